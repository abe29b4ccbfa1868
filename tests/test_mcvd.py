"""The MCVD baseline: its schedule and sampler against the official code's formulas, and the real commands."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dyfcli.baselines import DiffusionForecaster, training_method
from dyfcli.config import load_config
from dyfcli.mcvd import MCVDForecaster, mcvd_alphas, sampling_levels, schedule_of_levels
from dyfcli.networks import count_parameters
from dyfcli.noise import MemberNoise
from storefactory import make_store

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_schedule_is_the_official_linear_one_with_the_noisiest_level_first():
    alphas = mcvd_alphas(1000)
    betas = 1 - alphas / torch.cat([alphas[1:], torch.ones(1, dtype=alphas.dtype)])  # alphas_prev[i] = alphas[i+1]
    assert float(betas[0]) == pytest.approx(0.02) and float(betas[-1]) == pytest.approx(1e-4)
    torch.testing.assert_close(betas, torch.linspace(0.02, 1e-4, 1000, dtype=torch.float64))
    assert float(alphas[-1]) == pytest.approx(1 - 1e-4) and float(alphas[0]) < 1e-4  # index 0 = pure noise
    assert bool((alphas[1:] > alphas[:-1]).all())
    # the usual DDPM linear schedule (1e-4 -> 0.02, index 0 cleanest), read backwards
    standard = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(alphas, standard.flip(0))
    torch.testing.assert_close(schedule_of_levels(alphas.flip(0)).betas,
                               torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def test_sub_sampling_follows_the_official_stride():
    assert sampling_levels(20, None).tolist() == list(range(20))
    assert sampling_levels(20, 5).tolist() == [0, 4, 8, 12, 16]
    assert len(sampling_levels(1000, 300)) == 334  # skip 3, as the official ddpm_sampler


class CountingNet(nn.Module):
    """A fixed random function of (x, time, cond) that records the time labels it was called with."""

    def __init__(self, channels: int):
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.labels: list[float] = []

    def forward(self, x, time, cond):
        self.labels.append(float(time[0]))
        conditioned = torch.cat([x, cond.mean(1, keepdim=True).expand_as(x)], 1)
        return torch.tanh(self.mix(conditioned) + 0.01 * time.view(-1, 1, 1, 1))


def _official_ddpm_sampler(net, alphas, levels, x, cond, noise):
    """MCVD's `ddpm_sampler` + denoise step written from the official formulas (subsampled betas 1 - a/a_prev),
    fed the same normal draws as dyf's sampler (step s = n-1-i uses noise.fold(s + 1))."""
    visited = alphas[levels]
    n = len(levels)
    for i, level in enumerate(levels.tolist()):
        a = float(visited[i])
        a_prev = float(visited[i + 1]) if i + 1 < n else 1.0
        beta = 1 - a / a_prev
        eps = net(x, torch.full((x.shape[0],), float(level)), cond)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
        if i + 1 < n:
            x = x + math.sqrt((1 - a_prev) / (1 - a) * beta) * noise.fold(n - i).normal(tuple(x.shape[1:]))
    last = int(levels[-1])
    return x - math.sqrt(1 - float(alphas[last])) * net(x, torch.full((x.shape[0],), float(last)), cond)


@pytest.mark.parametrize("sampling_steps", [None, 5])
def test_sampler_is_the_official_update_and_counts_its_network_calls(sampling_steps):
    """Every visited level (noisiest first, labelled by MCVD's index) plus one denoise call: T + 1 calls."""
    horizon, fields = 2, 1
    net = CountingNet(horizon * fields)
    model = MCVDForecaster(net, horizon, fields, diffusion_steps=20, sampling_steps=sampling_steps)
    x0, noise = torch.randn(3, fields, 5, 6), MemberNoise.for_members(4, torch.arange(3))
    ours = model.sample_window(x0, None, noise)
    levels = sampling_levels(20, sampling_steps)
    assert net.labels == [*map(float, levels.tolist()), float(levels[-1])]
    assert len(net.labels) == sum(model.network_calls().values()) == len(levels) + 1
    assert model.network_calls() == {"denoiser": 21 if sampling_steps is None else 6}
    from dyfcli.mcvd import MCVD_START_SALT

    start = noise.fold(MCVD_START_SALT).normal((horizon * fields, 5, 6))
    reference = _official_ddpm_sampler(net, model.alphas, levels, start, x0, noise)
    torch.testing.assert_close(ours, reference.view(3, horizon, fields, 5, 6), rtol=1e-4, atol=1e-5)


class GaussianOracle(nn.Module):
    """The exact E[eps | x_t] for data N(mean, std^2), at MCVD level labels."""

    def __init__(self, alphas, mean, std):
        super().__init__()
        self.alphas, self.mean, self.std = alphas, mean, std

    def forward(self, x, time, cond):
        abar = self.alphas[time.long()].to(x.dtype).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x - abar.sqrt() * self.mean) / (abar * self.std**2 + 1 - abar)


def test_sampler_with_the_exact_denoiser_recovers_the_data_distribution():
    """With T = 1000 (the linear schedule needs it: abar at level 0 is 4e-5, at T = 200 it would be 0.13)."""
    alphas = mcvd_alphas(1000)
    model = MCVDForecaster(GaussianOracle(alphas, 2.0, 0.5), horizon=1, fields=1, diffusion_steps=1000)
    samples = model.sample_window(torch.zeros(4000, 1, 1, 1), None, MemberNoise.for_members(3, torch.arange(4000)))
    assert float(samples.mean()) == pytest.approx(2.0, abs=0.03)
    assert float(samples.std()) == pytest.approx(0.5, abs=0.03)


