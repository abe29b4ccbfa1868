"""`dyf prepare netcdf` on data as reanalysis users hold it (issue 9, items 1-2): variables in separate
files (per-variable folders of yearly files) and sub-daily time steps (splits and `forecast --init`)."""

import json

import numpy as np
import pytest
import xarray as xr

from dyfcli.errors import DataError
from dyfcli.sources.netcdf import expand_paths, open_source, prepare_netcdf
from dyfcli.store import open_store

LAT = np.linspace(-10.0, 10.0, 4)
LON = np.linspace(0.0, 15.0, 5)


def grid_file(path, name, hours, values=None, lat=LAT, units="hours since 2000-01-01", seed=0):
    """One variable on (time, lat, lon) at `hours` after the epoch, as a CF file; returns the values."""
    hours = np.asarray(hours, dtype=np.float64)
    if values is None:
        values = (280 + np.random.default_rng(seed).normal(size=(len(hours), len(lat), len(LON)))).astype(np.float32)
    ds = xr.Dataset({name: (("time", "lat", "lon"), values, {"units": "K"})},
                    coords={"time": ("time", hours, {"units": units, "standard_name": "time"}),
                            "lat": ("lat", lat, {"units": "degrees_north"}),
                            "lon": ("lon", LON, {"units": "degrees_east"})})
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path)
    return values


def weatherbench(root, names=("t2m", "tp"), years=2, steps=8, step_hours=6):
    """`root/<name>/<name>_<year>.nc`: per-variable folders of 'yearly' files of `steps` steps each."""
    values = {}
    for index, name in enumerate(names):
        chunks = []
        for year in range(years):
            hours = (year * steps + np.arange(steps)) * step_hours
            chunks.append(grid_file(root / name / f"{name}_{2000 + year}.nc", name, hours, seed=10 * index + year))
        values[name] = np.concatenate(chunks)
    return values


