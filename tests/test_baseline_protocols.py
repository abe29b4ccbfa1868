"""The paper's protocols around the baselines (issue 12 items 2, 4, 6): a baseline's preset chosen from the
store's system, the official baseline settings, the official perturbation mechanism and its sigma chosen on
the validation split, and raw units (`--normalization none`) for the simulated systems."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from dyfcli.baselines import PERTURBATION_SALT, TimeConditionedForecaster
from dyfcli.checkpoint import load_checkpoint
from dyfcli.config import load_config, method_preset, read_preset
from dyfcli.data import Normalizer, WindowDataset
from dyfcli.noise import MemberNoise
from dyfcli.store import DataStore, open_store
from storefactory import make_store, make_untrained_baseline

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TINY_SETS = ["--set", "forecaster.max_steps=4", "--set", "training.validate_every=4", "--set",
             "forecaster.network.hyper.dim=8", "--device", "cpu"]


def _run_cli(capsys, *args, code: int = 0) -> dict:
    """The real command line (parsing, run_command, JSON) in this process: one JSON document back."""
    from dyfcli.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(["--json", *args])
    out = capsys.readouterr().out
    assert raised.value.code == code, out
    return json.loads(out)


@pytest.fixture(scope="module")
def spring_stores(tmp_path_factory):
    """Two tiny simulated spring-mesh stores from the same seed: z-scored (`global`) and raw units (`none`)."""
    from dyfcli.sources.spring_mesh import prepare_spring_mesh

    folder = tmp_path_factory.mktemp("spring")
    stores = {}
    for mode in ("global", "none"):
        stores[mode] = folder / f"{mode}.zarr"
        prepare_spring_mesh(stores[mode], counts={"train": 3, "val": 1, "test": 1}, seed=1, device="cpu",
                            snapshots=24, normalization=mode)
    return stores


# ------------------------------------------------------------------------------------ item 6: preset by system

def test_a_baseline_without_preset_takes_the_preset_of_the_stores_system(dyf, spring_stores, tmp_path):
    proc = dyf("--json", "train-forecaster", "--data", str(spring_stores["global"]), "--method", "dropout",
               "--out", str(tmp_path / "d.pt"), "--dry-run", env=ONE_THREAD)
    summary = json.loads(proc.stdout)
    assert summary["preset"] == "spring-mesh-dropout"
    assert summary["config"]["forecaster"]["network"]["dropout"] == {"dropout": 0.05}  # not tiny's
    assert summary["config"]["data"]["horizon"] == 134
    assert "using preset spring-mesh-dropout" in proc.stderr  # the logged note naming it
    proc = dyf("--json", "train-forecaster", "--data", str(spring_stores["global"]), "--method", "perturbation",
               "--out", str(tmp_path / "p.pt"), "--dry-run", env=ONE_THREAD)
    assert json.loads(proc.stdout)["preset"] == "spring-mesh-perturbation"
    # an explicit --preset is used as given
    proc = dyf("--json", "train-forecaster", "--data", str(spring_stores["global"]), "--method", "dropout",
               "--preset", "tiny", "--out", str(tmp_path / "d.pt"), "--dry-run", env=ONE_THREAD)
    assert json.loads(proc.stdout)["preset"] == "tiny" and "using preset" not in proc.stderr


def test_a_baseline_on_a_store_of_no_known_system_is_refused_with_the_choices(dyf, tmp_path):
    store = make_store(tmp_path / "s.zarr")
    proc = dyf("--json", "train-forecaster", "--data", str(store), "--method", "dropout",
               "--out", str(tmp_path / "d.pt"), check=2, env=ONE_THREAD)
    message = json.loads(proc.stdout)["error"]["message"]
    assert "--preset" in message and "sst-dropout" in message and "tiny" in message
    assert not (tmp_path / "d.pt").exists()


def test_the_python_api_no_longer_falls_back_to_tiny(tmp_path):
    from dyfcli.errors import UsageError
    from dyfcli.train import resolve_forecaster

    with pytest.raises(UsageError, match="needs a preset"):
        resolve_forecaster("dropout", None, None)


def test_stores_say_which_system_they_hold():
    def system(attrs: dict, fields=("sst",)) -> str | None:
        ds = xr.Dataset(attrs={"dyf_fields": list(fields), **attrs})
        return DataStore(Path("x.zarr"), ds).system

    assert system({"dyf_system": "navier-stokes"}, ("u", "v", "p")) == "navier-stokes"
    assert system({"dyf_system": "spring-mesh"}, ("px",)) == "spring-mesh"
    assert system({"dyf_values": "physical"}) == "sst"  # written by `dyf prepare sst` only
    assert system({}) is None and system({"dyf_values": "physical"}, ("t2m",)) is None
    assert method_preset("sst", "dropout") == "sst-dropout"
    assert method_preset("sst", "no-such-method") == "sst"


# ------------------------------------------------------------------------------------ item 2: official settings

@pytest.mark.parametrize("dataset, dropout, lr", [
    ("sst", {"block_dropout": 0.6, "block_dropout1": 0.3, "attn_dropout": 0.6}, 3e-4),
    ("navier-stokes", {"dropout": 0.2}, 3e-4),
    ("spring-mesh", {"dropout": 0.05}, 4e-4),
])
def test_baseline_presets_hold_the_official_time_conditioned_settings(dataset, dropout, lr):
    base, baseline = load_config(dataset).to_dict(), load_config(f"{dataset}-dropout").to_dict()
    assert baseline["forecaster"]["network"]["dropout"] == dropout and baseline["forecaster"]["lr"] == lr
    # everything else is the data set's preset (network, batches, epochs, seed, ...)
    for section in ("data", "training", "interpolator", "sampling"):
        assert baseline[section] == base[section]
    assert baseline["forecaster"]["network"]["hyper"] == base["forecaster"]["network"]["hyper"]
    perturbation = load_config(f"{dataset}-perturbation").to_dict()
    assert perturbation["forecaster"] == baseline["forecaster"]
    assert perturbation["baseline"]["perturbation_noise"] == "per-lead"
    assert len(perturbation["baseline"]["perturbation_sigma_grid"]) >= 3
    assert read_preset(f"{dataset}-dropout")["description"].startswith("Dropout baseline")


class Inputs(nn.Module):
    """A stand-in network that returns its input: what a perturbed lead starts from becomes visible."""

    def forward(self, x, time, cond):
        return x.clone()


def _perturbation(mode: str, sigma: float = 0.5, horizon: int = 3) -> TimeConditionedForecaster:
    return TimeConditionedForecaster(Inputs(), horizon, "perturbation", sigma, mode)


def test_official_perturbation_draws_fresh_noise_per_lead_in_the_first_window_only():
    model = _perturbation("per-lead")
    x0 = torch.randn(1, 2, 5, 6).expand(4, -1, -1, -1)
    noise = MemberNoise.for_members(3, torch.arange(4))
    first = model.sample_window(x0, None, noise)  # (members, leads, C, Y, X)
    offsets = first - x0[:, None]
    assert (offsets[:, 0] - offsets[:, 1]).abs().min() > 0  # each lead its own draw
    assert (offsets[0] - offsets[1]).abs().min() > 0  # each member its own draw
    assert abs(float(offsets.std()) - 0.5) < 0.05  # sigma * N(0, 1)
    expected = 0.5 * noise.fold(PERTURBATION_SALT).fold(2).normal((2, 5, 6))
    torch.testing.assert_close(offsets[:, 1], expected)
    later = model.sample_window(x0, None, noise, window=1)
    assert torch.equal(later, x0[:, None].expand_as(later))  # later windows are not perturbed
    alone = torch.cat([model.sample_window(x0[i:i + 1], None, noise[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(first, alone)  # a member does not depend on its batch


def test_per_member_perturbation_keeps_the_earlier_mechanism():
    model = _perturbation("per-member")
    x0 = torch.randn(2, 2, 5, 6)
    noise = MemberNoise.for_members(3, torch.arange(2))
    earlier = x0 + 0.5 * noise.fold(PERTURBATION_SALT).normal((2, 5, 6))  # dyf's formula before issue 12
    for window in (0, 1):
        out = model.sample_window(x0, None, noise, window=window)
        assert torch.equal(out[:, 0], earlier) and torch.equal(out[:, 2], earlier)


def _baseline_checkpoint(store, path: Path, kind: str, sets: tuple[str, ...] = ()) -> Path:
    return make_untrained_baseline(store, path, kind, sets)


def test_forecast_rollouts_perturb_only_the_first_window(tmp_path):
    """Leads h+1..2h continue from each member's own x_h without noise (the official mechanism)."""
    from dyfcli import forecast
    from dyfcli.baselines import build_model_from_checkpoint

    store = open_store(make_store(tmp_path / "s.zarr", steps=16))
    path = _baseline_checkpoint(store, tmp_path / "p.pt", "perturbation", ("baseline.perturbation_sigma=0.5",))
    forecast.run_forecast(forecast.ForecastRequest(checkpoint=path, out=tmp_path / "f.zarr", horizon=8, ensemble=3,
                                                   data=store.path, device="cpu"))
    ds = xr.open_zarr(tmp_path / "f.zarr")
    series = int(ds["series"].values[0])  # make_store's labels are the store indices
    ensemble = np.stack([ds[name].values[0, 0] for name in store.fields], axis=2)  # (M, L, C, Y, X)
    checkpoint = load_checkpoint(path)
    model = build_model_from_checkpoint(checkpoint, "cpu")
    normalizer = Normalizer.from_state(checkpoint.normalizer)
    x_h = torch.from_numpy(normalizer.normalize_at(ensemble[:, 3], series))  # each member's own x_4
    noise = MemberNoise.for_members(0, torch.arange(3))  # any: window 1 draws none
    continued = model.sample_window(x_h, None, noise, window=1)
    expected = normalizer.denormalize_at(continued.numpy(), series)
    np.testing.assert_allclose(ensemble[:, 4:], expected, rtol=1e-4, atol=1e-4)
    perturbed = normalizer.denormalize_at(model.sample_window(x_h, None, noise, window=0).numpy(), series)
    assert np.abs(ensemble[:, 4:] - perturbed).max() > 1e-2  # so the check above can fail


