"""`dyf export FORECAST --to wb2`: a forecast store in WeatherBench-2's layout (docs/design.md §9).

WeatherBench 2 (and xskillscore, cf_xarray) read forecasts as one variable per field with dims `time`
(the initial time), `prediction_timedelta` (timedelta64 lead time), `realization` (ensemble member),
`latitude`, `longitude`, CF attributes and physical units. A dyf forecast store has `series` (tiles,
boxes) of `y`/`x` points with coordinates `lat(series, y)`, `lon(series, x)`; the export puts every tile
back in the grid it was cut from:

- The grid spans the tiles' latitudes and longitudes, both ascending (WB2 wants latitude increasing).
  When they lie on a regular spacing (every dyf tiling of a regular grid), the gaps between tiles are
  filled in at that spacing, so a row or column of tiles `prepare` dropped comes back as NaN; otherwise
  (a Gaussian grid) the grid is the union of the tiles' values. Points no exported tile covers and
  points the mask marks invalid are NaN. Tiles that overlap are refused: they did not come from one
  grid. Dropped tiles beyond the outermost kept ones are not known to the forecast, so not restored.
- Forecasts without latitude and longitude (simulations), with 2-D (curvilinear) ones, or with lead
  times that are no fixed time span (calendar months) are refused with a DataError naming the fix.
- The output is written like every dyf output (`outputs.claim_output`: a dyf-marked staging folder
  renamed into place; only an older export is ever replaced), one chunk per initial time holding the
  whole grid (WB2's advice: single chunks in space, small chunks in time), one initial time in memory.
- Field names stay dyf's (`t2m`, `z500`); the attributes record the forecast they came from.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dyfcli import __version__, outputs
from dyfcli.attrs import for_writing
from dyfcli.errors import DataError, UsageError
from dyfcli.runtime import progress

log = logging.getLogger("dyf")

FORMAT = "dyf-wb2-export"
FORMAT_VERSION = 1
TARGETS = ("wb2",)
REGULAR_FILL_LIMIT = 16  # a regular axis at most this many times longer than the tiles' values is filled in
DIMS = ("time", "prediction_timedelta", "realization", "latitude", "longitude")
# Forecast attributes carried over, so the export says which model, seed and sampler made it.
PROVENANCE = ("dyf_checkpoint", "dyf_checkpoint_sha256", "dyf_method", "dyf_seed", "dyf_horizon", "dyf_schedule",
              "dyf_precision", "dyf_network_calls", "dyf_time_step", "dyf_truth_absolute", "dyf_truth_id",
              "dyf_config")


@dataclass(frozen=True)
class Grid:
    """The grid the tiles were cut from: `latitude (Ny,)`, `longitude (Nx,)` ascending; `rows[s]` and
    `columns[s]` are the grid indices of series s's `y` rows and `x` columns."""

    latitude: np.ndarray
    longitude: np.ndarray
    rows: list[np.ndarray]
    columns: list[np.ndarray]


# ----------------------------------------------------------------------------------------------- checks

def stitching_grid(ds, path: Path) -> Grid:
    """The grid of the forecast's tiles; DataError when it has no 1-D latitudes and longitudes per series
    or when tiles overlap."""
    if "lat" not in ds.variables or "lon" not in ds.variables:
        raise DataError(f"{path} has no lat/lon coordinates (a simulation or a grid without geography); "
                        "WeatherBench-2 needs latitudes and longitudes: export forecasts of data prepared "
                        "from geographic files (`dyf prepare netcdf` or `dyf prepare sst`)")
    if ds["lat"].dims != ("series", "y") or ds["lon"].dims != ("series", "x"):
        raise DataError(f"{path} is on a curvilinear grid (lat/lon dims {ds['lat'].dims}, {ds['lon'].dims}); "
                        "WeatherBench-2 needs a regular latitude-longitude grid: regrid the source files "
                        "before `dyf prepare netcdf`")
    lat = np.asarray(ds["lat"].values, dtype=np.float64)
    lon = np.asarray(ds["lon"].values, dtype=np.float64)
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        raise DataError(f"{path} has missing (NaN) latitudes or longitudes; re-create its data store with "
                        "`dyf prepare` from files with complete coordinates")
    latitude, longitude = grid_axis(lat), grid_axis(lon)
    rows = [np.searchsorted(latitude, values) for values in lat]
    columns = [np.searchsorted(longitude, values) for values in lon]
    _check_no_overlap(rows, columns, (len(latitude), len(longitude)), path)
    return Grid(latitude, longitude, rows, columns)


