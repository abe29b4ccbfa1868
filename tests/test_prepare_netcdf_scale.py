"""`dyf prepare netcdf` at scale (issue 9, items 7 and 8): day-of-year normalisation, resumable writing
in time blocks, a Dask distributed scheduler."""

import json

import numpy as np
import pytest
import xarray as xr

from dyfcli.errors import UsageError
from dyfcli.sources import netcdf
from dyfcli.sources.netcdf import prepare_netcdf
from dyfcli.store import open_store

ONE_THREAD = {"OMP_NUM_THREADS": "1", "DASK_NUM_WORKERS": "1"}


def six_hourly_years(folder, years=(2019, 2020, 2021), grid=(8, 8)):
    """Per-variable yearly files as WeatherBench keeps them: `t2m/t2m_<year>.nc`, 6-hourly, a seasonal
    cycle plus noise, latitude north to south, a few land points (NaN). Returns the glob and the values
    (time, lat south-to-north, lon) with their times."""
    rng = np.random.default_rng(9)
    (folder / "t2m").mkdir(parents=True)
    all_times, all_values = [], []
    for year in years:
        times = np.arange(np.datetime64(f"{year}-01-01T00"), np.datetime64(f"{year + 1}-01-01T00"),
                          np.timedelta64(6, "h"))
        day = (times - times.astype("datetime64[Y]")).astype("timedelta64[h]").astype(float) / 24
        season = 10 * np.sin(2 * np.pi * day / 365.25)[:, None, None]
        values = (280 + season + rng.normal(size=(len(times), *grid))).astype(np.float32)
        values[:, -1, :2] = np.nan  # land in the (northern) first rows of the file
        lat = np.linspace(30, -30, grid[0])
        xr.Dataset({"t2m": (("time", "lat", "lon"), values, {"units": "K"})},
                   coords={"time": times, "lat": ("lat", lat, {"units": "degrees_north"}),
                           "lon": ("lon", np.linspace(0, 315, grid[1]), {"units": "degrees_east"})}
                   ).to_netcdf(folder / "t2m" / f"t2m_{year}.nc")
        all_times.append(times)
        all_values.append(values[:, ::-1])
    return str(folder / "t2m" / "*.nc"), np.concatenate(all_times), np.concatenate(all_values)


SPLITS = {"train_until": "2019", "val": "2020", "test": "2021"}
SPLIT_ARGS = ["--train-until", "2019", "--val", "2020", "--test", "2021"]


# ------------------------------------------------------------------------------------------- item 7

def test_dayofyear_statistics_of_the_training_split(tmp_path):
    pattern, times, values = six_hourly_years(tmp_path)
    summary = prepare_netcdf([pattern], ["t2m"], tmp_path / "d.zarr", normalization="pixel-dayofyear", **SPLITS)
    ds = open_store(tmp_path / "d.zarr").ds
    assert ds.attrs["dyf_normalization"] == "pixel-dayofyear"
    mean, std = ds["stats_mean_t2m"], ds["stats_std_t2m"]
    assert mean.dims == ("dayofyear", "series", "y", "x") and mean.shape == (366, 1, 8, 8)
    # the oracle: xarray's groupby over the 2019 steps only (4 six-hourly steps per day of year)
    train = xr.DataArray(values[:1460].astype(np.float64), dims=("time", "y", "x"), coords={"time": times[:1460]})
    grouped = train.groupby("time.dayofyear")
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(mean.values[:365, 0], grouped.mean().values, rtol=1e-6)
        np.testing.assert_allclose(std.values[:365, 0], grouped.std().values, rtol=1e-4, atol=1e-5)
    # 2019 has no 31 December as day 366: it takes day 365's statistics, and the summary says so
    np.testing.assert_array_equal(mean.values[365], mean.values[364])
    assert any("days of year without training data" in note and "366" in note for note in summary["notes"])
    land = ~ds["mask"].values[0]
    assert land.sum() == 2 and np.isnan(mean.values[:, 0][:, land]).all()  # no data: NaN as in pixel mode
    assert np.isfinite(mean.values[:, 0][:, ~land]).all()


