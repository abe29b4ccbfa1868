"""`dyf prepare netcdf` on files as users hold them (issue 9): pressure levels, auxiliary CF time,
exact --select, GRIB, bounds variables and undecodable time units."""

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dyfcli.errors import DataError
from dyfcli.sources.netcdf import prepare_netcdf
from dyfcli.store import open_store

LEVELS_HPA = [1000.0, 850.0, 500.0]


def era5_pressure_levels(path, steps=8):
    """Like a CDS ERA5 download: z and t on `pressure_level` (hPa), t2m alongside, lat descending (daily)."""
    rng = np.random.default_rng(4)
    shape = (steps, len(LEVELS_HPA), 4, 5)
    ds = xr.Dataset(
        {"z": (("valid_time", "pressure_level", "latitude", "longitude"), rng.normal(size=shape), {"units": "m2 s-2"}),
         "t": (("valid_time", "pressure_level", "latitude", "longitude"), 250 + rng.normal(size=shape)),
         "t2m": (("valid_time", "latitude", "longitude"), 280 + rng.normal(size=(steps, 4, 5)))},
        coords={"valid_time": ("valid_time", np.arange(steps) * 24.0, {"units": "hours since 2020-01-01",
                                                                      "standard_name": "time"}),
                "pressure_level": ("pressure_level", LEVELS_HPA, {"units": "hPa", "long_name": "pressure"}),
                "latitude": ("latitude", np.linspace(60, 30, 4), {"units": "degrees_north"}),
                "longitude": ("longitude", np.linspace(0, 20, 5), {"units": "degrees_east"})})
    ds.to_netcdf(path)
    return ds


def stored(out, name):
    """A field of the store as `(time, y, x)` in the file's latitude order (north first)."""
    return open_store(out).ds[name].values[0][:, ::-1]


# -------------------------------------------------------------------------------------------- levels

def test_pressure_levels_become_fields(tmp_path):
    ds = era5_pressure_levels(tmp_path / "era5.nc")
    summary = prepare_netcdf([str(tmp_path / "era5.nc")], ["z@500", "z@850", "t@850", "t2m"], tmp_path / "o.zarr")
    assert list(summary["fields"]) == ["z500", "z850", "t850", "t2m"]
    assert summary["fields"]["z500"]["units"] == "m2 s-2"
    assert open_store(tmp_path / "o.zarr").ds.attrs["dyf_fields"] == ["z500", "z850", "t850", "t2m"]
    for name, var, level in (("z500", "z", 500.0), ("z850", "z", 850.0), ("t850", "t", 850.0)):
        np.testing.assert_allclose(stored(tmp_path / "o.zarr", name),
                                   ds[var].sel(pressure_level=level).values.astype(np.float32))
    np.testing.assert_allclose(stored(tmp_path / "o.zarr", "t2m"), ds["t2m"].values.astype(np.float32))


def test_levels_in_pa_found_by_cf_attributes(tmp_path):
    """CMIP writes plev in Pa; a level written in hPa matches it, and so does the value in Pa. The axis
    here has an unusual name and is found by its attributes alone."""
    values = np.arange(6 * 3 * 2 * 2, dtype=np.float32).reshape(6, 3, 2, 2)
    xr.Dataset({"ta": (("time", "p", "lat", "lon"), values)},
               coords={"time": ("time", np.arange(6.0), {"units": "days since 2000-01-01"}),
                       "p": ("p", [100000.0, 85000.0, 50000.0], {"units": "Pa", "positive": "down"}),
                       "lat": [0.0, 1.0], "lon": [0.0, 1.0]}).to_netcdf(tmp_path / "ta.nc")
    prepare_netcdf([str(tmp_path / "ta.nc")], ["ta@850", "ta@50000"], tmp_path / "o.zarr")
    store = open_store(tmp_path / "o.zarr").ds
    np.testing.assert_array_equal(store["ta850"].values[0], values[:, 1])
    np.testing.assert_array_equal(store["ta50000"].values[0], values[:, 2])