def grid_axis(per_series: np.ndarray) -> np.ndarray:
    """The ascending axis holding every value of `per_series (S, N)`: a regular one filled in at their
    spacing when they all lie on it (each tile's values kept exactly), else the sorted union."""
    values = np.unique(per_series)
    if len(values) < 2:
        return values
    step = float(np.diff(values).min())
    position = (values - values[0]) / step
    steps = np.rint(position).astype(np.int64)
    if not np.allclose(position, steps, rtol=0, atol=1e-3) or steps[-1] + 1 > REGULAR_FILL_LIMIT * len(values):
        return values
    axis = values[0] + np.arange(steps[-1] + 1) * step
    axis[steps] = values  # the tiles' own coordinates, so each maps to its exact value
    return axis


def _check_no_overlap(rows: list[np.ndarray], columns: list[np.ndarray], shape: tuple[int, int],
                      path: Path) -> None:
    """Tiles cut from one grid cover each grid point at most once (and repeat no latitude or longitude)."""
    covered = np.zeros(shape, dtype=np.int64)
    for series, (row, column) in enumerate(zip(rows, columns)):
        if len(np.unique(row)) != len(row) or len(np.unique(column)) != len(column):
            raise DataError(f"{path}: series {series} repeats a latitude or longitude, so it is no tile of a "
                            "grid; WeatherBench-2 export needs tiles cut from one latitude-longitude grid")
        covered[np.ix_(row, column)] += 1
    if (covered > 1).any():
        raise DataError(f"{path}: its series overlap at {int((covered > 1).sum())} grid points, so they are not "
                        "tiles of one grid; export a forecast made from one `dyf prepare netcdf --tile` store")


def init_times(ds, path: Path) -> np.ndarray:
    """`init_time` as datetime64; DataError for undated (simulated) times."""
    values = np.asarray(ds["init_time"].values)
    if not np.issubdtype(values.dtype, np.datetime64):
        raise DataError(f"{path} has no dated initial times (simulated time); WeatherBench-2 needs dates: "
                        "export forecasts of dated data")
    return values.astype("datetime64[ns]")


def lead_timedeltas(ds, path: Path) -> np.ndarray:
    """`lead_time` as timedelta64; DataError for counts of calendar steps (months)."""
    values = np.asarray(ds["lead_time"].values)
    if not np.issubdtype(values.dtype, np.timedelta64):
        step = ds.attrs.get("dyf_time_step")
        raise DataError(f"{path} has lead times in steps of {step!r}, which is no fixed time span; "
                        "WeatherBench-2's prediction_timedelta needs data with a fixed time step (hours, days)")
    return values.astype("timedelta64[ns]")


# ----------------------------------------------------------------------------------------------- layout

