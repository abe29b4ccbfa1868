"""NOAA OISST v2.1 daily sea surface temperature -> a data store of the paper's 60x60 boxes.

Reads three layouts (docs/paper-notes.md §9.1):

* NOAA PSL yearly files `sst.day.mean.YYYY.nc` (older name `sst.day.mean.YYYY.v2.nc`): float32
  `sst(time, lat, lon)`, land = `missing_value` -9.96921e36, time in days since 1800-01-01;
* NCEI daily files `YYYYMM/oisst-avhrr-v02r01.YYYYMMDD[_preliminary].nc`: int16 packed (scale 0.01,
  `_FillValue` -999), dims `(time, zlev, lat, lon)`, time at 12:00 (floored to the date); a final file
  wins over a `_preliminary` one for the same day;
* DYffusion's already standardised boxes `sst.day.mean.box{N}.nc` / `sst.day.mean.60x60box{N}.standardized.nc`
  (standardised units, zeros on land): stored as they are with identity statistics.

Boxes follow the global tiling of DYffusion's preprocessing: 60x60 pixels (15° at 0.25°) between 60°S and
60°N, box id = row*24 + col with rows counted from lat -59.875 upwards and columns from lon 0.125
eastwards. Ids are computed from the coordinates, so a regional file yields the same ids as a global one.

The job streams: the store is written one time block (TIME_BLOCK days, one chunk per box) at a time, and
statistics are float64 sums per day of year accumulated box by box from the written store, so memory does
not grow with the number of years. Almost all the time goes into inflating the raw files (one zlib chunk
of the whole globe per day), and HDF5 cannot read in threads, so on one machine blocks are read by
`workers` processes (default: the available cores), each opening a file once per block, reading only the
rows and columns of the chosen boxes and returning just the cut boxes; this process writes them in time
order with at most TASKS_PER_WORKER blocks per process in flight; the per-box statistics then run in the
same processes. When h5py and deflate are installed, whole-day deflate chunks are inflated by libdeflate
(`ChunkSlicer`, about 2.5x faster than HDF5's zlib) with the same raw values. With a `distributed` cluster
(that sees the same file system) each block is one Dask task that reads and writes. Progress markers inside
the staging directory let an interrupted run, re-run with the same command, skip the blocks it already
wrote; SIGTERM or SIGUSR1 (a batch system's pre-emption) stop after the current block (or box's statistics)
with exit 75, as `prepare netcdf` (reading processes leave these signals to dyf). The output does not
depend on the number of workers or on the reading path. Reading processes watch the dyf process that
started them and exit when it ends, even by kill -9 (`exit_with_process`).

Statistics (`dyf_normalization = "pixel-dayofyear"`), over the training split only, ddof 0 as in xarray:
* a day of year with no training data at an ocean pixel (e.g. 366 when few leap years are in training)
  takes the statistics of the nearest day of year that has data (earlier day first on ties);
* the standard deviation is floored at `STD_FLOOR` (0.01 °C, the data's precision), so pixels that
  never vary (e.g. SST held at the freezing point under sea ice) do not divide by zero;
* land pixels (mask False) get mean 0 and std 1, so the statistics are finite everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import os
import re
import select
import shutil
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyfcli.attrs import for_writing
from dyfcli.cluster import connect_scheduler
from dyfcli.errors import DataError, UsageError
from dyfcli.runtime import fault_point, ignore_stop_signals, progress, stop_after_block, stop_signals
from dyfcli.splits import time_splits
from dyfcli import outputs
from dyfcli import store as data_store

log = logging.getLogger("dyf.oisst")

RESOLUTION = 0.25           # degrees; the only grid this source accepts
FIRST_LAT = -89.875         # pixel centre of the global grid's southernmost row
FIRST_LON = 0.125           # pixel centre of the global grid's first column
GLOBAL_COLUMNS = 1440
BOX_SIZE = 60               # pixels per box side (15°)
BOX_ROWS = 8                # 60°S..60°N
BOX_COLUMNS = 24
BAND_FIRST_ROW = 120        # global row of lat -59.875, the first row of box row 0
N_BOXES = BOX_ROWS * BOX_COLUMNS
MIN_OCEAN_FRACTION = 0.95   # `--boxes all` keeps boxes with at least this much ocean on the first day
STD_FLOOR = 0.01            # °C; OISST is stored to 0.01 °C
MISSING_ABOVE = 1e30        # |x| above this is missing even when a tool dropped `missing_value`
DAYS_OF_YEAR = 366
TIME_BLOCK = 32             # days per write block
STORE_TIME_CHUNK = 8        # days per Zarr chunk: a training window of 8 days touches one or two small chunks
DEFAULT_BOXES = "84-89,108-112"
FAST_CHUNKS = True          # read whole-day deflate chunks with h5py + libdeflate when installed
TASKS_PER_WORKER = 2        # blocks queued per reading process: bounds memory to a few blocks
PARENT_POLL_SECONDS = 0.5   # how often a reading process checks that dyf lives, where it cannot wait on it

LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "longitude")
PSL_NAME = re.compile(r"^sst\.day\.mean\.(\d{4})(\.v2)?\.nc$")
NCEI_NAME = re.compile(r"^oisst-avhrr-v02r01\.(\d{8})(_preliminary)?\.nc$")
BOX_NAME = re.compile(r"^sst\.day\.mean\.(?:box|60x60box)(\d+)(?:\.standardized)?\.nc$")
LAYOUT_NAMES = {
    "psl": "NOAA PSL yearly files sst.day.mean.YYYY.nc",
    "ncei": "NCEI daily files YYYYMM/oisst-avhrr-v02r01.YYYYMMDD.nc",
    "boxes": "DYffusion standardised box files sst.day.mean.box{N}.nc",
}

# The HDF5 library under netCDF4 is not thread-safe: every netCDF call holds this lock.
NETCDF_LOCK = threading.RLock()


# ----------------------------------------------------------------------------------------------- flags

def parse_boxes(text: str) -> list[int] | None:
    """`84-89,108-112` -> sorted ids; `all` -> None. Ids run 0..191."""
    if text.strip().lower() == "all":
        return None
    ids: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise UsageError(f"--boxes {text!r}: expected ids and ranges like 84-89,108-112, or 'all'")
        first, last = int(match[1]), int(match[2] or match[1])
        if first > last or last >= N_BOXES:
            raise UsageError(f"--boxes {text!r}: box ids run 0..{N_BOXES - 1} (row*24+col), ranges low-high")
        ids.update(range(first, last + 1))
    return sorted(ids)


def parse_years(text: str | None) -> tuple[int, int] | None:
    """`1982-2020` or `1982:2020` or `2019` -> inclusive (first, last); None -> every year found."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d{4})\s*(?:[-:]\s*(\d{4})\s*)?", text)
    if not match or int(match[2] or match[1]) < int(match[1]):
        raise UsageError(f"--years {text!r}: expected a year (2019) or a range FIRST-LAST (1982-2020)")
    return int(match[1]), int(match[2] or match[1])


def compress_ids(ids: list[int]) -> str:
    """[84, 85, 86, 108] -> '84-86,108'."""
    parts, ids = [], sorted(ids)
    start = prev = None
    for value in ids + [None]:
        if start is not None and value == prev + 1:
            prev = value
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = value
    return ",".join(parts)


def compress_dates(days: np.ndarray, limit: int = 12) -> list[str]:
    """Sorted datetime64[D] -> ['2001-03-04..2001-03-09', '2002-01-01'] (at most `limit` ranges)."""
    ranges: list[str] = []
    days = np.sort(np.asarray(days, dtype="datetime64[D]"))
    if not len(days):
        return ranges
    breaks = np.flatnonzero(np.diff(days) != np.timedelta64(1, "D")) + 1
    for run in np.split(days, breaks):
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}")
    if len(ranges) > limit:
        ranges = ranges[:limit] + [f"... ({len(ranges) - limit} more ranges)"]
    return ranges