def test_absent_level_exits_4_naming_the_levels(dyf, tmp_path):
    era5_pressure_levels(tmp_path / "era5.nc")
    proc = dyf("prepare", "netcdf", str(tmp_path / "era5.nc"), "--var", "z@700", "--out", str(tmp_path / "o.zarr"),
               check=4)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "z@700" in errors[0] and "1000, 850, 500" in errors[0]
    proc = dyf("prepare", "netcdf", str(tmp_path / "era5.nc"), "--var", "z@", "--out", str(tmp_path / "o.zarr"),
               check=2)
    assert "write NAME or NAME@LEVEL" in proc.stderr
    with pytest.raises(DataError, match="'t2m' .* has no vertical axis.*--var t2m without @LEVEL"):
        prepare_netcdf([str(tmp_path / "era5.nc")], ["t2m@500"], tmp_path / "o.zarr")
    with pytest.raises(DataError, match=r"extra dimension 'pressure_level' of size 3.*--var z@LEVEL.*1000, 850"):
        prepare_netcdf([str(tmp_path / "era5.nc")], ["z"], tmp_path / "o.zarr")


# ---------------------------------------------------------------------------------- auxiliary time

def nemo_files(folder, files=3, days=5):
    """Like NEMO output: dimension time_counter (axis T, no units, 0 in every file), the real time in the
    auxiliary coordinate time_centered (360_day, seconds), curvilinear nav_lat/nav_lon on (y, x)."""
    rng = np.random.default_rng(5)
    nav_lat, nav_lon = np.meshgrid(np.linspace(-5, 5, 3), np.linspace(100, 110, 4), indexing="ij")
    nav_lat = nav_lat + 0.1 * nav_lon  # curvilinear: latitude varies along x too
    values = rng.normal(size=(files * days, 3, 4)).astype(np.float32)
    for index in range(files):
        days_since = np.arange(index * days, (index + 1) * days) + 0.5
        xr.Dataset(
            {"tos": (("time_counter", "y", "x"), values[index * days:(index + 1) * days],
                     {"units": "degC", "coordinates": "time_centered nav_lat nav_lon"}),
             "time_centered_bounds": (("time_counter", "axis_nbounds"), np.zeros((days, 2)))},
            coords={"time_counter": ("time_counter", np.zeros(days), {"axis": "T"}),
                    "time_centered": ("time_counter", days_since * 86400,
                                      {"standard_name": "time", "calendar": "360_day",
                                       "units": "seconds since 1900-01-01 00:00:00",
                                       "bounds": "time_centered_bounds"}),
                    "nav_lat": (("y", "x"), nav_lat, {"units": "degrees_north", "standard_name": "latitude"}),
                    "nav_lon": (("y", "x"), nav_lon, {"units": "degrees_east", "standard_name": "longitude"})},
        ).to_netcdf(folder / f"nemo_{index}.nc")
    return values


def test_time_from_auxiliary_coordinate(tmp_path):
    values = nemo_files(tmp_path)
    summary = prepare_netcdf([str(tmp_path / "nemo_*.nc")], ["tos"], tmp_path / "o.zarr")
    assert summary["time"]["calendar"] == "360_day" and summary["time"]["steps"] == 15
    assert summary["time"]["step"] == "1D" and summary["time"]["first"].startswith("1900-01-01")
    store = open_store(tmp_path / "o.zarr").ds
    np.testing.assert_array_equal(store["tos"].values[0], values)
    with xr.open_dataset(tmp_path / "nemo_0.nc") as first:  # curvilinear lat/lon kept as (series, y, x)
        assert store["lat"].dims == ("series", "y", "x") and store["lat"].attrs["units"] == "degrees_north"
        np.testing.assert_array_equal(store["lat"].values[0], first["nav_lat"].values)
        np.testing.assert_array_equal(store["lon"].values[0], first["nav_lon"].values)