def errors_of(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------------- 1. per-variable files

def test_per_variable_folders_of_yearly_files(dyf, tmp_path):
    values = weatherbench(tmp_path / "wb")
    proc = dyf("--json", "prepare", "netcdf", str(tmp_path / "wb/t2m/*.nc"), str(tmp_path / "wb/tp/*.nc"),
               "--var", "t2m,tp", "--out", str(tmp_path / "s.zarr"))
    doc = json.loads(proc.stdout)
    assert doc["files"] == 4 and list(doc["fields"]) == ["t2m", "tp"] and doc["time"]["steps"] == 16
    store = open_store(tmp_path / "s.zarr")
    for name in ("t2m", "tp"):
        np.testing.assert_array_equal(store.ds[name].values[0], values[name])
    assert store.ds["time"].values[1] - store.ds["time"].values[0] == np.timedelta64(6, "h")


def test_u_and_v_in_two_files_as_the_issue_states(dyf, tmp_path):
    u = grid_file(tmp_path / "u.nc", "u", np.arange(10) * 24.0, seed=1)
    v = grid_file(tmp_path / "v.nc", "v", np.arange(10) + 1.0, seed=2, units="days since 1999-12-31")  # same times
    dyf("prepare", "netcdf", str(tmp_path / "u.nc"), str(tmp_path / "v.nc"), "--var", "u,v",
        "--out", str(tmp_path / "uv.zarr"))
    store = open_store(tmp_path / "uv.zarr")
    np.testing.assert_array_equal(store.ds["u"].values[0], u)
    np.testing.assert_array_equal(store.ds["v"].values[0], v)


def test_merged_variables_stay_lazy(tmp_path):
    weatherbench(tmp_path / "wb", years=3)
    files = expand_paths([str(tmp_path / "wb/t2m"), str(tmp_path / "wb/tp")])
    source = open_source(files, ["tp", "t2m"], {})
    assert sorted(source.ds.data_vars) == ["t2m", "tp"]
    assert all(source.ds[name].chunks is not None for name in ("t2m", "tp"))  # dask, nothing loaded
    assert source.ds.sizes["time"] == 24
    assert "dyf_file_index" not in source.ds.coords  # a step lies in a t2m file and a tp file
    single = open_source(files[3:], ["tp"], {})
    assert single.ds["dyf_file_index"].values.tolist() == [0] * 8 + [1] * 8 + [2] * 8


def test_variable_in_no_file_names_what_each_file_has(dyf, tmp_path):
    grid_file(tmp_path / "u.nc", "u", np.arange(10) * 24.0)
    grid_file(tmp_path / "w.nc", "w", np.arange(10) * 24.0)
    proc = dyf("prepare", "netcdf", str(tmp_path / "u.nc"), str(tmp_path / "w.nc"), "--var", "u,v",
               "--out", str(tmp_path / "o.zarr"), check=4)
    errors = errors_of(proc)
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "has the variable v" in errors[0] and "has no" not in errors[0]
    assert "u.nc has u" in errors[0] and "w.nc has w" in errors[0]
    assert "choose --var from: u, w" in errors[0]
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("case", ["step", "missing", "grid"])
def test_variables_that_disagree_name_the_files(tmp_path, case):
    grid_file(tmp_path / "u.nc", "u", np.arange(12) * 6.0)
    if case == "step":  # 12-hourly v against 6-hourly u
        grid_file(tmp_path / "v.nc", "v", np.arange(12) * 12.0)
        expected = "different time axes (12 vs 12 steps, first difference at step 1"
    elif case == "missing":  # v lacks the last step
        grid_file(tmp_path / "v.nc", "v", np.arange(11) * 6.0)
        expected = "different time axes (12 vs 11 steps, 2000-01-03T18:00:00 is only in one of them)"
    else:
        grid_file(tmp_path / "v.nc", "v", np.arange(12) * 6.0, lat=LAT + 0.5)
        expected = "different y grid"
    with pytest.raises(DataError) as caught:
        prepare_netcdf([str(tmp_path / "u.nc"), str(tmp_path / "v.nc")], ["u", "v"], tmp_path / "o.zarr")
    message = str(caught.value)
    assert expected in message and "u.nc" in message and "v.nc" in message and "\n" not in message, message
    assert not (tmp_path / "o.zarr").exists()


def test_a_missing_year_of_one_variable_is_refused(tmp_path):
    weatherbench(tmp_path / "wb", years=3)
    (tmp_path / "wb/tp/tp_2001.nc").unlink()
    with pytest.raises(DataError, match=r"t2m \(.*t2m_2000.nc and 2 more\) and tp \(.*tp_2000.nc and 1 more\) "
                                        r"have different time axes \(24 vs 16 steps"):
        prepare_netcdf([str(tmp_path / "wb/t2m/*.nc"), str(tmp_path / "wb/tp/*.nc")], ["t2m", "tp"],
                       tmp_path / "o.zarr")


def levels_file(path, name, hours, levels=(850.0, 500.0), seed=0):
    """A pressure-level variable (time, level, lat, lon) like WeatherBench's geopotential; returns values."""
    values = np.random.default_rng(seed).normal(size=(len(hours), len(levels), len(LAT), len(LON))).astype(np.float32)
    ds = xr.Dataset({name: (("time", "level", "lat", "lon"), values, {"units": "m2 s-2"})},
                    coords={"time": ("time", np.asarray(hours, np.float64), {"units": "hours since 2000-01-01"}),
                            "level": ("level", np.asarray(levels), {"units": "hPa"}),
                            "lat": ("lat", LAT, {"units": "degrees_north"}),
                            "lon": ("lon", LON, {"units": "degrees_east"})})
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path)
    return values