def test_dayofyear_streams_in_time_blocks(tmp_path, monkeypatch):
    """Many small blocks give the same statistics as one: the accumulation is blockwise, not whole."""
    pattern, _, _ = six_hourly_years(tmp_path, years=(2019, 2020))
    splits = {"train_until": "2019", "val": "2020-01:2020-06", "test": "2020-07:2020-12"}
    prepare_netcdf([pattern], ["t2m"], tmp_path / "one.zarr", normalization="pixel-dayofyear", **splits)
    monkeypatch.setattr(netcdf, "BLOCK_BYTES", 8 * 8 * 4 * 40)  # 40 steps a block
    summary = prepare_netcdf([pattern], ["t2m"], tmp_path / "many.zarr", normalization="pixel-dayofyear", **splits)
    assert summary["blocks_written"] > 50
    one, many = open_store(tmp_path / "one.zarr").ds, open_store(tmp_path / "many.zarr").ds
    np.testing.assert_allclose(many["stats_mean_t2m"].values, one["stats_mean_t2m"].values, rtol=1e-6)
    np.testing.assert_allclose(many["stats_std_t2m"].values, one["stats_std_t2m"].values, rtol=1e-5)
    np.testing.assert_array_equal(many["t2m"].values, one["t2m"].values)


def test_dayofyear_needs_dated_time(tmp_path):
    values = np.random.default_rng(0).normal(size=(20, 4, 5)).astype(np.float32)
    xr.Dataset({"u": (("t", "y", "x"), values)},
               coords={"t": ("t", np.arange(20.0), {"axis": "T"})}).to_netcdf(tmp_path / "u.nc")
    with pytest.raises(UsageError, match="pixel-dayofyear needs dated time steps.*--normalization pixel"):
        prepare_netcdf([str(tmp_path / "u.nc")], ["u"], tmp_path / "u.zarr", normalization="pixel-dayofyear")


def test_dayofyear_store_trains_forecasts_and_evaluates(dyf, tmp_path):
    """The store feeds training (normalisation by day of year) and evaluate's climatology reference."""
    pattern, _, _ = six_hourly_years(tmp_path, years=(2019, 2020))
    data, interpolator, model = tmp_path / "d.zarr", tmp_path / "i.pt", tmp_path / "m.pt"
    forecast, scores = tmp_path / "f.zarr", tmp_path / "scores.nc"
    quick = ["--set", "training.validate_every=4", "--set", "training.val_max_batches=1"]
    dyf("prepare", "netcdf", pattern, "--var", "t2m", "--out", str(data), "--normalization", "pixel-dayofyear",
        "--train-until", "2019", "--val", "2020-01:2020-06", "--test", "2020-07:2020-12")
    dyf("train-interpolator", "--data", str(data), "--preset", "tiny", "--out", str(interpolator),
        "--set", "interpolator.max_steps=2", *quick)
    dyf("train-forecaster", "--data", str(data), "--interpolator", str(interpolator), "--out", str(model),
        "--set", "forecaster.max_steps=2", *quick)
    dyf("forecast", "--ckpt", str(model), "--horizon", "4", "--ensemble", "2", "--seed", "1",
        "--init", "2020-08-01", "--out", str(forecast))
    doc = json.loads(dyf("--json", "evaluate", str(forecast), "--out", str(scores)).stdout)
    assert doc["ok"] and set(doc["scores"]) == {"t2m"}
    assert np.isfinite(doc["baselines"]["climatology"]["t2m"]["rmse"]["mean"])  # the day-of-year means
    written = xr.open_zarr(forecast)["t2m"].values
    assert np.isfinite(written[..., 1:, :]).all() and 250 < np.nanmean(written) < 310  # K, denormalised


# ------------------------------------------------------------------------------------------- item 8

def test_killed_run_resumes_from_its_blocks(dyf, tmp_path):
    """SIGKILL after the first block: the same command again reuses the staging store and its blocks."""
    pattern, _, values = six_hourly_years(tmp_path, years=(2019, 2020))
    out = tmp_path / "r.zarr"
    command = ["--json", "prepare", "netcdf", pattern, "--var", "t2m", "--out", str(out),
               "--train-until", "2019", "--val", "2020-01:2020-06", "--test", "2020-07:2020-12"]
    killed = dyf(*command, env={**ONE_THREAD, "DYF_FAULT_KILL_AT": "netcdf.block_written"}, check=None)
    assert killed.returncode == -9 and not out.exists()
    summary = json.loads(dyf(*command, env=ONE_THREAD).stdout)
    assert summary["resumed"] and summary["blocks_resumed"] >= 1
    ds = open_store(out).ds
    np.testing.assert_array_equal(ds["t2m"].values[0], values)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(ds["stats_mean_t2m"].values[0], np.nanmean(values[:1460].astype(np.float64), axis=0),
                                   rtol=1e-6)


