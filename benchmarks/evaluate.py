"""Evaluation throughput and peak memory on a large forecast store, against a plain numpy pass.

    .venv/bin/python benchmarks/evaluate.py --gb 0.5 --members 50 --leads 16 --grid 128x128 [--dir /tmp/x]

Writes a data store (series x time x Y x X, two fields) and a complete forecast store of about `--gb`
gigabytes straight with zarr (the real forecast_store schema, filled block by block without a model),
then runs, each in a subprocess:

- `dyf evaluate` (every score, both references, rank histograms);
- a plain numpy pass (`--numpy-pass`): the same store read block by block the same way (xarray without
  Dask), CRPS (members sorted last with np.sort), ensemble-mean MSE and spread per lead, nothing else;

and prints their wall times side by side (the issue's target: dyf <= 1.5x the numpy pass), GB/s (the
forecast's float32 bytes over the wall time and over the scoring loop alone) and each child's peak RSS
(psutil polling). A forecast store larger than RAM evaluates as long as the peak RSS stays flat as --gb
grows.
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


def peak_rss_of(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peak / 2**20


def run_json(command: list[str]) -> tuple[dict, float, float]:
    """(its JSON stdout, wall seconds, peak RSS MiB) of a child process; SystemExit when it fails."""
    start = time.perf_counter()
    proc, peak_mb = peak_rss_of(command)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), wall, peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=0.5, help="forecast store size (uncompressed float32)")
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--leads", type=int, default=16)
    parser.add_argument("--grid", default="128x128")
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
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
    try:
        start = time.perf_counter()
        store = make_data_store(folder / "truth.zarr", args.series, inits + args.leads + 1, ny, nx)
        make_forecast_store(folder / "forecast.zarr", store, inits, args.members, args.leads)
        on_disk = sum(f.stat().st_size for f in (folder / "forecast.zarr").rglob("*") if f.is_file())
        print(f"forecast store: {args.series} series x {inits} inits x {args.members} members x {args.leads} leads x "
              f"2 fields x {ny}x{nx} = {args.series * inits * block_bytes / 1e9:.2f} GB float32 "
              f"({on_disk / 1e9:.2f} GB on disk), written in {time.perf_counter() - start:.0f} s")
        forecast, store = folder / "forecast.zarr", folder / "truth.zarr"
        dyf = [sys.executable, "-m", "dyfcli", "--json", "evaluate", str(forecast)]
        plain = [sys.executable, str(Path(__file__).resolve()), "--numpy-pass", str(forecast), str(store)]
        (summary, dyf_wall, dyf_peak), (reference, plain_wall, plain_peak) = run_json(dyf), run_json(plain)
        throughput = summary["throughput"]
        gb, plain_gb = throughput["bytes_read"] / 1e9, reference["bytes_read"] / 1e9
        print(f"dyf evaluate: {dyf_wall:6.1f} s wall ({gb / dyf_wall:.3f} GB/s), scoring loop "
              f"{throughput['seconds']:.1f} s ({throughput['gb_per_s']:.3f} GB/s), peak RSS {dyf_peak:.0f} MiB; "
              f"{summary['blocks']} blocks of {block_bytes / 1e6:.0f} MB")
        print(f"numpy pass:   {plain_wall:6.1f} s wall ({plain_gb / plain_wall:.3f} GB/s), "
              f"loop {reference['seconds']:.1f} s ({plain_gb / reference['seconds']:.3f} GB/s), "
              f"peak RSS {plain_peak:.0f} MiB")
        print(f"ratio dyf / numpy: {dyf_wall / plain_wall:.2f}x wall, "
              f"{throughput['seconds'] / reference['seconds']:.2f}x loop (target <= 1.5x); weights "
              f"{summary.get('weights', 'none')}; cores: {len(os.sched_getaffinity(0))}; "
              f"load average {os.getloadavg()[0]:.1f}")
        for name in ("crps", "mse", "spread"):
            ours = summary["scores"]["u"][name]["mean"]
            print(f"u {name} mean over leads: dyf {ours:.6f}, numpy {reference['scores']['u'][name]:.6f}")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
