"""`dyf export FORECAST --to wb2`: WeatherBench-2 layout, tiles stitched back into their grid (dyfcli/export.py)."""

import json

import numpy as np
import pytest
import xarray as xr

from dyfcli import forecast_store
from dyfcli.errors import DataError
from dyfcli.export import grid_axis, stitching_grid
from dyfcli.sources.netcdf import prepare_netcdf
from dyfcli.store import open_store
from storefactory import make_store, make_untrained_checkpoint

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
LAT = np.arange(8) * 5.0 - 20.0  # 8 x 12 grid, 4 x 4 tiles: 2 rows x 3 columns of tiles
LON = np.arange(12) * 30.0


def write_raw_grid(path, days: int = 30):
    """A daily CF file of 2 m temperature on an 8 x 12 lat-lon grid: the middle column of 4 x 4 tiles is all
    land (those tiles are dropped by `prepare netcdf --tile 4`), and two points of the first tile are land."""
    rng = np.random.default_rng(0)
    t2m = (280 + 5 * np.sin(np.deg2rad(LON))[None, None] + 0.3 * LAT[None, :, None]
           + np.sin(np.arange(days) / 5)[:, None, None] + rng.normal(size=(days, len(LAT), len(LON))))
    t2m = t2m.astype(np.float32)
    t2m[:, :, 4:8] = np.nan
    t2m[:, 0, 0:2] = np.nan
    ds = xr.Dataset({"t2m": (("time", "lat", "lon"), t2m, {"units": "K", "long_name": "2 metre temperature"})},
                    coords={"time": ("time", np.arange(days) * 24.0, {"units": "hours since 2000-01-01"}),
                            "lat": ("lat", LAT, {"units": "degrees_north"}),
                            "lon": ("lon", LON, {"units": "degrees_east"})})
    ds.to_netcdf(path)
    return path


def tiled_store(folder):
    """A dated data store of 4 tiles (of 6) cut from one grid, with lat/lon per tile."""
    prepare_netcdf([str(write_raw_grid(folder / "raw.nc"))], ["t2m"], folder / "s.zarr", tile=4,
                   train_until="2000-01-18", val="2000-01-19:2000-01-23", test="2000-01-24:")
    return folder / "s.zarr"


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    from conftest import run_dyf

    folder = tmp_path_factory.mktemp("export")
    store = tiled_store(folder)
    model = make_untrained_checkpoint(open_store(store), folder / "model.pt")
    run_dyf("forecast", "--ckpt", str(model), "--data", str(store), "--init", "0,1", "--horizon", "4",
            "--ensemble", "3", "--device", "cpu", "--out", str(folder / "f.zarr"), env=ONE_THREAD)
    return {"folder": folder, "store": store, "forecast": folder / "f.zarr"}


def test_export_has_wb2_layout_and_the_forecast_values(dyf, tiled, tmp_path):
    out = tmp_path / "wb2.zarr"
    doc = json.loads(dyf("--json", "export", str(tiled["forecast"]), "--to", "wb2", "--out", str(out)).stdout)
    assert doc["ok"] and doc["series"] == 4 and doc["fields"] == ["t2m"]
    export, forecast = xr.open_zarr(out), xr.open_zarr(tiled["forecast"])
    assert export["t2m"].dims == ("time", "prediction_timedelta", "realization", "latitude", "longitude")
    assert export["t2m"].shape == (2, 4, 3, 8, 12) and export["t2m"].dtype == np.float32
    np.testing.assert_array_equal(export["time"].values, forecast["init_time"].values)
    assert export["prediction_timedelta"].dtype.kind == "m"
    np.testing.assert_array_equal(export["prediction_timedelta"].values, forecast["lead_time"].values)
    np.testing.assert_array_equal(export["latitude"].values, LAT)  # increasing, as WB2 wants
    np.testing.assert_array_equal(export["longitude"].values, LON)  # the dropped middle column restored
    assert export["latitude"].attrs["standard_name"] == "latitude"
    assert export["latitude"].attrs["units"] == "degrees_north"
    assert export["longitude"].attrs["units"] == "degrees_east" and export["time"].attrs["standard_name"] == "time"
    assert export["t2m"].attrs["units"] == "K" and export.attrs["dyf_format"] == "dyf-wb2-export"

    values, mask = forecast["t2m"].values, forecast["mask"].values  # (series, init, member, lead, y, x)
    for series in range(forecast.sizes["series"]):
        tile = export["t2m"].sel(latitude=forecast["lat"].values[series], longitude=forecast["lon"].values[series])
        expected = np.where(mask[series], values[series], np.nan).transpose(0, 2, 1, 3, 4)  # time, lead, member
        np.testing.assert_array_equal(tile.values, expected)
    assert np.isnan(export["t2m"].values[..., 4:8]).all()  # the tiles prepare dropped
    assert np.isnan(export["t2m"].values[..., 0, 0:2]).all() and np.isfinite(export["t2m"].values[..., 0, 2]).all()

    described = json.loads(dyf("--json", "inspect", str(out)).stdout)
    assert described["kind"] == "wb2-export" and described["sizes"]["realization"] == 3
    assert described["forecast"] == str(tiled["forecast"].resolve()) and described["fields"] == {"t2m": {"units": "K"}}

    export.to_netcdf(tmp_path / "wb2.nc")  # CF attributes and plain values: NetCDF takes it
    reopened = xr.open_dataset(tmp_path / "wb2.nc")
    np.testing.assert_array_equal(reopened["t2m"].values, export["t2m"].values)
    np.testing.assert_array_equal(reopened["prediction_timedelta"].values, export["prediction_timedelta"].values)