def test_surface_and_level_variables_from_their_own_folders(tmp_path):
    """The issue's command: 'wb/2m_temperature/*.nc' 'wb/geopotential/*.nc' --var t2m,z@500."""
    t2m = np.concatenate([grid_file(tmp_path / f"wb/2m_temperature/t_{y}.nc", "t2m", (np.arange(8) + 8 * y) * 6.0,
                                    seed=y) for y in range(2)])
    z = np.concatenate([levels_file(tmp_path / f"wb/geopotential/z_{y}.nc", "z", (np.arange(8) + 8 * y) * 6.0,
                                    seed=5 + y) for y in range(2)])
    paths = [str(tmp_path / "wb/2m_temperature/*.nc"), str(tmp_path / "wb/geopotential/*.nc")]
    summary = prepare_netcdf(paths, ["t2m", "z@500"], tmp_path / "s.zarr")
    assert list(summary["fields"]) == ["t2m", "z500"] and summary["files"] == 4
    store = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.ds["t2m"].values[0], t2m)
    np.testing.assert_array_equal(store.ds["z500"].values[0], z[:, 1])
    # --select applies to the files that have the dimension; one that no file has is still refused
    prepare_netcdf(paths, ["t2m", "z"], tmp_path / "sel.zarr", select={"level": "850"})
    np.testing.assert_array_equal(open_store(tmp_path / "sel.zarr").ds["z"].values[0], z[:, 0])
    with pytest.raises(DataError, match="--select plev=850: none of the 4 files has a dimension 'plev'"):
        prepare_netcdf(paths, ["t2m", "z"], tmp_path / "bad.zarr", select={"plev": "850"})


# ------------------------------------------------------------------------------------------- 2. sub-daily

def test_splits_parse_date_times_and_whole_days():
    from dyfcli.errors import UsageError
    from dyfcli.splits import parse_selection, time_splits

    assert parse_selection("2017-08-01T06", "--val") == ("2017-08-01T06:00", "2017-08-01T06:00")
    assert parse_selection("2017-08-01T06:30:2017-08-02", "--val") == ("2017-08-01T06:30", "2017-08-02")
    assert parse_selection(":2017-08-01T18:00", "--val") == (None, "2017-08-01T18:00")
    assert time_splits("2017-08-01T12", "2017-08-01T18:2017-08-02T06:00", "2017-08-02T12:") == {
        "train": {"time": [None, "2017-08-01T12:00"]}, "val": {"time": ["2017-08-01T18:00", "2017-08-02T06:00"]},
        "test": {"time": ["2017-08-02T12:00", None]}}
    with pytest.raises(UsageError, match="train and val splits overlap"):  # a date ends after its last hour
        time_splits("2017-08-01", "2017-08-01T18", "2017-08-02")
    with pytest.raises(UsageError, match="hour must be in 0..23"):
        parse_selection("2017-08-01T24", "--test")


@pytest.mark.parametrize("steps, step_hours, expected", [
    (10, 1, {"train": ["2000-01-01T07:00", 8], "val": ["2000-01-01T08:00", 1], "test": ["2000-01-01T09:00", 1]}),
    (4, 12, {"train": ["2000-01-01T12:00", 2], "val": ["2000-01-02T00:00", 1], "test": ["2000-01-02T12:00", 1]}),
])
def test_default_splits_of_sub_daily_data(tmp_path, steps, step_hours, expected):
    """10 hourly steps on one day, 4 twelve-hourly steps over two days: refused before ("only N dates")."""
    grid_file(tmp_path / "h.nc", "t2m", np.arange(steps) * float(step_hours))
    summary = prepare_netcdf([str(tmp_path / "h.nc")], ["t2m"], tmp_path / "s.zarr")
    splits = summary["splits"]
    assert splits["train"]["time"][1] == expected["train"][0] and splits["train"]["steps"] == expected["train"][1]
    for name in ("val", "test"):
        assert splits[name]["time"][0] == expected[name][0] and splits[name]["steps"] == expected[name][1]
    assert summary["time"]["step"] == f"{step_hours}h"


