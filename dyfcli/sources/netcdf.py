"""Bring your own data: CF-convention gridded NetCDF or Zarr files -> a data store (docs/design.md §3).

`prepare_netcdf` reads one or many files (globs and folders expanded), finds the time and horizontal
axes from CF attributes (`axis`, `standard_name`, `units`) and common names, and writes the chosen
variables as fields `(series, time, y, x)`. Decisions, so users know what they get:

- Values are decoded with `mask_and_scale` (packed integers, `_FillValue`, `missing_value` -> NaN).
  NaN is missing data; ±inf (or a value beyond the float32 range) is refused with a DataError naming
  the variable, file, count and first place, found in the same pass as the statistics. A valid point
  (see `mask`) without data in the training split is refused too: its statistics would be NaN.
- Extra dimensions of size 1 (a depth `zlev`, an ensemble `number`) are dropped; a larger one must be
  reduced with `--select DIM=VALUE` (the coordinate value matched exactly, within float tolerance, never
  the nearest: a value not present is a DataError naming those present).
- Pressure levels become fields: `--var z@500` is the field `z500` (the level as written). The vertical
  axis is found from CF attributes (axis Z, positive, air_pressure, pressure units) or usual names
  (level, plev, pressure_level, isobaricInhPa); a level in hPa matches a Pa axis and the reverse.
- The time is found on the dimension or, when the dimension's own coordinate is no real time (NEMO's
  `time_counter`), in an auxiliary coordinate along it (`time_centered`, by standard_name or units).
- GRIB files (`.grib`, `.grib2`) are read through xarray's cfgrib engine (extra `dyf[grib]`).
- Latitude (or projected y) running north to south is flipped so row 0 is the southernmost; longitude
  is kept as it is (0..360 or -180..180). Curvilinear 2-D latitude/longitude (NEMO's nav_lat/nav_lon) are
  kept as `lat`/`lon` `(series, y, x)`, not flipped.
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
  float64; `global`: one mean and std per field; `pixel-dayofyear` (dated data): mean and std of every
  point and day of year (xarray's `dayofyear`; sub-daily steps count for their day), accumulated a
  series and a time block at a time (memory: three float64 arrays of 366 x y x x), a day without
  training data taking the nearest day's statistics as in `prepare sst`. Standard deviations are
  floored at 1e-3 of the field's overall training std so that a point constant in training cannot blow
  up later. Points with no training data keep NaN statistics.
- Without split flags the last 10 % of the dates are the test split and the 10 % before them the
  validation split (rounded to whole dates; the summary says so). Sub-daily data covering fewer than
  10 dates are split by time steps instead. Split flags take dates or date-times (`2017-08-01T06:00`).
- Variables may come from different files (one folder per variable, split by year): the files holding
  the same variables are concatenated along time, then joined with the others on time and grid, which
  must be equal (a DataError names the files otherwise; nothing is aligned, regridded or filled).
- Data flow in time blocks of about 16 MB of the source grid (peak memory ~0.6 GB for a 720 x 1440
  daily file, whatever its length), read here or on a `distributed` cluster (`--scheduler`). The raw
  files are read once: the fields are written a time block at a time into a marked staging store, with a
  marker per block, so an interrupted run re-run with the same command (and unchanged files) skips the
  blocks written; statistics are then read back from the staged fields. A block is read straight from
  the files by xarray's lazy indexing (`BlockReader`: the values the lazy Dask Dataset describes, without
  a Dask graph per block), checked and summed on a helper thread while the block before is written, its
  chunk files written directly (`chunks.chunk_writer`). SIGTERM or SIGUSR1 (a batch
  system's pre-emption) stops after the current block with exit 75; the same command resumes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dyfcli.attrs import for_writing
from dyfcli.chunks import chunk_writer
from dyfcli.errors import DataError, UsageError
from dyfcli.runtime import fault_point, progress, stop_after_block, stop_signals
from dyfcli.store import (PERIODIC_X, DataStore, claim_output, encoding_for, finalize, new_staging,
                          provenance_attrs, staging_path, validate_dataset)

NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5", ".he5")
GRIB_SUFFIXES = (".grib", ".grib2", ".grb", ".grb2")
GRIB_EXTRA = "pip install 'dyf[grib]'"
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
NORMALIZATIONS = ("pixel", "global", "pixel-dayofyear")
DAYS_OF_YEAR = 366  # rows of pixel-dayofyear statistics: day d (xarray's dayofyear) is row d - 1
PROGRESS_DIR = ".dyf-progress"  # inside the staging store: the job's fingerprint and one marker per written block
FILE_COORD = "dyf_file_index"  # carried along time (sorting, calendar conversion) until `to_series` drops it
STEP_COORD = "dyf_source_step"  # the same: each step's place on the files' time axis, which `FieldFiles` index


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
    field_files: dict = field(default_factory=dict)  # field -> FieldFiles, for `BlockReader`
    flip_y: bool = False  # `_flip_south_up` reversed the y axis
    windows: list = field(default_factory=list)  # (rows, cols) slices of each series (`to_series`)
    source_steps: np.ndarray | None = None  # (time,) STEP_COORD of the store's steps (`to_series`)


# ------------------------------------------------------------------------------------------------ entry

def prepare_netcdf(paths: list[str], variables: list[str], out: Path, *, tile: int | None = None,
                   train_until: str | None = None, val: str | None = None, test: str | None = None,
                   normalization: str = "pixel", select: dict[str, str] | None = None,
                   overwrite: bool = False, scheduler: str | None = None) -> dict:
    """Build a data store from CF gridded files; returns a JSON-ready summary.

    `scheduler`: a Dask distributed scheduler address (default: env DASK_SCHEDULER_ADDRESS; none: local
    threads); its workers must see the input files (they read and decode the blocks; this process checks
    and writes them)."""
    from dyfcli.cluster import connect_scheduler

    inputs = [match for text in paths for match in _matches(text)]
    with claim_output(Path(out), overwrite, inputs=inputs):  # held until the store is renamed into place
        client = connect_scheduler(scheduler)
        try:
            return _prepare_netcdf(paths, variables, Path(out), tile=tile, train_until=train_until, val=val,
                                   test=test, normalization=normalization, select=select, client=client)
        finally:
            if client is not None:
                client.close()


def _prepare_netcdf(paths: list[str], variables: list[str], out: Path, *, tile: int | None,
                    train_until: str | None, val: str | None, test: str | None, normalization: str,
                    select: dict[str, str] | None, client=None) -> dict:
    if tile is not None and tile < 2:
        raise UsageError(f"--tile {tile}: a tile must be at least 2 x 2 points")
    if normalization not in NORMALIZATIONS:
        raise UsageError(f"--normalization {normalization!r}: choose {', '.join(NORMALIZATIONS)}")
    source = open_source(expand_paths(paths), variables, select or {})
    step, is_dated = regularize_time(source)
    if normalization == "pixel-dayofyear" and not is_dated:
        raise UsageError("--normalization pixel-dayofyear needs dated time steps, and these files' time axis "
                         "has no calendar units; use --normalization pixel or global")
    splits, default_splits = choose_splits(source.ds["time"].values, train_until, val, test, is_dated)
    if default_splits:
        source.notes.append(f"no split flags: using train {_span(splits['train'])}, val {_span(splits['val'])}, "
                            f"test {_span(splits['test'])}")
    dataset, tiles = to_series(source, tile)
    dataset.attrs.update(provenance_attrs(
        ", ".join(str(p) for p in paths),
        {"paths": [str(p) for p in paths], "files": len(source.files), "variables": variables, "tile": tile,
         "select": select or {}, "normalization": normalization, "splits": splits}))
    dataset.attrs.update({"dyf_fields": [field_name(v) for v in variables], "dyf_splits": splits,
                          "dyf_normalization": normalization, "dyf_time_step": step, "dyf_calendar": source.calendar})
    if tile is None and spans_360_degrees(source.x_coord):
        dataset.attrs[PERIODIC_X] = True  # networks pad x circularly (networks.wrap_x_padding)
        source.notes.append("longitudes span 360 degrees: x is periodic (dyf_periodic_x), the networks wrap around")
    reader = BlockReader.of(source, dataset.attrs["dyf_fields"])
    written = write(dataset, out, normalization, reader, source.step_files, files=source.files, client=client)
    if written["filled_days"]:
        source.notes.append(f"{len(written['filled_days'])} days of year without training data took the nearest "
                            f"day's statistics: {', '.join(map(str, written['filled_days'][:10]))}"
                            f"{' ...' if len(written['filled_days']) > 10 else ''}")
    return _summary(out, source, dataset, tiles, written, step, tile)


def _span(rule: dict) -> str:
    first, last = rule["time"]
    return f"{first or 'start'}..{last or 'end'}"


# ------------------------------------------------------------------------------------------------ files

def _matches(text: str) -> list[str]:
    """What one PATH argument names: the files a quoted glob matches (sorted), else the path itself."""
    return sorted(glob.glob(text)) if any(c in text for c in "*?[") else [text]


def expand_paths(paths: list[str]) -> list[Path]:
    """Files and Zarr stores named by `paths` (files, globs, folders), in a stable order."""
    found: list[Path] = []
    for text in paths:
        matches = _matches(text)
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
    suffixes = NETCDF_SUFFIXES + GRIB_SUFFIXES
    return sorted(p for p in folder.iterdir() if _is_zarr(p) or (p.is_file() and p.suffix.lower() in suffixes))


def _check_format(path: Path) -> None:
    if _is_zarr(path):
        return
    if path.is_dir():
        raise DataError(f"{path} is a folder but not a Zarr store; give NetCDF files or a Zarr store")
    if _is_grib(path):
        _require_grib(path)
        return
    with open(path, "rb") as handle:
        magic = handle.read(8)
    if not (magic[:3] == b"CDF" or magic == b"\x89HDF\r\n\x1a\n"):
        raise DataError(f"{path} is not a NetCDF file (neither NetCDF-3 nor NetCDF-4/HDF5) nor GRIB; "
                        "give NetCDF, GRIB or Zarr files, or convert it first (e.g. with cdo or xarray)")


def _is_grib(path: Path) -> bool:
    """GRIB 1 or 2, by suffix or by the `GRIB` that starts its first message."""
    if path.suffix.lower() in GRIB_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        return handle.read(4) == b"GRIB"


def _require_grib(path: Path) -> None:
    """GRIB is read by xarray's cfgrib engine, an optional extra that brings the ecCodes library."""
    import importlib

    try:
        importlib.import_module("cfgrib")
    except Exception as err:  # noqa: BLE001 - ImportError, or RuntimeError when ecCodes is missing
        raise DataError(f"{path} is GRIB, which needs cfgrib and ecCodes ({type(err).__name__}: {err}); "
                        f"install them with {GRIB_EXTRA}") from None


