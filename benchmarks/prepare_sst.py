"""Peak memory and speed of `dyf prepare sst` on a synthetic global OISST archive (PSL layout).

Writes yearly files `sst.day.mean.YYYY.nc` (720x1440 float32, land = missing_value, chunks of one day,
zlib level 1 like NetCDF-4 downloads) holding `max(--days)` consecutive days from 2001-01-01 into a
temporary folder, then

(a) runs `dyf prepare sst` as a subprocess on the first N days for each N in `--days` and polls the
    resident memory of its process tree (psutil), to show that the peak does not grow with N;
(b) runs a plain xarray version of the same job in a subprocess on `--naive-days` days and the same
    boxes: `xr.open_mfdataset` (default chunks), crop to 60°S-60°N, `groupby("time.dayofyear")` mean and
    std over the training days in float64 (what DYffusion's preprocessing script does), then cut the
    boxes from data and statistics and `to_zarr`. It is compared with `dyf prepare sst` on the same days.

    .venv/bin/python benchmarks/prepare_sst.py                 # 365,730,1460 days; naive on 730
    .venv/bin/python benchmarks/prepare_sst.py --quick         # 60,120 days; naive on 120
    .venv/bin/python benchmarks/prepare_sst.py --days 365,730 --naive-days 365 --workdir /big/disk
    .venv/bin/python benchmarks/prepare_sst.py --workers 1    # dyf reading in one process

The machine may be shared: the load average is printed next to every figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BOXES = "84-89,108-112"
PSL_MISSING = np.float32(-9.96921e36)
LAT = -89.875 + 0.25 * np.arange(720)
LON = 0.125 + 0.25 * np.arange(1440)


def splits_for(days: int) -> list[str]:
    """Train on all but the last ~10 % of days, then validation and test halves of the rest."""
    first = np.datetime64("2001-01-01")
    tail = max(2, days // 10)
    train_end = first + np.timedelta64(days - tail - 1, "D")
    val_end = train_end + np.timedelta64(tail // 2, "D")
    last = first + np.timedelta64(days - 1, "D")
    return ["--train-until", str(train_end),
            "--val", f"{train_end + np.timedelta64(1, 'D')}:{val_end}",
            "--test", f"{val_end + np.timedelta64(1, 'D')}:{last}"]


# ----------------------------------------------------------------------------------------------- archive

def write_archive(folder: Path, days: int, seed: int = 0) -> list[Path]:
    """Yearly PSL files holding `days` days from 2001-01-01; returns the files in order."""
    import netCDF4

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    la, lo = np.meshgrid(LAT, LON, indexing="ij")
    climate = (28 * np.cos(np.radians(la)) - 2 + 0.5 * np.sin(np.radians(3 * lo))).astype(np.float32)
    # rough continents east of 270°E and between 20°E and 150°E; the paper's Pacific boxes stay ocean
    land = (((lo > 275) & (lo < 325) & (np.abs(la) < 55)) | ((lo > 20) & (lo < 150) & (la > 5) & (la < 70))
            | (np.abs(la) > 80))
    anomalies = rng.normal(0, 0.5, size=(8, 720, 1440)).astype(np.float32)
    dates = np.datetime64("2001-01-01") + np.arange(days).astype("timedelta64[D]")
    years = dates.astype("datetime64[Y]").astype(int) + 1970
    files = []
    for year in np.unique(years):
        year_dates = dates[years == year]
        path = folder / f"sst.day.mean.{year}.nc"
        with netCDF4.Dataset(path, "w", format="NETCDF4") as dataset:
            dataset.createDimension("time", None)
            dataset.createDimension("lat", 720)
            dataset.createDimension("lon", 1440)
            dataset.createVariable("lat", "f4", ("lat",))[:] = LAT
            dataset.createVariable("lon", "f4", ("lon",))[:] = LON
            time_var = dataset.createVariable("time", "f8", ("time",))
            time_var.units = "days since 1800-01-01 00:00:00"
            time_var[:] = (year_dates - np.datetime64("1800-01-01")).astype(float)
            sst = dataset.createVariable("sst", "f4", ("time", "lat", "lon"), zlib=True, complevel=1,
                                         shuffle=True, chunksizes=(1, 720, 1440))
            sst.missing_value, sst.units = PSL_MISSING, "degC"
            sst.set_auto_maskandscale(False)
            for t, date in enumerate(year_dates):
                day = int((date - np.datetime64("2001-01-01")).astype(int))
                field = climate + 2 * np.sin(2 * np.pi * day / 365.25) + anomalies[day % 8] * (1 + 0.1 * (day % 5))
                field = np.round(field, 2)
                field[land] = PSL_MISSING
                sst[t] = field
        files.append(path)
    return files


def reuse_archive(folder: Path, days: int) -> list[Path] | None:
    """The files of an archive written by an earlier run with `--workdir`, if it holds exactly `days` days."""
    import netCDF4

    files = sorted(folder.glob("sst.day.mean.*.nc"))
    if not files:
        return None
    total = 0
    for path in files:
        with netCDF4.Dataset(path) as dataset:
            total += dataset.dimensions["time"].size
    return files if total == days else None


def subset(folder: Path, files: list[Path], days: int) -> Path:
    """A folder with the first `days` days: links to whole years, a truncated copy of the last one."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    import netCDF4

    remaining = days
    for path in files:
        with netCDF4.Dataset(path) as dataset:
            size = dataset.dimensions["time"].size
        if remaining >= size:
            os.symlink(path, folder / path.name)
            remaining -= size
        elif remaining > 0:
            with netCDF4.Dataset(path) as source, netCDF4.Dataset(folder / path.name, "w") as target:
                for name in ("time", "lat", "lon"):
                    target.createDimension(name, None if name == "time" else source.dimensions[name].size)
                for name, variable in source.variables.items():
                    extra = {"zlib": True, "complevel": 1, "shuffle": True, "chunksizes": (1, 720, 1440)} \
                        if name == "sst" else {}
                    fill = variable.getncattr("_FillValue") if "_FillValue" in variable.ncattrs() else None
                    copy = target.createVariable(name, variable.dtype, variable.dimensions, fill_value=fill, **extra)
                    copy.setncatts({k: variable.getncattr(k) for k in variable.ncattrs() if k != "_FillValue"})
                    variable.set_auto_maskandscale(False)
                    copy.set_auto_maskandscale(False)
                    copy[:] = variable[:remaining] if "time" in variable.dimensions else variable[:]
            remaining = 0
    return folder