# ----------------------------------------------------------------------------------------------- files

@contextmanager
def open_netcdf(path: str | Path):
    """Open a NetCDF file read-only; DataError when it is not one or has no `sst` variable."""
    import netCDF4

    with NETCDF_LOCK:
        try:
            dataset = netCDF4.Dataset(str(path), "r")
        except (OSError, RuntimeError, ValueError) as err:
            raise DataError(f"{path} is not a readable NetCDF file ({err}); remove it or download it again") from None
    try:
        if "sst" not in dataset.variables:
            raise DataError(f"{path} has no variable 'sst' (it has {', '.join(dataset.variables) or 'none'}); "
                            "give OISST files (sst.day.mean.YYYY.nc or oisst-avhrr-v02r01.YYYYMMDD.nc)")
        yield dataset
    finally:
        with NETCDF_LOCK:
            dataset.close()


def file_dates(dataset, path) -> np.ndarray:
    """The calendar dates (datetime64[D]) of a file's `time` axis; times within a day floor to it."""
    import cftime

    with NETCDF_LOCK:
        if "time" not in dataset.variables or not hasattr(dataset.variables["time"], "units"):
            raise DataError(f"{path} has no 'time' variable with units; give OISST daily files")
        variable = dataset.variables["time"]
        values = np.atleast_1d(np.asarray(variable[:], dtype=np.float64))
        units, calendar = variable.units, getattr(variable, "calendar", "standard")
    try:
        stamps = np.atleast_1d(cftime.num2date(values, units, calendar, only_use_cftime_datetimes=True))
    except ValueError as err:
        raise DataError(f"{path}: cannot decode time units {units!r} ({err}); give OISST daily files") from None
    return np.array([f"{s.year:04d}-{s.month:02d}-{s.day:02d}" for s in stamps], dtype="datetime64[D]")


def _dimension_role(name: str) -> str:
    lower = name.lower()
    if lower in LAT_NAMES:
        return "lat"
    if lower in LON_NAMES:
        return "lon"
    if lower == "time":
        return "time"
    return "other"


def check_sst_layout(dataset, path) -> None:
    """`sst` must have dims time, lat, lon and only length-1 others (NCEI's zlev)."""
    variable = dataset.variables["sst"]
    roles = [_dimension_role(d) for d in variable.dimensions]
    extra = [d for d, r in zip(variable.dimensions, roles) if r == "other" and dataset.dimensions[d].size != 1]
    if sorted(r for r in roles if r != "other") != ["lat", "lon", "time"] or extra:
        raise DataError(f"{path}: sst has dims {variable.dimensions}, expected (time, [zlev,] lat, lon)")


def read_sst(dataset, time_index: int, rows: slice, cols: slice) -> np.ndarray:
    """One day of `sst` in °C (float32, NaN where missing), shaped (rows, cols) of the file's lat/lon."""
    return SstSlicer(dataset, rows, cols).read(time_index)


class SstSlicer:
    """Reads the (rows, cols) region of `sst` one day at a time from an open dataset.

    The variable's layout and CF attributes are looked up once per file; each `read(day)` asks netCDF for
    the region only (raw values, no automatic masking) and decodes it by hand with `decode_sst`.
    """

    def __init__(self, dataset, rows: slice, cols: slice):
        with NETCDF_LOCK:
            self.variable = dataset.variables["sst"]
            self.variable.set_auto_maskandscale(False)
            self.attrs = {name: self.variable.getncattr(name) for name in self.variable.ncattrs()}
            self.dimensions = tuple(self.variable.dimensions)
            self.path = dataset.filepath()
            roles = [_dimension_role(dim) for dim in self.dimensions]
        self.key = [{"lat": rows, "lon": cols}.get(role, 0) for role in roles]
        self.time_axis = roles.index("time")
        self.transposed = [r for r in roles if r in ("lat", "lon")] == ["lon", "lat"]

    def read(self, time_index: int) -> np.ndarray:
        """(rows, cols) float32 °C, NaN where missing."""
        key = list(self.key)
        key[self.time_axis] = time_index
        with NETCDF_LOCK:
            raw = np.asarray(self.variable[tuple(key)])
        return decode_sst(raw.T if self.transposed else raw, self.attrs, f"{self.path}, time index {time_index}")