def test_interrupted_between_blocks_writes_only_the_rest(tmp_path, monkeypatch):
    pattern, _, values = six_hourly_years(tmp_path, years=(2019, 2020))
    splits = {"train_until": "2019", "val": "2020-01:2020-06", "test": "2020-07:2020-12"}
    monkeypatch.setattr(netcdf, "BLOCK_BYTES", 8 * 8 * 4 * 400)  # 400 steps a block: 8 blocks
    calls = []

    def crash_at_third(name):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands for a kill: nothing after this point runs

    monkeypatch.setattr(netcdf, "fault_point", crash_at_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_netcdf([pattern], ["t2m"], tmp_path / "r.zarr", **splits)
    monkeypatch.setattr(netcdf, "fault_point", lambda name: None)
    summary = prepare_netcdf([pattern], ["t2m"], tmp_path / "r.zarr", **splits)
    assert summary["resumed"] and summary["blocks_resumed"] == 3 and summary["blocks_written"] == 5
    ds = open_store(tmp_path / "r.zarr").ds
    np.testing.assert_array_equal(ds["t2m"].values[0], values)
    # statistics: the 3 blocks read back plus the 5 written now (the training year spans blocks 0-3)
    train = values[:1460].astype(np.float64)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(ds["stats_mean_t2m"].values[0], np.nanmean(train, axis=0), rtol=1e-6)
        np.testing.assert_allclose(ds["stats_std_t2m"].values[0], np.nanstd(train, axis=0), rtol=1e-5)


def test_changed_input_starts_afresh(tmp_path, monkeypatch):
    """A staging store from another job (here: an input file rewritten since) is not resumed."""
    pattern, _, _ = six_hourly_years(tmp_path, years=(2019, 2020))
    splits = {"train_until": "2019", "val": "2020-01:2020-06", "test": "2020-07:2020-12"}
    monkeypatch.setattr(netcdf, "fault_point", lambda name: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare_netcdf([pattern], ["t2m"], tmp_path / "r.zarr", **splits)
    monkeypatch.setattr(netcdf, "fault_point", lambda name: None)
    first = tmp_path / "t2m" / "t2m_2019.nc"
    ds = xr.load_dataset(first)
    ds["t2m"] += 1.0
    first.unlink()
    ds.to_netcdf(first)
    summary = prepare_netcdf([pattern], ["t2m"], tmp_path / "r.zarr", **splits)
    assert not summary["resumed"] and summary["blocks_resumed"] == 0


def test_scheduler_without_distributed_is_a_usage_error(dyf, tmp_path):
    """CI installs `distributed` (the test extra): hide it to see the message a user without it gets."""
    hidden = tmp_path / "hidden" / "distributed"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    without = {"PYTHONPATH": str(hidden.parent)}
    pattern, _, _ = six_hourly_years(tmp_path, years=(2019, 2020))
    proc = dyf("prepare", "netcdf", pattern, "--var", "t2m", "--out", str(tmp_path / "s.zarr"),
               "--scheduler", "tcp://127.0.0.1:8786", check=2, env=without)
    assert "pip install distributed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.zarr").exists()
    proc = dyf("prepare", "netcdf", pattern, "--var", "t2m", "--out", str(tmp_path / "s.zarr"), check=2,
               env={**without, "DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:8786"})  # the default, as for prepare sst
    assert "--scheduler tcp://127.0.0.1:8786 needs the Dask 'distributed' package" in proc.stderr


def test_scheduler_runs_on_a_local_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    pattern, _, values = six_hourly_years(tmp_path, years=(2019, 2020))
    splits = {"train_until": "2019", "val": "2020-01:2020-06", "test": "2020-07:2020-12"}
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        prepare_netcdf([pattern], ["t2m"], tmp_path / "c.zarr", scheduler=cluster.scheduler_address, **splits)
    ds = open_store(tmp_path / "c.zarr").ds
    np.testing.assert_array_equal(ds["t2m"].values[0], values)
