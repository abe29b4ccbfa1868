"""Evaluation throughput and peak memory on a large forecast store, against a plain numpy pass.

    .venv/bin/python benchmarks/evaluate.py --gb 0.5 --members 50 --leads 16 --grid 128x128 [--dir /tmp/x]
        [--reuse] [--repeat 3] [--baseline /tmp/dyf-head] [--breakdown] [--device cpu]

Writes a data store (series x time x Y x X, two fields) and a complete forecast store of about `--gb`
gigabytes straight with zarr (the real forecast_store schema, filled block by block without a model),
then runs, each in a subprocess:

- `dyf evaluate` (every score, both references, rank histograms);
- a plain numpy pass (`--numpy-pass`): the same store read block by block the same way (xarray without
  Dask), CRPS (members sorted last with np.sort), ensemble-mean MSE and spread per lead, nothing else;

and prints their wall times side by side (the issue's target: dyf <= 1.5x the numpy pass), GB/s (the
forecast's float32 bytes over the wall time and over the scoring loop alone), each child's CPU time (user +
sys: GB per CPU-second, and CPU / wall in the loop = the cores its threads kept busy) and peak RSS (psutil
polling). A forecast store larger than RAM evaluates as long as the peak RSS stays flat as --gb grows. On a
shared machine GB/s drift with the load: compare runs made side by side in one invocation.

- `--repeat N`: N rounds, each child in turn, then the median ratios;
- `--baseline DIR`: also run the `dyf` of another source tree (e.g. `git archive HEAD dyfcli | tar -x -C
  DIR`) in each round, for before/after ratios measured side by side;
- `--breakdown`: where one run's time goes, measured in this process: imports, opening the stores, and per
  block reading the forecast (dyf's chunk-file read vs zarr), the truth, the kernel, the sums, the references;
- `--reuse`: keep the stores of an earlier run in --dir (same arguments) instead of writing them again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_data_store(path: Path, series: int, steps: int, ny: int, nx: int):
    import xarray as xr

    from dyfcli.store import provenance_attrs, write_store

    rng = np.random.default_rng(0)
    coords = {"series": np.arange(series), "time": np.arange(steps) * 1.0, "y": np.arange(ny), "x": np.arange(nx)}
    ds = xr.Dataset(coords=coords)
    mask = np.ones((series, ny, nx), dtype=bool)
    mask[:, : ny // 5, : nx // 5] = False
    for name in ("u", "v"):
        values = rng.standard_normal((series, steps, ny, nx)).astype(np.float32)
        values[:, :, ~mask[0]] = np.nan
        ds[name] = (("series", "time", "y", "x"), values, {"units": "m s-1"})
        ds[f"stats_mean_{name}"] = ((), np.float32(0))
        ds[f"stats_std_{name}"] = ((), np.float32(1))
    ds["mask"] = (("series", "y", "x"), mask)
    ds.attrs.update(provenance_attrs("benchmark", {}))
    ds.attrs.update({"dyf_fields": ["u", "v"], "dyf_splits": {"test": {"series": list(range(series))}},
                     "dyf_normalization": "global", "dyf_time_step": 1.0})
    return write_store(ds, path, overwrite=True)


def make_forecast_store(path: Path, store: Path, inits: int, members: int, leads: int):
    import xarray as xr

    from dyfcli import forecast_store

    truth = xr.open_zarr(store, chunks=None)
    times = truth["time"].values
    lead = np.arange(1, leads + 1)
    init_index = np.arange(inits)
    layout = forecast_store.ForecastLayout(
        fields=["u", "v"], field_attrs={"u": {"units": "m s-1"}, "v": {"units": "m s-1"}},
        series=truth["series"].values, init_time=times[init_index], members=members, lead=lead.astype(float),
        lead_time=lead * 1.0, valid_time=times[init_index[:, None] + lead[None]], mask=truth["mask"],
        identity={}, attrs={"dyf_truth": str(store)})
    forecast_store.create(path, layout)
    writer = forecast_store.BlockWriter(path)
    rng = np.random.default_rng(1)
    ny, nx = truth.sizes["y"], truth.sizes["x"]
    noise = rng.standard_normal((members, leads, 2, ny, nx)).astype(np.float32)
    for s in range(truth.sizes["series"]):
        target = np.stack([truth[f].values[s] for f in ("u", "v")], axis=1)  # (T, C, Y, X)
        for i in range(inits):
            writer.write(s, i, target[None, i + 1: i + 1 + leads] + np.roll(noise, i, axis=0))
    forecast_store.mark_complete(path)


def numpy_pass(forecast: Path, store: Path) -> dict:
    """The plain numpy reference: per lead CRPS (properscoring's), ensemble-mean MSE and spread (ddof 0)
    over the valid points, for every field; the loop's seconds and bytes read."""
    import xarray as xr

    fc, truth = xr.open_zarr(forecast, chunks=None), xr.open_zarr(store, chunks=None)
    fields = list(fc.attrs["dyf_fields"])
    mask = truth["mask"].values.astype(bool)
    position = {t: i for i, t in enumerate(truth["time"].values.tolist())}
    valid_index = np.array([[position[t] for t in row] for row in fc["valid_time"].values.tolist()])
    members, leads = fc.sizes["member"], fc.sizes["lead"]
    weights = (2 * np.arange(1, members + 1) - members - 1).astype(np.float32)
    sums = {f: {name: np.zeros(leads) for name in ("crps", "se", "var", "n")} for f in fields}
    n_bytes, start = 0, time.perf_counter()
    for field in fields:
        for s in range(fc.sizes["series"]):
            valid = mask[s]
            for i in range(fc.sizes["init"]):
                ens = fc[field][s, i].values  # (M, L, Y, X)
                target = truth[field][s, valid_index[i]].values  # (L, Y, X)
                n_bytes += ens.nbytes
                error = np.moveaxis(ens[..., valid] - target[None, :, valid], 0, -1)  # (L, P, M)
                ordered = np.sort(error, axis=-1)
                crps = np.abs(error).mean(-1) - (ordered @ weights) / members ** 2
                totals = sums[field]
                totals["crps"] += crps.sum(-1, dtype=np.float64)
                totals["se"] += np.square(error.mean(-1)).sum(-1, dtype=np.float64)
                totals["var"] += error.var(-1).sum(-1, dtype=np.float64)
                totals["n"] += valid.sum()
    seconds = time.perf_counter() - start
    scores = {f: {"crps": float(np.mean(t["crps"] / t["n"])), "mse": float(np.mean(t["se"] / t["n"])),
                  "spread": float(np.mean(np.sqrt(t["var"] / t["n"])))} for f, t in sums.items()}
    return {"seconds": seconds, "bytes_read": n_bytes, "scores": scores}


def peak_rss_of(command: list[str], env: dict | None = None,
                cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """(the finished process, its peak RSS in MiB, its CPU seconds: user + sys of all its threads)."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=cwd)
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peak / 2**20, cpu


def run_json(command: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """A child's JSON stdout with its `wall` seconds, `peak_mb` and `cpu` seconds; SystemExit when it fails."""
    start = time.perf_counter()
    proc, peak_mb, cpu = peak_rss_of(command, env, cwd)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout), "wall": wall, "peak_mb": peak_mb, "cpu": cpu}