def chunk_reading_available() -> bool:
    """Whether the optional packages of `ChunkSlicer` (h5py, deflate) are installed."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("h5py", "deflate"))


class ChunkSlicer:
    """Reads the (rows, cols) region of `sst` one day at a time by inflating the day's stored chunk itself.

    For files (NetCDF-4 = HDF5) that store each day as one chunk compressed by deflate, after an optional
    byte shuffle, and nothing else (the PSL and NCEI downloads): the chunk's bytes are read with h5py,
    inflated with libdeflate (about 3x faster than the zlib inside HDF5) and un-shuffled for the region only.
    The raw values are the same as HDF5's, so `decode_sst` gives the same result. `open` returns None when
    h5py or deflate is not installed or the file is stored differently; a day whose chunk skipped a filter
    is read through netCDF (`fallback`).
    """

    DEFLATE, SHUFFLE = 1, 2   # HDF5 filter ids

    def __init__(self, h5file, variable, region: tuple[slice, slice], shuffled: bool, fallback: SstSlicer):
        self.h5file, self.variable, self.region, self.shuffled = h5file, variable, region, shuffled
        self.fallback, self.attrs, self.transposed = fallback, fallback.attrs, fallback.transposed
        self.roles = [_dimension_role(dim) for dim in fallback.dimensions]
        self.spatial_shape = tuple(size for size, role in zip(variable.shape, self.roles) if role in ("lat", "lon"))
        self.nbytes = int(np.prod(self.spatial_shape)) * variable.dtype.itemsize

    @classmethod
    def open(cls, path, fallback: SstSlicer, rows: slice, cols: slice) -> ChunkSlicer | None:
        try:
            import deflate  # noqa: F401
            import h5py
        except ImportError:
            return None
        try:
            h5file = h5py.File(path, "r")
        except OSError:
            return None
        try:
            variable = h5file["sst"]
            roles = [_dimension_role(dim) for dim in fallback.dimensions]
            whole_days = variable.chunks == tuple(size if role in ("lat", "lon") else 1
                                                  for size, role in zip(variable.shape, roles))
            plist = variable.id.get_create_plist()
            filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
            if whole_days and variable.dtype.kind in "iuf" and filters in ([cls.DEFLATE], [cls.SHUFFLE, cls.DEFLATE]):
                region = (cols, rows) if fallback.transposed else (rows, cols)
                return cls(h5file, variable, region, filters[0] == cls.SHUFFLE, fallback)
        except (KeyError, OSError, ValueError, TypeError):
            pass
        h5file.close()
        return None

    def close(self) -> None:
        self.h5file.close()

    def read(self, time_index: int) -> np.ndarray:
        """(rows, cols) float32 °C, NaN where missing; the same values as `SstSlicer.read`."""
        import deflate

        offset = tuple(time_index if role == "time" else 0 for role in self.roles)
        try:
            filter_mask, chunk = self.variable.id.read_direct_chunk(offset)
        except (OSError, ValueError, KeyError):   # a chunk never written holds the fill value
            return self.fallback.read(time_index)
        if filter_mask:
            return self.fallback.read(time_index)
        data = np.frombuffer(deflate.zlib_decompress(chunk, self.nbytes), dtype=np.uint8)
        if self.shuffled:  # byte k of every value is stored in plane k
            planes = data.reshape(self.variable.dtype.itemsize, *self.spatial_shape)[:, self.region[0], self.region[1]]
            raw = np.ascontiguousarray(np.moveaxis(planes, 0, -1)).view(self.variable.dtype)[..., 0]
        else:
            raw = data.view(self.variable.dtype).reshape(self.spatial_shape)[self.region]
        return decode_sst(raw.T if self.transposed else raw, self.attrs,
                          f"{self.fallback.path}, time index {time_index}")


def decode_sst(raw: np.ndarray, attrs: dict, where: str = "sst") -> np.ndarray:
    """Apply CF packing and missing values by hand (float32; NaN where missing).

    Missing: values equal to `_FillValue` or `missing_value` (compared in the stored type, before
    unpacking), and for floating-point data also NaN and |x| > 1e30 (PSL's -9.96921e36 even when a tool
    dropped `missing_value`). Unpacking: `raw * scale_factor + add_offset` in float32.
    An infinity that is not the declared fill value is damage, not land: a DataError naming `where`.
    """
    missing = [np.asarray(attrs[key]).ravel() for key in ("_FillValue", "missing_value") if key in attrs]
    invalid = np.isin(raw, np.concatenate(missing)) if missing else np.zeros(raw.shape, dtype=bool)
    values = raw.astype(np.float32)
    if not np.issubdtype(raw.dtype, np.integer):
        _refuse_infinite(values, invalid, where)
        invalid |= ~np.isfinite(values) | (np.abs(values) > MISSING_ABOVE)
    if "scale_factor" in attrs or "add_offset" in attrs:
        values = values * np.float32(attrs.get("scale_factor", 1.0)) + np.float32(attrs.get("add_offset", 0.0))
    values[invalid] = np.nan
    return values


def _refuse_infinite(values: np.ndarray, declared_missing: np.ndarray, where: str) -> None:
    infinite = np.isinf(values) & ~declared_missing
    if not infinite.any():
        return
    first, count = tuple(int(i) for i in np.argwhere(infinite)[0]), int(infinite.sum())
    raise DataError(f"{where}: sst holds {count} infinite value{'s' if count > 1 else ''} (±inf) that "
                    f"{'are' if count > 1 else 'is'} not its fill value, the first at index {first} of the "
                    "(lat, lon) region read; mark them missing (e.g. xarray: ds.where(np.isfinite(ds))) or "
                    "download the file again")


# ----------------------------------------------------------------------------------------------- discovery

@dataclass(frozen=True)
class DaySource:
    """Where one day lives: a file and the index along its time axis."""

    date: np.datetime64
    path: str
    index: int


@dataclass
class Archive:
    """The raw files of one layout, resolved to one source per day (sorted by date)."""

    root: Path
    layout: str                       # "psl" | "ncei" | "boxes"
    days: list[DaySource]
    box_files: dict[int, str]         # box id -> file, only for the "boxes" layout
    files: list[str]                  # every file used, for the input fingerprint


def discover(raw_dir: Path, years: tuple[int, int] | None) -> Archive:
    """Find the OISST files under `raw_dir` (recursively) and map every day to one file."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"RAW_DIR {raw_dir} is not an existing folder; give the folder holding the OISST files")
    found: dict[str, list[tuple[re.Match, Path]]] = {"psl": [], "ncei": [], "boxes": []}
    others = 0
    for folder, _, names in sorted(os.walk(raw_dir)):
        for name in sorted(names):
            for layout, pattern in (("psl", PSL_NAME), ("ncei", NCEI_NAME), ("boxes", BOX_NAME)):
                if match := pattern.match(name):
                    found[layout].append((match, Path(folder) / name))
                    break
            else:
                others += 1
    layouts = [layout for layout, items in found.items() if items]
    if not layouts:
        what = f"it holds {others} other file(s)" if others else "it is empty"
        raise DataError(f"no OISST files in {raw_dir} ({what}); expected " + "; or ".join(LAYOUT_NAMES.values()))
    if len(layouts) > 1:
        raise DataError(f"{raw_dir} mixes {' and '.join(LAYOUT_NAMES[x] for x in layouts)}; "
                        "keep one layout per folder and pass that folder")
    layout = layouts[0]
    reader = {"psl": _discover_psl, "ncei": _discover_ncei, "boxes": _discover_boxes}[layout]
    days, box_files = reader(found[layout], years)
    if not days:
        raise DataError(f"{raw_dir} holds no days in --years {years[0]}-{years[1]}; "
                        "choose years the files cover or leave --years out")
    files = sorted(({d.path for d in days} | set(box_files.values())) - {""})
    return Archive(raw_dir, layout, days, box_files, files)


def _in_years(year: int, years: tuple[int, int] | None) -> bool:
    return years is None or years[0] <= year <= years[1]


def _check_unique(days: list[DaySource]) -> list[DaySource]:
    days = sorted(days, key=lambda d: d.date)
    for a, b in zip(days, days[1:]):
        if a.date == b.date:
            raise DataError(f"day {a.date} is in both {a.path} and {b.path}; keep one of them")
    return days


def _discover_psl(items, years) -> tuple[list[DaySource], dict]:
    by_year: dict[int, Path] = {}
    for match, path in items:  # the v2.1 name wins over the older .v2.nc name of the same year
        year = int(match[1])
        if _in_years(year, years) and (year not in by_year or match[2] is None):
            by_year[year] = path
    days = []
    for year, path in sorted(by_year.items()):
        with open_netcdf(path) as dataset:
            check_sst_layout(dataset, path)
            dates = file_dates(dataset, path)
        days += [DaySource(date, str(path), index) for index, date in enumerate(dates)
                 if _in_years(date.astype(object).year, years)]
    return _check_unique(days), {}


def _discover_ncei(items, years) -> tuple[list[DaySource], dict]:
    by_date: dict[np.datetime64, tuple[bool, Path]] = {}
    for match, path in items:
        stamp = match[1]
        date = np.datetime64(f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:]}", "D")
        preliminary = match[2] is not None
        if _in_years(int(stamp[:4]), years) and (date not in by_date or by_date[date][0]):
            by_date[date] = (preliminary, path)  # a final file replaces a preliminary one
    return [DaySource(date, str(path), 0) for date, (_, path) in sorted(by_date.items())], {}


def _discover_boxes(items, years) -> tuple[list[DaySource], dict]:
    box_files: dict[int, str] = {}
    reference = None
    for match, path in items:
        box = int(match[1])
        if box in box_files:
            raise DataError(f"box {box} is in both {box_files[box]} and {path}; keep one of them")
        with open_netcdf(path) as dataset:
            check_sst_layout(dataset, path)
            dates = file_dates(dataset, path)
        if reference is not None and not np.array_equal(dates, reference[1]):
            raise DataError(f"{path} and {reference[0]} cover different days; give box files of one release")
        reference = (path, dates)
        box_files[box] = str(path)
    days = [DaySource(date, "", index) for index, date in enumerate(reference[1])
            if _in_years(date.astype(object).year, years)]
    return _check_unique(days), box_files


# ----------------------------------------------------------------------------------------------- boxes

@dataclass(frozen=True, eq=False)
class BoxCutter:
    """Where the selected boxes lie in a raw file's (lat, lon) grid.

    `grid` identifies the files' grid; `rows`/`cols` is the region read from each file; `box_rows` and `box_cols` (S, 60) index that region,
    ordered south to north and west to east, so `cut(region)` gives (S, 60, 60) boxes.
    """

    grid: tuple                  # grid_signature of the files
    rows: slice
    cols: slice
    box_rows: np.ndarray
    box_cols: np.ndarray

    def cut(self, region: np.ndarray) -> np.ndarray:
        return region[self.box_rows[:, :, None], self.box_cols[:, None, :]]


@dataclass(frozen=True, eq=False)
class Grid:
    """A file's lat/lon axes mapped onto the global 0.25° grid (index -1 where a cell is absent)."""

    lat: np.ndarray
    lon: np.ndarray
    row_index: np.ndarray   # (720,) global row -> file row, or -1
    col_index: np.ndarray   # (1440,) global column -> file column, or -1
    signature: tuple        # grid_signature of the file