def test_xskillscore_crps_on_the_export_equals_dyf_unweighted_crps(dyf, tiled, tmp_path):
    import xskillscore as xs  # in the test extra

    out = tmp_path / "wb2.zarr"
    dyf("export", str(tiled["forecast"]), "--to", "wb2", "--out", str(out))
    export = xr.open_zarr(out).load()
    summary = json.loads(dyf("--json", "evaluate", str(tiled["forecast"]), "--weights", "none",
                             env=ONE_THREAD).stdout)

    truth = xr.open_zarr(tiled["store"]).load()  # the truth placed on the grid by label, not by dyf's code
    valid_time = export["time"] + export["prediction_timedelta"]
    obs = xr.full_like(export["t2m"].isel(realization=0, drop=True), np.nan)
    for series in range(truth.sizes["series"]):
        tile = truth["t2m"].isel(series=series).sel(time=valid_time)
        tile = tile.rename(y="latitude", x="longitude").assign_coords(
            latitude=truth["lat"].values[series], longitude=truth["lon"].values[series])
        obs.loc[{"latitude": tile["latitude"], "longitude": tile["longitude"]}] = tile.transpose(*obs.dims).values
    crps = xs.crps_ensemble(obs, export["t2m"], member_dim="realization", dim=[])
    valid = np.isfinite(obs) & np.isfinite(export["t2m"].isel(realization=0))
    per_lead = crps.where(valid).mean(["time", "latitude", "longitude"]).values
    np.testing.assert_allclose(per_lead, summary["scores"]["t2m"]["crps"]["per_lead"], rtol=1e-5)


def test_export_refuses_what_it_cannot_write(dyf, tiled, tmp_path):
    out = tmp_path / "wb2.zarr"
    proc = dyf("export", str(tiled["forecast"]), "--to", "grib", "--out", str(out), check=2)
    assert "wb2" in proc.stderr
    dyf("export", str(tiled["forecast"]), "--to", "wb2", "--out", str(tmp_path / "wb2.nc"), check=2)
    dyf("export", str(tiled["forecast"]), "--to", "wb2", "--out", str(out))
    assert "--overwrite" in dyf("export", str(tiled["forecast"]), "--to", "wb2", "--out", str(out), check=2).stderr
    dyf("export", str(tiled["forecast"]), "--to", "wb2", "--out", str(out), "--overwrite")
    proc = dyf("export", str(tiled["forecast"]), "--to", "wb2", "--out", str(tiled["forecast"]), "--overwrite",
               check=2)  # the input itself: never replaced
    assert forecast_store.open_forecast(tiled["forecast"]).fields == ["t2m"]
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "dyf did not write" in dyf("export", str(tiled["forecast"]), "--to", "wb2", "--out", str(other),
                                      "--overwrite", check=2).stderr
    assert (other / "notes.txt").read_text() == "mine"


def test_simulation_forecast_without_lat_lon_is_refused(dyf, tmp_path):
    store = open_store(make_store(tmp_path / "sim.zarr"))  # float time, y/x indices only
    ds = store.ds
    lead = np.arange(1.0, 3.0)
    layout = forecast_store.ForecastLayout(
        fields=store.fields, field_attrs={}, series=ds["series"].values, init_time=ds["time"].values[:1],
        members=2, lead=lead, lead_time=lead * 0.5, valid_time=ds["time"].values[:1, None] + lead * 0.5,
        mask=ds["mask"], identity={}, attrs={"dyf_truth": str(store.path)})
    forecast_store.create(tmp_path / "f.zarr", layout)
    writer = forecast_store.BlockWriter(tmp_path / "f.zarr")
    for series in range(ds.sizes["series"]):
        writer.write(series, 0, np.zeros((2, 2, 2, 8, 12), dtype=np.float32))
    forecast_store.mark_complete(tmp_path / "f.zarr")
    proc = dyf("--json", "export", str(tmp_path / "f.zarr"), "--to", "wb2", "--out", str(tmp_path / "e.zarr"),
               check=4)
    message = json.loads(proc.stdout)["error"]["message"]
    assert "no lat/lon" in message and "dyf prepare netcdf" in message
    assert not (tmp_path / "e.zarr").exists() and not (tmp_path / "e.zarr.partial").exists()


def test_grid_axis_fills_gaps_of_a_regular_grid_only():
    regular = np.array([[0.0, 1.5, 3.0], [9.0, 10.5, 12.0]])  # two tiles, the two between them dropped
    np.testing.assert_allclose(grid_axis(regular), np.arange(9) * 1.5)
    gaussian = np.array([[-60.0, -20.1], [20.1, 60.0]])  # no common spacing: the union
    np.testing.assert_array_equal(grid_axis(gaussian), [-60.0, -20.1, 20.1, 60.0])


def test_overlapping_or_curvilinear_tiles_are_refused(tmp_path):
    ds = xr.Dataset(coords={"lat": (("series", "y"), [[0.0, 1.0], [1.0, 2.0]]),
                            "lon": (("series", "x"), [[0.0, 1.0], [0.0, 1.0]])})
    with pytest.raises(DataError, match="overlap at 2 grid points"):
        stitching_grid(ds, tmp_path)
    curvilinear = xr.Dataset(coords={"lat": (("series", "y", "x"), np.zeros((1, 2, 2))),
                                     "lon": (("series", "y", "x"), np.zeros((1, 2, 2)))})
    with pytest.raises(DataError, match="curvilinear.*regrid"):
        stitching_grid(curvilinear, tmp_path)
