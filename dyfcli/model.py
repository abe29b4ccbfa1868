"""DYffusion's two networks bound to the maths of `dyffusion.py`: the thin glue train and forecast use.

`DYffusionModel` holds the interpolator I_phi, the forecaster F_theta (absent during stage 1) and the
method's settings. It turns networks into the callables `dyffusion.sample` and the losses expect:

- interpolator input: `[x0, xh]` (2C channels), time = the raw interpolation time i, cond = the static
  conditioning fields (or None). Whenever the interpolator serves DYffusion (forecaster training, sampling,
  refinement, interpolation ensembles) it runs in eval mode with MC dropout forced on (`mc_dropout`), so
  BatchNorm keeps its running statistics while every dropout layer draws a mask.
- forecaster input: the state x~ (C channels), time = i(t) (`time_encoding="dynamics"`, the paper's),
  the diffusion step t (`"discrete"`) or t / T (`"normalized"`); cond = [forward conditioning, static].

Batches are what `data.WindowDataset` yields with length h + 1 (window 1):
`{"dynamics": (B, h+1, C, Y, X), "condition": (B, Cc, Y, X)}`, x0 = dynamics[:, 0], x_i = dynamics[:, i].

Train and forecast build the networks only through `build_interpolator` / `build_forecaster` (so both
build them identically from a config), and `dyffusion_from_checkpoint` is the one place that rebuilds a
trained model from a forecaster checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dyfcli import dyffusion
from dyfcli.dyffusion import ForecasterLoss, NetworkCalls, Schedule
from dyfcli.errors import CheckpointError, ConfigError
from dyfcli.networks import build_network, mc_dropout, supports_periodic_x
from dyfcli.noise import MemberNoise

log = logging.getLogger("dyf")

TIME_ENCODINGS = ("dynamics", "discrete", "normalized")


@dataclass(frozen=True)
class DYffusionSettings:
    """What DYffusion needs besides its two networks.

    horizon: h; extra_steps: k (T = h + k).
    forward_conditioning: `none`, `data` or `data+noise` (see `dyffusion.forward_condition`).
    time_encoding: the forecaster's time input: `dynamics` i(t) (the paper), `discrete` t, `normalized` t/T.
    lambda_reconstruction, lambda_reconstruction2: weights of the forward and look-ahead L1 terms.
    schedule: default sampling schedule kind (`dyffusion.make_schedule`).
    refine, cold_last_step, naive: default sampling options (`dyffusion.sample`).
    """

    horizon: int
    extra_steps: int = 0
    forward_conditioning: str = "data"
    time_encoding: str = "dynamics"
    lambda_reconstruction: float = 0.5
    lambda_reconstruction2: float = 0.5
    schedule: str = "full"
    refine: bool = False
    cold_last_step: bool = False
    naive: bool = False

    def __post_init__(self) -> None:
        # The config layer validates user input; these are programming errors.
        if self.forward_conditioning not in dyffusion.FORWARD_CONDITIONING:
            raise ValueError(f"forward_conditioning {self.forward_conditioning!r} is not one of "
                             f"{dyffusion.FORWARD_CONDITIONING}")
        if self.time_encoding not in TIME_ENCODINGS:
            raise ValueError(f"time_encoding {self.time_encoding!r} is not one of {TIME_ENCODINGS}")
        dyffusion.make_schedule(self.horizon, self.extra_steps, self.schedule)  # raises on a bad combination

    @staticmethod
    def from_config(config: Any) -> DYffusionSettings:
        """From a `config.RunConfig` (its `data`, `forecaster` and `sampling` sections)."""
        forecaster = config.forecaster
        return DYffusionSettings(
            horizon=config.data.horizon, extra_steps=forecaster.extra_steps,
            forward_conditioning=forecaster.forward_conditioning,
            lambda_reconstruction=forecaster.lambda_reconstruction,
            lambda_reconstruction2=forecaster.lambda_reconstruction2, schedule=config.sampling.schedule,
            refine=forecaster.refine, cold_last_step=forecaster.cold_last_step)

    @property
    def num_diffusion_steps(self) -> int:
        return self.horizon + self.extra_steps


def interpolator_channels(num_fields: int, num_conditions: int) -> dict[str, int]:
    """Channel keyword arguments of `networks.build_network` for the interpolator."""
    return {"in_channels": 2 * num_fields, "cond_channels": num_conditions, "out_channels": num_fields}


def forecaster_channels(num_fields: int, num_conditions: int, forward_conditioning: str) -> dict[str, int]:
    """Channel keyword arguments of `networks.build_network` for the forecaster."""
    conditioned = num_fields if forward_conditioning in ("data", "data+noise") else 0
    return {"in_channels": num_fields, "cond_channels": conditioned + num_conditions,
            "out_channels": num_fields}


def build_interpolator(config: Any, num_fields: int, num_conditions: int) -> nn.Module:
    """The untrained interpolator network `config.interpolator.network` describes (a `config.RunConfig`).

    ValueError/TypeError (from `networks.build_network`) when its kind or hyperparameters are unknown.
    """
    network = config.interpolator.network
    return build_network(network.kind, **interpolator_channels(num_fields, num_conditions),
                         **network.build_arguments())


def build_forecaster(config: Any, num_fields: int, num_conditions: int) -> nn.Module:
    """The untrained forecaster network `config.forecaster.network` describes; errors as `build_interpolator`."""
    network = config.forecaster.network
    channels = forecaster_channels(num_fields, num_conditions, config.forecaster.forward_conditioning)
    return build_network(network.kind, **channels, **network.build_arguments())


def periodic_networks(config: Any, periodic: bool, sections: tuple[str, ...]) -> Any:
    """`config` (a `config.RunConfig`) with `periodic_x: true` added to `<section>.network.hyper` for each
    of `sections` (`interpolator`, `forecaster`) that leaves it unset, when the store's x axis is periodic.

    Written into the config, the choice travels with the checkpoint (the network config), so `forecast`
    rebuilds the same network. Every choice is logged: the addition, a network kind that cannot wrap
    (`networks.supports_periodic_x`), and an explicit `periodic_x` that disagrees with the store (kept:
    the user asked for it).
    """
    for section in sections:
        stage = getattr(config, section)
        network = stage.network
        given = network.hyper.get("periodic_x")
        if given is not None:
            if bool(given) != periodic:
                log.warning("%s.network.hyper.periodic_x is %s although the store's x axis is %s; kept as set",
                            section, bool(given), "periodic (360 degrees)" if periodic else "not periodic")
            continue
        if not periodic:
            continue
        if not supports_periodic_x(network.kind):
            log.warning("the store's longitudes span 360 degrees, but a %s network cannot pad x circularly: "
                        "the 0/360 seam stays an edge for %s.network (choose unet or cnn to wrap it)",
                        network.kind, section)
            continue
        network = dataclasses.replace(network, hyper={**network.hyper, "periodic_x": True})
        config = dataclasses.replace(config, **{section: dataclasses.replace(stage, network=network)})
        log.info("the store's longitudes span 360 degrees: the %s pads x circularly "
                 "(%s.network.hyper.periodic_x: true)", section, section)
    return config


def load_weights(network: nn.Module, checkpoint: Any) -> None:
    """Load a `checkpoint.Checkpoint`'s `state_dict` into `network`; CheckpointError when they do not fit."""
    try:
        network.load_state_dict(checkpoint.state_dict)
    except RuntimeError as err:
        raise CheckpointError(f"the {checkpoint.kind} weights do not fit the network its config describes "
                              f"({_first_line(err)}); it is damaged or from another dyf version, "
                              "re-train it with this dyf") from None