def test_forecast_perturbation_sigma_overrides_the_checkpoint_and_is_recorded(dyf, tmp_path):
    store = open_store(make_store(tmp_path / "s.zarr", steps=16))
    path = _baseline_checkpoint(store, tmp_path / "p.pt", "perturbation", ("baseline.perturbation_sigma=0.5",))
    common = ["forecast", "--ckpt", str(path), "--horizon", "4", "--ensemble", "3", "--device", "cpu"]
    dyf(*common, "--out", str(tmp_path / "zero.zarr"), "--perturbation-sigma", "0", env=ONE_THREAD)
    zero = xr.open_zarr(tmp_path / "zero.zarr")
    assert zero.attrs["dyf_perturbation_sigma"] == 0.0
    members = zero["u"].values[0, 0]
    np.testing.assert_allclose(members, np.broadcast_to(members[:1], members.shape), atol=1e-6)  # all the same
    dyf(*common, "--out", str(tmp_path / "own.zarr"), env=ONE_THREAD)
    own = xr.open_zarr(tmp_path / "own.zarr")
    assert own.attrs["dyf_perturbation_sigma"] == 0.5 and float(own["u"].std("member").max()) > 0
    dropout = _baseline_checkpoint(store, tmp_path / "d.pt", "dropout")
    proc = dyf("forecast", "--ckpt", str(dropout), "--horizon", "4", "--ensemble", "2", "--device", "cpu",
               "--out", str(tmp_path / "d.zarr"), "--perturbation-sigma", "0.1", check=2, env=ONE_THREAD)
    assert "Perturbation checkpoints" in proc.stderr


