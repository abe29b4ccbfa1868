"""`dyf evaluate --weights coslat|none`, `--units physical|standardized`, units attributes, the `all` row and
`--ssr per-series`: every score checked against a hand computation with properscoring's CRPS."""

import json
from pathlib import Path

import numpy as np
import properscoring
import pytest
import xarray as xr

from dyfcli.evaluate import ScoreOptions, evaluate
from storefactory import make_store
from test_evaluate import make_forecast

INITS = (2, 5)
HORIZON = 3


def lat_store(tmp_path: Path, normalization: str = "pixel", name: str = "truth.zarr") -> Path:
    """A tiny store whose four series are tiles at different latitudes (lat(series, y)), u in m s-1 and
    v in K, with land."""
    from dyfcli.store import write_store

    base = xr.open_zarr(make_store(tmp_path / f"base-{name}", land=True, normalization=normalization, steps=16),
                        chunks=None).load()
    ny = base.sizes["y"]
    lat = np.stack([np.linspace(-70.0, -40.0, ny) + 35.0 * s for s in range(base.sizes["series"])])
    base = base.assign_coords(lat=(("series", "y"), lat.astype(np.float32), {"units": "degrees_north"}))
    base["u"].attrs["units"] = "m s-1"
    base["v"].attrs["units"] = "K"
    return write_store(base, tmp_path / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("weights")
    store = lat_store(tmp_path)
    forecast = make_forecast(tmp_path / "forecast.zarr", store, members=5, inits=INITS, horizon=HORIZON,
                             spread=0.3, bias=0.1)
    return store, forecast


def _arrays(store: Path, forecast: Path, field: str):
    """ens (S, I, M, L, Y, X), truth (S, I, L, Y, X), persistence (S, I, L, Y, X), valid (S, I, L, Y, X)."""
    truth = xr.open_zarr(store, chunks=None)
    fc = xr.open_zarr(forecast, chunks=None)
    times = list(truth["time"].values)
    index = np.array([[times.index(t) for t in row] for row in fc["valid_time"].values])  # (I, L)
    target = truth[field].values[:, index].astype(np.float64)
    init = np.array([times.index(t) for t in fc["init_time"].values])
    persistence = np.broadcast_to(truth[field].values[:, init][:, :, None], target.shape).astype(np.float64)
    valid = np.broadcast_to(truth["mask"].values[:, None, None], target.shape)
    return fc[field].values.astype(np.float64), target, persistence, valid


def _coslat(store: Path) -> np.ndarray:
    """cos(lat) (S, Y, X), normalised to mean 1 over the valid points."""
    truth = xr.open_zarr(store, chunks=None)
    mask = truth["mask"].values
    weights = np.broadcast_to(np.cos(np.deg2rad(truth["lat"].values.astype(np.float64)))[:, :, None], mask.shape)
    return weights / weights[mask].mean()


def _weighted_mean(values: np.ndarray, weights: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per lead (axis 2 of (S, I, L, Y, X)) weighted mean over the valid points."""
    w = np.where(valid, np.broadcast_to(weights, valid.shape), 0.0)
    v = np.where(valid, values, 0.0)
    return (v * w).sum(axis=(0, 1, 3, 4)) / w.sum(axis=(0, 1, 3, 4))


def _expected(ens, target, valid, weights, scale=1.0):
    """Hand-computed per-lead scores: properscoring CRPS, ensemble-mean MSE, spread, SSR, weighted."""
    error = (ens - target[:, :, None]) * scale[:, :, None] if np.ndim(scale) else (ens - target[:, :, None]) * scale
    crps = properscoring.crps_ensemble(np.zeros(target.shape), np.moveaxis(error, 2, -1))
    mse = _weighted_mean(error.mean(axis=2) ** 2, weights, valid)
    spread = np.sqrt(_weighted_mean(error.var(axis=2), weights, valid))
    return {"crps": _weighted_mean(crps, weights, valid), "mse": mse, "spread": spread, "ssr": spread / np.sqrt(mse)}


def _weights_per_point(store):
    return _coslat(store)[:, None, None]  # (S, 1, 1, Y, X) against (S, I, L, Y, X)


def test_coslat_is_the_default_with_latitudes_and_weights_every_score(world):
    store, forecast = world
    summary = evaluate(forecast)
    assert summary["weights"] == "coslat" and summary["units"] == "physical"
    weights = _weights_per_point(store)
    for field in ("u", "v"):
        ens, target, persistence, valid = _arrays(store, forecast, field)
        expected = _expected(ens, target, valid, weights)
        for metric, values in expected.items():
            np.testing.assert_allclose(summary["scores"][field][metric]["per_lead"], values, rtol=1e-5)
        np.testing.assert_allclose(summary["baselines"]["persistence"][field]["crps"]["per_lead"],
                                   _weighted_mean(np.abs(persistence - target), weights, valid), rtol=1e-5)
        # the rank histogram counts weights: rank = members below the truth (continuous data, no ties)
        ranks = (ens < target[:, :, None]).sum(axis=2)
        w = np.broadcast_to(weights, valid.shape)
        histogram = [[w[:, :, lead][valid[:, :, lead] & (ranks[:, :, lead] == r)].sum() for r in range(6)]
                     for lead in range(HORIZON)]
        np.testing.assert_allclose(summary["rank_histogram"][field]["per_lead"], histogram, rtol=1e-9)
        assert sum(summary["rank_histogram"][field]["total"]) == pytest.approx(valid.sum())  # mean weight 1


def test_weights_change_the_scores_and_none_is_unweighted(world):
    store, forecast = world
    weighted = evaluate(forecast)
    plain = evaluate(forecast, options=ScoreOptions(weights="none"))
    assert plain["weights"] == "none"
    ens, target, _, valid = _arrays(store, forecast, "u")
    expected = _expected(ens, target, valid, np.ones(1))
    np.testing.assert_allclose(plain["scores"]["u"]["crps"]["per_lead"], expected["crps"], rtol=1e-5)
    assert plain["rank_histogram"]["u"]["total"] == [int(v) for v in plain["rank_histogram"]["u"]["total"]]
    assert abs(weighted["scores"]["u"]["crps"]["mean"] - plain["scores"]["u"]["crps"]["mean"]) > 1e-4


def test_standardized_units_score_the_normalised_fields(world):
    store, forecast = world
    summary = evaluate(forecast, options=ScoreOptions(weights="none", units="standardized"))
    truth = xr.open_zarr(store, chunks=None)
    for field in ("u", "v"):
        ens, target, persistence, valid = _arrays(store, forecast, field)
        std = truth[f"stats_std_{field}"].values.astype(np.float64)[:, None, None]  # pixel: (S, 1, 1, Y, X)
        expected = _expected(ens, target, valid, np.ones(1), scale=1.0 / std)
        for metric, values in expected.items():
            np.testing.assert_allclose(summary["scores"][field][metric]["per_lead"], values, rtol=1e-5)
        mean = truth[f"stats_mean_{field}"].values[:, None, None]
        np.testing.assert_allclose(summary["baselines"]["climatology"][field]["crps"]["per_lead"],
                                   _weighted_mean(np.abs((target - mean) / std), np.ones(1), valid), rtol=1e-5)
    assert summary["units"] == "standardized" and summary["field_units"] == {"u": "1", "v": "1", "all": "1"}


def test_standardized_units_use_the_valid_days_statistics(tmp_path):
    from dyfcli.store import write_store

    base = xr.open_zarr(make_store(tmp_path / "base.zarr", fields=("sst",), dated=True, steps=12), chunks=None).load()
    seasonal = (1.0 + np.arange(366, dtype=np.float32))[:, None, None, None] * np.ones((1, 4, 8, 12), np.float32)
    base = base.drop_vars(["stats_mean_sst", "stats_std_sst"])
    base["stats_mean_sst"] = (("dayofyear", "series", "y", "x"), np.zeros_like(seasonal))
    base["stats_std_sst"] = (("dayofyear", "series", "y", "x"), seasonal)  # std = day of year
    base.attrs["dyf_normalization"] = "pixel-dayofyear"
    store = write_store(base, tmp_path / "seasonal.zarr")
    forecast = make_forecast(tmp_path / "f.zarr", store, inits=(2,), horizon=3)
    physical = evaluate(forecast)
    standardized = evaluate(forecast, options=ScoreOptions(units="standardized"))
    assert physical["weights"] == "none"  # no latitudes
    # init 2000-01-03: leads 1..3 are days 4..6, so the errors are divided by 4, 5, 6 (MSE by their squares)
    for lead, day in enumerate((4, 5, 6)):
        for metric, power in (("crps", 1), ("rmse", 1), ("spread", 1), ("mse", 2)):
            assert standardized["scores"]["sst"][metric]["per_lead"][lead] == pytest.approx(
                physical["scores"]["sst"][metric]["per_lead"][lead] / day ** power, rel=1e-5)
        assert standardized["scores"]["sst"]["ssr"]["per_lead"][lead] == pytest.approx(
            physical["scores"]["sst"]["ssr"]["per_lead"][lead], rel=1e-5)


def test_the_all_row_pools_the_fields(world):
    store, forecast = world
    summary = evaluate(forecast, options=ScoreOptions(weights="none"))
    both = summary["all"]["scores"]
    for metric in ("crps", "mse"):  # u and v share their valid points: the pooled value is the mean
        np.testing.assert_allclose(both[metric]["per_lead"], np.mean(
            [summary["scores"][f][metric]["per_lead"] for f in ("u", "v")], axis=0), rtol=1e-9)
    spread2 = np.mean([np.square(summary["scores"][f]["spread"]["per_lead"]) for f in ("u", "v")], axis=0)
    np.testing.assert_allclose(both["ssr"]["per_lead"], np.sqrt(spread2) / np.sqrt(both["mse"]["per_lead"]), rtol=1e-9)
    assert set(summary["all"]["baselines"]) == {"persistence", "climatology"}
    total = np.add(summary["rank_histogram"]["u"]["total"], summary["rank_histogram"]["v"]["total"])
    assert summary["all"]["rank_histogram"]["total"] == total.tolist()


def test_ssr_per_series_is_the_mean_of_each_series_ratio(world):
    store, forecast = world
    pooled = evaluate(forecast, options=ScoreOptions(weights="coslat"))
    summary = evaluate(forecast, options=ScoreOptions(weights="coslat", ssr="per-series"))
    assert "ssr_per_series" not in pooled["scores"]["u"] and summary["ssr"] == "per-series"
    weights = _weights_per_point(store)
    ens, target, _, valid = _arrays(store, forecast, "u")
    ratios = [_expected(ens[s:s + 1], target[s:s + 1], valid[s:s + 1], weights[s:s + 1])["ssr"] for s in range(4)]
    np.testing.assert_allclose(summary["scores"]["u"]["ssr_per_series"]["per_lead"], np.mean(ratios, axis=0),
                               rtol=1e-5)
    assert summary["scores"]["u"]["ssr"] == pooled["scores"]["u"]["ssr"]  # the pooled one stays beside it


def test_outputs_record_the_choices_and_carry_units(world, tmp_path):
    store, forecast = world
    evaluate(forecast, out=tmp_path / "s.nc", options=ScoreOptions(ssr="per-series"))
    ds = xr.open_dataset(tmp_path / "s.nc")
    assert (ds.attrs["dyf_weights"], ds.attrs["dyf_units"], ds.attrs["dyf_ssr"]) == ("coslat", "physical", "per-series")
    assert list(ds["field"].values) == ["u", "v", "all"]
    assert list(ds["field_units"].values) == ["m s-1", "K", ""]
    assert ds["ssr"].attrs["units"] == "1" and ds["ssr_per_series"].attrs["units"] == "1"
    assert "units" not in ds["crps"].attrs and "field_units" in ds["crps"].attrs["comment"]  # m s-1 and K
    assert list(ds["rank"].values) == list(range(6)) and ds["rank_histogram"].dims == ("field", "lead", "rank")
    evaluate(forecast, out=tmp_path / "std.zarr", options=ScoreOptions(units="standardized"))
    ds = xr.open_zarr(tmp_path / "std.zarr")
    assert ds["crps"].attrs["units"] == "1" and ds["mse"].attrs["units"] == "1"
    assert ds.attrs["dyf_units"] == "standardized"
    evaluate(forecast, out=tmp_path / "s.csv", options=ScoreOptions(weights="none"))
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0].endswith(",weights,units,unit")
    assert "forecast,u,1,0.5,crps," in lines[1] and lines[1].endswith(",none,physical,m s-1")
    assert any(line.startswith("forecast,v,mean,,mse,") and line.endswith(",none,physical,K^2") for line in lines)


def test_one_field_units_attribute(tmp_path):
    store = lat_store(tmp_path)
    forecast = make_forecast(tmp_path / "f.zarr", store, inits=(2,), horizon=2, fields=["u"])
    evaluate(forecast, out=tmp_path / "s.nc")
    ds = xr.open_dataset(tmp_path / "s.nc")
    assert ds["crps"].attrs["units"] == "m s-1" and ds["mse"].attrs["units"] == "(m s-1)^2"


def test_cli_records_the_choices_and_refuses_coslat_without_latitudes(dyf, world, tmp_path):
    store, forecast = world
    proc = dyf("--json", "evaluate", str(forecast), "--units", "standardized", "--ssr", "per-series")
    document = json.loads(proc.stdout)
    assert (document["weights"], document["units"], document["ssr"]) == ("coslat", "standardized", "per-series")
    assert "ssr_per_series" in document["all"]["scores"]
    assert "weights coslat, standardized units" in proc.stderr and "all fields" in proc.stderr
    plain = make_store(tmp_path / "plain.zarr", steps=16)
    other = make_forecast(tmp_path / "f.zarr", plain, inits=(2,), horizon=2)
    proc = dyf("--json", "evaluate", str(other), "--weights", "coslat", check=2)
    assert "no latitudes" in proc.stderr and "--weights none" in proc.stderr
    proc = dyf("evaluate", str(other), "--units", "kelvin", check=2)
    assert "--units kelvin" in proc.stderr