def wb2_schema(forecast, grid: Grid, times: np.ndarray, leads: np.ndarray):
    """The export's xr.Dataset: coordinates with CF attributes, fields as lazy NaN arrays (float32,
    chunks of one initial time), attributes naming the forecast it came from."""
    import dask.array as dsa
    import xarray as xr

    ds = forecast.ds
    members = forecast.members
    coords = {
        "time": ("time", times, {"long_name": "forecast initialization time"}),
        "prediction_timedelta": ("prediction_timedelta", leads, {"long_name": "forecast lead time"}),
        "realization": ("realization", np.arange(members, dtype=np.int64),
                        {"standard_name": "realization", "long_name": "ensemble member"}),
        "latitude": ("latitude", grid.latitude, {"axis": "Y"}),
        "longitude": ("longitude", grid.longitude, {"axis": "X"}),
    }
    export = xr.Dataset(coords=coords)
    shape = (len(times), len(leads), members, len(grid.latitude), len(grid.longitude))
    chunks = (1, *shape[1:])
    for name in forecast.fields:
        attrs = {key: value for key, value in ds[name].attrs.items()
                 if key in ("units", "standard_name", "long_name")}
        export[name] = (DIMS, dsa.full(shape, np.nan, dtype=np.float32, chunks=chunks), attrs)
    export.attrs.update({key: ds.attrs[key] for key in PROVENANCE if key in ds.attrs})
    export.attrs.update({
        "Conventions": "CF-1.8",
        "title": "dyf ensemble forecast in the WeatherBench-2 layout",
        "dyf_format": FORMAT,
        "dyf_format_version": FORMAT_VERSION,
        "dyf_fields": list(forecast.fields),
        "dyf_forecast": str(Path(forecast.path).resolve()),
        "dyf_version": __version__,
        "dyf_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return export, chunks


def stitch(values: np.ndarray, mask: np.ndarray, grid: Grid) -> np.ndarray:
    """One field at one initial time: tiles `(S, M, L, Y, X)` -> `(L, M, Ny, Nx)` float32 on the grid,
    NaN where no tile lies and where `mask (S, Y, X)` is False."""
    _, members, leads, _, _ = values.shape
    out = np.full((leads, members, len(grid.latitude), len(grid.longitude)), np.nan, dtype=np.float32)
    for series, (rows, columns) in enumerate(zip(grid.rows, grid.columns)):
        tile = np.where(mask[series], values[series], np.nan)  # (M, L, Y, X)
        out[:, :, rows[:, None], columns[None, :]] = tile.transpose(1, 0, 2, 3)
    return out


# ----------------------------------------------------------------------------------------------- workflow

def export(forecast_path: Path, out: Path, to: str = "wb2", overwrite: bool = False) -> dict:
    """Write the forecast store at `forecast_path` to `out` in the layout `to`; returns the summary."""
    if to not in TARGETS:
        raise UsageError(f"--to {to!r} is not a known layout; use one of {', '.join(TARGETS)}")
    if Path(out).suffix != ".zarr":
        raise UsageError(f"--out {out}: the export is a Zarr store; give a name ending in .zarr")
    with outputs.claim_output(Path(out), outputs.EXPORT, overwrite=overwrite, inputs=[forecast_path]):
        return _export(Path(forecast_path), Path(out))


def _export(forecast_path: Path, out: Path) -> dict:
    import zarr

    from dyfcli.forecast_store import open_forecast

    forecast = open_forecast(forecast_path)
    ds = forecast.ds
    grid = stitching_grid(ds, forecast_path)
    times, leads = init_times(ds, forecast_path), lead_timedeltas(ds, forecast_path)
    schema, chunks = wb2_schema(forecast, grid, times, leads)
    staging = outputs.new_staging(outputs.staging_path(out))
    encoding = {name: {"chunks": chunks, "fill_value": np.nan} for name in forecast.fields}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        for_writing(schema).to_zarr(staging, mode="a", compute=False, encoding=encoding, consolidated=True)
    group = zarr.open_group(str(staging), mode="r+", use_consolidated=False)
    mask = np.asarray(ds["mask"].values, dtype=bool)
    with progress("export", len(times), "initial times") as bar:
        for init in range(len(times)):
            for name in forecast.fields:
                values = np.asarray(ds[name].isel(init=init).values, dtype=np.float32)
                group[name][init] = stitch(values, mask, grid)
            bar.advance(1)
    outputs.unmark_staging(staging)
    outputs.move_into_place(staging, out, outputs.EXPORT)
    covered = np.zeros((len(grid.latitude), len(grid.longitude)), dtype=bool)
    for rows, columns in zip(grid.rows, grid.columns):
        covered[np.ix_(rows, columns)] = True
    log.info("exported %d series onto a %d x %d grid (%.0f%% of it covered)", len(grid.rows),
             len(grid.latitude), len(grid.longitude), 100 * covered.mean())
    return {"forecast": str(forecast_path), "out": str(out), "to": "wb2", "fields": list(forecast.fields),
            "sizes": dict(zip(DIMS, (len(times), len(leads), forecast.members, len(grid.latitude),
                                     len(grid.longitude)))),
            "series": len(grid.rows), "covered_fraction": float(covered.mean())}


def describe(path: Path | str) -> dict:
    """A JSON-ready summary of an export for `dyf inspect`."""
    import xarray as xr

    from dyfcli.attrs import decode
    from dyfcli.chunks import read_errors

    path = Path(path)
    with read_errors(path, "the export", "re-run `dyf export` with --overwrite"):
        ds = xr.open_zarr(path, chunks=None)
    attrs = decode(ds.attrs)
    times = ds["time"].values
    return {
        "kind": "wb2-export",
        "path": str(path),
        "fields": {name: {"units": ds[name].attrs.get("units")} for name in attrs.get("dyf_fields", [])},
        "sizes": {dim: int(size) for dim, size in ds.sizes.items()},
        "time": {"first": str(times[0]), "last": str(times[-1]), "count": int(len(times))} if len(times) else None,
        "prediction_timedelta": [str(value) for value in ds["prediction_timedelta"].values[:1000]],
        "forecast": attrs.get("dyf_forecast"),
        "method": attrs.get("dyf_method"),
        "seed": attrs.get("dyf_seed"),
        "created": attrs.get("dyf_created"),
        "dyf_version": attrs.get("dyf_version"),
    }