def _global_indices(values: np.ndarray, first: float, name: str, path, period: int | None) -> np.ndarray:
    differences = np.diff(values)
    if period:  # longitudes may wrap (0..360 or -180..180 conventions)
        differences = (differences + 180.0) % 360.0 - 180.0
        values = np.mod(values, 360.0)
    steps = (values - first) / RESOLUTION
    # A regional file may skip cells (e.g. across the date line in -180..180), so the finest spacing counts.
    spacing = float(np.abs(differences).min()) if len(values) > 1 else float("nan")
    if not np.isclose(spacing, RESOLUTION) or not np.allclose(steps, np.round(steps), atol=1e-3):
        raise DataError(f"{path}: {name} spacing is {spacing:g}°, not the OISST 0.25° grid with centres at "
                        f"{first:+.3f}+0.25k; give 0.25° OISST files (or use `dyf prepare netcdf` for other grids)")
    indices = np.round(steps).astype(np.int64)
    return indices % period if period else indices


def read_grid(path) -> Grid:
    """Read and check a raw file's lat/lon axes (DataError unless 0.25° on the OISST grid)."""
    with open_netcdf(path) as dataset:
        check_sst_layout(dataset, path)
        with NETCDF_LOCK:
            lat_name = next((n for n in dataset.variables if n.lower() in LAT_NAMES), None)
            lon_name = next((n for n in dataset.variables if n.lower() in LON_NAMES), None)
            if lat_name is None or lon_name is None:
                raise DataError(f"{path} has no lat/lon coordinate variables; give OISST files")
            lat = np.asarray(dataset.variables[lat_name][:], dtype=np.float64)
            lon = np.asarray(dataset.variables[lon_name][:], dtype=np.float64)
        signature = grid_signature(dataset)
    rows = _global_indices(lat, FIRST_LAT, "latitude", path, None)
    cols = _global_indices(lon, FIRST_LON, "longitude", path, GLOBAL_COLUMNS)
    row_index = np.full(720, -1, dtype=np.int64)
    col_index = np.full(GLOBAL_COLUMNS, -1, dtype=np.int64)
    valid = (rows >= 0) & (rows < 720)
    row_index[rows[valid]] = np.flatnonzero(valid)
    col_index[cols] = np.arange(len(cols))
    return Grid(lat, lon, row_index, col_index, signature)


def box_global_rows_cols(box: int) -> tuple[np.ndarray, np.ndarray]:
    """Global (row, column) indices of a box's pixels, south to north and west to east."""
    row, col = divmod(box, BOX_COLUMNS)
    first_row = BAND_FIRST_ROW + row * BOX_SIZE
    return np.arange(first_row, first_row + BOX_SIZE), np.arange(col * BOX_SIZE, (col + 1) * BOX_SIZE)


def box_coordinates(box: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre latitudes and longitudes (0..360) of a box."""
    rows, cols = box_global_rows_cols(box)
    return FIRST_LAT + RESOLUTION * rows, FIRST_LON + RESOLUTION * cols


def available_boxes(grid: Grid) -> list[int]:
    """Ids of the boxes whose every pixel lies in the file's grid."""
    boxes = []
    for box in range(N_BOXES):
        rows, cols = box_global_rows_cols(box)
        if (grid.row_index[rows] >= 0).all() and (grid.col_index[cols] >= 0).all():
            boxes.append(box)
    return boxes


def select_boxes(requested: list[int] | None, available: list[int], where: str) -> list[int]:
    """The requested ids (None = all available); DataError naming what is available otherwise."""
    if not available:
        raise DataError(f"{where} covers no complete 15° box between 60°S and 60°N; give files that cover "
                        "at least one box of the global 0.25° tiling")
    if requested is None:
        return list(available)
    outside = [box for box in requested if box not in available]
    if outside:
        raise DataError(f"boxes {compress_ids(outside)} lie outside the data in {where}; "
                        f"available boxes: {compress_ids(available)} (choose --boxes among them)")
    return list(requested)


def make_cutter(grid: Grid, boxes: list[int]) -> BoxCutter:
    file_rows = np.stack([grid.row_index[box_global_rows_cols(b)[0]] for b in boxes])
    file_cols = np.stack([grid.col_index[box_global_rows_cols(b)[1]] for b in boxes])
    r0, r1 = int(file_rows.min()), int(file_rows.max()) + 1
    c0, c1 = int(file_cols.min()), int(file_cols.max()) + 1
    return BoxCutter(grid.signature, slice(r0, r1), slice(c0, c1), file_rows - r0, file_cols - c0)


# ----------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True, eq=False)
class Reader:
    """Everything a worker needs to turn raw files into (S, 60, 60) boxes for one day."""

    layout: str
    cutter: BoxCutter | None        # raw layouts
    box_files: tuple[str, ...]      # "boxes" layout, in series order
    mask: np.ndarray                # (S, 60, 60) bool, True on ocean

    def read_days(self, days: list[tuple[int, str, int]], length: int) -> np.ndarray:
        """Boxes for `length` days; `days` lists (position, path, index) of the days present."""
        block = np.full((len(self.mask), length, BOX_SIZE, BOX_SIZE), np.nan, dtype=np.float32)
        if self.layout == "boxes":
            self._read_box_files(days, block)
        else:
            self._read_raw_files(days, block)
        block[np.broadcast_to(~self.mask[:, None], block.shape)] = np.nan
        return block

    def _read_raw_files(self, days, block) -> None:
        by_file: dict[str, list[tuple[int, int]]] = {}
        for position, path, index in days:
            by_file.setdefault(path, []).append((position, index))
        for path, entries in by_file.items():
            with open_netcdf(path) as dataset:
                self._check_same_grid(dataset, path)
                if self.layout == "ncei":
                    self._check_ncei_date(dataset, path)
                slicer = SstSlicer(dataset, self.cutter.rows, self.cutter.cols)
                fast = ChunkSlicer.open(path, slicer, self.cutter.rows, self.cutter.cols) if FAST_CHUNKS else None
                try:
                    for position, index in entries:
                        block[:, position] = self.cutter.cut((fast or slicer).read(index))
                finally:
                    if fast is not None:
                        fast.close()

    def _check_same_grid(self, dataset, path) -> None:
        found = grid_signature(dataset)
        if found != self.cutter.grid:
            raise DataError(f"{path} has the grid (lat first, last, size; lon first, last, size) {found} but the "
                            f"first file has {self.cutter.grid}; give files of one grid")

    @staticmethod
    def _check_ncei_date(dataset, path) -> None:
        stamp = NCEI_NAME.match(Path(path).name)[1]
        expected = np.datetime64(f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:]}", "D")
        dates = file_dates(dataset, path)
        if len(dates) != 1 or dates[0] != expected:
            raise DataError(f"{path} holds {compress_dates(dates)} but its name says {expected}; "
                            "download the file again")

    def _read_box_files(self, days, block) -> None:
        for series, path in enumerate(self.box_files):
            with open_netcdf(path) as dataset:
                flip = _latitude_descending(dataset)
                slicer = SstSlicer(dataset, slice(None), slice(None))
                for position, _, index in days:
                    values = slicer.read(index)
                    block[series, position] = values[::-1] if flip else values


def grid_signature(dataset) -> tuple:
    """(lat first, last, size, lon first, last, size) of a file, to check that all files share a grid."""
    with NETCDF_LOCK:
        signature = []
        for names in (LAT_NAMES, LON_NAMES):
            name = next((n for n in dataset.variables if n.lower() in names), None)
            if name is None:
                raise DataError(f"{dataset.filepath()} has no {names[0]} coordinate variable; give OISST files")
            values = dataset.variables[name]
            signature += [round(float(values[0]), 4), round(float(values[-1]), 4), int(values.shape[0])]
    return tuple(signature)