def test_training_chooses_sigma_on_the_validation_split_and_records_it(capsys, tmp_path):
    store = make_store(tmp_path / "s.zarr", land=True, steps=16)
    model = tmp_path / "p.pt"
    summary = _run_cli(capsys, "train-forecaster", "--data", str(store), "--method", "perturbation", "--preset",
                       "tiny", *TINY_SETS, "--set", "baseline.perturbation_sigma_grid=[0.0, 0.2, 3.0]",
                       "--out", str(model))
    chosen = summary["perturbation_sigma"]
    assert chosen["grid"] == [0.0, 0.2, 3.0] and len(chosen["val_crps"]) == 3
    assert chosen["sigma"] == chosen["grid"][int(np.argmin(chosen["val_crps"]))]
    assert len(set(chosen["val_crps"])) == 3  # each sigma really scored
    checkpoint = load_checkpoint(model)
    assert checkpoint.config["baseline"]["perturbation_sigma"] == chosen["sigma"]  # what forecast uses
    assert checkpoint.training["perturbation_sigma"] == chosen and checkpoint.training["complete"]
    events = [json.loads(line) for line in (tmp_path / "p.pt.run" / "metrics.jsonl").read_text().splitlines()]
    assert any(event.get("event") == "perturbation_sigma_selected" for event in events)


