"""`dyf prepare netcdf`: CF files from the wild -> a data store (dyfcli/sources/netcdf.py)."""

import json

import numpy as np
import pytest
import xarray as xr

from dyfcli.data import WindowDataset
from dyfcli.errors import DataError, UsageError
from dyfcli.sources.netcdf import prepare_netcdf, store_time_chunk
from dyfcli.store import open_store

NOLEAP_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


def cmip_monthly(path, months=24):
    """Like a CMIP6 Omon `tos` file: noleap mid-month times with bounds, float32, _FillValue 1e20, land."""
    lengths = np.tile(NOLEAP_MONTH_DAYS, months // 12 + 1)[:months]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.float64)
    rng = np.random.default_rng(1)
    tos = (20 + rng.normal(size=(months, 6, 8))).astype(np.float32)
    tos[:, :2, :3] = np.nan  # land
    lat = np.linspace(-10, 15, 6)
    ds = xr.Dataset(
        {"tos": (("time", "lat", "lon"), tos, {"units": "degC", "standard_name": "sea_surface_temperature"}),
         "time_bnds": (("time", "bnds"), np.stack([starts, starts + lengths], axis=1)),
         "lat_bnds": (("lat", "bnds"), np.stack([lat - 2.5, lat + 2.5], axis=1))},
        coords={"time": ("time", starts + lengths / 2, {"units": "days since 1850-01-01", "calendar": "noleap",
                                                         "bounds": "time_bnds", "axis": "T", "standard_name": "time"}),
                "lat": ("lat", lat, {"units": "degrees_north", "axis": "Y", "bounds": "lat_bnds"}),
                "lon": ("lon", np.linspace(0.5, 357.5, 8), {"units": "degrees_east", "axis": "X"})})
    ds.to_netcdf(path, encoding={"tos": {"_FillValue": 1e20, "dtype": "float32"}})
    return path, tos


def era5_like(path, steps=12, time_name="valid_time"):
    """Like a CDS ERA5 download: int16 packed t2m, latitude descending, 6-hourly, scalar `number`/`expver`."""
    rng = np.random.default_rng(2)
    t2m = (280 + 10 * rng.random((steps, 5, 7))).astype(np.float64)
    scale, offset = 0.002, 280.0
    packed = np.round((t2m - offset) / scale).astype(np.int16)
    latitude = np.linspace(60, 40, 5)  # north to south, as ERA5
    ds = xr.Dataset(
        {"t2m": ((time_name, "latitude", "longitude"), packed,
                 {"scale_factor": scale, "add_offset": offset, "_FillValue": np.int16(-32767), "units": "K",
                  "long_name": "2 metre temperature"})},
        coords={time_name: (time_name, np.arange(steps) * 6.0, {"units": "hours since 2020-01-01",
                                                                "standard_name": "time"}),
                "latitude": ("latitude", latitude, {"units": "degrees_north", "standard_name": "latitude"}),
                "longitude": ("longitude", np.linspace(-10, 5, 7), {"units": "degrees_east"}),
                "number": 0, "expver": "0001"})
    ds.to_netcdf(path)
    return path, (packed * scale + offset)


def daily_files(folder, files=3, days=10, grid=(8, 12)):
    """Like NCEI OISST dailies: a zlev of size 1, times at 12:00, land in the south-west corner."""
    rng = np.random.default_rng(3)
    values = (15 + rng.normal(size=(files * days, *grid))).astype(np.float32)
    values[:, :4, :4] = np.nan  # one whole land tile of 4 x 4
    for f in range(files):
        chunk = values[f * days:(f + 1) * days, None]
        ds = xr.Dataset({"sst": (("time", "zlev", "lat", "lon"), chunk, {"units": "Celsius"})},
                        coords={"time": ("time", np.arange(f * days, (f + 1) * days) + 16000.0,
                                         {"units": "days since 1978-01-01 12:00:00"}),
                                "zlev": ("zlev", [0.0]),
                                "lat": ("lat", np.arange(grid[0]) - 3.5, {"units": "degrees_north"}),
                                "lon": ("lon", np.arange(grid[1]) + 0.5, {"units": "degrees_east"})})
        ds.to_netcdf(folder / f"day_{f:02d}.nc")
    return values


def projected(path, steps=96):
    """A regional model output on projected y/x (metres), y running north to south, hourly."""
    rng = np.random.default_rng(4)
    precip = rng.gamma(1.0, size=(steps, 4, 6)).astype(np.float32)
    ds = xr.Dataset({"pr": (("t", "y", "x"), precip, {"units": "mm h-1", "grid_mapping": "crs"}),
                     "crs": ((), 0, {"grid_mapping_name": "lambert_conformal_conic"})},
                    coords={"t": ("t", np.arange(steps), {"units": "hours since 2021-06-01 00:00", "axis": "T"}),
                            "y": ("y", [3000.0, 2000.0, 1000.0, 0.0], {"standard_name": "projection_y_coordinate",
                                                                      "units": "m"}),
                            "x": ("x", np.arange(6) * 1000.0, {"standard_name": "projection_x_coordinate",
                                                             "units": "m"})})
    ds.to_netcdf(path)
    return path, precip


# -------------------------------------------------------------------------------------------- the wild

def test_cmip_monthly_noleap_with_bounds_and_fill(tmp_path):
    path, tos = cmip_monthly(tmp_path / "tos_Omon.nc")
    summary = prepare_netcdf([str(path)], ["tos"], tmp_path / "tos.zarr")
    store = open_store(tmp_path / "tos.zarr")
    ds = store.ds
    assert ds.attrs["dyf_time_step"] == "1MS" and ds.attrs["dyf_calendar"] == "noleap"
    assert str(ds["time"].values[0])[:10] == "1850-01-01" and str(ds["time"].values[13])[:10] == "1851-02-01"
    np.testing.assert_array_equal(ds["tos"].values[0], tos)  # NaN where the fill value was
    assert ds["tos"].attrs["standard_name"] == "sea_surface_temperature" and ds["tos"].attrs["units"] == "degC"
    assert (~ds["mask"].values[0, :2, :3]).all() and ds["mask"].values[0, 2:].all()
    assert ds["lat"].dims == ("series", "y") and ds["lon"].values[0, 0] == 0.5
    # default splits: last 10 % / 10 % of the 24 months
    assert summary["splits"]["test"]["steps"] == 2 and summary["splits"]["val"]["steps"] == 2
    assert summary["splits"]["train"]["steps"] == 20 and any("no split flags" in n for n in summary["notes"])
    train = tos[:20].astype(np.float64)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(ds["stats_mean_tos"].values[0], np.nanmean(train, axis=0), rtol=1e-6)
        np.testing.assert_allclose(ds["stats_std_tos"].values[0], np.nanstd(train, axis=0), rtol=1e-5)


def test_era5_packed_descending_latitude(tmp_path):
    path, t2m = era5_like(tmp_path / "era5.nc")
    summary = prepare_netcdf([str(path)], ["t2m"], tmp_path / "e.zarr", normalization="global")
    ds = open_store(tmp_path / "e.zarr").ds
    assert ds.attrs["dyf_time_step"] == "6h" and summary["time"]["steps"] == 12
    assert ds["lat"].values[0].tolist() == [40, 45, 50, 55, 60]  # flipped south to north
    np.testing.assert_allclose(ds["t2m"].values[0], t2m[:, ::-1], rtol=1e-6)
    assert ds["t2m"].dtype == np.float32 and ds["stats_mean_t2m"].dims == ()
    assert any("flipped" in note for note in summary["notes"])


def test_daily_files_by_glob_with_tiles_and_singleton_depth(tmp_path):
    (tmp_path / "raw").mkdir()
    values = daily_files(tmp_path / "raw")
    summary = prepare_netcdf([str(tmp_path / "raw" / "day_*.nc")], ["sst"], tmp_path / "d.zarr", tile=4,
                             train_until="2021-11-08", val="2021-11-09:2021-11-14", test="2021-11-15:")
    ds = open_store(tmp_path / "d.zarr").ds
    assert ds.attrs["dyf_time_step"] == "1D" and summary["files"] == 3
    assert str(ds["time"].values[0])[:19] == "2021-10-22T00:00:00"  # 16000 days after 1978-01-01 12:00, floored
    # 8 x 12 grid -> 2 x 3 tiles of 4 x 4; tile 0 (south-west) is all land and dropped
    assert ds["series"].values.tolist() == [1, 2, 3, 4, 5] and ds.sizes["y"] == ds.sizes["x"] == 4
    np.testing.assert_array_equal(ds["sst"].values[3], values[:, 4:8, 4:8])  # tile 4 = row 1, column 1
    assert any("zlev" in note for note in summary["notes"])
    assert ds["sst"].encoding["chunks"] == (1, store_time_chunk(4 * 4 * 4), 4, 4)


def test_daily_files_and_windows(tmp_path):
    (tmp_path / "raw").mkdir()
    daily_files(tmp_path / "raw", files=2, days=8, grid=(6, 6))
    prepare_netcdf([str(tmp_path / "raw")], ["sst"], tmp_path / "w.zarr", overwrite=False)
    dataset = WindowDataset(tmp_path / "w.zarr", "train", length=3)
    item = dataset[0]
    assert item["dynamics"].shape == (3, 1, 6, 6) and not item["dynamics"].isnan().any()


def test_projected_y_x_hourly(tmp_path):
    path, precip = projected(tmp_path / "wrf.nc")
    prepare_netcdf([str(path)], ["pr"], tmp_path / "p.zarr")
    ds = open_store(tmp_path / "p.zarr").ds
    assert ds.attrs["dyf_time_step"] == "1h"
    assert ds["y_coordinate"].values[0].tolist() == [0, 1000, 2000, 3000]
    assert ds["y_coordinate"].attrs["standard_name"] == "projection_y_coordinate"
    np.testing.assert_array_equal(ds["pr"].values[0], precip[:, ::-1])


def test_calendar_360_day_daily_is_converted(tmp_path):
    ds = xr.Dataset({"ua": (("time", "lat", "lon"), np.ones((40, 2, 3), np.float32))},
                    coords={"time": ("time", np.arange(40.0), {"units": "days since 2000-02-01",
                                                               "calendar": "360_day"}),
                            "lat": [0.0, 1.0], "lon": [0.0, 1.0, 2.0]})
    ds.to_netcdf(tmp_path / "ua.nc")
    summary = prepare_netcdf([str(tmp_path / "ua.nc")], ["ua"], tmp_path / "u.zarr")
    assert summary["time"]["calendar"] == "360_day" and summary["time"]["steps"] == 40
    assert any("360_day" in note for note in summary["notes"])


# ---------------------------------------------------------------------------------------------- errors

def test_bad_inputs_are_data_errors_that_name_the_fix(tmp_path):
    path, _ = cmip_monthly(tmp_path / "tos.nc")
    out = tmp_path / "o.zarr"
    with pytest.raises(DataError, match="no file matches"):
        prepare_netcdf([str(tmp_path / "nope*.nc")], ["tos"], out)
    (tmp_path / "notes.nc").write_text("hello")
    with pytest.raises(DataError, match="not a NetCDF file"):
        prepare_netcdf([str(tmp_path / "notes.nc")], ["tos"], out)
    with pytest.raises(DataError, match="no variable sst; choose --var from: tos"):
        prepare_netcdf([str(path)], ["sst"], out)
    xr.Dataset({"z": (("lat", "lon"), np.zeros((2, 3)))}).to_netcdf(tmp_path / "static.nc")
    with pytest.raises(DataError, match="no time axis"):
        prepare_netcdf([str(tmp_path / "static.nc")], ["z"], out)
    assert not out.exists() and not (tmp_path / "o.zarr.partial").exists()


def test_mismatched_grids_and_irregular_time(tmp_path):
    (tmp_path / "raw").mkdir()
    daily_files(tmp_path / "raw", files=2, days=5, grid=(4, 4))
    xr.Dataset({"sst": (("time", "lat", "lon"), np.zeros((5, 4, 5), np.float32))},
               coords={"time": ("time", np.arange(100, 105.0), {"units": "days since 2030-01-01"}),
                       "lat": ("lat", np.arange(4.0) - 3.5, {"units": "degrees_north"}),
                       "lon": ("lon", np.arange(5.0), {"units": "degrees_east"})}
               ).to_netcdf(tmp_path / "raw" / "odd.nc")
    with pytest.raises(DataError, match="different x grid"):
        prepare_netcdf([str(tmp_path / "raw")], ["sst"], tmp_path / "o.zarr")
    times = np.array([0, 1, 2, 5, 6, 7, 8, 9, 10, 11], dtype=np.float64)
    xr.Dataset({"v": (("time", "lat", "lon"), np.zeros((10, 2, 2), np.float32))},
               coords={"time": ("time", times, {"units": "days since 2000-01-01"}),
                       "lat": [0.0, 1.0], "lon": [0.0, 1.0]}).to_netcdf(tmp_path / "gappy.nc")
    with pytest.raises(DataError, match=r"irregular: the usual step is 1D but 2000-01-03.* -> 2000-01-06"):
        prepare_netcdf([str(tmp_path / "gappy.nc")], ["v"], tmp_path / "o.zarr")


def test_extra_dimension_needs_select(tmp_path):
    ds = xr.Dataset({"ta": (("time", "plev", "lat", "lon"), np.arange(5 * 3 * 2 * 2, dtype=np.float32)
                            .reshape(5, 3, 2, 2))},
                    coords={"time": ("time", np.arange(5.0), {"units": "days since 2000-01-01"}),
                            "plev": [100000.0, 85000.0, 50000.0], "lat": [0.0, 1.0], "lon": [0.0, 1.0]})
    ds.to_netcdf(tmp_path / "ta.nc")
    with pytest.raises(DataError, match="extra dimension 'plev' of size 3.*--select plev=VALUE.*--var"):
        prepare_netcdf([str(tmp_path / "ta.nc")], ["ta"], tmp_path / "o.zarr")
    prepare_netcdf([str(tmp_path / "ta.nc")], ["ta"], tmp_path / "o.zarr", select={"plev": "85000"})
    stored = open_store(tmp_path / "o.zarr").ds["ta"].values[0]
    np.testing.assert_array_equal(stored, ds["ta"].values[:, 1])


def test_partial_split_flags_are_a_usage_error(tmp_path):
    path, _ = cmip_monthly(tmp_path / "tos.nc")
    with pytest.raises(UsageError, match="missing --test"):
        prepare_netcdf([str(path)], ["tos"], tmp_path / "o.zarr", train_until="1850", val="1851-01:1851-06")
    with pytest.raises(DataError, match="test split .* selects no time step"):
        prepare_netcdf([str(path)], ["tos"], tmp_path / "o.zarr", train_until="1850", val="1851-01:1851-06",
                       test="1990")


# ------------------------------------------------------------------------------------------ real command

def test_cli_two_variables_json(dyf, tmp_path):
    ds = xr.Dataset({"u": (("time", "lat", "lon"), np.random.default_rng(0).normal(size=(6, 3, 4))),
                     "v": (("time", "lat", "lon"), np.ones((6, 3, 4)), {"units": "m s-1"})},
                    coords={"time": ("time", np.arange(6.0) * 24, {"units": "hours since 2000-01-01"}),
                            "lat": [0.0, 1.0, 2.0], "lon": [0.0, 1.0, 2.0, 3.0]})
    ds.to_netcdf(tmp_path / "uv.nc")
    proc = dyf("--json", "prepare", "netcdf", str(tmp_path / "uv.nc"), "--var", "u,v",
               "--out", str(tmp_path / "uv.zarr"))
    doc = json.loads(proc.stdout)
    assert doc["ok"] and list(doc["fields"]) == ["u", "v"] and doc["fields"]["v"]["units"] == "m s-1"
    assert "wrote" in proc.stderr
    std = open_store(tmp_path / "uv.zarr").ds["stats_std_v"].values
    assert np.isfinite(std).all() and (std > 0).all()  # a constant field is floored, not zero
    proc = dyf("prepare", "netcdf", str(tmp_path / "uv.nc"), "--var", "w", "--out", str(tmp_path / "w.zarr"), check=4)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "choose --var from: u, v" in errors[0] and "Traceback" not in proc.stderr


def test_zarr_input_and_undated_float_time(tmp_path):
    ds = xr.Dataset({"vorticity": (("time", "y", "x"), np.random.default_rng(5).normal(size=(20, 3, 4)),
                                   {"units": "s-1"})},
                    coords={"time": ("time", np.arange(20) * 0.25, {"axis": "T", "units": "s"})})
    ds.to_zarr(tmp_path / "sim.zarr")
    summary = prepare_netcdf([str(tmp_path / "sim.zarr")], ["vorticity"], tmp_path / "v.zarr")
    store = open_store(tmp_path / "v.zarr")
    assert not store.is_dated and store.ds.attrs["dyf_time_step"] == 0.25
    assert [summary["splits"][s]["steps"] for s in ("train", "val", "test")] == [16, 2, 2]
    assert store.split_ranges("test") == [(0, 18, 20)]
    with pytest.raises(UsageError, match="no dated time axis"):
        prepare_netcdf([str(tmp_path / "sim.zarr")], ["vorticity"], tmp_path / "w.zarr", train_until="2000",
                       val="2001", test="2002")