def test_curvilinear_coordinates_follow_tiles(tmp_path):
    nemo_files(tmp_path, files=1, days=12)
    prepare_netcdf([str(tmp_path / "nemo_0.nc")], ["tos"], tmp_path / "o.zarr", tile=2)
    store = open_store(tmp_path / "o.zarr").ds
    with xr.open_dataset(tmp_path / "nemo_0.nc") as first:
        assert store["lat"].shape == (2, 2, 2)  # 3 x 4 grid: one row of two tiles, the last row dropped
        np.testing.assert_array_equal(store["lat"].values[1], first["nav_lat"].values[:2, 2:4])
        np.testing.assert_array_equal(store["lon"].values[1], first["nav_lon"].values[:2, 2:4])


def test_bounds_variables_are_not_offered(dyf, tmp_path):
    nemo_files(tmp_path, files=1)
    proc = dyf("prepare", "netcdf", str(tmp_path / "nemo_0.nc"), "--var", "sst", "--out", str(tmp_path / "o.zarr"),
               check=4)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("choose --var from: tos")


def test_undecodable_time_units_named(dyf, tmp_path):
    xr.Dataset({"v": (("time", "lat", "lon"), np.zeros((4, 2, 2)))},
               coords={"time": ("time", np.arange(4.0), {"units": "hour since 0000-01-01"}),
                       "lat": [0.0, 1.0], "lon": [0.0, 1.0]}).to_netcdf(tmp_path / "bad.nc")
    proc = dyf("prepare", "netcdf", str(tmp_path / "bad.nc"), "--var", "v", "--out", str(tmp_path / "o.zarr"),
               check=4)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'hour since 0000-01-01'" in errors[0] and "'time'" in errors[0]
    assert "decode_times" not in errors[0]  # an xarray argument the CLI does not have


# ------------------------------------------------------------------------------------------- select

def test_select_matches_exactly_or_names_the_values(dyf, tmp_path):
    values = np.arange(5 * 2 * 2, dtype=np.float32).reshape(5, 1, 2, 2)
    xr.Dataset({"u": (("time", "pressure", "lat", "lon"), values)},
               coords={"time": ("time", np.arange(5.0), {"units": "days since 2000-01-01"}),
                       "pressure": ("pressure", np.array([500.0], np.float32), {"units": "hPa"}),
                       "lat": [0.0, 1.0], "lon": [0.0, 1.0]}).to_netcdf(tmp_path / "u.nc")
    args = ("prepare", "netcdf", str(tmp_path / "u.nc"), "--var", "u", "--out", str(tmp_path / "o.zarr"))
    proc = dyf(*args, "--select", "pressure=10", check=4)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pressure=10" in errors[0] and "values present are 500" in errors[0]
    proc = dyf(*args, "--select", "pressure=500,pressure=10", check=2)
    assert "pressure is selected twice" in proc.stderr
    prepare_netcdf([str(tmp_path / "u.nc")], ["u"], tmp_path / "o.zarr", select={"pressure": "500.00001"})
    np.testing.assert_array_equal(open_store(tmp_path / "o.zarr").ds["u"].values[0], values[:, 0])


def test_select_by_label_and_by_index(tmp_path):
    values = np.arange(5 * 2 * 2 * 2, dtype=np.float32).reshape(5, 2, 2, 2)
    xr.Dataset({"u": (("time", "member", "lat", "lon"), values), "v": (("time", "run", "lat", "lon"), values)},
               coords={"time": ("time", np.arange(5.0), {"units": "days since 2000-01-01"}),
                       "member": ["r1", "r2"], "lat": [0.0, 1.0], "lon": [0.0, 1.0]}).to_netcdf(tmp_path / "e.nc")
    prepare_netcdf([str(tmp_path / "e.nc")], ["u", "v"], tmp_path / "o.zarr", select={"member": "r2", "run": "0"})
    store = open_store(tmp_path / "o.zarr").ds
    np.testing.assert_array_equal(store["u"].values[0], values[:, 1])
    np.testing.assert_array_equal(store["v"].values[0], values[:, 0])
    with pytest.raises(DataError, match="has no member r3; the values present are r1, r2"):
        prepare_netcdf([str(tmp_path / "e.nc")], ["u"], tmp_path / "o2.zarr", select={"member": "r3"})
    with pytest.raises(DataError, match="run=2: .* give an index from 0 to 1"):
        prepare_netcdf([str(tmp_path / "e.nc")], ["v"], tmp_path / "o2.zarr", select={"run": "2"})