def _latitude_descending(dataset) -> bool:
    with NETCDF_LOCK:
        name = next((n for n in dataset.variables if n.lower() in LAT_NAMES), None)
        lat = np.asarray(dataset.variables[name][:], dtype=np.float64) if name else np.arange(2.0)
    return len(lat) > 1 and lat[1] < lat[0]


# ----------------------------------------------------------------------------------------------- statistics

def day_of_year(times: np.ndarray) -> np.ndarray:
    """xarray's `time.dt.dayofyear` (1..366) for datetime64 values."""
    import pandas as pd

    return np.asarray(pd.DatetimeIndex(times).day_of_year, dtype=np.int64)


@dataclass
class DayOfYearSums:
    """Streaming float64 sums per day of year and pixel, shifted by a reference field for accuracy."""

    reference: np.ndarray   # (Y, X) float64, first finite value seen at each pixel
    count: np.ndarray       # (366, Y, X) int32
    total: np.ndarray       # (366, Y, X) float64, sum of (x - reference)
    squares: np.ndarray     # (366, Y, X) float64, sum of (x - reference)**2

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> DayOfYearSums:
        return cls(np.full(shape, np.nan), np.zeros((DAYS_OF_YEAR, *shape), np.int32),
                   np.zeros((DAYS_OF_YEAR, *shape)), np.zeros((DAYS_OF_YEAR, *shape)))

    def add(self, values: np.ndarray, days_of_year: np.ndarray) -> None:
        """Accumulate `values` (T, Y, X) observed on `days_of_year` (T,) in 1..366; NaN is skipped."""
        values = values.astype(np.float64)
        unset = np.isnan(self.reference)
        if unset.any():
            first = _first_finite(values)
            self.reference[unset] = first[unset]
        valid = np.isfinite(values)
        shifted = np.where(valid, values - np.nan_to_num(self.reference), 0.0)
        index = days_of_year - 1
        if len(np.unique(index)) == len(index):  # the usual case: a block shorter than a year
            self.count[index] += valid
            self.total[index] += shifted
            self.squares[index] += shifted * shifted
        else:
            np.add.at(self.count, index, valid.astype(np.int32))
            np.add.at(self.total, index, shifted)
            np.add.at(self.squares, index, shifted * shifted)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean and std (ddof 0) per day of year, NaN where there is no data; plus the counts."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_shift = self.total / self.count
            variance = np.maximum(self.squares / self.count - mean_shift**2, 0.0)
        return np.nan_to_num(self.reference) + mean_shift, np.sqrt(variance), self.count


def _first_finite(values: np.ndarray) -> np.ndarray:
    valid = np.isfinite(values)
    first = np.argmax(valid, axis=0)
    picked = np.take_along_axis(values, first[None], axis=0)[0]
    return np.where(valid.any(axis=0), picked, np.nan)


def finish_statistics(mean: np.ndarray, std: np.ndarray, count: np.ndarray, mask: np.ndarray):
    """Fill days of year without data from the nearest one, floor std, set land to 0/1.

    mean, std, count: (366, Y, X); mask (Y, X). Returns float32 mean, std, the filled days of year
    (those that had no data at some ocean pixel) and the number of floored ocean values.
    """
    have = count > 0
    observed = mask & have.any(axis=0)          # ocean pixels with at least one training value
    mean, std = mean.copy(), std.copy()
    filled_days = fill_from_nearest_day(mean, std, have, observed)
    floored = int((std[:, observed] < STD_FLOOR).sum())
    std = np.maximum(std, STD_FLOOR)
    mean[:, ~observed], std[:, ~observed] = 0.0, 1.0
    return mean.astype(np.float32), std.astype(np.float32), filled_days, floored


def fill_from_nearest_day(mean: np.ndarray, std: np.ndarray, have: np.ndarray, observed: np.ndarray) -> list[int]:
    """In place: where `have` (366, Y, X) is False at an `observed` pixel, copy the nearest day of year
    that has data (earlier day first on ties, wrapping round the year). Returns the days filled (1..366).

    Shared with `prepare netcdf`, whose pixel-dayofyear statistics follow the same rule."""
    filled_days = []
    for day in np.flatnonzero((~have[:, observed]).any(axis=1)):
        filled_days.append(int(day) + 1)
        pixels = observed & ~have[day]
        for distance in range(1, DAYS_OF_YEAR // 2 + 1):
            for source in ((day - distance) % DAYS_OF_YEAR, (day + distance) % DAYS_OF_YEAR):
                take = pixels & have[source]
                mean[day][take], std[day][take] = mean[source][take], std[source][take]
                pixels &= ~take
            if not pixels.any():
                break
    return filled_days


# ----------------------------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class BlockJob:
    """One time block of the store: `length` days from time index `start`; `days` lists the
    (position in block, path, index in file) of the days that have a file."""

    start: int
    length: int
    days: list[tuple[int, str, int]]
    marker: str


def read_block(reader: Reader, days: list[tuple[int, str, int]], length: int) -> np.ndarray:
    """(S, length, 60, 60) float32 boxes of one block; runs in a reading process."""
    return reader.read_days(days, length)


def write_block(staging: str, values: np.ndarray, start: int, marker: str) -> int:
    """Write boxes (S, T, 60, 60) at time index `start` of the staging store, then leave a marker."""
    import zarr

    array = zarr.open_array(store=staging, path="sst", mode="r+")
    array[:, start:start + values.shape[1]] = values
    Path(marker).touch()
    return values.shape[1]


def read_and_write_block(staging: str, reader: Reader, job: BlockJob) -> int:
    """Both steps in one task, for a Dask cluster whose workers see the files and the store."""
    return write_block(staging, read_block(reader, job.days, job.length), job.start, job.marker)


def write_box_statistics(staging: str, series: int, train_start: int, train_stop: int,
                         days_of_year: np.ndarray, mask: np.ndarray, block: int, marker: str) -> dict:
    """Day-of-year statistics of one box over the training time indices; write them; leave a marker."""
    import zarr

    array = zarr.open_array(store=staging, path="sst", mode="r")
    sums = DayOfYearSums.empty(mask.shape)
    for start in range(train_start, train_stop, block):
        stop = min(start + block, train_stop)
        sums.add(np.asarray(array[series, start:stop]), days_of_year[start - train_start:stop - train_start])
    mean, std, filled_days, floored = finish_statistics(*sums.mean_std(), mask)
    for name, values in (("stats_mean_sst", mean), ("stats_std_sst", std)):
        zarr.open_array(store=staging, path=name, mode="r+")[:, series] = values
    Path(marker).write_text(json.dumps({"filled_days": filled_days, "floored": floored}))
    return {"filled_days": filled_days, "floored": floored}


# ----------------------------------------------------------------------------------------------- scheduling

def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a batch job's allocation)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_workers(workers: int | None) -> int:
    """`--workers`: None -> available cores; below 1 is a UsageError."""
    if workers is None:
        return available_cores()
    if workers < 1:
        raise UsageError(f"--workers {workers}: give 1 or more reading processes (default: the "
                         f"{available_cores()} available cores)")
    return int(workers)


@contextmanager
def local_processes(workers: int):
    """A process pool of `workers` readers, started at once (so it boots while this process creates the
    store); None for one worker, when everything runs in this process. Unfinished work is cancelled on exit."""
    if workers <= 1:
        yield None
        return
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=_process_context(), initializer=start_reading_process,
                               initargs=(os.getpid(),))
    try:
        for _ in range(workers):  # each submit while no process is idle starts one more
            pool.submit(int)
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _process_context():
    """`forkserver` processes: forked from a clean server that has imported this module, never from this
    process (its zarr and progress-bar threads and its HDF5 state must not be forked)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["netCDF4", __name__] + (["h5py", "deflate"] if chunk_reading_available() else []))
    return context


def start_reading_process(pid: int) -> None:
    """Pool initializer: leave the stop signals to dyf, which stops after the current block (a batch system
    signals every process of the job; a reader killed by it would break the pool), and end with dyf."""
    ignore_stop_signals()
    exit_with_process(pid)


def exit_with_process(pid: int) -> None:
    """Pool initializer: end this reading process as soon as process `pid` (the dyf that made the pool) ends.

    Nothing else would: a forkserver worker's OS parent is the forkserver, and every worker holds the pipe
    ends that keep the forkserver and its siblings waiting, so after a kill -9 of dyf they all lived on,
    holding dyf's pipes. Once the workers exit, the forkserver and resource tracker see their pipes close."""
    threading.Thread(target=_exit_when_ended, args=(pid,), name="dyf-watch", daemon=True).start()


