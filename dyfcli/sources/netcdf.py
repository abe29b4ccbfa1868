"""Bring your own data: CF-convention gridded NetCDF or Zarr files -> a data store (docs/design.md §3).

`prepare_netcdf` reads one or many files (globs and folders expanded), finds the time and horizontal
axes from CF attributes (`axis`, `standard_name`, `units`) and common names, and writes the chosen
variables as fields `(series, time, y, x)`. Decisions, so users know what they get:

- Values are decoded with `mask_and_scale` (packed integers, `_FillValue`, `missing_value` -> NaN).
  NaN is missing data; ±inf (or a value beyond the float32 range) is refused with a DataError naming
  the variable, file, count and first place, found in the same pass as the statistics. A valid point
  (see `mask`) without data in the training split is refused too: its statistics would be NaN.
- Extra dimensions of size 1 (a depth `zlev`, an ensemble `number`) are dropped; a larger one must be
  reduced with `--select DIM=VALUE` (nearest coordinate value).
- Latitude (or projected y) running north to south is flipped so row 0 is the southernmost; longitude
  is kept as it is (0..360 or -180..180).
- The time step must be regular: a fixed step (hourly, 6-hourly, daily...) or calendar months or
  years. Monthly data stamped mid-month (CMIP) are labelled by the first day of their month ("1MS").
  Daily or coarser steps are labelled by their date (00:00). Gaps or duplicates are a DataError.
- Non-standard calendars (noleap, 360_day, all_leap...) are checked for regularity in their own
  calendar, then stored as Gregorian datetime64 (xarray's `convert_calendar`; `align_on="year"` for
  360_day). Calendar months convert exactly. For daily noleap data the stored dates skip 29 February, so
  the step there is two Gregorian days; `dyf_calendar` records the source calendar.
- `--tile N` cuts N x N tiles (series = tile, numbered `row * columns + column` from the south-west;
  the remainder of the grid that does not fill a tile is dropped); tiles with no valid point are
  dropped. Without it there is one series, the whole grid.
- `mask` is True where every field is valid at the first time step. Points that are invalid later hold
  NaN and are set to 0 after normalisation by the loader.
- Normalisation `pixel` (default): mean and std of every point over the training split, accumulated in
  float64 in one pass with the write; `global`: one mean and std per field. Standard deviations are
  floored at 1e-3 of the field's overall training std so that a point constant in training cannot blow
  up later. Points with no training data keep NaN statistics.
- Without split flags the last 10 % of the dates are the test split and the 10 % before them the
  validation split (rounded to whole dates; the summary says so).
- Data flow through Dask in blocks of about 16 MB of the source grid (peak memory ~0.6 GB for a
  720 x 1440 daily file, whatever its length); the raw files are read once for fields and statistics.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dask.callbacks import Callback

from dyfcli.errors import DataError, UsageError
from dyfcli.runtime import progress
from dyfcli.store import (DataStore, claim_output, encoding_for, finalize, new_staging, provenance_attrs,
                          validate_dataset)

NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5", ".he5")
TIME_NAMES = ("time", "valid_time", "t", "date", "datetime", "time_counter")
Y_NAMES = ("lat", "latitude", "y", "rlat", "yc", "nj", "j", "south_north", "nlat")
X_NAMES = ("lon", "longitude", "x", "rlon", "xc", "ni", "i", "west_east", "nlon")
LAT_UNITS = ("degrees_north", "degree_north", "degrees_n", "degree_n", "degreesn", "degreen")
LON_UNITS = ("degrees_east", "degree_east", "degrees_e", "degree_e", "degreese", "degreee")
COPIED_ATTRS = ("units", "standard_name", "long_name")
STD_FLOOR_FRACTION = 1e-3
BLOCK_BYTES = 16 * 2**20
CHUNK_TARGET_BYTES = 256 * 2**10
MAX_TIME_CHUNK = 8
FILE_COORD = "dyf_file_index"  # carried along time (sorting, calendar conversion) until `to_series` drops it


@dataclass
class Source:
    """The chosen variables on canonical dims `(time, y, x)`, lazy, plus what we learnt reading them."""

    ds: object  # xr.Dataset
    files: list[Path]
    calendar: str = "standard"
    y_coord: dict | None = None  # {"name", "values", "attrs", "geographic"}
    x_coord: dict | None = None
    notes: list[str] = field(default_factory=list)
    block: int = 1  # time steps per Dask block
    step_files: list[Path] = field(default_factory=list)  # the file of every time step, for error messages


# ------------------------------------------------------------------------------------------------ entry

def prepare_netcdf(paths: list[str], variables: list[str], out: Path, *, tile: int | None = None,
                   train_until: str | None = None, val: str | None = None, test: str | None = None,
                   normalization: str = "pixel", select: dict[str, str] | None = None,
                   overwrite: bool = False) -> dict:
    """Build a data store from CF gridded files; returns a JSON-ready summary."""
    inputs = [match for text in paths for match in (glob.glob(text) if any(c in text for c in "*?[") else [text])]
    with claim_output(Path(out), overwrite, inputs=inputs):  # held until the store is renamed into place
        return _prepare_netcdf(paths, variables, Path(out), tile=tile, train_until=train_until, val=val,
                               test=test, normalization=normalization, select=select)


def _prepare_netcdf(paths: list[str], variables: list[str], out: Path, *, tile: int | None,
                    train_until: str | None, val: str | None, test: str | None, normalization: str,
                    select: dict[str, str] | None) -> dict:
    if tile is not None and tile < 2:
        raise UsageError(f"--tile {tile}: a tile must be at least 2 x 2 points")
    if normalization not in ("pixel", "global"):
        raise UsageError(f"--normalization {normalization!r}: choose pixel or global")
    source = open_source(expand_paths(paths), variables, select or {})
    step, is_dated = regularize_time(source)
    splits, default_splits = choose_splits(source.ds["time"].values, train_until, val, test, is_dated)
    if default_splits:
        source.notes.append(f"no split flags: using train {_span(splits['train'])}, val {_span(splits['val'])}, "
                            f"test {_span(splits['test'])}")
    dataset, tiles = to_series(source, tile)
    dataset.attrs.update(provenance_attrs(
        ", ".join(str(p) for p in paths),
        {"paths": [str(p) for p in paths], "files": len(source.files), "variables": variables, "tile": tile,
         "select": select or {}, "normalization": normalization, "splits": splits}))
    dataset.attrs.update({"dyf_fields": list(variables), "dyf_splits": splits, "dyf_normalization": normalization,
                          "dyf_time_step": step, "dyf_calendar": source.calendar})
    split_steps = write(dataset, out, normalization, source.step_files)
    return _summary(out, source, dataset, tiles, split_steps, step, tile)


def _span(rule: dict) -> str:
    first, last = rule["time"]
    return f"{first or 'start'}..{last or 'end'}"


# ------------------------------------------------------------------------------------------------ files

def expand_paths(paths: list[str]) -> list[Path]:
    """Files and Zarr stores named by `paths` (files, globs, folders), in a stable order."""
    found: list[Path] = []
    for text in paths:
        matches = sorted(glob.glob(text)) if any(c in text for c in "*?[") else [text]
        if not matches or not Path(matches[0]).exists():
            raise DataError(f"no file matches {text}; check the path (quote globs so that dyf expands them)")
        for match in map(Path, matches):
            found.extend(_files_in(match) if match.is_dir() and not _is_zarr(match) else [match])
    unique = list(dict.fromkeys(found))
    if not unique:
        raise DataError(f"no NetCDF or Zarr files in {', '.join(paths)}; give .nc files or Zarr stores")
    for path in unique:
        _check_format(path)
    return unique


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zmetadata"))


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_zarr(p) or (p.is_file() and p.suffix.lower() in NETCDF_SUFFIXES))


def _check_format(path: Path) -> None:
    if _is_zarr(path):
        return
    if path.is_dir():
        raise DataError(f"{path} is a folder but not a Zarr store; give NetCDF files or a Zarr store")
    with open(path, "rb") as handle:
        magic = handle.read(8)
    if not (magic[:3] == b"CDF" or magic == b"\x89HDF\r\n\x1a\n"):
        raise DataError(f"{path} is not a NetCDF file (neither NetCDF-3 nor NetCDF-4/HDF5); "
                        "give NetCDF or Zarr files, or convert it first (e.g. with cdo or xarray)")


def _open_file(path: Path):
    import xarray as xr

    try:
        if _is_zarr(path):
            return xr.open_dataset(path, engine="zarr", chunks=None, mask_and_scale=True)
        return xr.open_dataset(path, chunks=None, mask_and_scale=True)
    except Exception as err:  # noqa: BLE001 - backends raise many types for unreadable files
        raise DataError(f"cannot read {path} ({type(err).__name__}: {err}); check that it is a complete "
                        "NetCDF or Zarr file") from None


# ------------------------------------------------------------------------------------------------- axes

def _attr(var, name: str) -> str:
    return str(var.attrs.get(name, "")).strip().lower() if var is not None else ""


def axis_role(name: str, coord) -> str | None:
    """'time', 'y', 'x' or None for one dimension, from CF attributes first, then common names."""
    axis, standard_name, units = _attr(coord, "axis"), _attr(coord, "standard_name"), _attr(coord, "units")
    if coord is not None:
        kind = coord.dtype.kind
        if axis == "t" or standard_name == "time" or kind == "M" or (kind == "O" and _is_cftime(coord)):
            return "time"
        if axis == "y" or standard_name in ("latitude", "projection_y_coordinate", "grid_latitude") \
                or units in LAT_UNITS:
            return "y"
        if axis == "x" or standard_name in ("longitude", "projection_x_coordinate", "grid_longitude") \
                or units in LON_UNITS:
            return "x"
        if " since " in units:
            return "time"
    lowered = name.lower()
    for role, names in (("time", TIME_NAMES), ("y", Y_NAMES), ("x", X_NAMES)):
        if lowered in names:
            return role
    return None


def _is_cftime(coord) -> bool:
    return coord.size > 0 and hasattr(coord.values.flat[0], "calendar")


def find_axes(ds, name: str) -> dict[str, str]:
    """{'time': dim, 'y': dim, 'x': dim} for variable `name`; DataError naming what is missing."""
    var = ds[name]
    roles: dict[str, str] = {}
    for dim in var.dims:
        role = axis_role(dim, ds[dim] if dim in ds.coords else None)
        if role is None:
            continue
        if role in roles:
            raise DataError(f"variable {name!r} has two {role} axes ({roles[role]}, {dim}); "
                            "select one with --select")
        roles[role] = dim
    if "time" not in roles:
        raise DataError(f"variable {name!r} (dims {var.dims}) has no time axis; dyf needs a time dimension "
                        "marked axis='T', standard_name='time' or CF time units")
    for role, example in (("y", "latitude/y"), ("x", "longitude/x")):
        if role not in roles:
            raise DataError(f"variable {name!r} (dims {var.dims}) has no {role} axis; dyf needs a {example} "
                            "dimension marked by axis, standard_name or units")
    return roles


def select_dims(ds, select: dict[str, str], path: Path):
    """Apply `--select DIM=VALUE`: the nearest coordinate value, or an index when there is no coordinate."""
    for dim, value in select.items():
        if dim not in ds.dims:
            raise DataError(f"--select {dim}={value}: {path} has no dimension {dim!r} "
                            f"(it has {', '.join(map(str, ds.dims))})")
        if dim in ds.coords and ds[dim].dtype.kind in "iuf":
            ds = ds.sel({dim: float(value)}, method="nearest")
        elif dim in ds.coords and ds[dim].dtype.kind in "OUS":
            if value not in ds[dim].values:
                raise DataError(f"--select {dim}={value}: no such value; choose one of {list(ds[dim].values)[:10]}")
            ds = ds.sel({dim: value})
        else:
            ds = ds.isel({dim: int(value)})
    return ds


def canonical_file(path: Path, variables: list[str], select: dict[str, str], notes: list[str]):
    """One file's variables on dims (time, y, x), lazily indexed; coordinates kept on y and x only."""
    import xarray as xr

    ds = select_dims(_open_file(path), select, path)
    missing = [name for name in variables if name not in ds.data_vars]
    if missing:
        available = ", ".join(n for n in ds.data_vars if ds[n].ndim >= 2) or "none"
        raise DataError(f"{path} has no variable {', '.join(missing)}; choose --var from: {available}")
    roles = find_axes(ds, variables[0])
    arrays = {}
    for name in variables:
        var_roles = find_axes(ds, name)
        if var_roles != roles:
            raise DataError(f"variables {variables[0]!r} and {name!r} lie on different grids "
                            f"({roles} vs {var_roles}); prepare them into separate stores")
        arrays[name] = _squeeze_extra(ds[name], roles, name, notes)
    rename = {roles["time"]: "time", roles["y"]: "y", roles["x"]: "x"}
    out = xr.Dataset({name: da.transpose(*rename) for name, da in arrays.items()}).rename(rename)
    return out.reset_coords(drop=True)  # scalar and auxiliary coordinates (number, expver, bounds) go


