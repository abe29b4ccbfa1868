"""DYffusion (Cachay et al., NeurIPS 2023) as pure functions: schedules, the sampler and the losses.

Nothing here sees a network, a config or a file. The two networks arrive as callables (see `Interpolate`
and `Forecast`), randomness arrives as a `MemberNoise`, and tensors are laid out `(batch, channel, y, x)`;
sampled lead times come back as `(batch, lead, channel, y, x)`.

Terms (arXiv 2306.01984 §3; docs/paper-notes.md §1):
  h           horizon: data time steps covered by one forecast window.
  k           extra (artificial) diffusion steps inside (0, 1); T = h + k diffusion steps d = 0..T-1.
  i(d)        interpolation time of diffusion step d: d - k for d >= k+1 ("dynamical" steps, i = 1..h-1),
              d / (k+1) below (the reference's `before_t1_only` mapping; d = 0 -> 0).
  I(x0, xh, i)  the stochastic interpolator (MC dropout), trained on integer i in 1..h-1.
  F(x, i)       the forecaster, predicting x_h from the state x at interpolation time i.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as functional

from dyfcli.noise import MemberNoise

FORWARD_CONDITIONING = ("none", "data", "data+noise")


class Interpolate(Protocol):
    def __call__(self, x0: torch.Tensor, xh: torch.Tensor, time: torch.Tensor, noise: MemberNoise | None,
                 condition: torch.Tensor | None) -> torch.Tensor:
        """I(x0, xh, time): x0, xh (B, C, Y, X); time (B,) float; static condition (B, Cc, Y, X) or None.

        `noise=None` means dropout masks come from torch's global RNG (training).
        """
        ...


class Forecast(Protocol):
    def __call__(self, x: torch.Tensor, time: torch.Tensor, step: torch.Tensor, x0: torch.Tensor,
                 noise: MemberNoise | None, condition: torch.Tensor | None) -> torch.Tensor:
        """F(x, i) ~ x_h: state x (B, C, Y, X) at interpolation time `time` (B,) = i(step); `step` (B,) is
        the (possibly fractional) diffusion step, for `data+noise` conditioning; x0 the initial condition."""
        ...


# ------------------------------------------------------------------------------------------- schedules

def step_to_time(step: float | torch.Tensor, extra_steps: int) -> float | torch.Tensor:
    """Interpolation time i(d) of diffusion step d (a number, or a float tensor of any shape)."""
    first_dynamical = extra_steps + 1
    if isinstance(step, torch.Tensor):
        step = step.float()
        return torch.where(step >= first_dynamical, step - extra_steps, step / first_dynamical)
    return float(step - extra_steps) if step >= first_dynamical else step / first_dynamical


@dataclass(frozen=True)
class Schedule:
    """The diffusion steps a sampler visits, s_0 = 0 < s_1 < ... < s_M = T-1, and their times i(s).

    Every schedule contains 0 and all dynamical steps k+1..T-1 (so every integer lead time is visited);
    accelerated kinds only drop artificial steps (or, for `only_dynamics_plusN`, use fractional ones).
    """

    horizon: int
    extra_steps: int
    kind: str
    steps: tuple[float, ...]
    times: tuple[float, ...]

    def __post_init__(self) -> None:
        assert self.steps[0] == 0 and self.steps[-1] == self.num_diffusion_steps - 1, self.steps
        assert all(a < b for a, b in zip(self.steps, self.steps[1:])), self.steps
        assert self.times == tuple(step_to_time(s, self.extra_steps) for s in self.steps)

    @property
    def num_diffusion_steps(self) -> int:
        """T = h + k."""
        return self.horizon + self.extra_steps

    def __len__(self) -> int:
        """M + 1, the number of forecaster calls of one sampling pass."""
        return len(self.steps)


_KIND = re.compile(r"^(?:(full|only_dynamics)|only_dynamics_plus(\d+)(_discrete)?|every(\d+)(?:st|nd|rd|th)?"
                   r"|first(\d+(?:\.\d*)?|\.\d+))$")


def make_schedule(horizon: int, extra_steps: int, kind: str = "full") -> Schedule:
    """The sampling schedule of `kind` for T = horizon + extra_steps diffusion steps.

    kind:
      `full`                  every step 0..T-1.
      `only_dynamics`         0 and the dynamical steps k+1..T-1 only (h forecaster calls).
      `everyN`                every N-th artificial step (`every2`, `every2nd`), plus the above.
      `firstN`                the first N artificial steps; `firstF` with 0 < F < 1: the first ceil(F k).
      `only_dynamics_plusN`   N extra, possibly fractional steps linspace(0, k+1, N+1, endpoint=False);
                              `..._discrete` floors them.
    Raises ValueError for a horizon below 2, negative extra steps or an unknown kind.
    """
    if horizon < 2 or extra_steps < 0:
        raise ValueError(f"a DYffusion schedule needs horizon >= 2 and extra_steps >= 0, "
                         f"got horizon={horizon}, extra_steps={extra_steps}")
    artificial = [float(d) for d in range(1, extra_steps + 1)]
    dynamical = [float(d) for d in range(extra_steps + 1, horizon + extra_steps)]
    kept = _artificial_steps_kept(kind, artificial, extra_steps)
    steps = tuple(sorted(set(kept) | {0.0} | set(dynamical)))
    return Schedule(horizon, extra_steps, kind, steps, tuple(step_to_time(s, extra_steps) for s in steps))


def _artificial_steps_kept(kind: str, artificial: list[float], extra_steps: int) -> list[float]:
    match = _KIND.match(kind)
    if match is None:
        raise ValueError(f"unknown sampling schedule {kind!r}: use full, only_dynamics, everyN, firstN, "
                         "firstF (0 < F < 1) or only_dynamics_plusN")
    named, plus, discrete, every, first = match.groups()
    if named is not None:
        return artificial if named == "full" else []
    if plus is not None:
        count = int(plus)
        extra = [(extra_steps + 1) * j / (count + 1) for j in range(count + 1)]
        return [float(math.floor(s)) for s in extra] if discrete else extra
    if every is not None:
        if int(every) < 1:
            raise ValueError(f"sampling schedule {kind!r}: N in everyN must be at least 1")
        return artificial[::int(every)]
    fraction = float(first)
    if fraction < 1:
        if fraction <= 0:
            raise ValueError(f"sampling schedule {kind!r}: firstF needs 0 < F < 1, or an integer N >= 1")
        return artificial[:math.ceil(fraction * len(artificial))]
    if not fraction.is_integer():
        raise ValueError(f"sampling schedule {kind!r}: firstN needs an integer N >= 1, or 0 < F < 1")
    return artificial[:int(fraction)]


# ------------------------------------------------------------------------------------------- sampling

class NetworkCalls(NamedTuple):
    """Network evaluations of one sampling pass over one batch row (they scale with the batch)."""

    forecaster: int
    interpolator: int

    @property
    def total(self) -> int:
        return self.forecaster + self.interpolator


def count_network_calls(schedule: Schedule, *, naive: bool = False, cold_last_step: bool = False,
                        refine: bool = False, output_times: tuple[float, ...] | None = None) -> NetworkCalls:
    """What `sample` with these options calls, without calling it (Algorithm 2; docs/paper-notes.md §3).

    With M + 1 schedule steps: M + 1 forecaster calls; cold sampling calls the interpolator once at s = 0,
    twice at each of the M - 1 middle steps and never at the last step (once with `cold_last_step`);
    naive sampling calls it once per step but the last; refinement adds one call per output time below h.
    """
    steps = len(schedule) - 1
    if naive:
        interpolator = steps
    else:
        interpolator = 1 + 2 * (steps - 1) + int(cold_last_step)
    if refine:
        interpolator += sum(1 for time in _output_times(schedule, refine, output_times) if time < schedule.horizon)
    return NetworkCalls(forecaster=steps + 1, interpolator=interpolator)


class _NoiseStream:
    """Hands each network call its own stream, `noise.fold(n)` for the n-th call of the pass.

    The salt depends only on the call's position in the algorithm, never on the batch, so a member's
    draws are the same whether it is sampled alone or with others.
    """

    def __init__(self, noise: MemberNoise | None):
        self._noise = noise
        self._calls = 0

    def next(self) -> MemberNoise | None:
        self._calls += 1
        return None if self._noise is None else self._noise.fold(self._calls)


def sample(interpolate: Interpolate, forecast: Forecast, x0: torch.Tensor, schedule: Schedule,
           noise: MemberNoise | None, *, condition: torch.Tensor | None = None, cold_last_step: bool = False,
           naive: bool = False, refine: bool = False,
           output_times: tuple[float, ...] | None = None) -> torch.Tensor:
    """DYffusion sampling, Algorithm 2 of the paper as the reference's `sample_loop` implements it.

    Legend (paper symbol <- variable):
      x_t (initial condition)        <- x0       (B, C, Y, X)
      n, i_n                         <- s, time(s): schedule step and its interpolation time
      x~_{i_n} (current state)       <- x
      x^_{t+h} = F(x~_{i_n}, i_n)    <- xh_hat
      I(x_t, x^_{t+h}, i_{n+1})      <- x_next

    Args:
      interpolate, forecast: the two networks (see `Interpolate`, `Forecast`); each call gets its own
        `noise.fold(call_number)`, so the two interpolator calls of one cold update are independent draws.
      condition: static conditioning handed unchanged to both callables.
      cold_last_step: cold-update the last step too (the paper's Alg. 2, the reference before Oct 2024)
        instead of returning x^_{t+h} directly (the reference's current default).
      naive: replace the cold update by x <- x_next.
      refine: overwrite every lead below h by one fresh I(x0, x^_{t+h}, i) from the final forecast.
      output_times: lead times in (0, h] to return (default 1..h); fractional ones need `refine`.

    Returns:
      (B, L, C, Y, X): the states at the L requested lead times; lead h is the final state.
    """
    times = _output_times(schedule, refine, output_times)
    stream = _NoiseStream(noise)
    x = x0                                                     # x~_0 = x_t: sampling starts from the data
    integer_leads: list[torch.Tensor] = []                     # x~_i at i = 1..h-1, in order
    for n in range(len(schedule) - 1):
        s, time, time_next = schedule.steps[n], schedule.times[n], schedule.times[n + 1]
        # 1. forecast: x^_{t+h} = F(x~_{i_n}, i_n)
        xh_hat = forecast(x, _constant(x0, time), _constant(x0, s), x0, stream.next(), condition)
        # 2. interpolate to the next time: I(x_t, x^_{t+h}, i_{n+1})
        x_next = interpolate(x0, xh_hat, _constant(x0, time_next), stream.next(), condition)
        # 3. update: cold x~ <- x~ - I(x_t, x^, i_n) + I(x_t, x^, i_{n+1}) (a second, independent draw of I);
        #    at s = 0 the subtracted term is x~_0 itself, so both variants give x_next
        if naive or s == 0:
            x = x_next
        else:
            x = x - interpolate(x0, xh_hat, _constant(x0, time), stream.next(), condition) + x_next
        if float(time_next).is_integer():
            integer_leads.append(x)
    # 4. last step s_M = T-1 (i = h-1): the forecast itself, or one more cold update towards it
    s, time = schedule.steps[-1], schedule.times[-1]
    xh_hat = forecast(x, _constant(x0, time), _constant(x0, s), x0, stream.next(), condition)
    if cold_last_step and not naive:
        x = x - interpolate(x0, xh_hat, _constant(x0, time), stream.next(), condition) + xh_hat
    else:
        x = xh_hat
    if refine:
        return _refine_leads(interpolate, x0, xh_hat, x, times, schedule.horizon, stream, condition)
    return torch.stack([integer_leads[int(t) - 1] if t < schedule.horizon else x for t in times], dim=1)


def _refine_leads(interpolate: Interpolate, x0: torch.Tensor, xh_hat: torch.Tensor, x_final: torch.Tensor,
                  times: tuple[float, ...], horizon: int, stream: _NoiseStream,
                  condition: torch.Tensor | None) -> torch.Tensor:
    """Refinement: each lead i < h is one fresh interpolation I(x_t, x^_{t+h}, i); lead h is `x_final`.

    Returns (B, len(times), C, Y, X). Fractional i give continuous-time outputs. Lead h is never
    interpolated (the reference's interpolator asserts 0 < i < h and fails there when k > 0).
    """
    outputs = [interpolate(x0, xh_hat, _constant(x0, time), stream.next(), condition) if time < horizon
               else x_final for time in times]
    return torch.stack(outputs, dim=1)


def _constant(x0: torch.Tensor, value: float) -> torch.Tensor:
    """A (B,) float32 tensor of `value` on x0's device: a time or step for every batch row."""
    return torch.full((x0.shape[0],), float(value), dtype=torch.float32, device=x0.device)


def _output_times(schedule: Schedule, refine: bool, output_times: tuple[float, ...] | None) -> tuple[float, ...]:
    """The lead times to return: 1..h by default; checked to lie in (0, h], fractional only with refine."""
    if output_times is None:
        return tuple(float(lead) for lead in range(1, schedule.horizon + 1))
    times = tuple(float(t) for t in output_times)
    if not times or any(not 0 < t <= schedule.horizon for t in times):
        raise ValueError(f"output times {list(output_times)} must be a non-empty list in (0, {schedule.horizon}]")
    if not refine and any(not t.is_integer() for t in times):
        raise ValueError(f"fractional output times {list(output_times)} need refinement (refine=True)")
    return times


# ------------------------------------------------------------------------------------------- conditioning

def forward_condition(kind: str, x0: torch.Tensor, step: torch.Tensor, num_diffusion_steps: int,
                      noise: MemberNoise | None) -> torch.Tensor | None:
    """The forecaster's conditioning channels from x0 (B, C, Y, X) at diffusion step `step` (B,).

    `none`: None; `data`: x0; `data+noise`: tau x0 + (1 - tau) eps with tau = step / (T-1) (the diffusion
    step, not the interpolation time) and eps ~ N(0, I) drawn fresh from `noise` on every call (from
    torch's global RNG when `noise` is None), so the noise dominates at step 0 and vanishes at T-1.
    """
    if kind == "none":
        return None
    if kind == "data":
        return x0
    if kind != "data+noise":
        raise ValueError(f"unknown forward conditioning {kind!r}: use one of {', '.join(FORWARD_CONDITIONING)}")
    tau = (step.float() / (num_diffusion_steps - 1)).view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    eps = torch.randn_like(x0) if noise is None else noise.normal(tuple(x0.shape[1:]), dtype=x0.dtype).to(x0.device)
    return tau * x0 + (1 - tau) * eps


# ------------------------------------------------------------------------------------------- losses

def draw_interpolation_times(batch: int, horizon: int, generator: torch.Generator | None = None,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """Stage 1 targets: i ~ U{1, ..., h-1} per sample, (batch,) int64."""
    return torch.randint(1, horizon, (batch,), generator=generator, device=device)


def draw_diffusion_steps(batch: int, num_diffusion_steps: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Stage 2 inputs: t ~ U{0, ..., T-1} per sample, (batch,) int64."""
    return torch.randint(0, num_diffusion_steps, (batch,), generator=generator, device=device)


def interpolator_loss(interpolate: Interpolate, x0: torch.Tensor, xh: torch.Tensor, target: torch.Tensor,
                      time: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1: MSE (mean over all elements) between I(x0, xh, i) and the true x_i.

    x0, xh, target (B, C, Y, X); time (B,) the integer i of each target. Dropout draws come from torch's
    global RNG (noise None), as in ordinary training.
    """
    prediction = interpolate(x0, xh, time.float(), None, condition)
    return functional.mse_loss(prediction, target)


class ForecasterLoss(NamedTuple):
    """The stage 2 loss and its two terms (for logging)."""

    total: torch.Tensor
    forward: torch.Tensor
    lookahead: torch.Tensor


def forecaster_loss(interpolate: Interpolate, forecast: Forecast, x0: torch.Tensor, xh: torch.Tensor,
                    steps: torch.Tensor, *, horizon: int, extra_steps: int, condition: torch.Tensor | None = None,
                    lambda_forward: float = 0.5, lambda_lookahead: float = 0.5) -> ForecasterLoss:
    """Stage 2 (Algorithm 1; docs/paper-notes.md §2): two L1 terms around the frozen interpolator.

        forward   = L1(F(x~_t, i(t)), x_h),        x~_t = I(x0, x_h, i(t)) for t > 0, x~_0 = x0
        lookahead = L1(F(I(x0, x^_h, i(t+1)), i(t+1)), x_h)   over the samples with t <= T-2
        total     = lambda_forward * forward + lambda_lookahead * lookahead

    x^_h is the first term's prediction *with* its graph: the look-ahead gradient reaches the forecaster
    twice, once directly and once through the interpolator. x~_t needs no graph (its inputs are data).
    The look-ahead mean is over its subset only; it is 0 when the subset is empty or lambda_lookahead is 0.

    Every network call sees the whole batch, so no shape depends on the drawn steps: rows at t = 0 take x0
    in place of their interpolation, and rows at t = T-1 (their next step clamped to T-1) are weighted out
    of the look-ahead mean. The official code subsets the rows instead. With a new batch size at almost
    every step, that re-runs cuDNN's autotuning (`cudnn.benchmark`) and recompiles compiled networks, and
    the host waits for the device to count the rows. The price is the 1/T of rows whose outputs are dropped.

    Args:
      x0, xh: (B, C, Y, X) initial condition and true x_h; steps: (B,) integer diffusion steps t in 0..T-1.
      condition: static conditioning (B, Cc, Y, X) or None.
    """
    last_step = horizon + extra_steps - 1
    with torch.no_grad():
        interpolated = interpolate(x0, xh, step_to_time(steps.clamp(min=1), extra_steps), None, condition)
    x_t = torch.where(_per_row(steps > 0, x0), interpolated.to(x0.dtype), x0)
    xh_hat = forecast(x_t, step_to_time(steps, extra_steps), steps.float(), x0, None, condition)
    loss_forward = functional.l1_loss(xh_hat, xh)

    loss_lookahead = torch.zeros((), dtype=loss_forward.dtype, device=loss_forward.device)
    if lambda_lookahead > 0:
        step_next = (steps + 1).clamp(max=last_step)
        time_next = step_to_time(step_next, extra_steps)
        x_next = interpolate(x0, xh_hat, time_next, None, condition)
        xh_hat_next = forecast(x_next, time_next, step_next.float(), x0, None, condition)
        row_errors = functional.l1_loss(xh_hat_next, xh, reduction="none").flatten(1).mean(dim=1)
        ahead = steps < last_step
        loss_lookahead = torch.where(ahead, row_errors, 0).sum() / ahead.sum().clamp(min=1)
    total = lambda_forward * loss_forward + lambda_lookahead * loss_lookahead
    return ForecasterLoss(total, loss_forward, loss_lookahead)


def _per_row(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) mask shaped to broadcast against `like` (B, ...)."""
    return mask.view(-1, *([1] * (like.ndim - 1)))