def _open_file(path: Path, decode_times: bool = True):
    import xarray as xr

    try:
        if _is_zarr(path):
            return xr.open_dataset(path, engine="zarr", chunks=None, mask_and_scale=True, decode_times=decode_times)
        if _is_grib(path):  # indexpath "": no .idx files written beside the user's data
            return xr.open_dataset(path, engine="cfgrib", chunks=None, mask_and_scale=True, decode_times=decode_times,
                                   backend_kwargs={"indexpath": ""})
        return xr.open_dataset(path, chunks=None, mask_and_scale=True, decode_times=decode_times)
    except Exception as err:  # noqa: BLE001 - backends raise many types for unreadable files
        match = re.search(r"decode time units '([^']*)'", str(err))
        if match and decode_times:
            raise _undecodable_time(path, match.group(1)) from None
        raise DataError(f"cannot read {path} ({type(err).__name__}: {err}); check that it is a complete "
                        "NetCDF, GRIB or Zarr file") from None


def _undecodable_time(path: Path, units: str) -> DataError:
    """xarray's own message suggests `decode_times=False`, which the CLI does not have: name the variable
    and its units, and the fix that lies with the file."""
    with _open_file(path, decode_times=False) as ds:
        names = [str(n) for n, v in ds.variables.items() if str(v.attrs.get("units", "")) == units]
        calendar = next((str(ds[n].attrs["calendar"]) for n in names if "calendar" in ds[n].attrs), "standard")
    return DataError(f"{path}: the time units {units!r} of {', '.join(map(repr, names)) or 'a variable'} cannot "
                     f"be decoded in the {calendar} calendar (year 0 does not exist there; or the unit is "
                     "unknown); correct the units attribute in the file, e.g. with NCO: ncatted -a "
                     f"units,{names[0] if names else 'time'},o,c,'hours since 0001-01-01' {path.name}")


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
        roles.update(_auxiliary_time_dim(var, roles))
    if "time" not in roles:
        raise DataError(f"variable {name!r} (dims {var.dims}) has no time axis; dyf needs a time dimension "
                        "marked axis='T', standard_name='time' or CF time units")
    for role, example in (("y", "latitude/y"), ("x", "longitude/x")):
        if role not in roles:
            raise DataError(f"variable {name!r} (dims {var.dims}) has no {role} axis; dyf needs a {example} "
                            "dimension marked by axis, standard_name or units")
    return roles