def dyffusion_from_checkpoint(checkpoint: Any, device: torch.device | str) -> DYffusionModel:
    """The trained `DYffusionModel` of a forecaster checkpoint (with its embedded interpolator), eval mode, on `device`.

    The interpolator is rebuilt from the embedded interpolator's config, the forecaster and the settings
    from the checkpoint's own; CheckpointError (exit 5) when either does not describe what this dyf builds.
    """
    from dyfcli.config import config_from_dict

    inner = checkpoint.interpolator
    if inner is None:
        raise CheckpointError("the forecaster checkpoint embeds no interpolator; it is damaged, re-train it")
    fields, conditions = len(checkpoint.fields), checkpoint.condition_channels
    try:
        config = config_from_dict(checkpoint.config, "the checkpoint's config")
        inner_config = config_from_dict(inner.config, "the embedded interpolator's config")
        interpolator = build_interpolator(inner_config, fields, conditions)
        forecaster = build_forecaster(config, fields, conditions)
        settings = DYffusionSettings.from_config(config)
    except ConfigError as err:
        raise CheckpointError(f"{err.message}; the checkpoint was written by another dyf version, re-train it") from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"the checkpoint's config describes networks this dyf cannot build "
                              f"({_first_line(err)}); it is from another dyf version, re-train it") from None
    load_weights(interpolator, inner)
    load_weights(forecaster, checkpoint)
    forecaster.eval()  # DYffusionModel freezes the interpolator; inference needs the forecaster frozen too
    return DYffusionModel(interpolator, forecaster, settings).to(device)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