def test_training_noises_at_mcvd_levels_and_the_time_embedding_is_on():
    config = load_config("tiny", ["forecaster.network.hyper.dim=8", "baseline.diffusion_steps=20"])
    training = training_method("mcvd", config, 2, 1)
    assert isinstance(training.model, MCVDForecaster) and not isinstance(training.model, DiffusionForecaster)
    loss, _ = training.loss({"dynamics": torch.randn(3, 5, 2, 6, 7), "condition": torch.randn(3, 1, 6, 7)})
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in training.network.parameters())
    net = training.network.eval()
    x, cond = torch.randn(2, 8, 6, 7), torch.randn(2, 3, 6, 7)
    assert not torch.allclose(net(x, torch.tensor([0.0, 0.0]), cond), net(x, torch.tensor([19.0, 19.0]), cond))


def test_members_do_not_depend_on_batching():
    config = load_config("tiny", ["forecaster.network.hyper.dim=8", "baseline.diffusion_steps=20"])
    torch.manual_seed(0)
    model = training_method("mcvd", config, 2, 1).model
    x0, cond = torch.randn(1, 2, 6, 7).expand(4, -1, -1, -1), torch.randn(1, 1, 6, 7).expand(4, -1, -1, -1)
    noise = MemberNoise.for_members(5, torch.arange(4))
    together = model.sample_window(x0, cond, noise)
    alone = torch.cat([model.sample_window(x0[i:i + 1], cond[i:i + 1], noise[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert (together[0] - together[1]).abs().max() > 1e-4


def test_sst_network_has_the_official_mcvd_parameter_count():
    """The paper's SST MCVD: the SST Unet on 7 noisy frames + x0, time MLP on: 9,498,887 parameters."""
    model = training_method("mcvd", load_config("sst", []), 1, 0).model
    assert count_parameters(model.network) == 9_498_887


TRAIN_SETS = ["--set", "forecaster.max_steps=4", "--set", "training.validate_every=4", "--set",
              "baseline.diffusion_steps=10", "--set", "forecaster.network.hyper.dim=8", "--device", "cpu"]


def test_mcvd_through_the_dyf_executable(dyf, tmp_path):
    """Train a tiny MCVD, forecast two windows twice with the same seed, evaluate."""
    import xarray as xr

    store = make_store(tmp_path / "s.zarr", land=True, steps=16, cond=("obstacle",))
    model = tmp_path / "mcvd.pt"
    summary = json.loads(dyf("--json", "train-forecaster", "--data", str(store), "--method", "mcvd", "--preset",
                             "tiny", *TRAIN_SETS, "--out", str(model), env=ONE_THREAD).stdout)
    assert summary["kind"] == "mcvd" and summary["steps"] == 4
    outputs = []
    for name in ("a.zarr", "b.zarr"):
        document = json.loads(dyf("--json", "forecast", "--ckpt", str(model), "--horizon", "6", "--ensemble", "3",
                                  "--init", "every:4", "--seed", "7", "--device", "cpu",
                                  "--out", str(tmp_path / name), env=ONE_THREAD).stdout)
        assert document["network_calls_per_member"] == 2 * (10 + 1)  # 2 windows of h = 4, T = 10 levels + denoise
        outputs.append(xr.open_zarr(tmp_path / name))
    first, second = outputs
    calls = first.attrs["dyf_network_calls"]
    calls = json.loads(calls) if isinstance(calls, str) else calls
    assert calls["per_member"] == 22 and first.attrs["dyf_method"] == "mcvd"
    mask = first["mask"].values[0]
    values = first["u"].values
    assert values.shape[2:4] == (3, 6) and np.isfinite(values[..., mask]).all()
    assert values[..., mask].std(axis=2).max() > 0  # members differ
    np.testing.assert_array_equal(values, second["u"].values)  # fixed seed, same forecast
    scores = json.loads(dyf("--json", "evaluate", str(tmp_path / "a.zarr"), env=ONE_THREAD).stdout)
    assert np.isfinite(scores["scores"]["u"]["crps"]["mean"]) and scores["scores"]["u"]["spread"]["mean"] > 0


def test_ddpm_keeps_its_cosine_schedule_and_step_convention():
    """Adding MCVD leaves the DDPM baseline as it was: cosine betas, index 0 the cleanest level."""
    from dyfcli.baselines import DiffusionSchedule

    config = load_config("tiny", ["forecaster.network.hyper.dim=8", "baseline.diffusion_steps=20"])
    ddpm = training_method("ddpm", config, 2, 1).model
    assert isinstance(ddpm, DiffusionForecaster) and ddpm.network_calls() == {"denoiser": 20}
    torch.testing.assert_close(ddpm.schedule.alphas_cumprod, DiffusionSchedule.cosine(20).alphas_cumprod)
    assert float(ddpm.schedule.alphas_cumprod[0]) > float(ddpm.schedule.alphas_cumprod[-1])


def test_navier_stokes_mcvd_preset_is_the_papers_h4_variant():
    base, mcvd = load_config("navier-stokes"), load_config("navier-stokes-mcvd")
    assert mcvd.data.horizon == 4 and mcvd.baseline.diffusion_steps == 1000 and mcvd.baseline.sampling_steps is None
    assert mcvd.forecaster == base.forecaster and mcvd.training == base.training