def _auxiliary_time_dim(var, roles: dict[str, str]) -> dict[str, str]:
    """{'time': dim} when an auxiliary time coordinate lies along a dimension not yet given a role."""
    for coord in var.coords.values():
        if len(coord.dims) == 1 and coord.dims[0] not in roles.values() and _is_time(coord):
            return {"time": coord.dims[0]}
    return {}


def select_dims(obj, select: dict[str, str], path: Path):
    """Apply `--select DIM=VALUE` to the dimensions `obj` has (others are left to the variables that have
    them): the coordinate value matched exactly (float tolerance), or an index when there is no
    coordinate. Never the nearest value: a value not present is a DataError naming those present."""
    for dim, value in select.items():
        if dim in obj.dims:
            obj = obj.isel({dim: _select_index(obj, dim, value, f"--select {dim}={value}", path)})
    return obj


def _select_index(obj, dim: str, value: str, what: str, path: Path, scales: tuple[float, ...] = (1.0,)) -> int:
    """The index along `dim` whose coordinate equals `value` (times each of `scales`, in order)."""
    if dim not in obj.coords:
        if not value.lstrip("-").isdigit() or not -obj.sizes[dim] <= int(value) < obj.sizes[dim]:
            raise DataError(f"{what}: {path} has no coordinate for {dim!r}, so give an index from 0 to "
                            f"{obj.sizes[dim] - 1}")
        return int(value)
    values = obj[dim].values
    if values.dtype.kind in "iuf":
        try:
            target = float(value)
        except ValueError:
            raise DataError(f"{what}: {value!r} is not a number; {_values_text(values)}") from None
        for scale in scales:
            hits = np.flatnonzero(np.isclose(values.astype(np.float64), target * scale, rtol=1e-6, atol=1e-9))
            if len(hits):
                return int(hits[0])
    else:
        hits = np.flatnonzero(values.astype(str) == value)
        if len(hits):
            return int(hits[0])
    raise DataError(f"{what}: {path} has no {dim} {value}; {_values_text(values)}")


def _values_text(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, (float, np.floating)) else str(v) for v in values[:12])
    return f"the values present are {shown}{' ...' if len(values) > 12 else ''}"


# ------------------------------------------------------------------------------------------- variables

LEVEL_NAMES = ("level", "plev", "pressure_level", "isobaricinhpa", "lev", "pressure", "pressure_levels")
PRESSURE_UNITS = {"pa": 1.0, "hpa": 100.0, "millibar": 100.0, "millibars": 100.0, "mbar": 100.0, "mb": 100.0}
BOUNDS_DIMS = ("bnds", "bounds", "nv", "nbnd", "axis_nbounds", "nvertex", "vertices")


def parse_var(spec: str) -> tuple[str, str | None]:
    """One `--var` item: `z@500` -> ('z', '500'), `t2m` -> ('t2m', None)."""
    name, at, level = spec.partition("@")
    if not name or (at and not level):
        raise UsageError(f"--var {spec!r}: write NAME or NAME@LEVEL, e.g. t2m or z@500")
    return name, level or None


def field_name(spec: str) -> str:
    """The store field of one `--var` item: the name and the level as written (`z@500` -> `z500`)."""
    name, level = parse_var(spec)
    return name + (level or "")


def choosable_variables(ds) -> list[str]:
    """Data variables a user may give to --var: gridded (2-D or more), bounds variables left out."""
    bounds = {str(v.attrs.get("bounds")) for v in ds.variables.values() if "bounds" in v.attrs}
    return [str(name) for name, var in ds.data_vars.items()
            if var.ndim >= 2 and name not in bounds and not set(var.dims) & set(BOUNDS_DIMS)]


def variable_fields(ds, spec: str, path: Path, select: dict[str, str], notes: list[str]) -> dict:
    """Field name -> DataArray on dims (time, y, x), lazily indexed, for one `--var` item (`t2m`, `z@500`).

    `--select` applies to the dimensions the variable has; `@LEVEL` picks one level of its vertical axis.
    The time coordinate is the real time even when it is an auxiliary coordinate (NEMO's time_centered
    on the dimension time_counter). Other coordinates are dropped."""
    name, level = parse_var(spec)
    if name not in ds.data_vars:
        raise DataError(f"{path} has no variable {name}; choose --var from: "
                        f"{', '.join(choosable_variables(ds)) or 'none'}")
    roles = find_axes(ds, name)
    da = select_dims(ds[name], select, path)
    if level is not None:
        da = _select_level(da, spec, roles, path)
    da = _auxiliary_time(_squeeze_extra(da, roles, name, notes), roles["time"])
    rename = {roles["time"]: "time", roles["y"]: "y", roles["x"]: "x"}
    curvilinear = _curvilinear(da, roles)
    return {field_name(spec): da.transpose(*rename).rename(rename).reset_coords(drop=True).assign_coords(curvilinear)}


def _curvilinear(da, roles: dict[str, str]) -> dict:
    """2-D latitude and longitude on the (y, x) dims (NEMO's nav_lat/nav_lon) as `lat`/`lon` (y, x),
    kept only when the y or x dimension has no 1-D coordinate of its own."""
    if roles["y"] in da.coords and roles["x"] in da.coords:
        return {}
    found = {}
    for coord in da.coords.values():
        role = axis_role("", coord) if set(coord.dims) == {roles["y"], roles["x"]} else None
        if role in ("y", "x") and coord.dtype.kind in "iuf":
            attrs = {k: v for k, v in coord.attrs.items() if k in COPIED_ATTRS}
            found["lat" if role == "y" else "lon"] = (("y", "x"), coord.transpose(roles["y"], roles["x"]).values,
                                                      attrs)
    return found


def _is_vertical(name: str, coord) -> bool:
    """A vertical axis, from CF attributes (axis Z, positive, air_pressure, pressure units) or its name."""
    if coord is not None and (_attr(coord, "axis") == "z" or _attr(coord, "positive") in ("up", "down")
                              or _attr(coord, "standard_name") == "air_pressure"
                              or _attr(coord, "units") in PRESSURE_UNITS):
        return True
    return name.lower() in LEVEL_NAMES