class DYffusionModel:
    """The interpolator and forecaster networks with DYffusion's settings.

    Constructed with a forecaster (stage 2 and forecasting) it freezes the interpolator: no parameter
    requires grad and the module stays in eval mode, while gradients still flow through it to its inputs.
    """

    def __init__(self, interpolator: nn.Module, forecaster: nn.Module | None, settings: DYffusionSettings):
        self.interpolator = interpolator
        self.forecaster = forecaster
        self.settings = settings
        self.schedule = dyffusion.make_schedule(settings.horizon, settings.extra_steps, settings.schedule)
        if forecaster is not None:
            interpolator.requires_grad_(False)
            interpolator.eval()

    @property
    def horizon(self) -> int:
        """h, the lead times one sampled window covers."""
        return self.settings.horizon

    def to(self, device: torch.device | str) -> DYffusionModel:
        """Move both networks to `device` (in place); returns self."""
        self.interpolator.to(device)
        if self.forecaster is not None:
            self.forecaster.to(device)
        return self

    # ------------------------------------------------------------------------------ network callables

    def interpolate(self, x0: torch.Tensor, xh: torch.Tensor, time: torch.Tensor, noise: MemberNoise | None,
                    condition: torch.Tensor | None = None) -> torch.Tensor:
        """I(x0, xh, time) with MC dropout on (masks from `noise`, or torch's RNG when None): (B, C, Y, X)."""
        with eval_mode(self.interpolator), mc_dropout(self.interpolator, noise):
            return self._interpolator_forward(x0, xh, time, noise, condition)

    def _interpolator_forward(self, x0: torch.Tensor, xh: torch.Tensor, time: torch.Tensor,
                              noise: MemberNoise | None, condition: torch.Tensor | None) -> torch.Tensor:
        """The bare network call, in whatever mode the interpolator is (stage 1 training: train mode)."""
        return self.interpolator(torch.cat([x0, xh], dim=1), time, nonempty(condition))

    def forecast(self, x: torch.Tensor, time: torch.Tensor, step: torch.Tensor, x0: torch.Tensor,
                 noise: MemberNoise | None, condition: torch.Tensor | None = None) -> torch.Tensor:
        """F(x, i) ~ x_h (B, C, Y, X) at interpolation time `time` = i(step), in the forecaster's current mode."""
        settings = self.settings
        forward = dyffusion.forward_condition(settings.forward_conditioning, x0, step,
                                              settings.num_diffusion_steps, noise)
        parts = [part for part in (forward, nonempty(condition)) if part is not None]
        cond = torch.cat(parts, dim=1) if parts else None
        return self._require_forecaster()(x, self._forecaster_time(time, step), cond)

    def _forecaster_time(self, time: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        encoding = self.settings.time_encoding
        if encoding == "dynamics":
            return time
        if encoding == "discrete":
            return step
        return step / self.settings.num_diffusion_steps

    # ------------------------------------------------------------------------------ losses

    def interpolator_loss(self, batch: dict[str, torch.Tensor],
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """Stage 1: MSE of I(x0, xh, i) against x_i, i ~ U{1..h-1} per window; interpolator as the caller left it."""
        dynamics, condition = self._unpack(batch)
        times = dyffusion.draw_interpolation_times(dynamics.shape[0], self.settings.horizon, generator)
        times = times.to(dynamics.device)
        target = dynamics[torch.arange(dynamics.shape[0], device=dynamics.device), times]
        return dyffusion.interpolator_loss(self._interpolator_forward, dynamics[:, 0], dynamics[:, -1], target,
                                           times, condition)

    def forecaster_loss(self, batch: dict[str, torch.Tensor],
                        generator: torch.Generator | None = None) -> ForecasterLoss:
        """Stage 2: the two-term L1 loss of `dyffusion.forecaster_loss`, t ~ U{0..T-1} per window."""
        self._require_forecaster()
        if any(parameter.requires_grad for parameter in self.interpolator.parameters()):
            raise RuntimeError("the interpolator must be frozen during forecaster training; is there a bug?")
        dynamics, condition = self._unpack(batch)
        steps = dyffusion.draw_diffusion_steps(dynamics.shape[0], self.settings.num_diffusion_steps, generator)
        settings = self.settings
        return dyffusion.forecaster_loss(
            self.interpolate, self.forecast, dynamics[:, 0], dynamics[:, -1], steps.to(dynamics.device),
            horizon=settings.horizon, extra_steps=settings.extra_steps, condition=condition,
            lambda_forward=settings.lambda_reconstruction, lambda_lookahead=settings.lambda_reconstruction2)

    def _unpack(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        dynamics = batch["dynamics"]
        if dynamics.ndim != 5 or dynamics.shape[1] != self.settings.horizon + 1:
            raise ValueError(f"expected dynamics of shape (B, {self.settings.horizon + 1}, C, Y, X) "
                             f"(windows of length horizon + 1), got {tuple(dynamics.shape)}")
        return dynamics, nonempty(batch.get("condition"))

    # ------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def interpolate_window(self, x0: torch.Tensor, xh: torch.Tensor, condition: torch.Tensor | None,
                           noise: MemberNoise | None) -> torch.Tensor:
        """I(x0, xh, i) for i = 1..h-1 with MC dropout, call i drawing from `noise.fold(i)`: (B, h-1, C, Y, X).

        Stage 1 validation scores these ensembles (one member per batch row).
        """
        outputs = []
        for lead in range(1, self.settings.horizon):
            time = torch.full((x0.shape[0],), float(lead), device=x0.device)
            outputs.append(self.interpolate(x0, xh, time, None if noise is None else noise.fold(lead), condition))
        return torch.stack(outputs, dim=1)

    @torch.no_grad()
    def sample_window(self, x0: torch.Tensor, condition: torch.Tensor | None, noise: MemberNoise | None,
                      schedule: Schedule | str | None = None, refine: bool | None = None,
                      output_times: tuple[float, ...] | None = None) -> torch.Tensor:
        """One forecast window from x0 (B, C, Y, X): (B, L, C, Y, X) at leads 1..h (or `output_times`).

        One batch row per ensemble member; row b depends only on `noise` row b. The forecaster runs in
        eval mode (its dropout off). Options left as None take the settings' values.
        """
        with eval_mode(self._require_forecaster()):
            return dyffusion.sample(
                self.interpolate, self.forecast, x0, self._schedule(schedule), noise,
                condition=nonempty(condition), cold_last_step=self.settings.cold_last_step,
                naive=self.settings.naive, refine=self.settings.refine if refine is None else refine,
                output_times=output_times)

    def network_calls(self, schedule: Schedule | str | None = None, refine: bool | None = None,
                      output_times: tuple[float, ...] | None = None) -> NetworkCalls:
        """Network evaluations per batch row of `sample_window` with the same arguments."""
        return dyffusion.count_network_calls(
            self._schedule(schedule), naive=self.settings.naive, cold_last_step=self.settings.cold_last_step,
            refine=self.settings.refine if refine is None else refine, output_times=output_times)

    def _schedule(self, schedule: Schedule | str | None) -> Schedule:
        if schedule is None:
            return self.schedule
        if isinstance(schedule, str):
            return dyffusion.make_schedule(self.settings.horizon, self.settings.extra_steps, schedule)
        return schedule

    def _require_forecaster(self) -> nn.Module:
        if self.forecaster is None:
            raise RuntimeError("this DYffusionModel has no forecaster (stage 1); build it with one to forecast")
        return self.forecaster


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; train mode is restored after if it was on (a network already in eval
    mode is left alone: sampling enters this at every network call, and `eval()` walks every module)."""
    was_training = net.training
    if was_training:
        net.eval()
    try:
        yield net
    finally:
        if was_training:
            net.train()


def nonempty(condition: torch.Tensor | None) -> torch.Tensor | None:
    """A static condition with zero channels (a store without `cond_*` fields) means none."""
    return None if condition is None or condition.shape[1] == 0 else condition


def repeat_members(tensor: torch.Tensor | None, members: int) -> torch.Tensor | None:
    """(B, ...) -> (M * B, ...), member-major: row m * B + b is member m of window b."""
    return None if tensor is None else tensor.repeat(members, *([1] * (tensor.ndim - 1)))


def members_first(rows: torch.Tensor, members: int) -> torch.Tensor:
    """(M * B, L, ...) -> (M, L, B, ...)."""
    return rows.view(members, -1, *rows.shape[1:]).transpose(1, 2)
