"""The MCVD baseline (Voleti et al. 2022) as the DYffusion paper ran it: `train-forecaster --method mcvd`.

The official code's "simplified" MCVD (`src/diffusion/mcvd.py`, `ddpm_sampler` in `src/models/mcvd/`), with
what it differs from dyf's `ddpm` baseline (`baselines.DiffusionForecaster`) spelled out:

- Noise levels: a LINEAR beta schedule from 0.02 down to 1e-4 over T = `baseline.diffusion_steps` steps, with
  the MCVD index convention: level index 0 is the NOISIEST (alphas = the reversed cumulative product), so the
  network's time input is that index (ddpm: 0 is the cleanest).
- Training: L1 between the predicted and the true noise at a level t ~ U{0..T-1}; the h future frames are
  denoised jointly (h*C channels), conditioned on x0 (and the static fields) by concatenation. No
  masked-frame conditioning and no noise in the condition (the paper's "concat" mode). The time embedding
  is ON (the official spring-mesh config turned it off by mistake).
- Sampling: MCVD's DDPM sampler visits every level (`baseline.sampling_steps` < T: every (T // S)-th level,
  the official sub-sampling) with the posterior update and noise sqrt((1 - abar_prev)/(1 - abar) beta), no
  noise after the last level; then one extra "denoise" call x <- x - sqrt(1 - abar_last) eps_hat(x, last).
  So a window costs `levels + 1` network calls (1001 for T = 1000). The update is exactly DDPM's ancestral
  step on the visited levels, so the sampler is `baselines.ancestral_sample` on a schedule of those levels
  plus the denoise step. With sub-sampling the official denoise step labels the network with the number
  of visited levels minus one (a noisy level); dyf gives it the last visited level, as in full sampling.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from dyfcli.baselines import DiffusionSchedule, PredictNoise, _whole_leads_only, ancestral_sample
from dyfcli.model import eval_mode, nonempty
from dyfcli.noise import MemberNoise

log = logging.getLogger("dyf")

BETA_NOISIEST = 0.02  # beta at level index 0 (MCVD's sigma_begin)
BETA_CLEANEST = 1e-4  # beta at level index T-1 (MCVD's sigma_end)
MCVD_START_SALT = 0x3C7D


def mcvd_alphas(steps: int) -> torch.Tensor:
    """MCVD's abar per level index 0..T-1, float64: index 0 noisiest, index T-1 = 1 - 1e-4.

    betas = linspace(0.02, 1e-4, T); alphas = cumprod(1 - betas.flip(0)).flip(0), as the official code.
    """
    betas = torch.linspace(BETA_NOISIEST, BETA_CLEANEST, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas.flip(0), 0).flip(0)


def sampling_levels(steps: int, sampling_steps: int | None) -> torch.Tensor:
    """The level indices the sampler visits, noisiest first: all of them, or every (T // S)-th from 0."""
    if sampling_steps is None or sampling_steps >= steps:
        return torch.arange(steps)
    return torch.arange(0, steps, steps // sampling_steps)


def schedule_of_levels(alphas: torch.Tensor) -> DiffusionSchedule:
    """A `DiffusionSchedule` (index 0 = cleanest) whose step s has abar = `alphas[s]` (given cleanest first),
    with betas 1 - abar_s / abar_{s-1} (abar_{-1} = 1): MCVD's alphas_prev and betas of the visited levels."""
    prev = torch.cat([torch.ones(1, dtype=alphas.dtype), alphas[:-1]])
    betas = 1 - alphas / prev
    return DiffusionSchedule(
        betas=betas, alphas_cumprod=alphas, alphas_cumprod_prev=prev,
        posterior_variance=betas * (1 - prev) / (1 - alphas),
        posterior_mean_coef1=betas * prev.sqrt() / (1 - alphas),
        posterior_mean_coef2=(1 - prev) * (1 - betas).sqrt() / (1 - alphas))


class MCVDForecaster:
    """eps_hat = net(x_t (h*C channels), level index (0 = noisiest), cond = [x0, static])."""

    def __init__(self, network: nn.Module, horizon: int, fields: int, diffusion_steps: int,
                 sampling_steps: int | None = None):
        self.network, self.horizon, self.fields = network, horizon, fields
        self.alphas = mcvd_alphas(diffusion_steps)
        self.levels = sampling_levels(diffusion_steps, sampling_steps)
        if sampling_steps is not None and sampling_steps < diffusion_steps and len(self.levels) != sampling_steps:
            log.warning("MCVD visits every %d-th of its %d noise levels: %d sampling steps, not the %d of "
                        "baseline.sampling_steps (pick a divisor of %d for exactly that many)",
                        diffusion_steps // sampling_steps, diffusion_steps, len(self.levels), sampling_steps,
                        diffusion_steps)
        # ancestral_sample's step s (0 = cleanest) is visited level levels[n-1-s]
        self.label_of_step = self.levels.flip(0)
        self.schedule = schedule_of_levels(self.alphas[self.label_of_step])

    @property
    def steps(self) -> int:
        return int(self.alphas.shape[0])

    def to(self, device) -> MCVDForecaster:
        self.network.to(device)
        return self

    def _condition(self, x0: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        return x0 if condition is None else torch.cat([x0, condition], dim=1)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """L1 between the predicted and the true noise at level t ~ U{0..T-1} (0 = noisiest) per window."""
        dynamics, condition = batch["dynamics"], nonempty(batch.get("condition"))
        future = dynamics[:, 1:].flatten(1, 2)  # (B, h*C, Y, X)
        t = torch.randint(0, self.steps, (future.shape[0],), generator=generator).to(future.device)
        eps = torch.randn(future.shape, generator=generator).to(future.device, future.dtype)
        abar = self.alphas.to(future.device)[t].to(future.dtype).view(-1, 1, 1, 1)
        noisy = abar.sqrt() * future + (1 - abar).sqrt() * eps
        predicted = self.network(noisy, t.to(future.dtype), self._condition(dynamics[:, 0], condition))
        return F.l1_loss(predicted, eps)

    def _predict_noise(self, cond: torch.Tensor) -> PredictNoise:
        """eps_hat for ancestral_sample's step index (0 = cleanest visited level), labelled by MCVD's index."""
        def predict(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
            labels = self.label_of_step.to(x.device)[step.to(x.device)]
            return self.network(x, labels.to(x.dtype), cond)
        return predict

    @torch.no_grad()
    def sample_window(self, x0: torch.Tensor, static_cond: torch.Tensor | None, noise: MemberNoise,
                      output_times: tuple[float, ...] | None = None) -> torch.Tensor:
        """(B, C, Y, X) -> (B, h, C, Y, X): MCVD's DDPM sampler over the visited levels, then the denoise step."""
        _whole_leads_only(self.horizon, output_times)
        batch, channels, ny, nx = x0.shape
        cond = self._condition(x0, nonempty(static_cond))
        start = noise.fold(MCVD_START_SALT).normal((self.horizon * channels, ny, nx)).to(x0.device, x0.dtype)
        with eval_mode(self.network):
            frames = ancestral_sample(self._predict_noise(cond), self.schedule, start, noise)
            last = int(self.levels[-1])
            labels = torch.full((batch,), float(last), device=x0.device, dtype=x0.dtype)
            frames = frames - (1 - float(self.alphas[last])) ** 0.5 * self.network(frames, labels, cond)
        return frames.view(batch, self.horizon, channels, ny, nx)

    def network_calls(self, output_times: tuple[float, ...] | None = None) -> dict[str, int]:
        """Network evaluations per window and batch row: one per visited level plus the denoise step."""
        _whole_leads_only(self.horizon, output_times)
        return {"denoiser": len(self.levels) + 1}