# --------------------------------------------------------------------------------------------- GRIB

def write_grib(path, values, levels=None):
    """ERA5-like GRIB 2 written with eccodes, north to south: `2t` (values `(time, y, x)`), or `t` on
    `levels` hPa (values `(time, level, y, x)`). Returns the decoded values, which a NetCDF copy holds
    (GRIB packing rounds)."""
    eccodes = pytest.importorskip("eccodes")
    ny, nx = values.shape[-2:]
    decoded = np.empty_like(values)
    sample, name = ("regular_ll_sfc_grib2", "2t") if levels is None else ("regular_ll_pl_grib2", "t")
    with open(path, "wb") as handle:
        for index in np.ndindex(values.shape[:-2]):
            message = eccodes.codes_grib_new_from_samples(sample)
            keys = {"Ni": nx, "Nj": ny, "latitudeOfFirstGridPointInDegrees": 50.0,
                    "latitudeOfLastGridPointInDegrees": 50.0 - 5 * (ny - 1), "longitudeOfFirstGridPointInDegrees": 0.0,
                    "longitudeOfLastGridPointInDegrees": 5.0 * (nx - 1), "iDirectionIncrementInDegrees": 5.0,
                    "jDirectionIncrementInDegrees": 5.0, "dataDate": 20200101 + index[0], "dataTime": 0,
                    "shortName": name, "bitsPerValue": 24}
            if levels is not None:
                keys["level"] = levels[index[1]]
            for key, value in keys.items():
                eccodes.codes_set(message, key, value)
            eccodes.codes_set_values(message, values[index].ravel())
            decoded[index] = eccodes.codes_get_values(message).reshape(ny, nx)
            eccodes.codes_write(message, handle)
            eccodes.codes_release(message)
    return decoded


def test_grib_equals_its_netcdf_copy(tmp_path):
    pytest.importorskip("cfgrib")
    values = 280 + np.random.default_rng(6).normal(size=(8, 3, 4))
    decoded = write_grib(tmp_path / "era5.grib", values)
    xr.Dataset({"t2m": (("time", "latitude", "longitude"), decoded, {"units": "K"})},
               coords={"time": ("time", np.arange(8.0), {"units": "days since 2020-01-01"}),
                       "latitude": ("latitude", [50.0, 45.0, 40.0], {"units": "degrees_north"}),
                       "longitude": ("longitude", [0.0, 5.0, 10.0, 15.0], {"units": "degrees_east"})}
               ).to_netcdf(tmp_path / "era5.nc")
    from_grib = prepare_netcdf([str(tmp_path / "era5.grib")], ["t2m"], tmp_path / "grib.zarr")
    from_netcdf = prepare_netcdf([str(tmp_path / "era5.nc")], ["t2m"], tmp_path / "nc.zarr")
    assert from_grib["time"] == from_netcdf["time"] and from_grib["fields"]["t2m"]["units"] == "K"
    grib, netcdf = open_store(tmp_path / "grib.zarr").ds, open_store(tmp_path / "nc.zarr").ds
    for name in ("t2m", "lat", "lon", "stats_mean_t2m", "stats_std_t2m"):
        np.testing.assert_array_equal(grib[name].values, netcdf[name].values)
    assert not list(tmp_path.glob("*.idx"))  # no cfgrib index files left beside the user's data


def test_grib_pressure_levels_as_fields(tmp_path):
    pytest.importorskip("cfgrib")
    values = 250 + np.random.default_rng(7).normal(size=(6, 2, 3, 4))
    decoded = write_grib(tmp_path / "pl.grib2", values, levels=[850, 500])
    summary = prepare_netcdf([str(tmp_path / "pl.grib2")], ["t@500", "t@850"], tmp_path / "o.zarr")
    assert list(summary["fields"]) == ["t500", "t850"] and summary["time"]["step"] == "1D"
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "t500"), decoded[:, 1].astype(np.float32))
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "t850"), decoded[:, 0].astype(np.float32))


