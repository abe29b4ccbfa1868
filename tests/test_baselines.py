"""Baselines: DDPM maths against closed forms, per-member randomness, and the real commands on the tiny preset."""

import json
import math

import pytest
import torch

from dyfcli.baselines import (DiffusionForecaster, DiffusionSchedule, TimeConditionedForecaster, ancestral_sample,
                              cosine_betas, ddim_sample, ddim_times, training_method)
from dyfcli.config import load_config
from dyfcli.noise import MemberNoise
from storefactory import make_store

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_cosine_schedule_matches_its_definition():
    betas = cosine_betas(1000)
    assert betas.shape == (1000,) and float(betas.max()) == pytest.approx(0.999)
    abar = torch.cumprod(1 - betas, 0)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(abar[499]) == pytest.approx(f(0.5) / f(0.0), rel=1e-9)
    assert float(abar[0]) > 0.9999 and float(abar[-1]) < 1e-6


def _gaussian_oracle(schedule: DiffusionSchedule, mean: float, std: float):
    """The exact noise prediction when the data are N(mean, std^2): eps = sqrt(1-abar) (x_t - sqrt(abar) m) / var_t."""
    def predict_noise(x, t):
        abar = schedule.alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        variance = abar * std**2 + 1 - abar
        return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / variance
    return predict_noise


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_samplers_recover_a_gaussian_with_the_exact_denoiser(sampler):
    """With the exact E[eps | x_t] of Gaussian data the samplers reproduce the data's mean and spread
    (DDIM on a coarse subsequence loses a little spread: its last step returns E[x_0 | x_t])."""
    schedule = DiffusionSchedule.cosine(100)
    noise = MemberNoise.for_members(3, torch.arange(4000))
    start = noise.fold(987_654).normal((1,)).double()  # a stream the samplers do not use
    predict = _gaussian_oracle(schedule, mean=2.0, std=0.5)
    if sampler == "ancestral":
        samples = ancestral_sample(predict, schedule, start, noise)
    else:
        samples = ddim_sample(predict, schedule, start, noise, sampling_steps=50, eta=0.0)
    assert float(samples.mean()) == pytest.approx(2.0, abs=0.03)
    assert float(samples.std()) == pytest.approx(0.5, abs=0.03)


def test_ddim_times_cover_the_chain_from_the_end():
    pairs = ddim_times(1000, 5)
    assert pairs[0][0] == 999 and pairs[-1][1] == -1 and len(pairs) == 5
    assert all(t > t_next for t, t_next in pairs)


def _config(method_sets=()):
    return load_config("tiny", ["forecaster.network.hyper.dim=8", "baseline.diffusion_steps=20", *method_sets])


@pytest.mark.parametrize("method", ["dropout", "perturbation", "ddpm"])
def test_members_do_not_depend_on_batching_and_differ_from_each_other(method):
    torch.manual_seed(0)
    model = training_method(method, _config(["baseline.perturbation_sigma=0.3"]), 2, 1).model
    x0 = torch.randn(1, 2, 6, 7).expand(4, -1, -1, -1)
    cond = torch.randn(1, 1, 6, 7).expand(4, -1, -1, -1)
    noise = MemberNoise.for_members(5, torch.arange(4))
    together = model.sample_window(x0, cond, noise)
    alone = torch.cat([model.sample_window(x0[i:i + 1], cond[i:i + 1], noise[i:i + 1]) for i in range(4)])
    assert together.shape == (4, 4, 2, 6, 7)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert (together[0] - together[1]).abs().max() > 1e-4  # a real ensemble
    assert sum(model.network_calls().values()) == (20 if method == "ddpm" else 4)