def _squeeze_extra(da, roles: dict[str, str], name: str, notes: list[str]):
    for dim in da.dims:
        if dim in roles.values():
            continue
        if da.sizes[dim] != 1:
            raise DataError(f"variable {name!r} has an extra dimension {dim!r} of size {da.sizes[dim]}; dyf "
                            f"stores 2-D fields: pick one with --select {dim}=VALUE or choose another --var")
        note = f"dropped the size-1 dimension {dim!r}"
        if note not in notes:
            notes.append(note)
        da = da.isel({dim: 0}, drop=True)
    return da


# ----------------------------------------------------------------------------------------------- source

def open_source(files: list[Path], variables: list[str], select: dict[str, str]) -> Source:
    """All files as one lazy Dataset `(time, y, x)` sorted by time; grids must match exactly."""
    import xarray as xr

    notes: list[str] = []
    parts = [canonical_file(path, variables, select, notes) for path in files]
    first = parts[0]
    for path, part in zip(files[1:], parts[1:]):
        _check_same_grid(files[0], first, path, part)
    block = _block_steps(first)
    parts = [p.chunk({"time": min(block, p.sizes["time"]), "y": -1, "x": -1})
             .assign_coords({FILE_COORD: ("time", np.full(p.sizes["time"], index))})
             for index, p in enumerate(parts)]
    parts.sort(key=lambda p: _first_time(p))
    ds = parts[0] if len(parts) == 1 else xr.concat(parts, dim="time", data_vars="all", coords="minimal",
                                                     compat="override", join="override")
    source = Source(ds, files, notes=notes, block=block)
    source.calendar = _calendar(ds["time"])
    source.y_coord, source.x_coord = _coordinate(ds, "y"), _coordinate(ds, "x")
    _flip_south_up(source)
    for name in variables:
        source.ds[name].attrs = {k: v for k, v in first[name].attrs.items() if k in COPIED_ATTRS}
    return source