def dyf_line(name: str, run: dict, block_mb: float) -> str:
    loop = run["throughput"]
    gb = loop["bytes_read"] / 1e9
    loop_cpu = loop.get("cpu_seconds")  # older dyf: not reported
    overlap = f", CPU {loop_cpu:.1f} s = {loop_cpu / loop['seconds']:.2f} cores" if loop_cpu is not None else ""
    return (f"{name}: {run['wall']:6.1f} s wall ({gb / run['wall']:.3f} GB/s), CPU {run['cpu']:.1f} s "
            f"({gb / run['cpu']:.3f} GB per CPU-s); scoring loop {loop['seconds']:.1f} s ({loop['gb_per_s']:.3f} "
            f"GB/s{overlap}); peak RSS {run['peak_mb']:.0f} MiB; {run['blocks']} blocks of {block_mb:.0f} MB")


def numpy_line(run: dict) -> str:
    gb = run["bytes_read"] / 1e9
    return (f"numpy pass:   {run['wall']:6.1f} s wall ({gb / run['wall']:.3f} GB/s), CPU {run['cpu']:.1f} s "
            f"({gb / run['cpu']:.3f} GB per CPU-s); loop {run['seconds']:.1f} s ({gb / run['seconds']:.3f} GB/s); "
            f"peak RSS {run['peak_mb']:.0f} MiB")