def _exit_when_ended(pid: int) -> None:
    """Block until process `pid` ends (a pidfd turns readable on exit, even while it is an unreaped zombie;
    elsewhere poll every PARENT_POLL_SECONDS), then leave at once: there is nobody to report to."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3)
        while _process_exists(pid):
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)
    select.select([handle], [], [])
    os._exit(1)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else (pid reused)
        return True
    return True


StopCheck = Callable[[int, int], None]  # stop_check(done, total): raises Interrupted once a stop signal came


def ordered_results(pool, function, calls: Iterable[tuple], in_flight: int) -> Iterator:
    """`function(*args)` for each `args` of `calls`, yielded in order. With a pool, at most `in_flight`
    calls are queued or running at once (bounding the memory their results take); without, one by one here."""
    calls = iter(calls)
    if pool is None:
        for args in calls:
            yield function(*args)
        return
    from concurrent.futures.process import BrokenProcessPool

    queue = deque(pool.submit(function, *args) for args in itertools.islice(calls, in_flight))
    while queue:
        try:
            result = queue.popleft().result()
        except BrokenProcessPool:
            raise UsageError("a reading process died (out of memory, or a Python script that runs prepare_sst "
                             "without an `if __name__ == '__main__':` guard); rerun the same command with fewer "
                             "--workers (finished blocks are kept)") from None
        for args in itertools.islice(calls, 1):
            queue.append(pool.submit(function, *args))
        yield result


def write_blocks_locally(staging: str, reader: Reader, jobs: list[BlockJob], pool, in_flight: int, bar,
                         stop_check: StopCheck = lambda done, total: None) -> None:
    """Read blocks in the pool's processes (HDF5 cannot read in threads) and write each here, in time order,
    so an interruption leaves finished blocks with their markers. At most `in_flight` blocks are pending.
    `stop_check(done, total)` after each block raises to stop there (`stop_after_block`)."""
    calls = ((reader, job.days, job.length) for job in jobs)
    for done, (job, values) in enumerate(zip(jobs, ordered_results(pool, read_block, calls, in_flight)), start=1):
        write_block(staging, values, job.start, job.marker)
        fault_point("sst.block_written")
        bar.advance(1)
        stop_check(done, len(jobs))


def run_tasks(tasks: list, client, description: str, unit: str,
              stop_check: StopCheck = lambda done, total: None) -> list:
    """Compute Dask delayed tasks on a `distributed` client, advancing a progress bar as each ends.

    `stop_check(done, total)` after each task raises to stop there: the tasks not yet started are cancelled (each
    task leaves its own marker, so those that end after it are not lost either)."""
    from distributed import as_completed

    if not tasks:
        return []
    with progress(description, len(tasks), unit) as bar:
        futures = client.compute(tasks)
        try:
            for done, future in enumerate(as_completed(futures, loop=client.loop), start=1):
                future.result()
                bar.advance(1)
                stop_check(done, len(futures))
        except BaseException:
            client.cancel(futures)
            raise
        return [future.result() for future in futures]


# ----------------------------------------------------------------------------------------------- planning

@dataclass
class Plan:
    """The resolved job: boxes, time axis, splits, and how to read them."""

    archive: Archive
    boxes: list[int]
    lat: np.ndarray            # (S, 60)
    lon: np.ndarray            # (S, 60)
    mask: np.ndarray           # (S, 60, 60)
    times: np.ndarray          # (T,) datetime64[D], every day from first to last
    missing_days: np.ndarray   # days in `times` without a file
    splits: dict
    train_range: tuple[int, int]
    reader: Reader
    time_block: int

    @property
    def standardized(self) -> bool:
        return self.archive.layout == "boxes"

    @property
    def n_blocks(self) -> int:
        """Write blocks of `time_block` days covering `times` (the last may be shorter)."""
        return -(-len(self.times) // self.time_block)


def plan_raw_boxes(archive: Archive, requested: list[int] | None) -> tuple[list[int], Reader, np.ndarray, np.ndarray]:
    """Boxes, reader and coordinates for PSL/NCEI files; `all` keeps boxes >= 95 % ocean on day one."""
    first = archive.days[0]
    grid = read_grid(first.path)
    boxes = select_boxes(requested, available_boxes(grid), str(archive.root))
    first_day = _first_day_boxes(first, make_cutter(grid, boxes))
    ocean = np.isfinite(first_day)
    fractions = ocean.mean(axis=(1, 2))
    if requested is None:
        keep = fractions >= MIN_OCEAN_FRACTION
        if not keep.any():
            raise DataError(f"no box in {archive.root} is at least {MIN_OCEAN_FRACTION:.0%} ocean; "
                            "name boxes with --boxes")
        boxes = [b for b, k in zip(boxes, keep) if k]
        ocean = ocean[keep]
    else:
        for box, fraction in zip(boxes, fractions):
            if fraction < MIN_OCEAN_FRACTION:
                log.warning("box %d is only %.0f%% ocean on %s", box, 100 * fraction, first.date)
    cutter = make_cutter(grid, boxes)
    coordinates = [box_coordinates(b) for b in boxes]
    lat = np.stack([c[0] for c in coordinates])
    lon = np.stack([c[1] for c in coordinates])
    return boxes, Reader(archive.layout, cutter, (), ocean), lat, lon


def _first_day_boxes(day: DaySource, cutter: BoxCutter) -> np.ndarray:
    with open_netcdf(day.path) as dataset:
        return cutter.cut(read_sst(dataset, day.index, cutter.rows, cutter.cols))


def plan_box_files(archive: Archive, requested: list[int] | None, time_block: int):
    """Boxes, reader and coordinates for DYffusion's standardised box files (zeros on land)."""
    boxes = select_boxes(requested, sorted(archive.box_files), str(archive.root))
    files = tuple(archive.box_files[b] for b in boxes)
    for box, path in zip(boxes, files):
        _check_box_file(box, path)
    probe = Reader("boxes", None, files, np.ones((len(boxes), BOX_SIZE, BOX_SIZE), dtype=bool))
    head = [(position, "", day.index) for position, day in enumerate(archive.days[:time_block])]
    values = probe.read_days(head, len(head))
    # Land was set to exactly 0 after standardising; ocean is 0.0 at no pixel on every one of these days.
    ocean = (np.nan_to_num(values) != 0).any(axis=1)
    coordinates = [box_coordinates(b) for b in boxes]
    return (boxes, Reader("boxes", None, files, ocean),
            np.stack([c[0] for c in coordinates]), np.stack([c[1] for c in coordinates]))


def _check_box_file(box: int, path: str) -> None:
    with open_netcdf(path) as dataset:
        with NETCDF_LOCK:
            sizes = {_dimension_role(d): dataset.dimensions[d].size for d in dataset.variables["sst"].dimensions}
            lat_name = next((n for n in dataset.variables if n.lower() in LAT_NAMES), None)
            lon_name = next((n for n in dataset.variables if n.lower() in LON_NAMES), None)
            lat = np.asarray(dataset.variables[lat_name][:], np.float64) if lat_name else None
            lon = np.asarray(dataset.variables[lon_name][:], np.float64) if lon_name else None
    if sizes.get("lat") != BOX_SIZE or sizes.get("lon") != BOX_SIZE:
        raise DataError(f"{path}: a box file must be 60x60, found lat={sizes.get('lat')} lon={sizes.get('lon')}")
    if lat is not None and lon is not None and np.ptp(lat) > BOX_SIZE:  # degrees, not 0..59 indices
        expected_lat, expected_lon = box_coordinates(box)
        if not (np.allclose(np.sort(lat), expected_lat) and np.allclose(np.sort(np.mod(lon, 360)), expected_lon)):
            raise DataError(f"{path}: its coordinates are not those of box {box}; check the file name")