def test_explicit_date_time_splits_and_whole_day_ends(tmp_path):
    grid_file(tmp_path / "h.nc", "t2m", np.arange(12) * 6.0)  # 6-hourly, 2000-01-01 .. 2000-01-03T18
    hourly = prepare_netcdf([str(tmp_path / "h.nc")], ["t2m"], tmp_path / "a.zarr", train_until="2000-01-02T06",
                            val="2000-01-02T12:2000-01-03T00:00", test="2000-01-03T06:")
    assert [hourly["splits"][name]["steps"] for name in ("train", "val", "test")] == [6, 3, 3]
    daily = prepare_netcdf([str(tmp_path / "h.nc")], ["t2m"], tmp_path / "b.zarr", train_until="2000-01-01",
                           val="2000-01-02", test="2000-01-03")
    assert [daily["splits"][name]["steps"] for name in ("train", "val", "test")] == [4, 4, 4]
    store = open_store(tmp_path / "a.zarr")
    assert store.split_ranges("val")[0][1:] == (6, 9)


def test_forecast_init_date_times_match_exactly(tmp_path):
    from dyfcli import forecast

    grid_file(tmp_path / "h.nc", "t2m", np.arange(40) * 6.0)  # 6-hourly over 10 days
    prepare_netcdf([str(tmp_path / "h.nc")], ["t2m"], tmp_path / "s.zarr", train_until="2000-01-07",
                   val="2000-01-08", test="2000-01-09:")
    store = open_store(tmp_path / "s.zarr")
    chosen = forecast.select_initial_conditions(store, "test", "2000-01-09T06:00,2000-01-09T18", 2)
    assert (chosen.init_time == np.array(["2000-01-09T06:00", "2000-01-09T18:00"], dtype="datetime64[ns]")).all()
    assert forecast.select_initial_conditions(store, "test", "2000-01-10", 2).time_indices == (36,)  # midnight
    with pytest.raises(DataError, match=r"--init 2000-01-09T03:00 is not a time of the 'test' split; the nearest "
                                        r"are 2000-01-09T00:00 and 2000-01-09T06:00"):
        forecast.select_initial_conditions(store, "test", "2000-01-09T03:00", 2)
    with pytest.raises(DataError, match=r"runs from 2000-01-09T00:00 to 2000-01-10T18:00"):
        forecast.select_initial_conditions(store, "test", "2000-01-08T06", 2)


def test_dated_forecast_store_has_timedelta_lead_times(dyf, tmp_path):
    from storefactory import make_untrained_checkpoint

    lat = np.linspace(-20.0, 20.0, 8)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(24, 8, 5)).astype(np.float32)
    grid_file(tmp_path / "h.nc", "t2m", np.arange(24) * 6.0, values=values, lat=lat)
    prepare_netcdf([str(tmp_path / "h.nc")], ["t2m"], tmp_path / "s.zarr", train_until="2000-01-04",
                   val="2000-01-05", test="2000-01-06")
    ckpt = make_untrained_checkpoint(open_store(tmp_path / "s.zarr"), tmp_path / "model.pt")
    dyf("forecast", "--ckpt", str(ckpt), "--data", str(tmp_path / "s.zarr"), "--init", "2000-01-06T06:00",
        "--horizon", "2", "--ensemble", "1", "--device", "cpu", "--out", str(tmp_path / "f.zarr"),
        env={"OMP_NUM_THREADS": "1"})
    ds = xr.open_zarr(tmp_path / "f.zarr")
    assert ds["lead_time"].dtype.kind == "m"
    assert (ds["lead_time"].values == np.array([6, 12], dtype="timedelta64[h]")).all()
    assert ds["init_time"].values[0] == np.datetime64("2000-01-06T06:00")
    assert ds["valid_time"].values[0, 1] == np.datetime64("2000-01-06T18:00")


def test_infinite_value_in_a_merged_variable_names_the_variable_not_another_file(tmp_path):
    grid_file(tmp_path / "u.nc", "u", np.arange(10) * 24.0)
    v = np.ones((10, len(LAT), len(LON)), np.float32)
    v[7, 1, 2] = np.inf
    grid_file(tmp_path / "v.nc", "v", np.arange(10) * 24.0, values=v)
    with pytest.raises(DataError, match=r"'v' holds 1 infinite value .*, the first at time 2000-01-08T00:00") as caught:
        prepare_netcdf([str(tmp_path / "u.nc"), str(tmp_path / "v.nc")], ["u", "v"], tmp_path / "o.zarr")
    assert "u.nc" not in str(caught.value)