def _check_same_grid(first_path: Path, first, path: Path, part) -> None:
    for dim in ("y", "x"):
        same = first.sizes[dim] == part.sizes[dim] and (
            dim not in first.coords or np.allclose(first[dim].values, part[dim].values, equal_nan=True))
        if not same:
            raise DataError(f"{path} has a different {dim} grid from {first_path} "
                            f"({part.sizes[dim]} vs {first.sizes[dim]} points or other coordinates); "
                            "give files on one grid (regrid first, e.g. with xESMF or cdo)")


def _first_time(part):
    value = part["time"].values[0]
    return value if not isinstance(value, np.datetime64) else value.astype("datetime64[ns]").astype(np.int64)


def _block_steps(part) -> int:
    """Time steps per Dask block: about BLOCK_BYTES of the source grid, a multiple of the store chunk."""
    step_bytes = part.sizes["y"] * part.sizes["x"] * 4 * len(part.data_vars)
    chunk = store_time_chunk(part.sizes["y"] * part.sizes["x"] * 4)
    return max(1, BLOCK_BYTES // (step_bytes * chunk)) * chunk


def store_time_chunk(step_bytes: int) -> int:
    """Steps per Zarr chunk: whole fields of small tiles are grouped up to ~256 KiB (at most 8 steps,
    the length of an SST training window); large fields get one step per chunk (docs/design.md §3)."""
    steps = max(1, CHUNK_TARGET_BYTES // max(1, step_bytes))
    return min(MAX_TIME_CHUNK, 2 ** int(math.log2(steps)))


def _calendar(time) -> str:
    if time.dtype.kind == "O" and _is_cftime(time):
        return str(time.values.flat[0].calendar)
    return "standard"


def _coordinate(ds, dim: str) -> dict | None:
    if dim not in ds.coords:
        return None
    coord = ds[dim]
    if coord.dtype.kind not in "iuf":
        return None
    geographic = axis_role("", coord) == dim and (
        _attr(coord, "standard_name") in ("latitude", "longitude")
        or _attr(coord, "units") in LAT_UNITS + LON_UNITS)
    return {"values": np.asarray(coord.values, dtype=np.float64),
            "attrs": {k: v for k, v in coord.attrs.items() if k in COPIED_ATTRS + ("axis",)},
            "geographic": bool(geographic)}


def _flip_south_up(source: Source) -> None:
    coord = source.y_coord
    if coord is None or len(coord["values"]) < 2 or coord["values"][1] > coord["values"][0]:
        return
    source.ds = source.ds.isel(y=slice(None, None, -1))
    coord["values"] = coord["values"][::-1].copy()
    source.notes.append("flipped the y axis so that it runs south to north (ascending)")


# ------------------------------------------------------------------------------------------------- time

def regularize_time(source: Source) -> tuple[str | float, bool]:
    """Check the time step is regular; relabel times as datetime64 (or float). Returns (step, is_dated)."""
    import pandas as pd

    time = source.ds["time"]
    if time.dtype.kind in "iuf":
        return _regular_float_time(time.values), False
    index = time.to_index()
    if index.has_duplicates:
        duplicates = sorted({str(t) for t in index[index.duplicated()]})[:5]
        raise DataError(f"the files repeat time steps ({', '.join(duplicates)}); remove overlapping files")
    if len(index) < 2:
        raise DataError("the data have fewer than 2 time steps; dyf needs a time series")
    seconds = np.asarray((index[1:] - index[:-1]) / pd.Timedelta(seconds=1), dtype=np.float64)
    median = float(np.median(seconds))
    if 27 * 86400 <= median <= 32 * 86400:
        step, labels = _calendar_step(index, 1, "1MS"), _month_starts(index)
    elif 360 * 86400 <= median <= 367 * 86400:
        step, labels = _calendar_step(index, 12, "1YS"), _month_starts(index, yearly=True)
    else:
        step = _fixed_step(index, seconds)
        labels = None
    _relabel(source, labels, daily=median >= 86400)
    return step, True


def _calendar_step(index, months: int, name: str) -> str:
    month_number = np.array([t.year * 12 + t.month for t in index])
    bad = np.nonzero(np.diff(month_number) != months)[0]
    if len(bad):
        _irregular(index, bad, "1 month" if months == 1 else "1 year")
    return name


def _fixed_step(index, seconds: np.ndarray) -> str:
    values, counts = np.unique(seconds, return_counts=True)
    usual = float(values[np.argmax(counts)])
    bad = np.nonzero(seconds != usual)[0]
    if usual <= 0 or len(bad):
        _irregular(index, bad, _step_name(usual))
    return _step_name(usual)


def _step_name(seconds: float) -> str:
    for unit, size in (("D", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _irregular(index, bad: np.ndarray, usual: str) -> None:
    gaps = ", ".join(f"{index[i]} -> {index[i + 1]}" for i in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise DataError(f"the time steps are irregular: the usual step is {usual} but {gaps}{more}; "
                    "fill or drop the gaps (e.g. xarray resample/interpolate) or give files without them")


def _month_starts(index, yearly: bool = False) -> np.ndarray:
    return np.array([np.datetime64(f"{t.year:04d}-{1 if yearly else t.month:02d}-01") for t in index],
                    dtype="datetime64[ns]")


def _relabel(source: Source, labels: np.ndarray | None, daily: bool) -> None:
    """Store datetime64 labels: month starts as given, else Gregorian dates (floored to the day if daily)."""
    ds = source.ds
    if labels is None and source.calendar not in ("standard", "gregorian", "proleptic_gregorian"):
        before = ds.sizes["time"]
        align = "year" if source.calendar == "360_day" else "date"
        ds = ds.convert_calendar("standard", align_on=align, use_cftime=False)
        source.notes.append(f"converted the {source.calendar} calendar to Gregorian dates (align_on={align})")
        if ds.sizes["time"] != before:
            source.notes.append(f"dropped {before - ds.sizes['time']} dates that do not exist in the Gregorian "
                                "calendar")
    if labels is None:
        labels = np.asarray(ds["time"].values).astype("datetime64[ns]")
        if daily:
            labels = labels.astype("datetime64[D]").astype("datetime64[ns]")
    source.ds = ds.assign_coords(time=labels)


def _regular_float_time(values: np.ndarray) -> float:
    steps = np.diff(values.astype(np.float64))
    if len(values) < 2:
        raise DataError("the data have fewer than 2 time steps; dyf needs a time series")
    usual = float(np.median(steps))
    bad = np.nonzero(~np.isclose(steps, usual, rtol=1e-6))[0]
    if usual <= 0 or len(bad):
        gaps = ", ".join(f"{values[i]} -> {values[i + 1]}" for i in bad[:5])
        raise DataError(f"the time steps are irregular: the usual step is {usual} but {gaps}; "
                        "give regularly spaced time steps")
    return usual


# ----------------------------------------------------------------------------------------------- splits

def choose_splits(times: np.ndarray, train_until: str | None, val: str | None, test: str | None,
                  is_dated: bool) -> tuple[dict, bool]:
    """The `dyf_splits` attribute from the flags, or last 10 % / 10 % of the dates when none is given."""
    from dyfcli.splits import time_splits

    given = {"--train-until": train_until, "--val": val, "--test": test}
    if any(v is not None for v in given.values()):
        missing = [flag for flag, value in given.items() if value is None]
        if missing:
            raise UsageError(f"give all of --train-until, --val and --test, or none of them (missing "
                             f"{', '.join(missing)})")
        if not is_dated:
            raise UsageError("--train-until/--val/--test take dates but these data have no dated time axis; "
                             "leave them out to split 80/10/10")
        splits = time_splits(train_until, val, test)
    else:
        splits = _default_splits(times, is_dated)
    _check_splits_select(times, splits)
    return splits, all(v is None for v in given.values())


def _default_splits(times: np.ndarray, is_dated: bool) -> dict:
    points = np.unique(times.astype("datetime64[D]")) if is_dated else np.asarray(times, dtype=np.float64)
    n = len(points)
    if n < 3:
        raise DataError(f"the data cover only {n} distinct {'dates' if is_dated else 'times'}, too few for "
                        "train/val/test splits (splits are whole dates); give more time steps")
    held_out = max(1, round(0.1 * n))
    val_start, test_start = n - 2 * held_out, n - held_out
    if val_start < 1:
        val_start, test_start = n - 2, n - 1

    def text(value):
        return str(value) if is_dated else float(value)

    return {"train": {"time": [None, text(points[val_start - 1])]},
            "val": {"time": [text(points[val_start]), text(points[test_start - 1])]},
            "test": {"time": [text(points[test_start]), None]}}


def _check_splits_select(times: np.ndarray, splits: dict) -> None:
    import xarray as xr

    probe = DataStore(Path("."), xr.Dataset(coords={"time": times, "series": [0]}, attrs={"dyf_splits": splits}))
    for split in splits:
        if not probe.split_ranges(split):
            raise DataError(f"the {split} split {splits[split]['time']} selects no time step of data from "
                            f"{times[0]} to {times[-1]}; choose --train-until/--val/--test inside that range")


# ----------------------------------------------------------------------------------------------- series

def to_series(source: Source, tile: int | None):
    """The Dataset of docs/design.md §3 without statistics: fields (series, time, y, x), mask, coordinates.

    Returns it with the series labels (tile numbers `row * columns + column`; 0 without tiles)."""
    import xarray as xr

    if FILE_COORD in source.ds.coords:
        source.step_files = [source.files[i] for i in source.ds[FILE_COORD].values]
    ds = source.ds.drop_vars(FILE_COORD, errors="ignore")
    fields = list(ds.data_vars)
    first_valid = np.all([np.isfinite(ds[name].isel(time=0).values) for name in fields], axis=0)
    size, tiles, labels = choose_tiles(first_valid, tile, source.notes)
    windows = [(slice(r * size[0], (r + 1) * size[0]), slice(c * size[1], (c + 1) * size[1])) for r, c in tiles]
    pieces = [ds.isel(y=rows, x=cols).drop_vars(["y", "x"], errors="ignore")
              .assign_coords(y=np.arange(size[0]), x=np.arange(size[1])) for rows, cols in windows]
    series = xr.DataArray(labels, dims="series", name="series")
    out = xr.concat(pieces, dim=series, coords="minimal", compat="override", join="override")
    chunk = store_time_chunk(size[0] * size[1] * 4)
    block = max(chunk, (source.block // chunk) * chunk)
    out = out.transpose("series", "time", "y", "x").chunk({"series": 1, "time": block, "y": -1, "x": -1})
    for name in fields:
        out[name] = out[name].astype(np.float32)
        out[name].attrs = dict(ds[name].attrs)
    out["mask"] = (("series", "y", "x"), np.stack([first_valid[rows, cols] for rows, cols in windows]))
    _attach_coordinates(out, source, tiles, *size)
    return out, labels


def choose_tiles(first_valid: np.ndarray, tile: int | None, notes: list[str]):
    """Tile size, `(row, column)` of the tiles with a valid point, and their labels."""
    ny, nx = first_valid.shape
    size = (tile, tile) if tile else (ny, nx)
    rows, cols = ny // size[0], nx // size[1]
    if rows == 0 or cols == 0:
        raise UsageError(f"--tile {tile} is larger than the grid ({ny} x {nx}); choose a smaller tile")
    if tile and (ny % tile or nx % tile):
        notes.append(f"dropped the last {ny % tile} rows and {nx % tile} columns that do not fill a tile")
    tiles = [(r, c) for r in range(rows) for c in range(cols)
             if first_valid[r * size[0]:(r + 1) * size[0], c * size[1]:(c + 1) * size[1]].any()]
    if not tiles:
        raise DataError("no valid (non-NaN) point at the first time step; check --var and the fill values")
    if tile and len(tiles) < rows * cols:
        notes.append(f"dropped {rows * cols - len(tiles)} tiles without any valid point")
    return size, tiles, [r * cols + c for r, c in tiles]


def _attach_coordinates(out, source: Source, tiles: list, size_y: int, size_x: int) -> None:
    for dim, coord, position, size in (("y", source.y_coord, 0, size_y), ("x", source.x_coord, 1, size_x)):
        if coord is None:
            continue
        name = ("lat" if dim == "y" else "lon") if coord["geographic"] else f"{dim}_coordinate"
        values = np.stack([coord["values"][t[position] * size:(t[position] + 1) * size] for t in tiles])
        out.coords[name] = (("series", dim), values, coord["attrs"])


# ------------------------------------------------------------------------------------------------ write

def write(dataset, out: Path, normalization: str, step_files: list[Path] | None = None) -> dict[str, int]:
    """Fields, statistics and the check for infinite values in one pass over the sources, into a staging
    store renamed when complete (`step_files`: the file of each time step, named by errors).

    Returns the number of time steps in each split."""
    import dask
    import xarray as xr

    splits = dataset.attrs["dyf_splits"]
    probe = DataStore(out, dataset)
    start, stop = probe.split_ranges("train")[0][1:]
    fields = dataset.attrs["dyf_fields"]
    time_chunk = store_time_chunk(dataset.sizes["y"] * dataset.sizes["x"] * 4)
    staging = new_staging(out)  # marked as dyf's first; mode "a" keeps the marker
    writer = dataset.to_zarr(staging, mode="a", compute=False, consolidated=False,
                             encoding=encoding_for(dataset, time_chunk))
    moments = {name: _moments(dataset[name].isel(time=slice(start, stop))) for name in fields}
    infinite = {name: np.isinf(dataset[name]).sum(("y", "x")) for name in fields}  # (series, time) counts
    with DaskProgress("prepare netcdf: writing"):
        _, computed, infinite = dask.compute(writer, moments, infinite)
    for name in fields:
        refuse_infinite(dataset[name], infinite[name].values, step_files or [])
    stats = xr.Dataset({var: values for name in fields
                        for var, values in _statistics(name, computed[name], normalization,
                                                       dataset["mask"]).items()})
    stats = stats.reset_coords(drop=True).drop_vars(["series", "y", "x"], errors="ignore")
    stats.attrs = dict(dataset.attrs)  # appending rewrites the group attributes
    stats.to_zarr(staging, mode="a", consolidated=True, encoding=encoding_for(stats))
    validate_dataset(xr.open_zarr(staging, consolidated=True))
    finalize(staging, out)
    return {split: int(sum(b - a for _, a, b in probe.split_ranges(split)[:1])) for split in splits}


def _moments(train):
    """count, sum, sum of squares over time, float64: `(series, y, x)` each (lazy)."""
    values = train.astype(np.float64)
    valid = values.notnull()
    return (valid.sum("time"), values.fillna(0).sum("time"), (values.fillna(0) ** 2).sum("time"))


def refuse_infinite(field, counts: np.ndarray, step_files: list[Path]) -> None:
    """DataError when the field `(series, time, y, x)` holds ±inf; `counts` `(series, time)` counts them.

    One +inf made a pixel's mean inf and its std NaN, and moved the std floor of every pixel. NaN is
    missing data; an infinity is damage only the user can judge, so it is refused, not masked."""
    total = int(counts.sum())
    if total == 0:
        return
    time_index, series = (int(i) for i in np.argwhere(counts.T)[0])  # the earliest time step first
    values = field.isel(series=series, time=time_index).values
    y, x = (int(i) for i in np.argwhere(np.isinf(values))[0])
    where = f" in {step_files[time_index]}" if len(step_files) == field.sizes["time"] else ""
    raise DataError(f"{field.name!r} holds {total} infinite value{'s' if total > 1 else ''} (±inf, or beyond "
                    f"the float32 range){where}, the first at time {_label(field['time'].values[time_index])}, "
                    f"{_position(field, series, y, x)}; mark them missing in the files (xarray: "
                    "ds.where(np.isfinite(ds))) or correct them, then run prepare again")


def _label(value) -> str:
    return str(np.datetime_as_string(value, unit="s")) if isinstance(value, np.datetime64) else str(value)


def _position(field, series: int, y: int, x: int) -> str:
    """`series s, y j, x i` in store indices (y south to north), with lat/lon when the store has them."""
    text = f"series {field['series'].values[series]}, y {y}, x {x}"
    places = [f"{name} {float(field[name].values[series, index]):g}" for name, index in (("lat", y), ("lon", x))
              if name in field.coords]
    return text + (f" ({', '.join(places)})" if places else "")


def _statistics(name: str, moments: tuple, normalization: str, mask) -> dict:
    """`stats_mean_<name>`, `stats_std_<name>` as float32 DataArrays of the store's normalisation mode.

    DataError when a valid point (`mask` True) would get non-finite statistics: the loader would turn it
    into NaN or 0 silently."""
    count, total, squares = (m.astype(np.float64) for m in moments)
    n_all = float(count.sum())
    if n_all == 0:
        raise DataError(f"{name!r} has no valid value in the training split; choose other --train-until dates")
    mean_all = float(total.sum()) / n_all
    std_all = math.sqrt(max(float(squares.sum()) / n_all - mean_all ** 2, 0.0))
    floor = STD_FLOOR_FRACTION * std_all if std_all > 0 else 1.0
    if normalization == "global":
        mean, std = np.float32(mean_all), np.float32(max(std_all, floor))
        return {f"stats_mean_{name}": ((), mean), f"stats_std_{name}": ((), std)}
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    std = std.where(count == 0, np.maximum(std, floor))
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    _refuse_nonfinite_statistics(name, mean, std, mask)
    return {f"stats_mean_{name}": mean, f"stats_std_{name}": std}


def _refuse_nonfinite_statistics(name: str, mean, std, mask) -> None:
    bad = (mask & ~(np.isfinite(mean) & np.isfinite(std))).transpose("series", "y", "x").values
    if not bad.any():
        return
    series, y, x = (int(i) for i in np.argwhere(bad)[0])
    count = int(bad.sum())
    points = "1 valid point (valid at the first time step) has" if count == 1 else \
        f"{count} valid points (valid at the first time step) have"
    raise DataError(f"{name!r}: {points} no value in the training split, so their statistics would be NaN "
                    f"(the first at {_position(mask, series, y, x)}); choose a training split in which they "
                    "have data (--train-until) or mark them missing at the first time step too")


class DaskProgress(Callback):
    """Report finished Dask tasks through `runtime.progress` (a bar on a terminal, log lines otherwise)."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description
        self._context = self._bar = None

    def _start_state(self, dsk, state) -> None:
        self._context = progress(self.description, len(dsk), "tasks")
        self._bar = self._context.__enter__()

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self._bar.advance(1)

    def _finish(self, dsk, state, errored) -> None:
        self._context.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------- summary

def _summary(out: Path, source: Source, dataset, tiles: list, split_steps: dict, step, tile) -> dict:
    times = dataset["time"].values
    first, last = (np.datetime_as_string(t, unit="s") if isinstance(t, np.datetime64) else float(t)
                   for t in (times[0], times[-1]))
    return {
        "out": str(out),
        "files": len(source.files),
        "fields": {name: {k: dataset[name].attrs.get(k) for k in ("units", "standard_name")}
                   for name in dataset.attrs["dyf_fields"]},
        "series": len(tiles),
        "tile": tile,
        "grid": [int(dataset.sizes["y"]), int(dataset.sizes["x"])],
        "time": {"first": first, "last": last, "steps": int(len(times)), "step": step,
                 "calendar": source.calendar},
        "normalization": dataset.attrs["dyf_normalization"],
        "splits": {name: {"time": rule["time"], "steps": split_steps[name]}
                   for name, rule in dataset.attrs["dyf_splits"].items()},
        "valid_fraction": float(dataset["mask"].values.mean()),
        "notes": source.notes,
    }
