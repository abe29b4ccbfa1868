"""Windows per second and memory of `WindowDataset` on an SST-sized store.

Builds a store shaped like the paper's SST data (11 series x 14,000 days x 60 x 60 float32, ~2.2 GB) in a
temporary folder, writing the Zarr arrays directly (fast), then reads random windows of 8 steps in one
process (= one DataLoader worker) and reports windows/second and the resident memory. A second, small
store (`--small-days`) shows that memory does not grow with the store.

    .venv/bin/python benchmarks/windows.py                     # full size, time chunk 1
    .venv/bin/python benchmarks/windows.py --days 2000 --time-chunk 8
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import xarray as xr
import zarr

from dyfcli import data
from dyfcli.data import WindowDataset
from dyfcli.store import encoding_for, provenance_attrs


def build_store(path: Path, series: int, days: int, grid: int, time_chunk: int, compress: bool = True) -> Path:
    """Metadata through xarray (no data), then the field written block by block with zarr."""
    import dask.array as da

    times = np.datetime64("1982-01-01") + np.arange(days).astype("timedelta64[D]")
    shape = (series, days, grid, grid)
    lazy = da.zeros(shape, dtype=np.float32, chunks=(1, time_chunk, grid, grid))
    ds = xr.Dataset(coords={"series": np.arange(series), "time": times, "y": np.arange(grid), "x": np.arange(grid)})
    ds["sst"] = (("series", "time", "y", "x"), lazy, {"units": "degC"})
    ds["mask"] = (("series", "y", "x"), np.ones((series, grid, grid), dtype=bool))
    ds["stats_mean_sst"] = (("series", "y", "x"), np.full((series, grid, grid), 20, np.float32))
    ds["stats_std_sst"] = (("series", "y", "x"), np.full((series, grid, grid), 2, np.float32))
    train_end = str(times[int(days * 0.8)])
    ds.attrs.update(provenance_attrs("benchmark", {}))
    ds.attrs.update({"dyf_fields": ["sst"], "dyf_normalization": "pixel", "dyf_time_step": "1D",
                     "dyf_splits": {"train": {"time": [None, train_end]}, "val": {"time": [None, None]}}})
    encoding = encoding_for(ds, time_chunk)
    if not compress:
        encoding["sst"]["compressors"] = None
    ds.to_zarr(path, mode="w", compute=False, encoding=encoding, consolidated=True)
    array = zarr.open_group(str(path), mode="r+")["sst"]
    rng = np.random.default_rng(0)
    block_days = max(time_chunk, (256 // time_chunk) * time_chunk)
    for s in range(series):
        for start in range(0, days, block_days):
            stop = min(days, start + block_days)
            array[s, start:stop] = rng.normal(20, 2, size=(stop - start, grid, grid)).astype(np.float32)
    return path


def measure(path: Path, length: int, reads: int, seed: int = 0) -> dict:
    dataset = WindowDataset(path, "train", length)
    order = np.random.default_rng(seed).integers(0, len(dataset), size=reads)
    dataset[0]  # open the arrays
    start, cpu_start = time.perf_counter(), time.process_time()
    for index in order:
        item = dataset[int(index)]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert item["dynamics"].shape[0] == length
    # CPU seconds as well as wall seconds: on a shared machine the wall clock mostly measures the neighbours.
    return {"windows": len(dataset), "windows_per_s": round(reads / elapsed),
            "windows_per_cpu_s": round(reads / cpu), "rss_mb": round(psutil.Process().memory_info().rss / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=11)
    parser.add_argument("--days", type=int, default=14_000)
    parser.add_argument("--small-days", type=int, default=400)
    parser.add_argument("--grid", type=int, default=60)
    parser.add_argument("--time-chunk", type=int, default=1)
    parser.add_argument("--length", type=int, default=8)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--reader", choices=("files", "zarr"), default="files",
                        help="files: dyf's direct chunk-file reads (default); zarr: zarr-python indexing")
    parser.add_argument("--no-compression", action="store_true", help="store the field uncompressed "
                        "(dyf stores use zarr's default Zstd)")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the stores (default: a temp dir)")
    args = parser.parse_args()
    if args.reader == "zarr":
        data.chunk_reader = lambda array: array  # what WindowDataset would do without its fast path
    root = Path(tempfile.mkdtemp(prefix="dyf-bench-", dir=args.dir))
    try:
        results = {}
        for label, days in (("small", args.small_days), ("big", args.days)):
            path = root / f"{label}.zarr"
            t0 = time.perf_counter()
            build_store(path, args.series, days, args.grid, args.time_chunk, compress=not args.no_compression)
            build_s = time.perf_counter() - t0
            gc.collect()
            results[label] = {"days": days, "build_s": round(build_s, 1), **measure(path, args.length, args.reads)}
            print(f"{label}: {json.dumps(results[label])}", flush=True)
        print(json.dumps({"reader": args.reader, "time_chunk": args.time_chunk, "compressed": not args.no_compression, "length": args.length, **results}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