# ----------------------------------------------------------------------------------------------- measuring

def run_measured(command: list[str], timeout: float) -> dict:
    """Run `command`, polling the resident memory and CPU time of its process tree every 50 ms.

    CPU time is the larger of getrusage(RUSAGE_CHILDREN), which counts the command and the descendants it
    reaped, and the sum over every process seen in the tree of its last polled user+system time, which also
    counts processes nobody reaps before the command exits (the `forkserver` readers of dyf prepare sst).
    """
    import resource

    import psutil

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak = 0
    tree_cpu: dict[int, float] = {}
    timed_out = False
    while proc.poll() is None:
        try:
            tree = [parent] + parent.children(recursive=True)
        except psutil.Error:
            tree = []
        rss = 0
        for member in tree:
            try:
                with member.oneshot():
                    rss += member.memory_info().rss
                    times = member.cpu_times()
                    tree_cpu[member.pid] = max(tree_cpu.get(member.pid, 0.0), times.user + times.system)
            except psutil.Error:
                pass
        peak = max(peak, rss)
        if time.monotonic() - started > timeout:
            proc.kill()
            timed_out = True
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    cpu = max(cpu, sum(tree_cpu.values()))
    return {"seconds": time.monotonic() - started, "cpu_seconds": cpu, "peak_rss_gb": peak / 1e9,
            "returncode": proc.returncode,
            "timed_out": timed_out, "stderr_tail": stderr.strip().splitlines()[-3:], "load": os.getloadavg()[0]}


def dyf_command(raw: Path, out: Path, days: int, workers: int | None) -> list[str]:
    dyf = Path(sys.executable).with_name("dyf")
    extra = [] if workers is None else ["--workers", str(workers)]
    return [str(dyf), "prepare", "sst", str(raw), "--out", str(out), "--boxes", BOXES, "--overwrite",
            *splits_for(days), *extra]


