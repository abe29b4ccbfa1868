"""`dyf evaluate`: streaming scores against the truth, references, outputs, plots and input errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dyfcli import forecast_store
from dyfcli.errors import DataError, UsageError
from dyfcli.evaluate import evaluate
from dyfcli.metrics import ScoreAccumulator, lead_mean
from storefactory import make_store

HORIZON = 4


def make_forecast(path: Path, store_path: Path, *, members: int = 6, inits: tuple[int, ...] = (2, 5, 9),
                  spread: float = 0.2, bias: float = 0.0, seed: int = 0, complete: bool = True,
                  fields: list[str] | None = None, horizon: int = HORIZON) -> Path:
    """A forecast store written with the real forecast_store writer: truth + a calibrated perturbation."""
    rng = np.random.default_rng(seed)
    truth = xr.open_zarr(store_path, chunks=None)
    fields = fields or list(truth.attrs["dyf_fields"])
    times = truth["time"].values
    leads = np.arange(1, horizon + 1)
    step = times[1] - times[0]
    layout = forecast_store.ForecastLayout(
        fields=fields, field_attrs={f: dict(truth[f].attrs) for f in fields}, series=truth["series"].values,
        init_time=times[list(inits)], members=members, lead=leads.astype(float), lead_time=leads * step,
        valid_time=np.stack([times[i] + leads * step for i in inits]), mask=truth["mask"], identity={"test": 1},
        attrs={"dyf_truth": str(store_path)})
    forecast_store.create(path, layout)
    writer = forecast_store.BlockWriter(path)
    for s in range(truth.sizes["series"]):
        for position, i in enumerate(inits):
            within = np.minimum(i + leads, len(times) - 1)  # beyond the store's end: any values
            target = np.stack([truth[f].values[s, within] for f in fields], axis=1)  # (L, C, Y, X)
            centre = target + spread * rng.standard_normal(target.shape) + bias
            block = centre[None] + spread * rng.standard_normal((members, *target.shape))
            writer.write(s, position, block.astype(np.float32))
    if complete:
        forecast_store.mark_complete(path)
    return path


@pytest.fixture
def stores(tmp_path):
    store = make_store(tmp_path / "truth.zarr", land=True, normalization="pixel", steps=16)
    forecast = make_forecast(tmp_path / "forecast.zarr", store)
    return store, forecast


def _direct_scores(store: Path, forecast: Path, field: str) -> dict:
    """The same scores computed in memory from whole arrays: the oracle for streaming."""
    import torch

    truth = xr.open_zarr(store, chunks=None)
    fc = xr.open_zarr(forecast, chunks=None)
    times = list(truth["time"].values)
    index = np.array([[times.index(t) for t in row] for row in fc["valid_time"].values])  # (I, L)
    ens = fc[field].values  # (S, I, M, L, Y, X)
    target = truth[field].values[:, index]  # (S, I, L, Y, X)
    mask = np.broadcast_to(truth["mask"].values[:, None, None], target.shape)
    acc = ScoreAccumulator(leads=ens.shape[3], members=ens.shape[2])
    acc.update(torch.from_numpy(np.moveaxis(ens, 2, 0)).permute(0, 3, 1, 2, 4, 5),
               torch.from_numpy(target).permute(2, 0, 1, 3, 4), torch.from_numpy(mask).permute(2, 0, 1, 3, 4))
    return acc.result()


def test_streamed_scores_equal_in_memory_scores(stores, monkeypatch):
    store, forecast = stores
    monkeypatch.setattr("dyfcli.evaluate.SLICE_ELEMENTS", 600)  # forces several lead slices per block
    summary = evaluate(forecast)
    for field in ("u", "v"):
        direct = _direct_scores(store, forecast, field)
        for metric in ("crps", "crps_fair", "mse", "rmse", "spread", "ssr", "ssr_unbiased"):
            np.testing.assert_allclose(summary["scores"][field][metric]["per_lead"], direct[metric].numpy(),
                                       rtol=1e-9)
            assert summary["scores"][field][metric]["mean"] == pytest.approx(lead_mean(direct[metric]))
    assert summary["members"] == 6 and summary["blocks"] == 4 * 3
    assert summary["leads"] == [1.0, 2.0, 3.0, 4.0]
    assert summary["lead_time"] == [0.5, 1.0, 1.5, 2.0]


def test_scores_are_sensible_and_references_scored(stores):
    store, forecast = stores
    summary = evaluate(forecast)
    scores = summary["scores"]["u"]
    assert 0.6 < scores["ssr_unbiased"]["mean"] < 1.4  # calibrated by construction
    assert scores["rmse"]["mean"] == pytest.approx(0.2 * math.sqrt(1 + 1 / 6), rel=0.25)
    persistence = summary["baselines"]["persistence"]["u"]
    climatology = summary["baselines"]["climatology"]["u"]
    # a 1-member reference: CRPS is the absolute error, no spread
    assert persistence["spread"]["mean"] == 0.0 and persistence["crps_fair"]["mean"] is None
    # the travelling wave drifts away from the initial state, so persistence worsens with lead time
    assert persistence["crps"]["per_lead"][-1] > persistence["crps"]["per_lead"][0]
    assert persistence["crps"]["mean"] > scores["crps"]["mean"]
    assert climatology["crps"]["mean"] > scores["crps"]["mean"]
    total = summary["rank_histogram"]["u"]["total"]
    assert len(total) == 7 and sum(total) == 12 * 4 * int(xr.open_zarr(store)["mask"].values[0].sum())


def test_climatology_uses_pixel_mean_and_persistence_uses_initial_state(tmp_path):
    store = make_store(tmp_path / "truth.zarr", normalization="pixel", steps=16)
    forecast = make_forecast(tmp_path / "f.zarr", store, inits=(3,))
    summary = evaluate(forecast)
    truth = xr.open_zarr(store, chunks=None)
    u, mean = truth["u"].values, truth["stats_mean_u"].values
    leads = np.arange(1, HORIZON + 1)
    expected_persistence = np.abs(u[:, 3 + leads] - u[:, 3:4]).mean(axis=(0, 2, 3))
    expected_climatology = np.abs(u[:, 3 + leads] - mean[:, None]).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(summary["baselines"]["persistence"]["u"]["crps"]["per_lead"],
                               expected_persistence, rtol=1e-6)
    np.testing.assert_allclose(summary["baselines"]["climatology"]["u"]["crps"]["per_lead"],
                               expected_climatology, rtol=1e-6)


def test_climatology_of_day_of_year_statistics(tmp_path):
    from dyfcli.store import write_store

    base = xr.open_zarr(make_store(tmp_path / "base.zarr", fields=("sst",), dated=True, steps=12), chunks=None).load()
    seasonal = np.arange(366, dtype=np.float32)[:, None, None, None] * np.ones((1, 4, 8, 12), np.float32)
    base = base.drop_vars(["stats_mean_sst", "stats_std_sst"])
    base["stats_mean_sst"] = (("dayofyear", "series", "y", "x"), seasonal)  # mean = day of year - 1
    base["stats_std_sst"] = (("dayofyear", "series", "y", "x"), np.ones_like(seasonal))
    base.attrs["dyf_normalization"] = "pixel-dayofyear"
    store = write_store(base, tmp_path / "seasonal.zarr")
    forecast = make_forecast(tmp_path / "f.zarr", store, inits=(2,), horizon=3)
    summary = evaluate(forecast)
    sst = base["sst"].values  # 2000-01-03 is day 3: leads 1..3 are days 4..6, means 3, 4, 5
    expected = [np.abs(sst[:, 2 + lead] - (2 + lead)).mean() for lead in (1, 2, 3)]
    np.testing.assert_allclose(summary["baselines"]["climatology"]["sst"]["crps"]["per_lead"], expected, rtol=1e-6)


def test_missing_truth_values_are_excluded(tmp_path):
    from dyfcli.store import write_store

    base = xr.open_zarr(make_store(tmp_path / "base.zarr", steps=16), chunks=None).load()
    base["u"].values[:, 6] = np.nan  # a day missing from the raw files
    store = write_store(base, tmp_path / "gappy.zarr")
    forecast = make_forecast(tmp_path / "f.zarr", store, inits=(3,))  # lead 3 is the missing day
    summary = evaluate(forecast)
    crps = summary["scores"]["u"]["crps"]["per_lead"]
    assert crps[2] is None and all(value is not None for i, value in enumerate(crps) if i != 2)
    assert summary["scores"]["v"]["crps"]["per_lead"][2] is not None


def test_dated_store_with_leads_beyond_the_truth(tmp_path):
    store = make_store(tmp_path / "truth.zarr", dated=True, steps=12)
    forecast = make_forecast(tmp_path / "f.zarr", store, inits=(2, 9), horizon=4)  # 9 + 3, 9 + 4 do not exist
    assert forecast_store.open_forecast(forecast).ds["valid_time"].dtype.kind == "M"
    summary = evaluate(forecast)
    assert summary["leads"] == [1.0, 2.0]
    assert summary["lead_time_units"] == "days" and summary["lead_time"] == [1.0, 2.0]


def test_truth_with_other_fields_is_a_data_error(stores, tmp_path):
    _, forecast = stores
    other_fields = make_store(tmp_path / "fields.zarr", fields=("a", "b"), steps=16, land=True)
    with pytest.raises(DataError, match="fields"):
        evaluate(forecast, truth_path=other_fields)


def test_forecast_entirely_beyond_the_truth_is_a_data_error(tmp_path):
    store = make_store(tmp_path / "truth.zarr", steps=12)
    forecast = make_forecast(tmp_path / "f.zarr", store, inits=(11,), horizon=2)
    with pytest.raises(DataError, match="covers the forecast period"):
        evaluate(forecast)


def test_outputs_netcdf_zarr_csv(stores, tmp_path):
    _, forecast = stores
    with pytest.raises(UsageError, match=".nc, .zarr or .csv"):
        evaluate(forecast, out=tmp_path / "scores.txt")
    evaluate(forecast, out=tmp_path / "scores.nc")
    ds = xr.open_dataset(tmp_path / "scores.nc")
    assert ds["crps"].dims == ("source", "field", "lead")
    assert list(ds["source"].values) == ["forecast", "persistence", "climatology"]
    assert ds["rank_histogram"].shape == (3, HORIZON, 7)  # u, v and `all`
    evaluate(forecast, out=tmp_path / "scores.zarr")
    assert float(xr.open_zarr(tmp_path / "scores.zarr")["crps_lead_mean"].sel(source="forecast", field="u")) == \
        pytest.approx(float(ds["crps_lead_mean"].sel(source="forecast", field="u")))
    evaluate(forecast, out=tmp_path / "scores.csv")
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert lines[0] == "source,field,lead,lead_time,metric,value,weights,units,unit"
    assert len(lines) == 1 + 3 * 3 * 7 * (HORIZON + 1)  # fields u, v and `all`
    assert not list(tmp_path.glob("*.partial"))


def test_plots_are_written(tmp_path):
    store = make_store(tmp_path / "truth.zarr", fields=("sst",), land=True, dated=True, steps=12)
    forecast = make_forecast(tmp_path / "f.zarr", store, inits=(1,), members=4)
    summary = evaluate(forecast, plots=tmp_path / "plots")
    names = sorted(Path(p).name for p in summary["plots"])
    assert names == sorted(f"{kind}_{f}.{ext}" for f in ("sst",) for kind, ext in
                           (("scores", "png"), ("maps", "png"), ("rank_histogram", "png"), ("rollout", "gif")))
    for path in summary["plots"]:
        assert Path(path).stat().st_size > 5_000


def test_cli_json_and_table(dyf, stores, tmp_path):
    _, forecast = stores
    proc = dyf("--json", "evaluate", str(forecast), "--out", str(tmp_path / "s.csv"))
    document = json.loads(proc.stdout)
    assert document["ok"] and document["command"] == "evaluate"
    assert set(document["scores"]["u"]) >= {"crps", "crps_fair", "mse", "rmse", "spread", "ssr", "ssr_unbiased"}
    assert len(document["scores"]["u"]["crps"]["per_lead"]) == HORIZON
    assert set(document["baselines"]) == {"persistence", "climatology"}
    assert "crps_fair" in proc.stderr and "persistence" in proc.stderr


def _exit_code(capsys, *args: str) -> tuple[int, str]:
    """The real command line in this process (no interpreter start-up): exit code and stderr."""
    from dyfcli.cli import main

    with pytest.raises(SystemExit) as raised:
        main(list(args))
    return raised.value.code, capsys.readouterr().err


def test_cli_bad_inputs_exit_4(dyf, capsys, stores, tmp_path):
    store, forecast = stores
    proc = dyf("--json", "evaluate", str(tmp_path / "nope.zarr"), check=4)
    assert json.loads(proc.stdout)["error"]["exit_code"] == 4 and "does not exist" in proc.stderr
    other_grid = make_store(tmp_path / "other.zarr", grid=(6, 6), steps=16)
    code, err = _exit_code(capsys, "evaluate", str(forecast), "--truth", str(other_grid))
    assert code == 4 and "grid" in err
    partial = make_forecast(tmp_path / "partial.zarr", store, complete=False)
    code, err = _exit_code(capsys, "evaluate", str(partial))
    assert code == 4 and "incomplete" in err
    code, err = _exit_code(capsys, "evaluate", str(forecast), "--out", str(tmp_path / "scores.txt"))
    assert code == 2 and ".csv" in err


def test_maps_put_north_up_and_grey_out_invalid_points():
    from dyfcli.plots import _map_frame

    values = np.arange(6, dtype=float).reshape(3, 2)
    mask = np.array([[True, False], [True, True], [True, True]])
    frame, extent = _map_frame(values, mask, {"lat": np.array([10.0, 5.0, 0.0]), "lon": np.array([100.0, 101.0])})
    assert extent == [100.0, 101.0, 0.0, 10.0]
    assert frame[0, 0] == 4.0 and frame.mask[2, 1]  # row 0 (lat 10) went to the top; its invalid point stays masked
    frame, extent = _map_frame(values, mask, {})
    assert extent is None and frame[0, 0] == 0.0 and frame.mask[0, 1]
