"""Evaluation throughput and peak memory on a large forecast store.

    .venv/bin/python benchmarks/evaluate.py --gb 3 --members 50 --leads 16 --grid 128x128 [--dir /tmp/x]

Writes a data store (series x time x Y x X, two fields) and a complete forecast store of about `--gb`
gigabytes straight with zarr (the real forecast_store schema, filled block by block without a model),
then runs `dyf evaluate` in a subprocess and reports GB/s and blocks/s (from its --json summary) and the
child's peak RSS (psutil polling; `ru_maxrss` of the child as a cross-check). A forecast store larger than
RAM evaluates as long as the peak RSS stays flat as --gb grows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=3.0, help="forecast store size (uncompressed float32)")
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--leads", type=int, default=16)
    parser.add_argument("--grid", default="128x128")
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
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
        command = [sys.executable, "-m", "dyfcli", "--json", "evaluate", str(folder / "forecast.zarr")]
        start = time.perf_counter()
        proc, peak_mb = peak_rss_of(command)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"dyf evaluate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads(proc.stdout)
        throughput = summary["throughput"]
        children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"evaluate: {throughput['bytes_read'] / 1e9:.2f} GB in {throughput['seconds']:.1f} s scoring "
              f"({wall:.1f} s wall incl. start-up): {throughput['gb_per_s']:.3f} GB/s, "
              f"{throughput['blocks_per_s']:.2f} blocks/s ({summary['blocks']} blocks of {block_bytes / 1e6:.0f} MB)")
        print(f"peak RSS of dyf evaluate: {peak_mb:.0f} MiB (polled), {children_max:.0f} MiB (ru_maxrss of children)")
        print(f"CRPS u mean over leads: {summary['scores']['u']['crps']['mean']:.4f}, "
              f"SSR {summary['scores']['u']['ssr']['mean']:.3f}; cores: {os.cpu_count()}")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