def plan_job(raw_dir: Path, requested: list[int] | None, year_range: tuple[int, int] | None, splits: dict,
             allow_gaps: bool, time_block: int) -> Plan:
    """Resolve parsed flags and raw files into a Plan; every problem is a DataError."""
    archive = discover(raw_dir, year_range)
    if archive.layout == "boxes":
        chosen, reader, lat, lon = plan_box_files(archive, requested, time_block)
    else:
        chosen, reader, lat, lon = plan_raw_boxes(archive, requested)
    present = np.array([d.date for d in archive.days], dtype="datetime64[D]")
    times = np.arange(present[0], present[-1] + np.timedelta64(1, "D"), dtype="datetime64[D]")
    missing = np.setdiff1d(times, present)
    if year_range is not None:  # a partly covered first or last year (1981 starts in September) is fine
        present_years = set(present.astype("datetime64[Y]").astype(int) + 1970)
        absent_years = [y for y in range(year_range[0], year_range[1] + 1) if y not in present_years]
        if absent_years and not allow_gaps:
            raise DataError(f"--years asks for {compress_ids(absent_years)} but {raw_dir} has no files for "
                            "those years; download them, narrow --years, or pass --allow-gaps")
    if len(missing) and not allow_gaps:
        raise DataError(f"{len(missing)} day(s) are missing from {raw_dir}: {', '.join(compress_dates(missing))}; "
                        "download them or pass --allow-gaps (missing days are stored as NaN)")
    train_range = _check_splits(splits, times)
    return Plan(archive, chosen, lat, lon, reader.mask, times, missing, splits, train_range, reader, time_block)


def _check_splits(splits: dict, times: np.ndarray) -> tuple[int, int]:
    """Time-index range of the training split; DataError when a split holds no day of the data."""
    ranges = {}
    for name, rule in splits.items():
        first, last = rule["time"]
        start = 0 if first is None else int(np.searchsorted(times, np.datetime64(first, "D")))
        stop = len(times) if last is None else int(np.searchsorted(times, np.datetime64(last, "D"), side="right"))
        if stop <= start:
            raise DataError(f"the {name} split {first or '...'}..{last or '...'} holds no day of the data "
                            f"({times[0]}..{times[-1]}); choose --train-until/--val/--test within it")
        ranges[name] = (start, stop)
    return ranges["train"]


# ----------------------------------------------------------------------------------------------- store

def store_attrs(plan: Plan, recipe: dict) -> dict:
    archive = plan.archive
    if plan.standardized:
        source = (f"{LAYOUT_NAMES['boxes']} from {archive.root}: values are STANDARDIZED per pixel and day of "
                  "year by DYffusion's preprocessing (not °C); zeros on land became NaN; statistics are identity")
    else:
        source = (f"NOAA OISST v2.1 daily SST, {LAYOUT_NAMES[archive.layout]} from {archive.root}; "
                  "60x60 boxes of the global 0.25° tiling (id = row*24+col from 59.875°S, 0.125°E)")
    attrs = data_store.provenance_attrs(source, recipe)
    attrs.update({
        "dyf_fields": ["sst"],
        "dyf_splits": plan.splits,
        "dyf_normalization": "global" if plan.standardized else "pixel-dayofyear",
        "dyf_time_step": "1D",
        "dyf_missing_days": [str(d) for d in plan.missing_days],
        "dyf_values": "standardized" if plan.standardized else "physical",
    })
    return attrs


def template_dataset(plan: Plan, attrs: dict):
    """The store's full schema; fields and statistics are lazy placeholders written later by blocks."""
    import dask.array as da
    import xarray as xr

    n_series, n_times = len(plan.boxes), len(plan.times)
    coords = {
        "series": np.asarray(plan.boxes, dtype=np.int64),
        "time": plan.times.astype("datetime64[ns]"),
        "y": np.arange(BOX_SIZE), "x": np.arange(BOX_SIZE),
        "lat": (("series", "y"), plan.lat.astype(np.float32), {"units": "degrees_north", "standard_name": "latitude"}),
        "lon": (("series", "x"), plan.lon.astype(np.float32), {"units": "degrees_east", "standard_name": "longitude"}),
    }
    ds = xr.Dataset(coords=coords)
    field = da.full((n_series, n_times, BOX_SIZE, BOX_SIZE), np.nan, dtype=np.float32,
                    chunks=(1, store_time_chunk(plan), BOX_SIZE, BOX_SIZE))
    ds["sst"] = (data_store.FIELD_DIMS, field, _field_attrs(plan.standardized))
    ds["mask"] = (data_store.STATIC_DIMS, plan.mask, {"long_name": "ocean (True) / land (False)"})
    if plan.standardized:
        ds["stats_mean_sst"] = ((), np.float32(0.0), {"long_name": "identity: the values are already standardized"})
        ds["stats_std_sst"] = ((), np.float32(1.0), {"long_name": "identity: the values are already standardized"})
    else:
        ds = ds.assign_coords(dayofyear=np.arange(1, DAYS_OF_YEAR + 1))
        shape = (DAYS_OF_YEAR, n_series, BOX_SIZE, BOX_SIZE)
        for stat in ("mean", "std"):
            ds[f"stats_{stat}_sst"] = (data_store.STATS_DIMS["pixel-dayofyear"],
                                       da.zeros(shape, dtype=np.float32, chunks=(DAYS_OF_YEAR, 1, BOX_SIZE, BOX_SIZE)),
                                       _stats_attrs(stat))
    ds.attrs.update(attrs)
    return ds


def _field_attrs(standardized: bool) -> dict:
    if standardized:
        return {"units": "1", "long_name": "sea surface temperature standardized per pixel and day of year "
                "(DYffusion preprocessing), not degC"}
    return {"units": "degC", "standard_name": "sea_surface_temperature",
            "long_name": "daily sea surface temperature (NOAA OISST v2.1)"}


def _stats_attrs(stat: str) -> dict:
    return {"units": "degC", "long_name": f"training-split {stat} per pixel and day of year (xarray dayofyear); "
            f"days without training data take the nearest day's value; std floored at {STD_FLOOR} degC; "
            "land holds mean 0, std 1"}


def store_time_chunk(plan: Plan) -> int:
    """Chunks divide the write blocks, so writers of different blocks never share a chunk."""
    return math.gcd(plan.time_block, STORE_TIME_CHUNK)


def create_store(staging: Path, plan: Plan, attrs: dict) -> None:
    ds = template_dataset(plan, attrs)
    data_store.validate_dataset(ds)
    encoding = data_store.encoding_for(ds, store_time_chunk(plan))
    for name in ("stats_mean_sst", "stats_std_sst"):
        if ds[name].dims:
            encoding[name]["chunks"] = (DAYS_OF_YEAR, 1, BOX_SIZE, BOX_SIZE)  # keeps the checksum codec
    for_writing(ds).to_zarr(staging, mode="a", compute=False, encoding=encoding,
                            consolidated=False)  # "w" would drop the marker


