"""Tiny raw OISST files written by tests: PSL yearly, NCEI daily and DYffusion box layouts.

The default grid is a regional cut of the global 0.25° grid, one row and two columns wider than boxes
84 (15°S-0°, 180°-165°W) and 85 (165°W-150°W), so only those two boxes are complete. `synthetic_sst`
gives deterministic values in °C rounded to 0.01 (what NCEI packing can hold), with an island in box 84,
a large land block in box 85 (it is under 95 % ocean), and one pixel frozen at -1.8 °C (zero variance).
"""

from __future__ import annotations

from pathlib import Path

import netCDF4
import numpy as np
import pandas as pd

PSL_MISSING = np.float32(-9.96921e36)
NCEI_FILL = -999
LAT = -15.125 + 0.25 * np.arange(61)      # -15.125 .. -0.125
LON = 179.625 + 0.25 * np.arange(124)     # 179.625 .. 210.375
FROZEN_PIXEL = (-0.125, 200.125)          # (lat, lon) held at -1.8 °C every day


def days(first: str, last: str) -> np.ndarray:
    return np.arange(np.datetime64(first), np.datetime64(last) + np.timedelta64(1, "D"), dtype="datetime64[D]")


def land(lat: np.ndarray = LAT, lon: np.ndarray = LON) -> np.ndarray:
    """(Y, X) True on land."""
    la, lo = np.meshgrid(lat, np.mod(lon, 360), indexing="ij")
    island = (la >= -10) & (la <= -8.5) & (lo >= 185) & (lo <= 187)
    block = (la >= -5) & (la < 0) & (lo > 205) & (lo < 210)      # 20x19 pixels of box 85
    return island | block


def synthetic_sst(dates: np.ndarray, lat: np.ndarray = LAT, lon: np.ndarray = LON) -> np.ndarray:
    """(T, Y, X) float32 °C, NaN on land; depends on the date only, not on which file holds it."""
    la, lo = np.meshgrid(lat, np.mod(lon, 360), indexing="ij")
    base = 26 + 2 * np.cos(np.radians(la)) + 0.02 * (lo - 180)
    out = np.empty((len(dates), len(lat), len(lon)), dtype=np.float32)
    frozen = (np.isclose(la, FROZEN_PIXEL[0])) & (np.isclose(lo, FROZEN_PIXEL[1]))
    index = pd.DatetimeIndex(dates)
    for t, day in enumerate(index):
        rng = np.random.default_rng(day.toordinal())
        field = (base + 1.5 * np.sin(2 * np.pi * day.day_of_year / 365.25) + 0.3 * (day.year - 2000)
                 + rng.normal(0, 0.4, size=base.shape))
        field[frozen] = -1.8
        out[t] = np.round(field, 2)
    out[:, land(lat, lon)] = np.nan
    return out


def _coordinates(dataset, lat, lon) -> None:
    dataset.createDimension("lat", len(lat))
    dataset.createDimension("lon", len(lon))
    dataset.createVariable("lat", "f4", ("lat",))[:] = lat
    dataset.createVariable("lon", "f4", ("lon",))[:] = lon
    dataset["lat"].units, dataset["lon"].units = "degrees_north", "degrees_east"


