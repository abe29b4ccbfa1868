"""Peak memory and speed of `dyf prepare netcdf` on a synthetic WeatherBench-like archive.

Writes per-variable folders of yearly files, as WeatherBench (5.625°) keeps them, into a temporary folder:
`2m_temperature/2m_temperature_<year>_5.625deg.nc` (t2m), `10m_u_component_of_wind` (u10),
`10m_v_component_of_wind` (v10), and the pressure-level variables `geopotential` (z), `temperature` (t),
`u_component_of_wind` (u) on a `level` dimension (500, 850, 1000 hPa); 6-hourly, 32 x 64 global grid,
latitude north to south, float32. Then, for each N in `--years`, it runs as subprocesses, polling the
resident memory of each process tree:

(a) `dyf prepare netcdf` on the first N years of the 8 fields t2m, u10, v10, z@500, z@850, t@500, t@850,
    u@500 (the last year the test split, the one before it validation);
(b) the naive job on the same files and fields: `xr.open_mfdataset(...)` per folder, `xr.merge`, the
    levels picked with `.sel`, `.to_zarr(...)` (no statistics, no checks): in yearly chunks (`naive`, a
    floor for any xarray pipeline) and in the chunks of a dyf store, which training reads window by
    window (`naive-8`);
(c) the floors of any job that writes a dyf store from these files: reading the 8 fields from the files
    with netCDF4 and nothing else (`read`); writing the store's chunk files of 8 steps, raw values and
    their CRC-32C in zarr's nested layout, with nothing read (`write`); importing the libraries dyf reads
    and writes with (`imports`). Each is a separate process, like the jobs.

    .venv/bin/python benchmarks/prepare_netcdf.py                    # 3 and 10 years
    .venv/bin/python benchmarks/prepare_netcdf.py --years 3,10,20    # more years
    .venv/bin/python benchmarks/prepare_netcdf.py --years 3 --single-files   # without multi-file merge

`--single-files` writes one file holding every variable per year (for a dyf without the per-variable
merge or `@LEVEL` syntax: levels then come as separate variables `z500`, ...). The machine may be shared:
the load average is printed next to every figure, and the speed ratios are given in CPU seconds too.
For each length the last lines give the ratios and the verdict on issue 9's targets: dyf >= 5x the naive
job's speed (wall clock, yearly chunks) and peak RSS <= 2 GB, and the floors next to the time the target
would leave dyf.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_sst import run_measured  # noqa: E402 - the same process-tree RSS poller

SURFACE = {"2m_temperature": ("t2m", 280.0, 15.0), "10m_u_component_of_wind": ("u10", 0.0, 5.0),
           "10m_v_component_of_wind": ("v10", 0.0, 5.0)}
LEVELS = {"geopotential": ("z", 50000.0, 3000.0), "temperature": ("t", 260.0, 15.0),
          "u_component_of_wind": ("u", 5.0, 10.0)}
LEVEL_VALUES = [500, 850, 1000]
UNITS = {"t2m": "K", "u10": "m s**-1", "v10": "m s**-1", "z": "m**2 s**-2", "t": "K", "u": "m s**-1"}
FIELDS = ["t2m", "u10", "v10", "z@500", "z@850", "t@500", "t@850", "u@500"]
GRID = (32, 64)
FIRST_YEAR = 1979
STORE_CHUNK = 8  # time steps per chunk of a dyf store of this grid (netcdf.store_time_chunk)
SPEED_TARGET = 5.0  # issue 9 item 8: dyf >= 5x the naive job's speed...
RSS_TARGET_GB = 2.0  # ...with a peak RSS <= 2 GB whatever the number of years


# ----------------------------------------------------------------------------------------------- archive

def _coords(year: int) -> dict:
    times = np.arange(np.datetime64(f"{year}-01-01T00"), np.datetime64(f"{year + 1}-01-01T00"),
                      np.timedelta64(6, "h"))
    lat = np.linspace(87.1875, -87.1875, GRID[0])  # 5.625° centres, north to south as WeatherBench
    return {"time": times, "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", np.arange(GRID[1]) * 5.625, {"units": "degrees_east", "standard_name": "longitude"})}


def _values(rng, steps: int, base: float, spread: float, levels: int | None = None,
            start: int = 0, smooth: bool = False) -> np.ndarray:
    """Random values; `smooth`: weather-like ones instead, zonal waves travelling eastward across the
    0°/360° seam (wavenumbers 2 and 3, one lap in 10 and 4 days) plus a diurnal cycle and 10 % noise,
    so that a map of a forecast shows structure (scripts/global_map.sh)."""
    shape = (steps, *GRID) if levels is None else (steps, levels, *GRID)
    noise = rng.standard_normal(shape, dtype=np.float32)
    if not smooth:
        return (base + spread * noise).astype(np.float32)
    days = (start + np.arange(steps)) / 4.0  # 6-hourly steps
    lat = np.deg2rad(_coords(FIRST_YEAR)["lat"][1])[None, :, None]
    lon = np.deg2rad(np.arange(GRID[1]) * 5.625)[None, None, :]
    t = days[:, None, None]
    wave = (np.cos(lat) * np.sin(2 * (lon - 2 * np.pi * t / 10)) + 0.5 * np.cos(lat) ** 2 * np.sin(3 * (lon - 2 * np.pi * t / 4))
            + 0.3 * np.sin(2 * np.pi * t) * np.cos(lon) + np.sin(lat))
    if levels is not None:
        wave = wave[:, None]
    return (base + spread * (wave + 0.1 * noise)).astype(np.float32)


def write_archive(root: Path, years: int, single_files: bool, smooth: bool = False) -> list[str]:
    """The archive of `years` years (`smooth`: travelling waves instead of noise, see `_values`); returns
    the path globs to give `dyf prepare netcdf`."""
    import xarray as xr

    rng = np.random.default_rng(0)
    start = 0
    for year in range(FIRST_YEAR, FIRST_YEAR + years):
        coords = _coords(year)
        steps = len(coords["time"])
        variables = {}
        for folder, (name, base, spread) in SURFACE.items():
            variables[(folder, name)] = xr.DataArray(_values(rng, steps, base, spread, None, start, smooth),
                                                     dims=("time", "lat", "lon"), attrs={"units": UNITS[name]})
        for folder, (name, base, spread) in LEVELS.items():
            variables[(folder, name)] = xr.DataArray(
                _values(rng, steps, base, spread, len(LEVEL_VALUES), start, smooth),
                dims=("time", "level", "lat", "lon"), attrs={"units": UNITS[name]})
        start += steps
        if single_files:
            flat = {}
            for (_, name), da in variables.items():
                if "level" in da.dims:
                    flat.update({f"{name}{lev}": da.isel(level=i) for i, lev in enumerate(LEVEL_VALUES)})
                else:
                    flat[name] = da
            (root / "all").mkdir(parents=True, exist_ok=True)
            xr.Dataset(flat, coords=coords).to_netcdf(root / "all" / f"all_{year}_5.625deg.nc")
            continue
        for (folder, name), da in variables.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            ds = xr.Dataset({name: da}, coords=coords)
            if "level" in da.dims:
                ds = ds.assign_coords(level=("level", LEVEL_VALUES, {"units": "hPa", "long_name": "pressure_level"}))
            ds.to_netcdf(root / folder / f"{folder}_{year}_5.625deg.nc")
    folders = ["all"] if single_files else [*SURFACE, *LEVELS]
    return [str(root / folder / "*.nc") for folder in folders]


def subset(root: Path, years: int, single_files: bool) -> list[str]:
    """Globs matching only the first `years` years (symlinks in a folder per length)."""
    target = root / f"first{years}"
    folders = ["all"] if single_files else [*SURFACE, *LEVELS]
    for folder in folders:
        (target / folder).mkdir(parents=True, exist_ok=True)
        for year in range(FIRST_YEAR, FIRST_YEAR + years):
            for path in (root / "archive" / folder).glob(f"*_{year}_*.nc"):
                link = target / folder / path.name
                if not link.exists():
                    link.symlink_to(path)
    return [str(target / folder / "*.nc") for folder in folders]


# ----------------------------------------------------------------------------------------------- jobs

def fields_for(single_files: bool) -> list[str]:
    return [name.replace("@", "") for name in FIELDS] if single_files else FIELDS


def dyf_command(globs: list[str], out: Path, years: int, single_files: bool) -> list[str]:
    dyf = Path(sys.executable).with_name("dyf")
    last = FIRST_YEAR + years - 1
    return [str(dyf), "prepare", "netcdf", *globs, "--var", ",".join(fields_for(single_files)), "--out", str(out),
            "--overwrite", "--train-until", str(last - 2), "--val", str(last - 1), "--test", str(last)]


def naive_job(out: str, single_files: bool, globs: list[str], time_chunk: int) -> None:
    """`xr.open_mfdataset(...).to_zarr(...)` of the same fields in chunks of `time_chunk` steps (run in a
    subprocess via `--naive-job`)."""
    import xarray as xr

    # one open_mfdataset per variable folder (time concatenation), merged: what WeatherBench users write
    ds = xr.merge([xr.open_mfdataset(pattern, combine="by_coords") for pattern in globs], join="exact")
    picked = {}
    for name in fields_for(single_files):
        variable, _, level = name.partition("@")
        picked[name.replace("@", "")] = ds[variable].sel(level=int(level), drop=True) if level else ds[variable]
    xr.Dataset(picked).chunk({"time": time_chunk}).to_zarr(out, mode="w")  # zarr needs uniform chunks (leap years)


def floor_job(kind: str, single_files: bool, out: str, globs: list[str]) -> None:
    """One floor (run in a subprocess via `--floor-job`): `imports`, `read` (every field's values with
    netCDF4, decoded, nothing written) or `write` (the chunk files of a dyf store of the same fields and
    steps under `out`, values not read: zeros)."""
    import glob
    import importlib
    import os

    if kind == "imports":
        for module in ("dask.array", "netCDF4", "xarray", "zarr"):
            importlib.import_module(module)
        return
    import netCDF4

    def contents(path: str) -> tuple[set[str], int]:
        """A file's variables and its number of time steps."""
        with netCDF4.Dataset(path) as ds:
            return set(ds.variables), ds.dimensions["time"].size

    files = [sorted(glob.glob(pattern)) for pattern in globs]
    steps = sum(contents(path)[1] for path in files[0])
    if kind == "read":
        for name in fields_for(single_files):
            variable, _, level = name.partition("@")
            for path in next(group for group in files if variable in contents(group[0])[0]):
                with netCDF4.Dataset(path) as ds:
                    levels = list(ds["level"][:]) if level else None
                    values = ds[variable][:, levels.index(int(level))] if level else ds[variable][:]
                    np.asarray(values, dtype=np.float32)
        return
    import google_crc32c

    raw = np.zeros((STORE_CHUNK, *GRID), dtype="<f4").tobytes()
    checksum = google_crc32c.value(raw).to_bytes(4, "little")
    for name in fields_for(single_files):
        for chunk in range(-(-steps // STORE_CHUNK)):
            folder = os.path.join(out, name.replace("@", ""), "c", "0", str(chunk), "0")
            os.makedirs(folder)
            with open(os.path.join(folder, "0"), "wb") as handle:
                handle.write(raw + checksum)


def floor_line(years: int, ours: dict, naive: dict, floors: dict) -> str:
    """What a dyf at SPEED_TARGET x the naive job would have, next to the floors measured."""
    budget = naive["seconds"] / SPEED_TARGET
    parts = ", ".join(f"{kind} {result['seconds']:.1f} s (CPU {result['cpu_seconds']:.1f} s)"
                      for kind, result in floors.items())
    return (f"  {years} years: at {SPEED_TARGET:g}x the naive job dyf would take {budget:.1f} s; floors, each "
            f"alone: {parts}; dyf took {ours['seconds']:.1f} s (CPU {ours['cpu_seconds']:.1f} s)")


def verdict(years: int, ours: dict, naive: dict, naive_small: dict) -> str:
    """The targets of issue 9 item 8 for one archive length: dyf >= SPEED_TARGET x the naive job's speed
    (wall clock, side by side; CPU seconds too, which a shared machine disturbs less) and peak RSS <=
    RSS_TARGET_GB."""
    if ours["returncode"] != 0:
        return f"  {years} years: dyf FAILED, no verdict"
    wall, cpu = naive["seconds"] / ours["seconds"], naive["cpu_seconds"] / ours["cpu_seconds"]
    wall_small = naive_small["seconds"] / ours["seconds"]
    speed = "met" if wall >= SPEED_TARGET else "NOT met"
    memory = "met" if ours["peak_rss_gb"] <= RSS_TARGET_GB else "NOT met"
    return (f"  {years} years: dyf {wall:.2f}x the naive job's speed (yearly chunks; CPU {cpu:.2f}x), "
            f"{wall_small:.2f}x the naive job writing the store's chunks of {STORE_CHUNK} steps; naive computes "
            f"no statistics and checks nothing\n"
            f"  target speed >= {SPEED_TARGET:g}x the naive job: {speed} ({wall:.2f}x); "
            f"target peak RSS <= {RSS_TARGET_GB:g} GB: {memory} ({ours['peak_rss_gb']:.2f} GB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--years", default="3,10", help="archive lengths to prepare, comma-separated (>= 3)")
    parser.add_argument("--single-files", action="store_true", help="one file of all variables per year")
    parser.add_argument("--workdir", default=None, help="where to write the archive (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--naive-job", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--naive-chunk", type=int, default=1460, help=argparse.SUPPRESS)
    parser.add_argument("--floor-job", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_job:
        naive_job(args.naive_job[0], args.single_files, args.naive_job[1:], args.naive_chunk)
        return
    if args.floor_job:
        floor_job(args.floor_job[0], args.single_files, args.floor_job[1], args.floor_job[2:])
        return
    lengths = sorted({int(y) for y in args.years.split(",")})
    if lengths[0] < 3:
        parser.error("--years: every length needs at least 3 years (train, val, test)")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dyf-bench-netcdf-"))
    try:
        write_archive(root / "archive", lengths[-1], args.single_files)
        print(f"archive: {lengths[-1]} years, {len(FIELDS)} fields, 6-hourly, {GRID[0]}x{GRID[1]}, "
              f"{sum(p.stat().st_size for p in (root / 'archive').rglob('*.nc')) / 1e9:.2f} GB in {root}")
        print(f"{'job':<8}{'years':>6}{'wall s':>9}{'CPU s':>8}{'peak RSS GB':>13}{'load':>6}")
        for years in lengths:
            globs = subset(root, years, args.single_files)
            ours = run_measured(dyf_command(globs, root / f"dyf{years}.zarr", years, args.single_files), args.timeout)
            naive, naive_small = (
                run_measured([sys.executable, __file__, "--naive-job", str(root / f"naive{years}-{chunk}.zarr"), *globs,
                              "--naive-chunk", str(chunk), *(["--single-files"] if args.single_files else [])],
                             args.timeout) for chunk in (1460, STORE_CHUNK))
            floors = {kind: run_measured([sys.executable, __file__, "--floor-job", kind,
                                          str(root / f"floor{years}-{kind}"), *globs,
                                          *(["--single-files"] if args.single_files else [])], args.timeout)
                      for kind in ("read", "write", "imports")}
            for job, result in (("dyf", ours), ("naive", naive), (f"naive-{STORE_CHUNK}", naive_small),
                                *floors.items()):
                status = "" if result["returncode"] == 0 else f"  FAILED {result['stderr_tail']}"
                print(f"{job:<8}{years:>6}{result['seconds']:>9.1f}{result['cpu_seconds']:>8.1f}"
                      f"{result['peak_rss_gb']:>13.2f}{result['load']:>6.1f}{status}")
            print(verdict(years, ours, naive, naive_small))
            print(floor_line(years, ours, naive, floors))
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