def _select_level(da, spec: str, roles: dict[str, str], path: Path):
    """`NAME@LEVEL`: the level matched exactly in the units of the file; a level written in hPa matches
    Pa coordinates (and the reverse) when their units say so."""
    name, level = parse_var(spec)
    vertical = [d for d in da.dims if d not in roles.values() and _is_vertical(str(d), da.coords.get(d))]
    if not vertical:
        raise DataError(f"--var {spec}: variable {name!r} in {path} has no vertical axis (dims {da.dims}); "
                        f"write --var {name} without @LEVEL")
    dim = vertical[0]
    scale = PRESSURE_UNITS.get(_attr(da.coords.get(dim), "units"))
    scales = {None: (1.0,), 1.0: (1.0, 100.0)}.get(scale, (1.0, 0.01))  # hPa written, Pa stored; or the reverse
    return da.isel({dim: _select_index(da, dim, level, f"--var {spec}", path, scales)})


def _is_time(coord) -> bool:
    kind = coord.dtype.kind
    return kind == "M" or (kind == "O" and _is_cftime(coord)) or (kind in "iuf" and " since " in _attr(coord, "units"))


def _auxiliary_time(da, dim: str):
    """Use an auxiliary time coordinate along `dim` when the dimension's own is no real time (NEMO writes
    time_counter without units, 0 in every file, and the time in time_centered)."""
    if dim in da.coords and _is_time(da[dim]):
        return da
    for coord in da.coords.values():
        if coord.name != dim and coord.dims == (dim,) and _is_time(coord):
            return da.assign_coords({dim: coord.values})
    return da


def canonical_file(ds, path: Path, variables: list[str], select: dict[str, str], notes: list[str]):
    """One opened file's variables on dims (time, y, x), lazily indexed; coordinates kept on y and x only
    (and curvilinear lat/lon on (y, x))."""
    import xarray as xr

    for dim, value in select.items():
        if dim not in ds.dims:
            raise DataError(f"--select {dim}={value}: {path} has no dimension {dim!r} "
                            f"(it has {', '.join(map(str, ds.dims))})")
    fields: dict = {}
    for spec in variables:
        fields.update(variable_fields(ds, spec, path, select, notes))
    roles = {spec: find_axes(ds, parse_var(spec)[0]) for spec in variables}
    for spec in variables[1:]:
        if roles[spec] != roles[variables[0]]:
            raise DataError(f"variables {variables[0]!r} and {spec!r} lie on different grids "
                            f"({roles[variables[0]]} vs {roles[spec]}); prepare them into separate stores")
    return xr.Dataset(fields)  # scalar and auxiliary coordinates (number, expver, bounds) are gone


def _squeeze_extra(da, roles: dict[str, str], name: str, notes: list[str]):
    for dim in da.dims:
        if dim in roles.values():
            continue
        if da.sizes[dim] != 1:
            coord = da.coords.get(dim)
            levels = f" or one level per field (--var {name}@LEVEL)" if _is_vertical(dim, coord) else ""
            present = _values_text(coord.values) if coord is not None else "it has no coordinate"
            raise DataError(f"variable {name!r} has an extra dimension {dim!r} of size {da.sizes[dim]}; dyf "
                            f"stores 2-D fields: pick one with --select {dim}=VALUE{levels} or choose another "
                            f"--var ({present})")
        note = f"dropped the size-1 dimension {dim!r}"
        if note not in notes:
            notes.append(note)
        da = da.isel({dim: 0}, drop=True)
    return da


# ----------------------------------------------------------------------------------------------- source

def open_source(files: list[Path], variables: list[str], select: dict[str, str]) -> Source:
    """All files as one lazy Dataset `(time, y, x)` sorted by time; grids must match exactly.

    Variables may sit in different files (reanalysis downloads keep one folder per variable, split by
    year): the files holding the same variables are concatenated along time, then these groups are
    joined on time and grid, which must agree exactly (nothing is aligned or filled)."""
    notes: list[str] = []
    opened = {path: _open_file(path) for path in files}  # once each: a GRIB file is scanned at every open
    try:
        contents = {path: (choosable_variables(ds), {str(dim) for dim in ds.dims}) for path, ds in opened.items()}
        _check_select_dims(select, contents)
        grouped = _group_by_variables(files, variables, {p: c[0] for p, c in contents.items()})
    except BaseException:
        for ds in opened.values():
            ds.close()
        raise
    used = {path for paths, _ in grouped for path in paths}
    for path in set(files) - used:  # files holding none of the --var
        opened[path].close()
    groups = [(paths, [canonical_file(opened[path], path, specs, _select_in(select, contents[path][1]), notes)
                       for path in paths]) for paths, specs in grouped]
    first_path, first = groups[0][0][0], groups[0][1][0]
    for paths, parts in groups:
        for path, part in zip(paths, parts):
            _check_same_grid(first_path, first, path, part)
    block = _block_steps(first, sum(len(parts[0].data_vars) for _, parts in groups))
    attrs = {name: dict(parts[0][name].attrs) for _, parts in groups for name in parts[0].data_vars}
    ds = _join_groups([(paths, _concat_in_time(files, paths, parts, block)) for paths, parts in groups])
    ds = ds.assign_coords({STEP_COORD: ("time", np.arange(ds.sizes["time"]))})
    source = Source(ds, files, notes=notes, block=block,
                    field_files={name: files for _, parts in groups for name, files in _field_files(parts).items()})
    source.calendar = _calendar(ds["time"])
    source.y_coord, source.x_coord = _coordinate(ds, "y"), _coordinate(ds, "x")
    _flip_south_up(source)
    for name, values in attrs.items():
        source.ds[name].attrs = {k: v for k, v in values.items() if k in COPIED_ATTRS}
    return source


def _base_name(spec: str) -> str:
    """The file variable of one `--var` item: `z@500` -> `z`."""
    return spec.split("@", 1)[0]


def _group_by_variables(files: list[Path], variables: list[str],
                        held: dict[Path, list[str]]) -> list[tuple[list[Path], list[str]]]:
    """(files, specs) pairs: the requested specs held by the same set of files, in the order asked.

    A file holds a spec when the spec's variable is one of its data variables (`held`); a spec no file
    holds is a DataError naming what the files hold."""
    missing = [spec for spec in variables if not any(_base_name(spec) in names for names in held.values())]
    if missing:
        choices = ", ".join(dict.fromkeys(n for names in held.values() for n in names)) or "none"
        where = (f"{files[0]} has no variable" if len(files) == 1
                 else f"none of the {len(files)} files ({_holdings(held)}) has the variable")
        raise DataError(f"{where} {', '.join(missing)}; choose --var from: {choices}")
    groups: dict[tuple[Path, ...], list[str]] = {}
    for spec in variables:
        groups.setdefault(tuple(p for p in files if _base_name(spec) in held[p]), []).append(spec)
    return [(list(paths), specs) for paths, specs in groups.items()]


