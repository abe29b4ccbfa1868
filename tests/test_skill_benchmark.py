"""benchmarks/skill.py's helpers: per-data-set defaults, seeds, the window-boundary figure and the error bars."""

import importlib.util
import sys
from pathlib import Path

import pytest

SKILL = Path(__file__).resolve().parents[1] / "benchmarks" / "skill.py"


@pytest.fixture(scope="module")
def skill():
    spec = importlib.util.spec_from_file_location("skill_benchmark", SKILL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_defaults_follow_the_data_set_and_the_presets_last_step(skill):
    args = skill.parse_args([])
    assert (args.dataset, args.window, args.mcvd_window, args.horizon, args.batch_size) == ("spring-mesh", 32, 32,
                                                                                            128, 64)
    assert args.last_step == ["direct"] and args.seeds == 1 and "mcvd" in args.methods.split(",")
    assert skill.parse_args(["--window", "8"]).mcvd_window == 8  # spring mesh: MCVD's window follows --window
    ns = skill.parse_args(["--dataset", "navier-stokes", "--last-step", "cold,direct", "--seeds", "3"])
    assert (ns.window, ns.mcvd_window, ns.horizon, ns.trajectories) == (16, 4, 64, "8,2,3")
    assert ns.preset.name == "navier-stokes-small.yaml" and ns.last_step == ["cold", "direct"]


@pytest.mark.parametrize("argv", [["--last-step", "warm"], ["--last-step", "cold,cold"], ["--methods", "dyffusion,gan"],
                                  ["--seeds", "0"], ["--first-seed", "-1"]])
def test_bad_choices_are_usage_errors(skill, argv, capsys):
    with pytest.raises(SystemExit) as raised:
        skill.parse_args(argv)
    assert raised.value.code == 2


def test_seeds_change_training_and_model_names(skill):
    args = skill.parse_args(["--last-step", "cold,direct"])
    assert "training.seed=12" in skill.common_sets(args, 100, 32, 1)
    assert not any("training.seed" in item for item in skill.common_sets(args, 100, 32, 0))
    assert skill.model_name("dyffusion", args, 100, 0) == "dyffusion_h32_dim32_bs64_steps100_cold"
    assert skill.model_name("mcvd", args, 200, 2) == "mcvd_h32_dim32_bs64_steps200_S1000_seed2"
    sets = skill.method_sets("mcvd", args, 200)
    assert "baseline.sampling_steps=1000" in sets and "forecaster.network.dropout.dropout=0.0" in sets


def _scores(spread_by_field, ssr_by_field):
    return {field: {"spread": {"per_lead": spread}, "ssr": {"per_lead": ssr_by_field[field]}}
            for field, spread in spread_by_field.items()}


def test_boundary_drop_measures_the_saw_tooth(skill):
    """Spread growing within each window of 3 and falling back at each window start: (1,2,3)(1.5,2.5,3.5)(2,3,4)."""
    spread = [1, 2, 3, 1.5, 2.5, 3.5, 2, 3, 4]
    ssr = [0.5, 0.7, 0.9, 0.6, 0.8, 1.0, 0.7, 0.9, 1.1]
    drop = skill.boundary_drop(_scores({"a": spread, "b": spread}, {"a": ssr, "b": ssr}), ["a", "b"], 3)
    assert drop["boundaries"] == 2
    assert drop["spread_ratio"] == pytest.approx((1.5 / 3 + 2 / 3.5) / 2)
    assert drop["ssr_before"] == pytest.approx(0.95) and drop["ssr_first"] == pytest.approx(0.65)
    assert skill.boundary_drop(_scores({"a": spread[:3]}, {"a": ssr[:3]}), ["a"], 3) is None
    assert skill.window_means(spread, 3) == pytest.approx([2, 2.5, 3])


def test_summarize_averages_fields_and_skips_an_all_row(skill):
    def table(value):
        return {"crps": {"mean": value, "per_lead": [value] * 4}, "mse": {"mean": value ** 2, "per_lead": [0] * 4},
                "ssr": {"mean": 1.0, "per_lead": [1.0] * 4}, "spread": {"mean": 1.0, "per_lead": [1, 2, 1, 2]}}
    scores = {"fields": ["u", "v", "all"], "scores": {"u": table(1.0), "v": table(3.0), "all": table(99.0)},
              "baselines": {"persistence": {"u": table(4.0), "v": table(6.0)}}}
    row = skill.summarize(scores, window=2, crps_window=2)
    assert row["crps"] == 2.0 and row["mse"] == 5.0 and row["crps_per_window"] == [2.0, 2.0]
    assert row["references"]["persistence"]["crps"] == 5.0 and row["boundary"]["spread_ratio"] == 0.5


def test_aggregate_gives_mean_and_sample_std_over_seeds(skill):
    def row(seed, crps):
        return {"label": "dropout", "method": "dropout", "seed": seed, "crps": crps, "mse": 1.0, "ssr": 0.5,
                "forecast_s": 2.0, "train_s": 3.0, "network_calls": 8, "train_steps": 10,
                "crps_per_window": [crps, 2 * crps], "boundary": None}
    merged, = skill.aggregate([row(0, 1.0), row(1, 2.0), row(2, 3.0)])
    assert merged["seeds"] == 3 and merged["crps"] == 2.0 and merged["crps_std"] == pytest.approx(1.0)
    assert merged["mse_std"] == 0.0 and merged["crps_per_window"] == [2.0, 4.0] and merged["boundary"] is None
    assert skill.with_error(2.0, 1.0, 3, ".2f") == "2.00±1.00" and skill.with_error(2.0, 0.0, 1, ".2f") == "2.00"


def test_a_finished_forecast_and_the_training_time_of_a_model_are_reused(skill, dyf, tmp_path):
    """Re-running the benchmark in its folder re-evaluates finished forecasts instead of recomputing them."""
    import json

    from storefactory import make_store

    store = make_store(tmp_path / "s.zarr", steps=16)
    model, forecast = tmp_path / "dropout.pt", tmp_path / "f.zarr"
    dyf("train-forecaster", "--data", str(store), "--method", "dropout", "--preset", "tiny", "--set",
        "forecaster.max_steps=2", "--set", "training.validate_every=2", "--device", "cpu", "--out", str(model))
    made = json.loads(dyf("--json", "forecast", "--ckpt", str(model), "--horizon", "6", "--ensemble", "2", "--seed",
                          "1", "--device", "cpu", "--out", str(forecast)).stdout)
    args = skill.parse_args(["--horizon", "6", "--ensemble", "2"])
    reused = skill.finished_forecast(forecast, model, args, seed=1)
    assert reused["network_calls_per_member"] == made["network_calls_per_member"] and reused["seconds"] >= 0
    assert skill.finished_forecast(forecast, model, args, seed=0) is None
    assert skill.finished_forecast(forecast, model, skill.parse_args(["--horizon", "6", "--ensemble", "3"]), 1) is None
    assert skill.finished_forecast(tmp_path / "none.zarr", model, args, 1) is None
    assert skill.recorded_train_seconds(model) > 0 and skill.recorded_train_seconds(tmp_path / "none.pt") is None