def naive_job(raw: Path, out: Path, train_end: str) -> None:
    """The plain xarray version (run in a subprocess through `--naive-job`)."""
    import xarray as xr

    from dyfcli.sources.oisst import box_global_rows_cols, parse_boxes

    ds = xr.open_mfdataset(sorted(raw.glob("sst.day.mean.*.nc")), combine="by_coords")
    sst = ds["sst"].sel(lat=slice(-60, 60))
    training = sst.sel(time=slice(None, train_end)).astype("float64").groupby("time.dayofyear")
    mean, std = training.mean().astype("float32"), training.std().astype("float32")
    band_first_row = int(np.searchsorted(ds["lat"].values, -60))
    boxes = []
    for box in parse_boxes(BOXES):
        rows, cols = box_global_rows_cols(box)
        pick = {"lat": slice(rows[0] - band_first_row, rows[-1] - band_first_row + 1),
                "lon": slice(cols[0], cols[-1] + 1)}
        boxes.append(xr.Dataset({"sst": sst.isel(pick).drop_vars(["lat", "lon"]).rename(lat="y", lon="x"),
                                 "mean": mean.isel(pick).drop_vars(["lat", "lon"]).rename(lat="y", lon="x"),
                                 "std": std.isel(pick).drop_vars(["lat", "lon"]).rename(lat="y", lon="x")}))
    xr.concat(boxes, dim="series").to_zarr(out, mode="w")


# ----------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", default="365,730,1460", help="archive lengths for the memory run")
    parser.add_argument("--naive-days", type=int, default=730, help="archive length for the speed comparison")
    parser.add_argument("--quick", action="store_true", help="--days 60,120 --naive-days 120")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--naive-timeout", type=float, default=1800)
    parser.add_argument("--workers", type=int, default=None, help="dyf prepare sst --workers (default: its own)")
    parser.add_argument("--naive-job", nargs=3, metavar=("RAW", "OUT", "TRAIN_END"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_job:
        naive_job(Path(args.naive_job[0]), Path(args.naive_job[1]), args.naive_job[2])
        return
    if args.quick:
        args.days, args.naive_days = "60,120", 120
    lengths = sorted({int(d) for d in args.days.split(",")} | {args.naive_days})
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dyf-bench-sst-"))
    try:
        started = time.monotonic()
        files = reuse_archive(work / "archive", max(lengths)) or write_archive(work / "archive", max(lengths))
        print(f"archive: {max(lengths)} days, 720x1440 float32 in {len(files)} yearly files, "
              f"{sum(f.stat().st_size for f in files) / 1e9:.2f} GB, written in {time.monotonic() - started:.0f} s",
              flush=True)
        print(f"{'job':<8}{'days':>6}{'seconds':>10}{'CPU s':>9}{'peak RSS GB':>13}{'load':>7}  exit", flush=True)
        results = {}
        for days in lengths:
            raw = subset(work / f"raw-{days}", files, days)
            result = run_measured(dyf_command(raw, work / f"dyf-{days}.zarr", days, args.workers), timeout=3600)
            results[("dyf", days)] = result
            _print_row("dyf", days, result)
        raw = work / f"raw-{args.naive_days}"
        train_end = splits_for(args.naive_days)[1]
        command = [sys.executable, __file__, "--naive-job", str(raw), str(work / "naive.zarr"), train_end]
        naive = run_measured(command, timeout=args.naive_timeout)
        _print_row("naive", args.naive_days, naive)
        ours = results[("dyf", args.naive_days)]
        bound = ">" if naive["timed_out"] else ""
        print(f"speed-up of dyf prepare sst over the naive version on {args.naive_days} days: "
              f"{bound}{naive['seconds'] / ours['seconds']:.1f}x wall clock, "
              f"{bound}{naive['cpu_seconds'] / ours['cpu_seconds']:.1f}x CPU time; peak RSS {ours['peak_rss_gb']:.2f} GB vs "
              f"{bound}{naive['peak_rss_gb']:.2f} GB")
        peaks = [results[("dyf", d)]["peak_rss_gb"] for d in lengths]
        print(f"dyf peak RSS over {lengths} days: {', '.join(f'{p:.2f}' for p in peaks)} GB "
              f"(limit 2 GB: {'ok' if max(peaks) < 2 else 'EXCEEDED'})")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _print_row(job: str, days: int, result: dict) -> None:
    status = "timeout" if result["timed_out"] else str(result["returncode"])
    print(f"{job:<8}{days:>6}{result['seconds']:>10.1f}{result['cpu_seconds']:>9.1f}{result['peak_rss_gb']:>13.2f}"
          f"{result['load']:>7.1f}  {status}",
          flush=True)
    if result["returncode"] not in (0, None) and not result["timed_out"]:
        print("   " + "\n   ".join(result["stderr_tail"]), flush=True)


if __name__ == "__main__":
    main()