def _check_select_dims(select: dict[str, str], contents: dict[Path, tuple[list[str], set[str]]]) -> None:
    """`--select DIM=VALUE` must name a dimension of some file (with per-variable files, not all have it)."""
    for dim, value in select.items():
        if not any(dim in dims for _, dims in contents.values()):
            dims = sorted(set().union(*(dims for _, dims in contents.values())))
            where = (f"{next(iter(contents))} has no" if len(contents) == 1 else
                     f"none of the {len(contents)} files has a")
            raise DataError(f"--select {dim}={value}: {where} dimension {dim!r} "
                            f"(dimensions present: {', '.join(dims)}); choose one of them")


def _select_in(select: dict[str, str], dims: set[str]) -> dict[str, str]:
    """The part of `--select` that applies to one file: the dimensions it has."""
    return {dim: value for dim, value in select.items() if dim in dims}


def _holdings(held: dict[Path, list[str]]) -> str:
    """`a.nc and 9 more have u; b.nc has v`: which files hold which variables, one clause per set."""
    by_names: dict[tuple[str, ...], list[Path]] = {}
    for path, names in held.items():
        by_names.setdefault(tuple(names), []).append(path)
    return "; ".join(f"{_files_text(paths)} {'has' if len(paths) == 1 else 'have'} {', '.join(names) or 'none'}"
                     for names, paths in by_names.items())