def _fingerprint(plan: Plan, recipe: dict) -> str:
    """Identity of the job: options plus every input file's name, size and modification time."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    for path in plan.archive.files:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def prepare_staging(staging: Path, plan: Plan, recipe: dict, attrs: dict) -> tuple[Path, bool]:
    """Reuse a staging store of the same job (resume) or create a fresh one. Returns (progress dir, resumed)."""
    marks = staging / ".dyf-progress"
    fingerprint = _fingerprint(plan, recipe)
    job_file = marks / "job.json"
    if job_file.exists() and json.loads(job_file.read_text()).get("fingerprint") == fingerprint:
        return marks, True
    if staging.exists():
        log.info("discarding %s from an earlier, different or unfinished job", staging)
    outputs.new_staging(staging)  # removes only dyf's own staging folder
    create_store(staging, plan, attrs)
    marks.mkdir()
    job_file.write_text(json.dumps({"fingerprint": fingerprint}))
    return marks, False


# ----------------------------------------------------------------------------------------------- workflow

def _refuse_times_of_day(splits: dict) -> None:
    """OISST is daily: a split bound with a time of day would be cut to its day, a silent substitution."""
    for name, rule in splits.items():
        for bound in rule["time"]:
            if bound is not None and "T" in str(bound):
                raise UsageError(f"the {name} split bound {bound} has a time of day but OISST is daily; give a "
                                 "year, a month or a date")


def prepare_sst(raw_dir: Path, out: Path, *, boxes: str = DEFAULT_BOXES, years: str | None = None,
                train_until: str = "2018", val: str = "2019", test: str = "2020", allow_gaps: bool = False,
                scheduler: str | None = None, overwrite: bool = False, time_block: int = TIME_BLOCK,
                workers: int | None = None) -> dict:
    """`dyf prepare sst`: raw OISST files -> a data store of 60x60 boxes. Returns a summary dict.

    `workers`: reading processes on this machine (default: the available cores); ignored with a scheduler.
    They are started with `forkserver`, so a Python script calling this with workers > 1 needs the usual
    `if __name__ == "__main__":` guard.
    """
    started = time.monotonic()
    out = Path(out)
    requested, year_range = parse_boxes(boxes), parse_years(years)
    workers = check_workers(workers)
    splits = time_splits(train_until, val, test)
    _refuse_times_of_day(splits)
    with data_store.claim_output(out, overwrite, inputs=[raw_dir]):
        client = connect_scheduler(scheduler)
        try:
            plan = plan_job(Path(raw_dir), requested, year_range, splits, allow_gaps, time_block)
            recipe = {"raw_dir": str(Path(raw_dir).resolve()), "layout": plan.archive.layout, "boxes": plan.boxes,
                      "years": years, "train_until": train_until, "val": val, "test": test,
                      "allow_gaps": allow_gaps, "time_block": time_block}
            return _write_store(plan, recipe, out, client, workers, started)
        finally:
            if client is not None:
                client.close()


def _write_store(plan: Plan, recipe: dict, out: Path, client, workers: int, started: float) -> dict:
    """Staging store (fresh or resumed) -> field blocks -> statistics -> rename into place."""
    staging = data_store.staging_path(out)
    workers = 1 if client is not None else min(workers, plan.n_blocks)
    in_flight = TASKS_PER_WORKER * workers
    with stop_signals("stopping after the current block") as stop_requested, local_processes(workers) as pool:
        marks, resumed = prepare_staging(staging, plan, recipe, store_attrs(plan, recipe))
        jobs, skipped = _block_jobs(plan, marks)
        description = f"sst {len(plan.boxes)} boxes"
        stop_check = functools.partial(stop_after_block, stop_requested, command="dyf prepare sst")
        if client is not None:
            import dask

            tasks = [dask.delayed(read_and_write_block, pure=False)(str(staging), plan.reader, job) for job in jobs]
            run_tasks(tasks, client, description, "blocks", stop_check)
        elif jobs:
            with progress(description, len(jobs), "blocks") as bar:
                write_blocks_locally(str(staging), plan.reader, jobs, pool, in_flight, bar, stop_check)
        stats = _statistics(plan, staging, marks, client, pool, in_flight,
                            functools.partial(stop_check, blocks="boxes' statistics"))
    _finish(staging, out, marks)
    summary = _summary(plan, out, len(jobs), skipped, stats, resumed, time.monotonic() - started)
    summary["workers"] = None if client is not None else workers  # local reading processes (None: the cluster)
    return summary


def _block_jobs(plan: Plan, marks: Path) -> tuple[list[BlockJob], int]:
    """The time blocks still to write (those without a marker), and how many were skipped."""
    first = plan.times[0]
    by_block: dict[int, list[tuple[int, str, int]]] = {}
    for day in plan.archive.days:
        time_index = int((day.date - first) // np.timedelta64(1, "D"))
        block, position = divmod(time_index, plan.time_block)
        by_block.setdefault(block, []).append((position, day.path, day.index))
    jobs, skipped = [], 0
    for block in range(plan.n_blocks):
        marker = marks / f"block-{block:06d}"
        if marker.exists():
            skipped += 1
            continue
        start = block * plan.time_block
        length = min(plan.time_block, len(plan.times) - start)
        jobs.append(BlockJob(start, length, by_block.get(block, []), str(marker)))
    return jobs, skipped


def _statistics(plan: Plan, staging: Path, marks: Path, client, pool, in_flight: int,
                stop_check: StopCheck = lambda done, total: None) -> dict:
    """One statistics task per box (on the cluster, in the local processes, or here); markers skip done boxes.
    `stop_check(done, total)` after each box raises to stop there."""
    if plan.standardized:
        return {"filled_days": [], "floored": 0}
    start, stop = plan.train_range
    days_of_year = day_of_year(plan.times[start:stop])
    calls, results = [], []
    for series in range(len(plan.boxes)):
        marker = marks / f"stats-{series:04d}"
        if marker.exists():
            results.append(json.loads(marker.read_text()))
            continue
        calls.append((str(staging), series, start, stop, days_of_year, plan.mask[series], plan.time_block,
                      str(marker)))
    if client is not None:
        import dask

        tasks = [dask.delayed(write_box_statistics, pure=False)(*args) for args in calls]
        results += run_tasks(tasks, client, "sst statistics", "boxes", stop_check)
    elif calls:
        with progress("sst statistics", len(calls), "boxes") as bar:
            for done, result in enumerate(ordered_results(pool, write_box_statistics, calls, in_flight), start=1):
                results.append(result)
                fault_point("sst.statistics_written")
                bar.advance(1)
                stop_check(done, len(calls))
    return {"filled_days": sorted({d for r in results for d in r["filled_days"]}),
            "floored": int(sum(r["floored"] for r in results))}


def _finish(staging: Path, out: Path, marks: Path) -> None:
    import zarr

    shutil.rmtree(marks)
    with warnings.catch_warnings():  # consolidated metadata on purpose, as in store.py
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(staging))
    data_store.finalize(staging, out)
    data_store.open_store(out)  # the schema check a reader will do


def _summary(plan: Plan, out: Path, written: int, skipped: int, stats: dict, resumed: bool, seconds: float) -> dict:
    split_days = {}
    for name, rule in plan.splits.items():
        first, last = rule["time"]
        lo = plan.times[0] if first is None else np.datetime64(first, "D")
        hi = plan.times[-1] if last is None else np.datetime64(last, "D")
        split_days[name] = int(((plan.times >= lo) & (plan.times <= hi)).sum())
    return {
        "out": str(out), "layout": plan.archive.layout, "values": "standardized" if plan.standardized else "degC",
        "series": plan.boxes, "boxes": compress_ids(plan.boxes), "grid": [BOX_SIZE, BOX_SIZE],
        "days": int(len(plan.times)), "time": [str(plan.times[0]), str(plan.times[-1])],
        "missing_days": compress_dates(plan.missing_days), "splits": plan.splits, "split_days": split_days,
        "ocean_fraction": float(plan.mask.mean()), "blocks_written": written, "blocks_resumed": skipped,
        "resumed": resumed, "stats_filled_days_of_year": stats["filled_days"],
        "stats_std_floored": stats["floored"], "seconds": round(seconds, 2),
    }