def test_grib_without_the_extra_names_it(dyf, tmp_path):
    """Where cfgrib is not importable (a stand-in module that fails, whether or not it is installed)."""
    (tmp_path / "era5.grib").write_bytes(b"GRIB" + bytes(100))
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "cfgrib.py").write_text("raise ImportError('No module named cfgrib')\n")
    proc = dyf("prepare", "netcdf", str(tmp_path / "era5.grib"), "--var", "t2m", "--out", str(tmp_path / "o.zarr"),
               check=4, env={"PYTHONPATH": str(tmp_path / "blocker")})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("install them with pip install 'dyf[grib]'")
    assert "Traceback" not in proc.stderr


def test_infinite_value_placed_on_a_curvilinear_grid(tmp_path):
    nemo_files(tmp_path, files=1, days=12)
    with xr.open_dataset(tmp_path / "nemo_0.nc") as ds:
        broken = ds.load()
    broken["tos"][3, 1, 2] = np.inf
    broken.to_netcdf(tmp_path / "inf.nc")
    lat, lon = float(broken["nav_lat"].values[1, 2]), float(broken["nav_lon"].values[1, 2])
    with pytest.raises(DataError, match=rf"y 1, x 2 \(lat {lat:g}, lon {lon:g}\)"):
        prepare_netcdf([str(tmp_path / "inf.nc")], ["tos"], tmp_path / "o.zarr")


def test_curvilinear_store_evaluates_with_plots(tmp_path):
    """Maps of a curvilinear store are drawn on grid indices: its 2-D lat/lon give no rectangular extent."""
    from test_evaluate import make_forecast

    from dyfcli.evaluate import evaluate

    nemo_files(tmp_path, files=1, days=12)
    prepare_netcdf([str(tmp_path / "nemo_0.nc")], ["tos"], tmp_path / "truth.zarr")
    forecast = make_forecast(tmp_path / "f.zarr", tmp_path / "truth.zarr", inits=(1,), members=2, horizon=2)
    summary = evaluate(forecast, plots=tmp_path / "plots")
    assert any(Path(p).name == "maps_tos.png" for p in summary["plots"])


def test_variables_on_staggered_grids_are_refused(tmp_path):
    """u and v on grids of the same size but other coordinates (a C grid) must not be aligned into NaN."""
    values = np.zeros((5, 2, 3), np.float32)
    xr.Dataset({"u": (("time", "lat", "lon_u"), values), "v": (("time", "lat", "lon_v"), values)},
               coords={"time": ("time", np.arange(5.0), {"units": "days since 2000-01-01"}), "lat": [0.0, 1.0],
                       "lon_u": ("lon_u", [0.5, 1.5, 2.5], {"units": "degrees_east"}),
                       "lon_v": ("lon_v", [0.0, 1.0, 2.0], {"units": "degrees_east"})}).to_netcdf(tmp_path / "uv.nc")
    with pytest.raises(DataError, match="'u' and 'v' lie on different grids"):
        prepare_netcdf([str(tmp_path / "uv.nc")], ["u", "v"], tmp_path / "o.zarr")


def test_a_time_axis_that_does_not_increase_is_named_not_garbled(tmp_path, dyf):
    """A float time dimension holding 0 at every step (and no auxiliary CF time) used to give "the usual step
    is 0.0 but ;"."""
    import numpy as np
    import xarray as xr

    path = tmp_path / "flat.nc"
    xr.Dataset({"u": (("time", "y", "x"), np.zeros((4, 3, 3), dtype=np.float32))},
               coords={"time": ("time", np.zeros(4), {"axis": "T"})}).to_netcdf(path)
    result = dyf("prepare", "netcdf", str(path), "--var", "u", "--out", str(tmp_path / "o.zarr"), check=4)
    assert "does not increase" in result.stderr and "but ;" not in result.stderr