def breakdown(forecast: Path, store: Path, repeat: int = 3) -> None:
    """Print where the time of one `dyf evaluate` goes, each stage timed on its own in this process (best of
    `repeat`, per block of one field): start-up, then the scoring loop's stages. CPU time (of all this
    process's threads: zarr decodes in its own) drifts less with the load of a shared machine than wall time."""
    import importlib

    def best(work, times: int = repeat) -> tuple[float, float]:
        """(CPU seconds, wall seconds), the best of `times`."""
        cpu, wall = [], []
        for _ in range(times):
            begin, begin_cpu = time.perf_counter(), time.process_time()
            work()
            cpu.append(time.process_time() - begin_cpu)
            wall.append(time.perf_counter() - begin)
        return min(cpu), min(wall)

    print(f"breakdown (best of {repeat}, one thread, per block of one field unless said):")
    imports = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); import torch; "
                              "u = time.perf_counter(); import xarray, zarr, dask.array; "
                              "print(u - t, time.perf_counter() - u)"], capture_output=True, text=True, check=True)
    torch_s, xarray_s = (float(v) for v in imports.stdout.split())
    print(f"  start-up: import torch {torch_s:.2f} s, xarray + zarr + dask {xarray_s:.2f} s (fresh processes)")
    evaluate = importlib.import_module("dyfcli.evaluate")
    metrics = importlib.import_module("dyfcli.metrics")
    begin = time.perf_counter()
    inputs = evaluate.open_inputs(forecast, store)
    options = evaluate.resolve_options(inputs, evaluate.ScoreOptions())
    print(f"  start-up: open and check both stores {time.perf_counter() - begin:.2f} s")
    field = inputs.fields[0]
    files = inputs.block_files[field]
    direct = best(lambda: files.read(0, 0))
    through_zarr = best(lambda: np.asarray(inputs.forecast[field][0, 0].values, dtype=np.float32))
    block = evaluate.read_block(inputs, field, 0, 0)
    times = inputs.time_index[0, inputs.leads]
    truth = best(lambda: (inputs.truth[field][0, times].values, inputs.truth[field][0, 0].values))
    members, leads = block.ensemble.shape[:2]
    parts = evaluate.lead_slices(members, leads, block.mask.size)
    mask = block.mask[None] & np.isfinite(block.truth)

    def kernel():
        return [metrics.point_values(block.ensemble[:, part], block.truth[part]) for part in parts]

    values = kernel()
    sums = best(lambda: [metrics.slice_sums(v, block.truth[part].shape, mask[part], members)
                         for v, part in zip(values, parts)])
    references = best(lambda: [metrics.slice_sums(metrics.point_values(reference[:, part], block.truth[part]),
                                                  block.truth[part].shape, mask[part], 1)
                               for part in parts for reference in (block.persistence, block.climatology)])
    whole = best(lambda: evaluate._scored_block(inputs, field, 0, 0, False))
    mb = block.ensemble.nbytes / 1e6
    stages = [("read the forecast block (chunk file: read, crc32c, zstd)", direct),
              ("  the same through xarray/zarr, for comparison", through_zarr),
              ("read the truth and the initial state (xarray)", truth), ("kernel: point values", best(kernel)),
              ("sums: masked float64 totals, rank histogram", sums),
              ("references: persistence, climatology", references),
              ("the whole block (_scored_block)", whole)]
    for name, (cpu, wall) in stages:
        print(f"  {name:58s} {cpu * 1e3:6.1f} ms CPU = {mb / 1e3 / cpu:5.2f} GB per CPU-s ({wall * 1e3:6.1f} ms wall)")
    results, _, stats = evaluate.score(inputs, options=options)
    out = Path(tempfile.mkdtemp(prefix="dyf-bench-scores-")) / "scores.csv"
    begin = time.perf_counter()
    evaluate.write_scores(evaluate.scores_dataset(results, inputs, {}, options), out)
    print(f"  after the loop: scores dataset + CSV {time.perf_counter() - begin:.2f} s; the loop itself "
          f"{stats['seconds']:.1f} s for {stats['bytes_read'] / 1e9:.2f} GB with {evaluate.SCORE_WORKERS} workers")
    shutil.rmtree(out.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=0.5, help="forecast store size (uncompressed float32)")
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--leads", type=int, default=16)
    parser.add_argument("--grid", default="128x128")
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--reuse", action="store_true", help="reuse the stores already in --dir")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of runs side by side")
    parser.add_argument("--baseline", type=Path, default=None, help="a dyf source tree to run side by side")
    parser.add_argument("--breakdown", action="store_true", help="also time the stages of one run here")
    parser.add_argument("--device", default="auto", help="dyf evaluate --device")
    parser.add_argument("--numpy-pass", nargs=2, type=Path, metavar=("FORECAST", "STORE"),
                        help="internal: run only the plain numpy pass on these stores, print JSON")
    args = parser.parse_args()
    if args.numpy_pass:
        print(json.dumps(numpy_pass(*args.numpy_pass)))
        return
    ny, nx = (int(v) for v in args.grid.split("x"))
    block_bytes = args.members * args.leads * 2 * ny * nx * 4
    inits = max(1, round(args.gb * 1e9 / block_bytes / args.series))
    folder = args.dir or Path(tempfile.mkdtemp(prefix="dyf-bench-evaluate-"))
    folder.mkdir(parents=True, exist_ok=True)
    forecast, store = folder / "forecast.zarr", folder / "truth.zarr"
    try:
        start = time.perf_counter()
        if not (args.reuse and (forecast / "zarr.json").exists() and store.exists()):
            make_data_store(store, args.series, inits + args.leads + 1, ny, nx)
            make_forecast_store(forecast, store, inits, args.members, args.leads)
        on_disk = sum(f.stat().st_size for f in forecast.rglob("*") if f.is_file())
        print(f"forecast store: {args.series} series x {inits} inits x {args.members} members x {args.leads} leads x "
              f"2 fields x {ny}x{nx} = {args.series * inits * block_bytes / 1e9:.2f} GB float32 "
              f"({on_disk / 1e9:.2f} GB on disk), ready in {time.perf_counter() - start:.0f} s")
        if args.breakdown:
            breakdown(forecast, store)
        dyf = [sys.executable, "-m", "dyfcli", "--json", "evaluate", str(forecast), "--device", args.device]
        plain = [sys.executable, str(Path(__file__).resolve()), "--numpy-pass", str(forecast), str(store)]
        before_env = None if args.baseline is None else {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
        if before_env is not None:  # run from the baseline's folder: `python -m` puts the working folder first
            which = subprocess.run([sys.executable, "-c", "import dyfcli; print(dyfcli.__file__)"], env=before_env,
                                   cwd=args.baseline, capture_output=True, text=True, check=True).stdout.strip()
            print(f"before: the dyf of {which}")
        ratios = {"wall": [], "loop": [], "after / before wall": [], "after / before loop": []}
        for round_number in range(1, args.repeat + 1):
            if args.repeat > 1:
                print(f"round {round_number}, load average {os.getloadavg()[0]:.1f}:")
            summary, reference = run_json(dyf), run_json(plain)
            print(dyf_line("dyf evaluate", summary, block_bytes / 1e6))
            print(numpy_line(reference))
            ratios["wall"].append(summary["wall"] / reference["wall"])
            ratios["loop"].append(summary["throughput"]["seconds"] / reference["seconds"])
            if before_env is not None:
                before = run_json(dyf, before_env, cwd=args.baseline)
                print(dyf_line(f"before ({args.baseline})", before, block_bytes / 1e6))
                ratios["after / before wall"].append(summary["wall"] / before["wall"])
                ratios["after / before loop"].append(summary["throughput"]["seconds"] / before["throughput"]["seconds"])
        median = {name: float(np.median(values)) for name, values in ratios.items() if values}
        print(f"ratio dyf / numpy: {median['wall']:.2f}x wall, {median['loop']:.2f}x loop (target <= 1.5x)"
              + (f"; dyf after / before: {median['after / before wall']:.2f}x wall, "
                 f"{median['after / before loop']:.2f}x loop" if before_env is not None else "")
              + (f" (medians of {args.repeat} rounds)" if args.repeat > 1 else "")
              + f"; weights {summary.get('weights', 'none')}; cores: {len(os.sched_getaffinity(0))}; "
              f"load average {os.getloadavg()[0]:.1f}")
        for name in ("crps", "mse", "spread"):
            ours = summary["scores"]["u"][name]["mean"]
            print(f"u {name} mean over leads: dyf {ours:.6f}, numpy {reference['scores']['u'][name]:.6f}")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