def test_losses_backpropagate_and_ddpm_uses_its_time_embedding():
    config = _config()
    batch = {"dynamics": torch.randn(3, 5, 2, 6, 7), "condition": torch.zeros(3, 0, 6, 7)}
    for method in ("dropout", "ddpm"):
        training = training_method(method, config, 2, 0)
        loss, _ = training.loss(batch)
        loss.backward()
        assert loss.item() > 0 and all(p.grad is not None for p in training.network.parameters() if p.requires_grad)
    ddpm = training_method("ddpm", config, 2, 0).model
    assert isinstance(ddpm, DiffusionForecaster)
    x = torch.randn(2, 8, 6, 7)
    ddpm.network.eval()
    early = ddpm.network(x, torch.tensor([1.0, 1.0]), torch.randn(2, 2, 6, 7))
    late = ddpm.network(x, torch.tensor([15.0, 15.0]), torch.randn(2, 2, 6, 7) * 0)
    assert not torch.allclose(early, late)


def test_perturbation_without_sigma_is_deterministic():
    model = training_method("perturbation", _config(["baseline.perturbation_sigma=0"]), 2, 0).model
    assert isinstance(model, TimeConditionedForecaster)
    x0 = torch.randn(3, 2, 6, 7)
    out = model.sample_window(x0[:1].expand(3, -1, -1, -1), None, MemberNoise.for_members(0, torch.arange(3)))
    torch.testing.assert_close(out[0], out[2])


TRAIN_SETS = ["--set", "forecaster.max_steps=4", "--set", "training.validate_every=4", "--set",
              "baseline.diffusion_steps=10", "--set", "forecaster.network.hyper.dim=8", "--device", "cpu"]


def _check_forecast(store, forecast, document, method):
    import numpy as np
    import xarray as xr

    from dyfcli.evaluate import evaluate

    assert document["network_calls_per_member"] == (20 if method == "ddpm" else 8)  # 2 windows of h = 4
    values = xr.open_zarr(forecast)["u"].values  # (series, init, member, lead, y, x)
    mask = xr.open_zarr(forecast)["mask"].values[0]
    assert values.shape[2:4] == (3, 6) and np.isfinite(values[..., mask]).all()
    assert np.isnan(values[..., ~mask]).all()
    assert values[..., mask].std(axis=2).max() > 0  # members differ
    scores = evaluate(forecast)["scores"]["u"]
    assert np.isfinite(scores["crps"]["mean"]) and scores["spread"]["mean"] > 0


def test_dropout_baseline_through_the_dyf_executable(dyf, tmp_path):
    store = make_store(tmp_path / "s.zarr", land=True, steps=16)
    model, forecast = tmp_path / "dropout.pt", tmp_path / "f.zarr"
    proc = dyf("--json", "train-forecaster", "--data", str(store), "--method", "dropout", "--preset", "tiny",
               *TRAIN_SETS, "--out", str(model), env=ONE_THREAD)
    summary = json.loads(proc.stdout)
    assert summary["kind"] == "dropout" and summary["steps"] == 4
    proc = dyf("--json", "forecast", "--ckpt", str(model), "--horizon", "6", "--ensemble", "3", "--init", "every:4",
               "--device", "cpu", "--out", str(forecast), env=ONE_THREAD)
    _check_forecast(store, forecast, json.loads(proc.stdout), "dropout")


def _run_cli(capsys, *args) -> dict:
    """The real command line (parsing, run_command, JSON) in this process."""
    from dyfcli.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(["--json", *args])
    out = capsys.readouterr().out
    assert raised.value.code == 0, out
    return json.loads(out)


@pytest.mark.parametrize("method", ["perturbation", "ddpm"])
def test_baseline_train_and_forecast_commands(capsys, tmp_path, method):
    store = make_store(tmp_path / "s.zarr", land=True, steps=16, cond=("obstacle",))
    model, forecast = tmp_path / f"{method}.pt", tmp_path / "f.zarr"
    summary = _run_cli(capsys, "train-forecaster", "--data", str(store), "--method", method, "--preset", "tiny",
                       *TRAIN_SETS, "--set", "baseline.perturbation_sigma=0.2", "--out", str(model))
    assert summary["kind"] == method and summary["steps"] == 4
    document = _run_cli(capsys, "forecast", "--ckpt", str(model), "--horizon", "6", "--ensemble", "3",
                        "--init", "every:4", "--device", "cpu", "--out", str(forecast))
    _check_forecast(store, forecast, document, method)


