"""The paper's baselines (docs/paper-notes.md §6), trained by `train.py` and sampled by `forecast.py`.

- `dropout`: a time-conditioned forecaster x_j = net(x0, time=j) trained with MSE at j ~ U{1..h}; at
  inference MC dropout stays on and each lead j = 1..h is one independent pass (leads are not chained);
  every member and lead draws its own masks (`noise.fold(j)`).
- `perturbation`: the same network and training; at inference dropout is off and the initial condition gets
  `sigma * N(0, 1)` (sigma = `baseline.perturbation_sigma`, in the units the network sees). As the official
  code (`get_ensemble_inputs`, called once per lead time in the first window; `perturbation_noise:
  per-lead`): every member and lead time of the first window draws its own noise, and later windows start
  from the member's own x_h unperturbed. `per-member` keeps one draw per member and window, shared by its
  leads, in every window (dyf's earlier mechanism).
- `ddpm`: a conditional Gaussian diffusion model over the h stacked future frames (h*C channels), conditioned
  on x0 (and the static fields) by concatenation, with the diffusion step as the network's time input (the
  time embedding is ON; the official configs shipped it off by mistake). Cosine beta schedule (s = 0.008,
  betas clipped at 0.999), epsilon prediction with an L1 loss, t ~ U{0..T-1}. Sampling is ancestral over
  all T steps, or DDIM with `eta` over `baseline.sampling_steps` evenly spaced steps.
- `mcvd`: the paper's MCVD ("concat", linear betas, MCVD's level index; `dyfcli/mcvd.py`), built on the
  DDPM maths below.

Each method gives `train.py` an object with `kind`, `network`, `to(device)`, `loss(batch)` and
`validation_ensemble(batch, noise, members)`, and gives `forecast.py` a model with `horizon`,
`sample_window(x0, static_cond, noise) -> (B, h, C, Y, X)` and `network_calls()`. All tensors are
normalised (invalid points 0). Randomness at inference comes only from `MemberNoise`, so a member's
forecast does not depend on how members are batched.

The DDPM maths (`cosine_betas`, `DiffusionSchedule`, `ancestral_sample`, `ddim_sample`) never sees a
network: it takes a `predict_noise(x, t)` callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dyfcli.checkpoint import BASELINE_KINDS
from dyfcli.errors import CheckpointError, ConfigError
from dyfcli.model import eval_mode, members_first, nonempty, repeat_members
from dyfcli.networks import build_network, mc_dropout
from dyfcli.noise import MemberNoise

METHODS = BASELINE_KINDS
PERTURBATION_SALT = 0x9E27
DDPM_START_SALT = 0xDD90
DDIM_ETA = 1.0  # the reference's DDIM eta when sampling_steps < diffusion_steps


# ================================================================================================ DDPM maths

def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: beta_t = 1 - abar_{t+1}/abar_t, abar(u) = cos^2((u+s)/(1+s) pi/2)."""
    u = torch.linspace(0, steps, steps + 1, dtype=torch.float64) / steps
    alphas_cumprod = torch.cos((u + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, max_beta)


@dataclass(frozen=True)
class DiffusionSchedule:
    """Per-step constants of a Gaussian diffusion with T steps (index t = 0..T-1), float64 (T,) each."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef1: torch.Tensor  # multiplies the predicted x_0
    posterior_mean_coef2: torch.Tensor  # multiplies x_t

    @staticmethod
    def cosine(steps: int) -> DiffusionSchedule:
        betas = cosine_betas(steps)
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return DiffusionSchedule(
            betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=prev,
            posterior_variance=betas * (1 - prev) / (1 - alphas_cumprod),
            posterior_mean_coef1=betas * prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - prev) * alphas.sqrt() / (1 - alphas_cumprod))

    @property
    def steps(self) -> int:
        return int(self.betas.shape[0])

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t (B,) long."""
        abar = _per_row(self.alphas_cumprod, t, x_start)
        return abar.sqrt() * x_start + (1 - abar).sqrt() * noise

    def predict_start(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = _per_row(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def _per_row(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast against `like`, in its dtype and device."""
    picked = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return picked.view(-1, *([1] * (like.ndim - 1)))


PredictNoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, ...), t (B,) long) -> eps


def ancestral_sample(predict_noise: PredictNoise, schedule: DiffusionSchedule, x_end: torch.Tensor,
                     noise: MemberNoise) -> torch.Tensor:
    """DDPM's reverse process over all T steps from x_{T-1} = `x_end` ~ N(0, I) (Ho et al., Alg. 2).

    x_{t-1} = mu(x_t, x0_hat) + sigma_t z with the clipped log posterior variance; no noise at t = 0.
    The z of step t is `noise.fold(t + 1)`.
    """
    x = x_end
    log_variance = schedule.posterior_variance.clamp(min=1e-20).log()
    for step in reversed(range(schedule.steps)):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        x_start = schedule.predict_start(x, t, predict_noise(x, t))
        mean = (_per_row(schedule.posterior_mean_coef1, t, x) * x_start
                + _per_row(schedule.posterior_mean_coef2, t, x) * x)
        if step == 0:
            return mean
        z = noise.fold(step + 1).normal(tuple(x.shape[1:])).to(x.device, x.dtype)
        x = mean + (0.5 * _per_row(log_variance, t, x)).exp() * z
    return x


def ddim_times(total_steps: int, sampling_steps: int) -> list[tuple[int, int]]:
    """(t, t_next) pairs from T-1 down to -1 over `sampling_steps` evenly spaced steps (t_next = -1: done)."""
    times = torch.linspace(-1, total_steps - 1, sampling_steps + 1).long().tolist()[::-1]
    return list(zip(times[:-1], times[1:]))


def ddim_sample(predict_noise: PredictNoise, schedule: DiffusionSchedule, x_end: torch.Tensor, noise: MemberNoise,
                sampling_steps: int, eta: float = DDIM_ETA) -> torch.Tensor:
    """DDIM (Song et al., Eq. 12) over `sampling_steps` steps; eta = 1 is DDPM-like, eta = 0 deterministic."""
    x = x_end
    for index, (step, step_next) in enumerate(ddim_times(schedule.steps, sampling_steps)):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        eps = predict_noise(x, t)
        x_start = schedule.predict_start(x, t, eps)
        if step_next < 0:
            return x_start
        abar, abar_next = float(schedule.alphas_cumprod[step]), float(schedule.alphas_cumprod[step_next])
        sigma = eta * math.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
        direction = math.sqrt(max(1 - abar_next - sigma**2, 0.0)) * eps
        z = noise.fold(index + 1).normal(tuple(x.shape[1:])).to(x.device, x.dtype)
        x = math.sqrt(abar_next) * x_start + direction + sigma * z
    return x


# ================================================================================================ helpers

def _whole_leads_only(horizon: int, output_times) -> None:
    """Baselines forecast the lead times 1..h; sub-step outputs are a DYffusion feature."""
    if output_times is not None and [float(t) for t in output_times] != [float(j) for j in range(1, horizon + 1)]:
        raise ValueError("the baselines forecast whole lead times 1..h only; drop --output-times "
                         "(sub-step outputs need a DYffusion model)")


# ================================================================================================ models

class TimeConditionedForecaster:
    """x_j = net(x0, time=j, cond) for j = 1..h: the Dropout and Perturbation baselines.

    inference = "dropout": MC dropout on, independent masks per member and lead (`noise.fold(j)`).
    inference = "perturbation": dropout off, x0 + sigma * N(0, 1): with `noise_mode` "per-lead" one draw per
    member and lead time in window 0 only (`noise.fold(PERTURBATION_SALT).fold(j)`), none later; with
    "per-member" one draw per member in every window (`noise.fold(PERTURBATION_SALT)`).
    """

    uses_window_index = True  # `forecast.rollout` passes `window=` (perturbation depends on it)

    def __init__(self, network: nn.Module, horizon: int, inference: str, sigma: float = 0.0,
                 noise_mode: str = "per-lead"):
        if inference not in ("dropout", "perturbation"):
            raise ValueError(f"inference {inference!r} is not dropout or perturbation")
        if noise_mode not in ("per-lead", "per-member"):
            raise ValueError(f"noise_mode {noise_mode!r} is not per-lead or per-member")
        self.network, self.horizon, self.inference, self.sigma = network, horizon, inference, sigma
        self.noise_mode = noise_mode

    def to(self, device) -> TimeConditionedForecaster:
        self.network.to(device)
        return self

    def with_sigma(self, sigma: float) -> TimeConditionedForecaster:
        """The same network with another perturbation sigma (`dyf forecast --perturbation-sigma`, the
        validation grid of `baseline.perturbation_sigma_grid`)."""
        return TimeConditionedForecaster(self.network, self.horizon, self.inference, sigma, self.noise_mode)

    def _inputs(self, x0: torch.Tensor, noise: MemberNoise, lead: int, window: int) -> torch.Tensor:
        """What the network starts lead `lead` of window `window` from (perturbed or not)."""
        if self.inference != "perturbation":
            return x0
        if self.noise_mode == "per-member":
            stream = noise.fold(PERTURBATION_SALT)
        elif window == 0:
            stream = noise.fold(PERTURBATION_SALT).fold(lead)
        else:
            return x0
        return x0 + self.sigma * stream.normal(tuple(x0.shape[1:])).to(x0.device, x0.dtype)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE of net(x0, j) against x_j, j ~ U{1..h} per window."""
        dynamics, condition = batch["dynamics"], nonempty(batch.get("condition"))
        rows = torch.arange(dynamics.shape[0], device=dynamics.device)
        leads = torch.randint(1, self.horizon + 1, (dynamics.shape[0],), generator=generator).to(dynamics.device)
        prediction = self.network(dynamics[:, 0], leads.to(dynamics.dtype), condition)
        return F.mse_loss(prediction, dynamics[rows, leads])

    @torch.no_grad()
    def sample_window(self, x0: torch.Tensor, static_cond: torch.Tensor | None, noise: MemberNoise,
                      output_times: tuple[float, ...] | None = None, window: int = 0) -> torch.Tensor:
        """(B, C, Y, X) -> (B, h, C, Y, X), one batch row per member; `window`: the autoregressive window's
        index (0: x0 is the initial condition)."""
        _whole_leads_only(self.horizon, output_times)
        condition = nonempty(static_cond)
        outputs = []
        with eval_mode(self.network):
            for lead in range(1, self.horizon + 1):
                time = torch.full((x0.shape[0],), float(lead), device=x0.device, dtype=x0.dtype)
                inputs = self._inputs(x0, noise, lead, window)
                if self.inference == "dropout":
                    with mc_dropout(self.network, noise.fold(lead)):
                        outputs.append(self.network(inputs, time, condition))
                else:
                    outputs.append(self.network(inputs, time, condition))
        return torch.stack(outputs, dim=1)

    def network_calls(self, output_times: tuple[float, ...] | None = None) -> dict[str, int]:
        """Network evaluations per window and batch row: one per lead time."""
        _whole_leads_only(self.horizon, output_times)
        return {"forecaster": self.horizon}


class DiffusionForecaster:
    """The DDPM baseline: eps_hat = net(x_t (h*C channels), t, cond = [x0, static])."""

    def __init__(self, network: nn.Module, horizon: int, fields: int, diffusion_steps: int,
                 sampling_steps: int | None = None, eta: float = DDIM_ETA):
        self.network, self.horizon, self.fields = network, horizon, fields
        self.schedule = DiffusionSchedule.cosine(diffusion_steps)
        self.sampling_steps = sampling_steps if sampling_steps and sampling_steps < diffusion_steps else None
        self.eta = eta

    def to(self, device) -> DiffusionForecaster:
        self.network.to(device)
        return self

    def _predict_noise(self, x0: torch.Tensor, condition: torch.Tensor | None) -> PredictNoise:
        cond = x0 if condition is None else torch.cat([x0, condition], dim=1)
        return lambda x, t: self.network(x, t.to(x.dtype), cond)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """L1 between the predicted and the true noise of x_t, t ~ U{0..T-1} per window."""
        dynamics, condition = batch["dynamics"], nonempty(batch.get("condition"))
        future = dynamics[:, 1:].flatten(1, 2)  # (B, h*C, Y, X)
        t = torch.randint(0, self.schedule.steps, (future.shape[0],), generator=generator).to(future.device)
        eps = torch.randn(future.shape, generator=generator).to(future.device, future.dtype)
        predicted = self._predict_noise(dynamics[:, 0], condition)(self.schedule.q_sample(future, t, eps), t)
        return F.l1_loss(predicted, eps)

    @torch.no_grad()
    def sample_window(self, x0: torch.Tensor, static_cond: torch.Tensor | None, noise: MemberNoise,
                      output_times: tuple[float, ...] | None = None) -> torch.Tensor:
        """(B, C, Y, X) -> (B, h, C, Y, X) by ancestral sampling (or DDIM when sampling_steps < T)."""
        _whole_leads_only(self.horizon, output_times)
        batch, channels, ny, nx = x0.shape
        predict = self._predict_noise(x0, nonempty(static_cond))
        start = noise.fold(DDPM_START_SALT).normal((self.horizon * channels, ny, nx)).to(x0.device, x0.dtype)
        with eval_mode(self.network):
            if self.sampling_steps is None:
                frames = ancestral_sample(predict, self.schedule, start, noise)
            else:
                frames = ddim_sample(predict, self.schedule, start, noise, self.sampling_steps, self.eta)
        return frames.view(batch, self.horizon, channels, ny, nx)

    def network_calls(self, output_times: tuple[float, ...] | None = None) -> dict[str, int]:
        """Network evaluations per window and batch row: one per sampling step."""
        _whole_leads_only(self.horizon, output_times)
        return {"denoiser": self.sampling_steps or self.schedule.steps}


# ================================================================================================ building

if TYPE_CHECKING:
    from dyfcli.mcvd import MCVDForecaster


def _build(method: str, config: Any, fields: int,
           conditions: int) -> TimeConditionedForecaster | DiffusionForecaster | MCVDForecaster:
    """The model of `method` with fresh weights, from a `config.RunConfig`."""
    network_config, horizon = config.forecaster.network, config.data.horizon
    if method in ("dropout", "perturbation"):
        channels = {"in_channels": fields, "cond_channels": conditions, "out_channels": fields}
    elif method in ("ddpm", "mcvd"):
        channels = {"in_channels": horizon * fields, "cond_channels": fields + conditions,
                    "out_channels": horizon * fields}
    else:
        raise ConfigError(f"unknown baseline {method!r}; use one of {', '.join(METHODS)}")
    try:
        network = build_network(network_config.kind, **channels, with_time=True, **network_config.build_arguments())
    except (ValueError, TypeError) as err:
        raise ConfigError(f"forecaster.network for the {method} baseline: {err}") from None
    if method == "ddpm":
        return DiffusionForecaster(network, horizon, fields, config.baseline.diffusion_steps,
                                   config.baseline.sampling_steps)
    if method == "mcvd":
        from dyfcli.mcvd import MCVDForecaster  # mcvd.py builds on this module's DDPM maths

        return MCVDForecaster(network, horizon, fields, config.baseline.diffusion_steps,
                              config.baseline.sampling_steps)
    return TimeConditionedForecaster(network, horizon, method, config.baseline.perturbation_sigma,
                                     config.baseline.perturbation_noise)


@dataclass
class BaselineTraining:
    """What `train.py`'s loop needs from a baseline (its `TrainingMethod` protocol)."""

    model: TimeConditionedForecaster | DiffusionForecaster | MCVDForecaster
    kind: str

    @property
    def network(self) -> nn.Module:
        return self.model.network

    def to(self, device) -> None:
        self.model.to(device)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.loss(batch), {}

    def validation_ensemble(self, batch: dict[str, torch.Tensor], noise: MemberNoise,
                            members: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ensemble (M, h, B, C, Y, X), truth (h, B, C, Y, X)); member m of window b is noise row m * B + b."""
        dynamics = batch["dynamics"]
        rows = self.model.sample_window(repeat_members(dynamics[:, 0], members),
                                        repeat_members(batch.get("condition"), members), noise)
        return members_first(rows, members), dynamics[:, 1:].transpose(0, 1)


def training_method(method: str, config: Any, fields: int, conditions: int) -> BaselineTraining:
    """`train-forecaster --method dropout|perturbation|ddpm|mcvd`: the network comes from `forecaster.network`."""
    return BaselineTraining(_build(method, config, fields, conditions), method)


def build_model_from_checkpoint(checkpoint: Any,
                                device) -> TimeConditionedForecaster | DiffusionForecaster | MCVDForecaster:
    """The sampler of a baseline checkpoint (`checkpoint.Checkpoint`), weights loaded, eval mode, on `device`."""
    from dyfcli.config import config_from_dict

    if checkpoint.kind not in METHODS:
        raise CheckpointError(f"a {checkpoint.kind!r} checkpoint is not a baseline ({', '.join(METHODS)})")
    try:
        config = config_from_dict(checkpoint.config, "the checkpoint's config")
        model = _build(checkpoint.kind, config, len(checkpoint.fields), checkpoint.condition_channels)
        model.network.load_state_dict(checkpoint.state_dict)
    except (ConfigError, RuntimeError) as err:
        message = getattr(err, "message", None) or str(err).strip().splitlines()[0][:200]
        raise CheckpointError(f"the {checkpoint.kind} checkpoint does not fit this dyf ({message}); "
                              "re-train it with `dyf train-forecaster`") from None
    model.network.eval()
    return model.to(device)