def write_psl(folder: Path, dates: np.ndarray, *, lat=LAT, lon=LON, v2_years=(), offset: float = 0.0,
              name: str | None = None, values: np.ndarray | None = None, zlib: bool = False,
              shuffle: bool = True) -> np.ndarray:
    """PSL yearly files `sst.day.mean.YYYY.nc` (`.v2.nc` for `v2_years`); returns the values (T, Y, X).

    `zlib` compresses each day's chunk (level 1, byte shuffle first unless `shuffle` is False) like the
    real downloads; by default the chunks are stored uncompressed."""
    folder.mkdir(parents=True, exist_ok=True)
    values = (synthetic_sst(dates, lat, lon) if values is None else values) + np.float32(offset)
    years = dates.astype("datetime64[Y]").astype(int) + 1970
    for year in np.unique(years):
        pick = years == year
        filename = name or (f"sst.day.mean.{year}.v2.nc" if year in v2_years else f"sst.day.mean.{year}.nc")
        with netCDF4.Dataset(folder / filename, "w", format="NETCDF4") as dataset:
            dataset.createDimension("time", None)
            _coordinates(dataset, lat, lon)
            time = dataset.createVariable("time", "f8", ("time",))
            time.units = "days since 1800-01-01 00:00:00"
            time[:] = (dates[pick] - np.datetime64("1800-01-01")).astype(float)
            sst = dataset.createVariable("sst", "f4", ("time", "lat", "lon"), chunksizes=(1, len(lat), len(lon)),
                                         zlib=zlib, complevel=1, shuffle=zlib and shuffle)
            sst.missing_value = PSL_MISSING
            sst.units = "degC"
            sst.set_auto_maskandscale(False)
            sst[:] = np.where(np.isnan(values[pick]), PSL_MISSING, values[pick])
    return values


def write_ncei_day(folder: Path, date: np.datetime64, values: np.ndarray, *, preliminary: bool = False,
                   lat=LAT, lon=LON) -> Path:
    """One NCEI daily file `YYYYMM/oisst-avhrr-v02r01.YYYYMMDD[_preliminary].nc` (int16, scale 0.01)."""
    stamp = str(date).replace("-", "")
    path = folder / stamp[:6] / f"oisst-avhrr-v02r01.{stamp}{'_preliminary' if preliminary else ''}.nc"
    path.parent.mkdir(parents=True, exist_ok=True)
    with netCDF4.Dataset(path, "w", format="NETCDF4") as dataset:
        dataset.createDimension("time", None)
        dataset.createDimension("zlev", 1)
        _coordinates(dataset, lat, lon)
        time = dataset.createVariable("time", "f4", ("time",))
        time.units = "days since 1978-01-01 12:00:00"
        time[:] = float((np.datetime64(date, "D") - np.datetime64("1978-01-01")).astype(int))
        dataset.createVariable("zlev", "f4", ("zlev",))[:] = 0.0
        sst = dataset.createVariable("sst", "i2", ("time", "zlev", "lat", "lon"), fill_value=NCEI_FILL, zlib=True)
        sst.scale_factor, sst.add_offset, sst.units = np.float32(0.01), np.float32(0.0), "Celsius"
        sst.set_auto_maskandscale(False)
        packed = np.where(np.isnan(values), NCEI_FILL, np.round(np.nan_to_num(values) * 100)).astype(np.int16)
        sst[0, 0] = packed
    return path


def write_ncei(folder: Path, dates: np.ndarray, **kwargs) -> np.ndarray:
    values = synthetic_sst(dates)
    for date, field in zip(dates, values):
        write_ncei_day(folder, date, field, **kwargs)
    return values


def write_box_file(path: Path, box: int, dates: np.ndarray, values: np.ndarray, *, degrees: bool = True) -> None:
    """A DYffusion box file: standardized `sst(time, lat, lon)` 60x60, zeros on land."""
    row, col = divmod(box, 24)
    lat = -59.875 + 0.25 * (120 + 60 * row + np.arange(60)) if degrees else np.arange(60.0)
    lon = 0.125 + 0.25 * (60 * col + np.arange(60)) if degrees else np.arange(60.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with netCDF4.Dataset(path, "w", format="NETCDF4") as dataset:
        dataset.createDimension("time", None)
        _coordinates(dataset, lat, lon)
        time = dataset.createVariable("time", "f8", ("time",))
        time.units, time.calendar = "days since 1982-01-01", "proleptic_gregorian"
        time[:] = (dates - np.datetime64("1982-01-01")).astype(float)
        dataset.createVariable("sst", "f4", ("time", "lat", "lon"))[:] = values