def _files_text(paths: list[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more"


def _concat_in_time(files: list[Path], paths: list[Path], parts: list, block: int):
    """One group's files (same variables) as one Dataset sorted by time, each step tagged with its file."""
    import xarray as xr

    parts = [p.chunk({"time": min(block, p.sizes["time"]), "y": -1, "x": -1})
             .assign_coords({FILE_COORD: ("time", np.full(p.sizes["time"], files.index(path)))})
             for path, p in zip(paths, parts)]
    parts.sort(key=lambda p: _first_time(p))  # stable: the order of `field_files`
    return parts[0] if len(parts) == 1 else xr.concat(parts, dim="time", data_vars="all", coords="minimal",
                                                      compat="override", join="override")


def _join_groups(groups: list[tuple[list[Path], object]]):
    """The groups' variables in one Dataset; their time axes must be equal (grids are checked before).

    The first group's coordinates are kept. The file of each time step is dropped when there are several
    groups: a step then lies in one file per group, and naming the first group's would mislead."""
    import xarray as xr

    first_paths, first = groups[0]
    for paths, ds in groups[1:]:
        _check_same_times(first_paths, first, paths, ds)
    if len(groups) == 1:
        return first
    parts = [ds.drop_vars(FILE_COORD) for _, ds in groups]
    return xr.merge(parts, join="override", compat="override", combine_attrs="override")


def _check_same_times(first_paths: list[Path], first, paths: list[Path], ds) -> None:
    a, b = np.asarray(first["time"].values), np.asarray(ds["time"].values)
    n = min(len(a), len(b))
    unequal = np.flatnonzero([x != y for x, y in zip(a[:n], b[:n])])
    if len(a) == len(b) and not len(unequal):
        return
    i = int(unequal[0]) if len(unequal) else n
    where = (f"first difference at step {i}: {_label(a[i])} vs {_label(b[i])}" if i < n else
             f"{_label((a if len(a) > n else b)[n])} is only in one of them")
    raise DataError(f"the variables {', '.join(first.data_vars)} ({_files_text(first_paths)}) and "
                    f"{', '.join(ds.data_vars)} ({_files_text(paths)}) have different time axes ({len(a)} vs "
                    f"{len(b)} steps, {where}); give files of all variables covering the same times at the "
                    "same step")


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


def _block_steps(part, fields: int) -> int:
    """Time steps per Dask block: about BLOCK_BYTES of the source grid (all `fields`), a multiple of the
    store chunk."""
    step_bytes = part.sizes["y"] * part.sizes["x"] * 4 * fields
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
    """The 1-D coordinate of `dim`, or else the 2-D (curvilinear) `lat`/`lon` (y, x) from `variable_fields`."""
    curvilinear = "lat" if dim == "y" else "lon"
    if dim not in ds.coords and curvilinear in ds.coords and ds[curvilinear].dims == ("y", "x"):
        coord = ds[curvilinear]
        return {"values": np.asarray(coord.values, dtype=np.float64), "attrs": dict(coord.attrs), "geographic": True}
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
    if coord is None or coord["values"].ndim != 1 or len(coord["values"]) < 2 \
            or coord["values"][1] > coord["values"][0]:  # a curvilinear (2-D) grid is kept as it is
        return
    source.ds = source.ds.isel(y=slice(None, None, -1))
    source.flip_y = True
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
    if usual <= 0:
        raise DataError(f"the time coordinate does not increase (values {values[0]:g} .. {values[-1]:g}, usual "
                        f"step {usual:g}); give files whose time axis increases, or a CF time coordinate "
                        "(standard_name=time with units) along the time dimension")
    bad = np.nonzero(~np.isclose(steps, usual, rtol=1e-6))[0]
    if len(bad):
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
    """The last 10 % of the points for test, the 10 % before for validation. Points are whole dates, or
    time steps for sub-daily data covering fewer than 10 dates (a day would be too coarse a unit)."""
    points, text = _split_points(times, is_dated)
    n = len(points)
    if n < 3:
        raise DataError(f"the data cover only {n} time steps, too few for train/val/test splits; give at least "
                        "3 time steps")
    held_out = max(1, round(0.1 * n))
    val_start, test_start = n - 2 * held_out, n - held_out
    if val_start < 1:
        val_start, test_start = n - 2, n - 1
    return {"train": {"time": [None, text(points[val_start - 1])]},
            "val": {"time": [text(points[val_start]), text(points[test_start - 1])]},
            "test": {"time": [text(points[test_start]), None]}}


def _split_points(times: np.ndarray, is_dated: bool):
    """The points splits are cut between and how each is written in `dyf_splits`."""
    if not is_dated:
        return np.asarray(times, dtype=np.float64), float
    dates = np.unique(times.astype("datetime64[D]"))
    if len(dates) >= 10 or len(dates) == len(times):
        return dates, str
    unit = "m" if np.all(times.astype("datetime64[m]") == times) else "s"
    return np.asarray(times), lambda value: str(np.datetime_as_string(value, unit=unit))


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
    source.source_steps = np.asarray(source.ds[STEP_COORD].values)
    ds = source.ds.drop_vars([FILE_COORD, STEP_COORD], errors="ignore")
    fields = list(ds.data_vars)
    first_valid = np.all([np.isfinite(ds[name].isel(time=0).values) for name in fields], axis=0)
    size, tiles, labels = choose_tiles(first_valid, tile, source.notes)
    windows = [(slice(r * size[0], (r + 1) * size[0]), slice(c * size[1], (c + 1) * size[1])) for r, c in tiles]
    source.windows = windows
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


def spans_360_degrees(x_coord: dict | None) -> bool:
    """Whether a 1-D longitude x axis is a regular grid around the whole globe (n steps of 360/n degrees),
    so its last column neighbours its first: the store's x axis is periodic."""
    if x_coord is None or not x_coord["geographic"] or x_coord["values"].ndim != 1 or len(x_coord["values"]) < 3:
        return False
    values = x_coord["values"]
    steps = np.mod(np.diff(values), 360.0)  # a grid that crosses the date line or 0 degrees still counts
    step = steps[0]
    return bool(step > 0 and np.allclose(steps, step, rtol=1e-4, atol=0)
                and np.isclose(len(values) * step, 360.0, rtol=1e-4, atol=0))


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
        if coord["values"].ndim == 2:  # curvilinear lat/lon (y, x): (series, y, x)
            values = np.stack([coord["values"][r * size_y:(r + 1) * size_y, c * size_x:(c + 1) * size_x]
                               for r, c in tiles])
            out.coords[name] = (("series", "y", "x"), values, coord["attrs"])
            continue
        values = np.stack([coord["values"][t[position] * size:(t[position] + 1) * size] for t in tiles])
        out.coords[name] = (("series", dim), values, coord["attrs"])


# ------------------------------------------------------------------------------------------------ reads

@dataclass(frozen=True)
class FieldFiles:
    """One field's files in time order: lazily indexed DataArrays `(time, y, x)` (xarray's own indexing,
    no Dask) and `starts`, where each file's steps begin on the files' time axis (STEP_COORD), then the
    total."""

    arrays: tuple
    starts: np.ndarray

    def read(self, steps: np.ndarray) -> np.ndarray:
        """The values at `steps` (increasing places on the time axis), `(time, y, x)`: one read per run of
        consecutive steps within a file."""
        pieces = []
        breaks = np.flatnonzero(np.diff(steps) != 1) + 1
        for run in np.split(steps, breaks):
            first, last = int(run[0]), int(run[-1]) + 1
            while first < last:
                index = int(np.searchsorted(self.starts, first, side="right")) - 1
                begin, stop = int(self.starts[index]), min(last, int(self.starts[index + 1]))
                pieces.append(np.asarray(self.arrays[index].isel(time=slice(first - begin, stop - begin)).values))
                first = stop
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _field_files(parts: list) -> dict[str, FieldFiles]:
    """`FieldFiles` of the variables of one group's files (`canonical_file` Datasets), in the order
    `_concat_in_time` concatenates them."""
    ordered = sorted(parts, key=_first_time)  # stable, as `_concat_in_time`'s sort
    starts = np.cumsum([0] + [part.sizes["time"] for part in ordered])
    return {name: FieldFiles(tuple(part[name] for part in ordered), starts) for name in ordered[0].data_vars}


@dataclass(frozen=True)
class BlockReader:
    """Time blocks of the store's fields `(series, time, y, x)` float32, read straight from the files.

    The same values as computing the store Dataset's Dask arrays (the steps kept by calendar conversion,
    the y axis flipped, the tiles cut), for a fraction of the cost: a decade of 8 WeatherBench fields
    (benchmarks/prepare_netcdf.py) spent more time building, optimising and scheduling Dask graphs per
    block than reading, and read each file chunk twice where blocks straddle files. Picklable, so a
    `distributed` worker can read for us."""

    fields: dict[str, FieldFiles]  # in the store's field order
    source_steps: np.ndarray  # (time,): each store step's place on the files' time axis
    flip_y: bool
    windows: tuple  # (rows, cols) slices of each series

    @classmethod
    def of(cls, source: Source, fields: list[str]) -> BlockReader:
        """The reader of `source` once `to_series` has cut it into series."""
        return cls({name: source.field_files[name] for name in fields}, source.source_steps, source.flip_y,
                   tuple(source.windows))

    def read(self, start: int, stop: int) -> list[np.ndarray]:
        """Store steps `start:stop` of every field."""
        steps = self.source_steps[start:stop]
        blocks = []
        for files in self.fields.values():
            values = files.read(steps)
            if self.flip_y:
                values = values[:, ::-1]
            series = np.stack([values[:, rows, cols] for rows, cols in self.windows])
            blocks.append(series.astype(np.float32, copy=False))
        return blocks


@dataclass
class ReadBlock:
    """A block as read and checked off the writing thread: values per field `(series, time, y, x)`, the
    count of ±inf per field `(series, time)`, the moments (`_array_moments`) of its training steps."""

    values: list[np.ndarray]
    infinite: list[np.ndarray]
    moments: dict | None


def read_block(reader: BlockReader, start: int, stop: int, client, train: tuple[int, int] | None) -> ReadBlock:
    """Read store steps `start:stop` (on a `distributed` worker with a `client`), count their infinities and
    sum the moments of the steps in `train` (a range inside the block; None or empty: no moments).

    Runs on prepare's reading thread: numpy releases the GIL for these sums, so they overlap the chunk
    writes of the block before."""
    if client is None:
        values = reader.read(start, stop)
    else:
        values = client.submit(reader.read, start, stop, pure=False).result()
    in_train = train is not None and train[0] < train[1]
    moments = {name: _array_moments(data[:, train[0] - start:train[1] - start])
               for name, data in zip(reader.fields, values)} if in_train else None
    return ReadBlock(values, [np.isinf(data).sum(axis=(2, 3)) for data in values], moments)


# ------------------------------------------------------------------------------------------------ write

def write(dataset, out: Path, normalization: str, reader: BlockReader, step_files: list[Path] | None = None, *,
          files: list[Path] = (), client=None) -> dict:
    """Fields in time blocks (each checked for infinite values, and its training steps' moments summed, as it
    is written), then the statistics over the training split, into a staging store renamed into place when
    complete. Blocks written by an earlier, interrupted run and day-of-year statistics are read back.

    A marker is left in the staging store after each block, so an interrupted run re-run with the same
    command and unchanged `files` writes only the blocks still missing (`step_files`: the file of each
    time step, named by errors; `client`: a `distributed.Client`, or None for local threads).
    Returns the time steps of each split, blocks written and resumed, and the days of year filled."""
    import xarray as xr

    time_chunk = store_time_chunk(dataset.sizes["y"] * dataset.sizes["x"] * 4)
    staging, marks, resumed = _open_staging(dataset, out, time_chunk, list(files))
    probe = DataStore(out, dataset)
    train = tuple(probe.split_ranges("train")[0][1:])
    in_pass = None if normalization == "pixel-dayofyear" else train
    written, skipped, moments = _write_blocks(dataset, reader, staging, marks, step_files or [], client, in_pass)
    with warnings.catch_warnings():  # the progress folder is ours, not part of the Zarr hierarchy
        warnings.filterwarnings("ignore", message=f"Object at {PROGRESS_DIR} is not recognized")
        staged = xr.open_zarr(staging, consolidated=False, chunks=None)[dataset.attrs["dyf_fields"]]
    stats, filled_days = _training_statistics(staged, dataset, train, normalization, client, moments, skipped)
    shutil.rmtree(marks)  # a kill from here on starts the job afresh
    stats.attrs = dict(dataset.attrs)  # appending rewrites the group attributes
    for_writing(stats).to_zarr(staging, mode="a", consolidated=True, encoding=encoding_for(stats))
    validate_dataset(xr.open_zarr(staging, consolidated=True))
    finalize(staging, out)
    steps = {split: int(sum(b - a for _, a, b in probe.split_ranges(split)[:1]))
             for split in dataset.attrs["dyf_splits"]}
    return {"steps": steps, "blocks_written": written, "blocks_resumed": len(skipped), "resumed": resumed,
            "filled_days": filled_days}


def _open_staging(dataset, out: Path, time_chunk: int, files: list[Path]) -> tuple[Path, Path, bool]:
    """The staging store of the same job (same recipe, blocks and input files) to resume, or a fresh one
    holding everything but the field values. Returns (staging, progress folder, resumed)."""
    staging = staging_path(out)
    marks = staging / PROGRESS_DIR
    job = marks / "job.json"
    fingerprint = _fingerprint(dataset, files)
    try:
        if json.loads(job.read_text()).get("fingerprint") == fingerprint:
            return staging, marks, True
    except (OSError, ValueError):  # no job record, or one cut short: start afresh
        pass
    new_staging(out)  # marked as dyf's first; mode "a" keeps the marker
    for_writing(dataset).to_zarr(staging, mode="a", compute=False, consolidated=False,
                                 encoding=encoding_for(dataset, time_chunk))
    marks.mkdir()
    job.write_text(json.dumps({"fingerprint": fingerprint}))
    return staging, marks, False


def _fingerprint(dataset, files: list[Path]) -> str:
    """Identity of a job: its recipe, its time blocks and every input's name, size and modification time."""
    recipe = {"recipe": dataset.attrs["dyf_recipe"], "blocks": list(dataset.chunks["time"]),
              "fields": dataset.attrs["dyf_fields"]}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _write_blocks(dataset, reader: BlockReader, staging: Path, marks: Path, step_files: list[Path], client,
                  train: tuple[int, int] | None) -> tuple[int, list[tuple[int, int]], dict | None]:
    """Write the time blocks without a marker. Returns how many were written, the (start, stop) of those
    skipped, and the moments (`_moments`) per field of the training steps `train` in the blocks written
    (None when none, or `train` is None).

    The next block is read from the files, checked and summed on a helper thread (`read_block`) while this
    one is written (file decoding and chunk writes each leave a core idle otherwise). SIGTERM/SIGUSR1 (a
    batch system's pre-emption) stop after the current block with exit 75: the same command resumes from
    the markers."""
    from concurrent.futures import ThreadPoolExecutor

    bounds = np.cumsum((0, *dataset.chunks["time"]))
    blocks = [(index, int(a), int(b)) for index, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    todo = [block for block in blocks if not (marks / f"block-{block[0]:06d}").exists()]
    arrays = _staged_arrays(staging, dataset.attrs["dyf_fields"])
    moments = None
    with stop_signals("stopping after the current time block") as stop_requested, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="dyf-netcdf-reader") as thread, \
            progress("prepare netcdf: writing", len(todo), "blocks") as bar:

        def read_ahead(start: int, stop: int):
            overlap = None if train is None else (max(start, train[0]), min(stop, train[1]))
            return thread.submit(read_block, reader, start, stop, client, overlap)

        pending = read_ahead(*todo[0][1:]) if todo else None
        for position, (index, start, stop) in enumerate(todo):
            block = pending.result()
            if position + 1 < len(todo):
                pending = read_ahead(*todo[position + 1][1:])
            _write_block(dataset, block, arrays, start, stop, step_files)
            moments = _sum_moments(moments, block.moments)
            (marks / f"block-{index:06d}").touch()
            fault_point("netcdf.block_written")
            bar.advance(1)
            stop_after_block(stop_requested, position + 1, len(todo), "dyf prepare netcdf")
    return len(todo), [block[1:] for block in blocks if block not in todo], moments


def _sum_moments(total: dict | None, part: dict | None) -> dict | None:
    """Per field, the element-wise sums of two `_moments` results (either may be None), as numpy arrays:
    adding DataArrays cost ~1 ms a call, 1 400 calls for a decade of 8 fields."""
    if total is None or part is None:
        return part if total is None else total
    return {name: tuple(np.asarray(a) + np.asarray(b) for a, b in zip(total[name], part[name])) for name in total}


def _staged_arrays(staging: Path, fields: list[str]) -> dict:
    """The template's field arrays, opened once (a region write through xarray re-reads the whole store's
    metadata each time, about 0.1 s a block), as writers of their chunk files (`chunks.chunk_writer`)."""
    import zarr

    return {name: chunk_writer(zarr.open_array(store=str(staging), path=name, mode="r+")) for name in fields}


def _write_block(dataset, block: ReadBlock, arrays: dict, start: int, stop: int, step_files: list[Path]) -> None:
    """The `block` (`read_block`: steps `start:stop` of every field) into the staging store's `arrays`,
    refused if it holds ±inf.

    Checked, summed and written as numpy arrays: building the same work as Dask graphs cost more than doing
    it (benchmarks/prepare_netcdf.py). Raw float32 values go straight into the chunk files: the template
    has no CF encoding to apply (NaN is the fill value)."""
    for name, data, infinite in zip(dataset.attrs["dyf_fields"], block.values, block.infinite):
        if infinite.any():
            refuse_infinite(dataset[name].isel(time=slice(start, stop)).copy(data=data), infinite,
                            step_files[start:stop])
        arrays[name][:, start:stop] = data


def _array_moments(values: np.ndarray) -> tuple:
    """`_moments` of a numpy block `(series, time, y, x)`, the same sums in the same order without
    xarray's per-call overhead: count, sum, sum of squares over time, numpy arrays `(series, y, x)`
    (int64, float64, float64).

    One float64 copy, squared in place (x * x is np.square's rounding), and NaN zeroed only when there is
    one: the sums are bit for bit those of the plain expressions."""
    missing = np.isnan(values)
    wide = values.astype(np.float64)
    if missing.any():
        wide[missing] = 0.0
    count, total = (~missing).sum(axis=1), wide.sum(axis=1)
    return count, total, np.multiply(wide, wide, out=wide).sum(axis=1)


def _training_statistics(staged, dataset, train: tuple[int, int], normalization: str, client,
                         moments: dict | None, skipped: list[tuple[int, int]]):
    """The statistics Dataset of every field over the training steps `train`; plus the days of year filled.

    Day-of-year statistics are read back from the staged fields `staged` (lazy, unchunked) a time block
    at a time; the others add `moments` (those of the blocks just written) and the moments of the
    training steps in the `skipped` blocks, read back."""
    import dask
    import xarray as xr

    start, stop = train
    block = dataset.chunks["time"][0]
    fields = dataset.attrs["dyf_fields"]
    if normalization == "pixel-dayofyear":
        days = dataset["time"].isel(time=slice(start, stop)).dt.dayofyear.values
        parts = {name: _dayofyear_statistics(name, staged[name], start, stop, days, block, dataset["mask"])
                 for name in fields}
        stats = xr.Dataset({var: values for name in fields for var, values in parts[name][0].items()},
                           coords={"dayofyear": np.arange(1, DAYS_OF_YEAR + 1)})
        return stats, sorted({day for name in fields for day in parts[name][1]})
    for first, last in skipped:
        first, last = max(first, start), min(last, stop)
        if first >= last:
            continue
        chunked = staged.isel(time=slice(first, last)).chunk({"series": 1, "time": block, "y": -1, "x": -1})
        (part,) = dask.compute({name: _moments(chunked[name]) for name in fields},
                               **({"scheduler": client} if client is not None else {}))
        moments = _sum_moments(moments, part)
    if moments is None:
        raise DataError("the training split holds no time step; choose other --train-until dates")
    stats = xr.Dataset({var: values for name in fields
                        for var, values in _statistics(name, moments[name], normalization,
                                                       dataset["mask"]).items()})
    return stats.reset_coords(drop=True).drop_vars(["series", "y", "x"], errors="ignore"), []


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
    places = [f"{name} {float(field[name].values[(series, index) if field[name].ndim == 2 else (series, y, x)]):g}"
              for name, index in (("lat", y), ("lon", x)) if name in field.coords]
    return text + (f" ({', '.join(places)})" if places else "")


def _statistics(name: str, moments: tuple, normalization: str, mask) -> dict:
    """`stats_mean_<name>`, `stats_std_<name>` as float32 DataArrays of the store's normalisation mode.

    DataError when a valid point (`mask` True) would get non-finite statistics: the loader would turn it
    into NaN or 0 silently."""
    import xarray as xr

    count, total, squares = (xr.DataArray(np.asarray(m, dtype=np.float64), dims=("series", "y", "x")) for m in moments)
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


def _dayofyear_statistics(name: str, field, start: int, stop: int, days: np.ndarray, block: int,
                          mask) -> tuple[dict, list[int]]:
    """`stats_mean_<name>`, `stats_std_<name>` `(dayofyear, series, y, x)` over the training steps
    `start:stop` of `field` (lazy; `days`: their day of year 1..366, so sub-daily steps count for their
    day), one series and `block` steps at a time: memory is three float64 arrays of 366 x y x x, whatever
    the length of the training split. As `prepare sst`: a day of year without training data at a point
    takes the nearest day's statistics. Std floored as in `_statistics`. Returns them and the days filled."""
    from dyfcli.sources.oisst import DayOfYearSums, fill_from_nearest_day

    per_series = []
    for series in range(field.sizes["series"]):
        sums = DayOfYearSums.empty((field.sizes["y"], field.sizes["x"]))
        for first in range(start, stop, block):
            last = min(first + block, stop)
            sums.add(np.asarray(field.isel(series=series, time=slice(first, last)).values),
                     days[first - start:last - start])
        per_series.append(sums.mean_std())
    mean, std, count = (np.stack([part[i] for part in per_series], axis=1) for i in range(3))  # (366, S, Y, X)
    floor = _dayofyear_floor(name, mean, std, count)
    filled: set[int] = set()
    for series in range(mean.shape[1]):
        have = count[:, series] > 0
        filled.update(fill_from_nearest_day(mean[:, series], std[:, series], have, have.any(axis=0)))
    with np.errstate(invalid="ignore"):
        std = np.where(np.isnan(std), std, np.maximum(std, floor))
    dims = ("dayofyear", "series", "y", "x")
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    _refuse_nonfinite_statistics(name, _on_mask(mean[0], mask), _on_mask(std[0], mask), mask)
    return {f"stats_mean_{name}": (dims, mean), f"stats_std_{name}": (dims, std)}, sorted(filled)


def _dayofyear_floor(name: str, mean: np.ndarray, std: np.ndarray, count: np.ndarray) -> float:
    """STD_FLOOR_FRACTION of the field's overall training std, from the per-day moments."""
    n_all = int(count.sum())
    if n_all == 0:
        raise DataError(f"{name!r} has no valid value in the training split; choose other --train-until dates")
    seen = count > 0
    mean_all = float(np.where(seen, count * mean, 0.0).sum()) / n_all
    squares = float(np.where(seen, count * (std ** 2 + mean ** 2), 0.0).sum()) / n_all
    std_all = math.sqrt(max(squares - mean_all ** 2, 0.0))
    return STD_FLOOR_FRACTION * std_all if std_all > 0 else 1.0


def _on_mask(values: np.ndarray, mask):
    """`values` `(series, y, x)` as a DataArray on `mask`'s coordinates (for the messages naming a point)."""
    return mask.copy(data=values)


# ---------------------------------------------------------------------------------------------- summary

def _summary(out: Path, source: Source, dataset, tiles: list, written: dict, step, tile) -> dict:
    """`written`: what `write` returns (steps per split, blocks written and resumed)."""
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
        "splits": {name: {"time": rule["time"], "steps": written["steps"][name]}
                   for name, rule in dataset.attrs["dyf_splits"].items()},
        "valid_fraction": float(dataset["mask"].values.mean()),
        "blocks_written": written["blocks_written"],
        "blocks_resumed": written["blocks_resumed"],
        "resumed": written["resumed"],
        "notes": source.notes,
    }