def test_a_sigma_grid_without_a_validation_split_is_refused_before_training(capsys, tmp_path):
    from dyfcli.store import write_store

    ds = open_store(make_store(tmp_path / "s.zarr", steps=16)).ds.load()
    ds.attrs["dyf_splits"] = {name: rule for name, rule in ds.attrs["dyf_splits"].items() if name != "val"}
    store = write_store(ds, tmp_path / "no-val.zarr")
    document = _run_cli(capsys, "train-forecaster", "--data", str(store), "--method", "perturbation", "--preset",
                        "tiny", *TINY_SETS, "--set", "baseline.perturbation_sigma_grid=[0.1]",
                        "--out", str(tmp_path / "p.pt"), code=3)
    assert "'val' split" in document["error"]["message"] and not (tmp_path / "p.pt").exists()


# ------------------------------------------------------------------------------------ item 4: raw units

def test_prepare_records_raw_units_and_the_normalizer_is_the_identity(spring_stores):
    raw, scored = open_store(spring_stores["none"]), open_store(spring_stores["global"])
    assert raw.normalization == "none" and scored.normalization == "global"
    np.testing.assert_array_equal(raw.ds["qx"].values, scored.ds["qx"].values)  # same data, other use
    assert float(raw.ds["stats_std_qx"]) == float(scored.ds["stats_std_qx"])  # statistics kept
    normalizer = Normalizer.from_store(raw)
    frames = np.stack([raw.ds[name].values[0, :5] for name in raw.fields], axis=1)  # (T, C, Y, X)
    x = torch.from_numpy(frames[:3])
    assert torch.equal(normalizer.normalize(x, 0, np.arange(3)), x)
    assert torch.equal(normalizer.denormalize(x, 0, np.arange(3)), x)
    window = WindowDataset(raw.path, "train", 5)[0]
    np.testing.assert_array_equal(window["dynamics"], frames)  # the networks see raw units
    restored = Normalizer.from_state(normalizer.get_state())
    assert restored.mode == "none" and torch.equal(restored.normalize_at(x, 0), x)


def test_prepare_refuses_other_normalisations_for_simulated_systems(dyf, tmp_path):
    proc = dyf("prepare", "spring-mesh", "--out", str(tmp_path / "s.zarr"), "--trajectories", "1,1,1",
               "--snapshots", "4", "--device", "cpu", "--normalization", "pixel", check=2, env=ONE_THREAD)
    assert "--normalization 'pixel'" in proc.stderr and "none" in proc.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_raw_unit_store_trains_forecasts_and_evaluates(capsys, spring_stores, tmp_path):
    data = str(spring_stores["none"])
    sets = ["--set", "interpolator.max_steps=3", "--set", "forecaster.max_steps=3", "--set",
            "training.validate_every=3", "--device", "cpu"]
    _run_cli(capsys, "train-interpolator", "--data", data, "--preset", "tiny", *sets, "--out",
             str(tmp_path / "i.pt"))
    _run_cli(capsys, "train-forecaster", "--data", data, "--interpolator", str(tmp_path / "i.pt"), *sets,
             "--out", str(tmp_path / "m.pt"))
    checkpoint = load_checkpoint(tmp_path / "m.pt")
    assert checkpoint.normalizer["mode"] == "none" and checkpoint.store["normalization"] == "none"
    _run_cli(capsys, "forecast", "--ckpt", str(tmp_path / "m.pt"), "--horizon", "6", "--ensemble", "2",
             "--device", "cpu", "--out", str(tmp_path / "f.zarr"))
    values = xr.open_zarr(tmp_path / "f.zarr")["qx"].values
    assert np.isfinite(values).all()
    scores = _run_cli(capsys, "evaluate", str(tmp_path / "f.zarr"))
    assert np.isfinite(scores["scores"]["qx"]["crps"]["mean"])
    climatology = scores["baselines"]["climatology"]["qx"]["crps"]["mean"]
    assert np.isfinite(climatology) and climatology > 0  # the stored global mean is the climatology
