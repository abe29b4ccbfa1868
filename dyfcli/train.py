"""Training workflows: `train_interpolator` (DYffusion stage 1) and `train_forecaster` (stage 2 or a baseline).

What happens, in order (`_fit` reads top to bottom, nanoGPT style):

1. Join the process group when launched by `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK) or by `srun`
   (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID with MASTER_ADDR/MASTER_PORT); gloo on CPU, nccl on GPU
   (`runtime.distributed`, shared with `dyf forecast`).
2. Decide between a fresh start and a resume: `<out>.state.pt` present -> continue from it (same command,
   same settings); `--out` present without a state file -> refuse unless `--overwrite`. A fresh run saves
   its state file (step 0) before anything else, so `--out` never exists without one until the run is
   finished: a kill -9 at any point leaves a run the same command resumes.
3. Windows of length h + 1 from the store's `train` split (DistributedSampler, seeded per epoch) and an
   evenly spaced subset of the `val` split.
4. AdamW (betas (0.9, 0.99)), gradient accumulation, global-norm clipping, optional EMA and cosine LR
   schedule, bf16 autocast and torch.compile on CUDA only.
5. Every `validate_every` steps (or epoch): ensemble CRPS on the validation windows; the best network
   so far is saved atomically to `--out` (selection by CRPS, as the paper does).
6. SIGTERM or SIGUSR1 (SLURM's warning before the time limit; `runtime.stop_signals`): finish the
   optimiser step, save the training state, exit 75 (`Interrupted`); Ctrl-C (SIGINT) does the same and
   exits 130 (`Cancelled`); re-running the same command resumes. Further signals while stopping are ignored.
7. A non-finite training loss, validation CRPS or weight stops the run (exit 4, `_require_finite`) before
   anything non-finite is saved: the state file on disk stays the last finite one.

Data parallelism: gradients are averaged with one flat all-reduce per optimiser step instead of wrapping
the network in DistributedDataParallel, because the forecaster loss calls the network twice and
back-propagates through the frozen interpolator, which DDP's per-forward hooks do not expect; reducing
once per step also makes accumulation free of communication. Randomness (dropout masks, sampled times)
is reseeded from (seed, rank, step) at every optimiser step, so a resumed run repeats exactly what the
uninterrupted run would have done, without storing RNG states.

Outputs: `--out` (the inference checkpoint, `checkpoint.py`), `<out>.run/config.yaml` (the resolved
config), `<out>.run/metrics.jsonl` (one JSON line per logged step and per validation, plus events; a resume
first drops the records after the saved step, which it repeats), and while a run is unfinished
`<out>.state.pt` (removed when it completes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dyfcli import checkpoint as ckpt
from dyfcli import outputs
from dyfcli.config import (RunConfig, apply_overrides, config_from_dict, load_config, read_preset,
                           require_stochastic_interpolator, to_yaml)
from dyfcli.errors import Cancelled, ConfigError, DataError, Interrupted, UsageError
from dyfcli.model import (DYffusionModel, DYffusionSettings, build_forecaster, build_interpolator, eval_mode,
                          load_weights, members_first, periodic_networks, repeat_members)
from dyfcli.noise import MemberNoise
from dyfcli.runtime import (Ranks, StopRequest, configure_device, cuda_speedups, distributed, fault_point,
                            ignore_stop_signals, resolve_device, stop_signals)

log = logging.getLogger("dyf")

VALIDATION_SALT = 0x5A11D  # validation ensembles draw from their own streams, fixed across validations


# ================================================================================================ methods

class TrainingMethod(Protocol):
    """What the loop needs from a method (DYffusion stage 1 or 2, or a baseline from `baselines.py`).

    kind: the checkpoint kind (`interpolator`, `forecaster`, or the baseline's name).
    network: the module whose parameters are trained and saved as the checkpoint's `state_dict`.
    loss(batch): the training loss of one batch (on the device) -> (scalar tensor, extra terms to log).
    validation_ensemble(batch, noise, members): `(ensemble (M, L, B, C, Y, X), truth (L, B, C, Y, X))`
      for the batch's windows, member m of window b drawing from `noise` row m * B + b (member-major).
    """

    kind: str
    network: nn.Module

    def to(self, device: torch.device) -> None: ...

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def validation_ensemble(self, batch: dict[str, torch.Tensor], noise: MemberNoise,
                            members: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class _DYffusionStage:
    """One of DYffusion's two training stages; `to` moves both networks (stage 2 runs the interpolator too)."""

    model: DYffusionModel

    def to(self, device: torch.device) -> None:
        self.model.to(device)


@dataclass
class InterpolatorStage(_DYffusionStage):
    """DYffusion stage 1: MSE of I(x0, xh, i); validation ensembles of I at every i in 1..h-1."""

    kind: str = "interpolator"

    @property
    def network(self) -> nn.Module:
        return self.model.interpolator

    def loss(self, batch):
        return self.model.interpolator_loss(batch), {}

    def validation_ensemble(self, batch, noise, members):
        dynamics = batch["dynamics"]
        x0, xh = repeat_members(dynamics[:, 0], members), repeat_members(dynamics[:, -1], members)
        rows = self.model.interpolate_window(x0, xh, repeat_members(batch["condition"], members), noise)
        return members_first(rows, members), dynamics[:, 1:-1].transpose(0, 1)


@dataclass
class ForecasterStage(_DYffusionStage):
    """DYffusion stage 2: the two-term L1 loss around the frozen interpolator; sampled validation ensembles."""

    kind: str = "forecaster"

    @property
    def network(self) -> nn.Module:
        return self.model.forecaster

    def loss(self, batch):
        terms = self.model.forecaster_loss(batch)
        return terms.total, {"loss_forward": terms.forward, "loss_lookahead": terms.lookahead}

    def validation_ensemble(self, batch, noise, members):
        dynamics = batch["dynamics"]
        rows = self.model.sample_window(repeat_members(dynamics[:, 0], members),
                                        repeat_members(batch["condition"], members), noise)
        return members_first(rows, members), dynamics[:, 1:].transpose(0, 1)


def build_method(method: str, config: RunConfig, fields: int, conditions: int,
                 interpolator: ckpt.Checkpoint | None) -> TrainingMethod:
    """The one place that tells the methods apart: `interpolator`, `dyffusion` (stage 2) or a baseline."""
    settings = _settings(config)  # checked for the baselines too: the config is validated as a whole
    if method not in ("interpolator", "dyffusion"):
        from dyfcli import baselines

        return baselines.training_method(method, config, fields, conditions)
    network = _network("interpolator", build_interpolator, config, fields, conditions)
    if method == "interpolator":
        return InterpolatorStage(DYffusionModel(network, None, settings))
    assert interpolator is not None, "stage 2 needs the interpolator checkpoint"
    load_weights(network, interpolator)
    forecaster = _network("forecaster", build_forecaster, config, fields, conditions)
    return ForecasterStage(DYffusionModel(network, forecaster, settings))


def _settings(config: RunConfig) -> DYffusionSettings:
    try:
        return DYffusionSettings.from_config(config)
    except ValueError as err:  # e.g. an unknown sampling.schedule: make_schedule is the one judge
        raise ConfigError(f"invalid DYffusion settings: {err}") from None


def _network(stage: str, build: Callable[[RunConfig, int, int], nn.Module], config: RunConfig, fields: int,
             conditions: int) -> nn.Module:
    """`build(config, fields, conditions)` with an unbuildable network reported as the config error it is."""
    try:
        return build(config, fields, conditions)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{stage}.network: {err}") from None


# ================================================================================================ workflows

def train_interpolator(data: Path | str, out: Path | str, config: RunConfig, *, device: str = "auto",
                       overwrite: bool = False) -> dict:
    """Train DYffusion's stage 1 on `data` with `config` (`config.load_config`); the best interpolator by
    validation CRPS goes to `out`."""
    require_stochastic_interpolator(config)
    with _claim_output(Path(out), overwrite, [data]), distributed() as ranks:
        return _fit("interpolator", config, Path(data), Path(out), None, device, overwrite, ranks)


def train_forecaster(data: Path | str, out: Path | str, *, interpolator: Path | str | None = None,
                     method: str = "dyffusion", preset: str | None = None,
                     overrides: list[str] | tuple[str, ...] = (), device: str = "auto",
                     overwrite: bool = False) -> dict:
    """Train DYffusion's forecaster (frozen `interpolator`) or a baseline (`method`) on `data` -> `out`.

    Without `preset` the configuration is the interpolator's (plus `overrides`); the `interpolator`
    section always stays the one the interpolator was trained with.
    """
    config, stage1 = resolve_forecaster(method, interpolator, preset, overrides)
    with _claim_output(Path(out), overwrite, [data, interpolator]), distributed() as ranks:
        return _fit(method, config, Path(data), Path(out), stage1, device, overwrite, ranks)


def resolve_forecaster(method: str, interpolator: Path | str | None, preset: str | None,
                       overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, ckpt.Checkpoint | None]:
    """`train_forecaster`'s config and its loaded interpolator checkpoint (None for a baseline): everything
    checked before an output is claimed, and all that `train-forecaster --dry-run` needs."""
    if method not in ("dyffusion", *ckpt.BASELINE_KINDS):
        raise UsageError(f"--method {method!r} is not one of dyffusion, {', '.join(ckpt.BASELINE_KINDS)}")
    if method != "dyffusion":
        if interpolator is not None:
            log.warning("--interpolator is ignored by the %s baseline", method)
        if preset is None:  # `load_config` would fall back to `tiny`; the CLI picks the store's preset
            raise UsageError(f"the {method} baseline needs a preset (e.g. --preset tiny, or the store's: "
                             "`dyf train-forecaster` without --preset picks it)")
        return load_config(preset, overrides), None
    if interpolator is None:
        raise UsageError("train-forecaster --method dyffusion needs --interpolator interpolator.pt "
                         "(from `dyf train-interpolator`)")
    stage1 = ckpt.load_checkpoint(Path(interpolator), expect_kind="interpolator")
    ckpt.require_complete(stage1, Path(interpolator))
    return forecaster_config(stage1, preset, overrides), stage1


def forecaster_config(interpolator: ckpt.Checkpoint, preset: str | None, overrides) -> RunConfig:
    """The stage 2 config: a preset (or the interpolator's own config) with overrides, keeping the
    interpolator section and horizon of the trained interpolator."""
    document = read_preset(preset) if preset is not None else interpolator.config
    document = apply_overrides(document, overrides)
    document = {**document, "interpolator": interpolator.config["interpolator"]}
    config = config_from_dict(document, f"preset {preset}" if preset else "the interpolator's config")
    trained_horizon = interpolator.config["data"]["horizon"]
    if config.data.horizon != trained_horizon:
        raise ConfigError(f"data.horizon = {config.data.horizon} but the interpolator was trained with horizon "
                          f"{trained_horizon}; use the same horizon (or re-train the interpolator)")
    if list(config.data.calendar) != interpolator.calendar:  # both networks take the same condition channels
        raise ConfigError(f"data.calendar = {list(config.data.calendar)} but the interpolator was trained with "
                          f"{interpolator.calendar}; use the same data.calendar (or re-train the interpolator)")
    return config


# ================================================================================================ the loop

@dataclass
class Run:
    """Everything one training run knows besides the loop's counters."""

    kind: str
    method_name: str
    config: RunConfig
    stage: Any  # config.InterpolatorConfig | config.ForecasterConfig
    data: Path
    out: Path
    device: torch.device
    ranks: Ranks
    template: dict[str, Any]  # checkpoint fields shared by every save
    run_dir: Path
    mask: torch.Tensor  # (S, Y, X) bool, valid points of the store
    saved_step: int | None = None  # the step of the training state on disk, if any
    sigma_selection: dict | None = None  # the Perturbation baseline's sigma chosen on validation, if any


@dataclass
class Progress:
    """The loop's counters: saved in the training state, restored on resume."""

    step: int = 0
    epoch: int = 0
    micro_done: int = 0  # micro-batches of the current epoch already used
    best_crps: float = math.inf
    best_step: int = -1
    stale_validations: int = 0
    last_validated_step: int = -1
    history: list[dict[str, float]] = field(default_factory=list)


def _fit(method_name: str, config: RunConfig, data: Path, out: Path, interpolator: ckpt.Checkpoint | None,
         device_spec: str, overwrite: bool, ranks: Ranks) -> dict:
    started = time.monotonic()
    run, train_set, val_set, state = _open_run(method_name, config, data, out, interpolator, device_spec,
                                               overwrite, ranks)
    _require_sigma_validation(run, val_set)
    fault_point("train.started")
    device, stage = run.device, run.stage
    torch.manual_seed(config.training.seed)  # identical initial weights on every rank
    config = run.config  # with the store's periodic x axis resolved (`model.periodic_networks`)
    method = build_method(method_name, config, len(train_set.fields), train_set.condition_channels, interpolator)
    method.to(device)
    network = method.network
    network.train()
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=stage.lr,
                                  betas=config.training.betas, eps=config.training.eps,
                                  weight_decay=stage.weight_decay)
    ema = Ema(network, config.training.ema.decay) if config.training.ema.enabled else None
    progress = Progress()
    if state is not None:
        progress = _restore(state, network, optimizer, ema)
        run.saved_step = progress.step
        log.info("resuming %s training from step %d (epoch %d)", run.kind, progress.step, progress.epoch)
    ranks.broadcast_module(network)
    _write_run_files(run, resumed=state is not None)
    fault_point("train.run_files_written")

    training = config.training
    bf16 = cuda_speedups([network], device, bf16=training.bf16, compile=training.compile,
                         action="training in float32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    loader_for_epoch, micro_per_epoch = _train_loader(train_set, config, ranks, pin_memory=device.type == "cuda")
    accumulation = config.training.accumulation
    steps_per_epoch = math.ceil(micro_per_epoch / accumulation)
    total_steps = min(stage.max_steps or math.inf, stage.epochs * steps_per_epoch)
    resumed_from = progress.step

    def validate_and_save_state() -> None:
        _validate(run, method, val_set, progress, ema, stop_requested)
        _save_training_state(run, network, optimizer, ema, progress)  # a later crash resumes from here
        fault_point("train.state_saved")
        if ranks.any(stop_requested()):
            _interrupt(run, progress, stop_requested)

    stopping = stop_signals("saving the training state after this step", sigint=True)
    with stopping as stop_requested, _progress_bar(run, total_steps - progress.step) as bar:
        if state is None:
            # A state file from the start: `--out` never exists without one, so a kill between saving the
            # best checkpoint and the state (or anywhere else) leaves a run the same command resumes.
            _save_training_state(run, network, optimizer, ema, progress)
            fault_point("train.initial_state_saved")
        if state is not None and state.get("pending_validation"):
            validate_and_save_state()
        micro_in_step, loss_sum, loss_count, shown = 0, torch.zeros((), device=device), 0, {}
        while progress.step < total_steps and not _patience_exhausted(run, progress):
            for batch in loader_for_epoch(progress.epoch, progress.micro_done):
                if micro_in_step == 0:
                    torch.manual_seed(_step_seed(config.training.seed, ranks.rank, progress.step))
                batch = _to_device(batch, device)
                with autocast:
                    loss, extra = method.loss(batch)
                (loss / accumulation).backward()
                loss_sum += loss.detach()
                loss_count += 1
                micro_in_step += 1
                progress.micro_done += 1
                if micro_in_step < accumulation and progress.micro_done < micro_per_epoch:
                    continue
                learning_rate = _learning_rate(config, stage.lr, progress.step, total_steps)
                _optimizer_step(network, optimizer, ema, ranks, learning_rate, config.training.grad_clip)
                progress.step += 1
                micro_in_step = 0
                if progress.step % config.training.log_every == 0 or progress.step == total_steps:
                    mean_loss = ranks.mean(loss_sum / max(loss_count, 1))
                    _require_finite(run, progress, "the training loss", float(mean_loss))
                    shown = _log_step(run, progress, mean_loss, learning_rate, extra)
                    loss_sum, loss_count = torch.zeros((), device=device), 0
                bar.advance(1, **shown)
                if config.training.validate_every and progress.step % config.training.validate_every == 0:
                    validate_and_save_state()
                if ranks.any(stop_requested()):
                    _save_training_state(run, network, optimizer, ema, progress)
                    _interrupt(run, progress, stop_requested)
                if progress.step >= total_steps or _patience_exhausted(run, progress):
                    break
            if progress.micro_done >= micro_per_epoch:  # the epoch is complete
                progress.epoch, progress.micro_done = progress.epoch + 1, 0
                if not config.training.validate_every:
                    validate_and_save_state()
            if progress.epoch >= stage.epochs:
                break
        if progress.last_validated_step != progress.step:
            validate_and_save_state()  # a signal during this last validation still saves and exits 75
        _select_perturbation_sigma(run, method, val_set, progress, stop_requested)
        return _finish(run, network, ema, progress, resumed_from, started)  # a signal now: finish, exit 0


def _optimizer_step(network: nn.Module, optimizer: torch.optim.Optimizer, ema: Ema | None, ranks: Ranks,
                    learning_rate: float, grad_clip: float | None) -> None:
    """Average the accumulated gradients over ranks, clip them, step at `learning_rate`, update the EMA."""
    ranks.average_gradients(network)
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(network)


def _open_run(method_name: str, config: RunConfig, data: Path, out: Path, interpolator: ckpt.Checkpoint | None,
              device_spec: str, overwrite: bool, ranks: Ranks):
    """Check the output, open the store and its windows: `(Run, train windows, validation windows, state)`."""
    from dyfcli.data import WindowDataset
    from dyfcli.store import open_store

    kind = {"interpolator": "interpolator", "dyffusion": "forecaster"}.get(method_name, method_name)
    device = _device(device_spec)
    state = _prepare_output(out, overwrite, ranks)
    store = open_store(data)
    # the sections this run trains: the interpolator in stage 1, else the forecaster (baselines: its network)
    trained = ("interpolator",) if kind == "interpolator" else ("forecaster",)
    config = periodic_networks(config, store.periodic_x, trained)
    if state is not None:
        _check_resumable(state, config, kind, out)
    if interpolator is not None:
        ckpt.check_compatible(interpolator, store)
    train_set = WindowDataset(data, "train", config.data.horizon + 1, calendar=config.data.calendar)
    val_set = _validation_set(data, store, config)
    run = Run(kind=kind, method_name="dyffusion" if kind in ckpt.DYFFUSION_KINDS else kind, config=config,
              stage=config.interpolator if kind == "interpolator" else config.forecaster, data=data, out=out,
              device=device, ranks=ranks, template=_template(store, train_set, interpolator),
              run_dir=Path(str(out) + ".run"), mask=torch.from_numpy(store.ds["mask"].values.astype(bool)))
    return run, train_set, val_set, state


# How long to train may change between an interrupted run and its resume; nothing else may.
_RUN_LENGTH_KEYS = {("interpolator", "epochs"), ("interpolator", "max_steps"), ("forecaster", "epochs"),
                    ("forecaster", "max_steps")}


def _check_resumable(state: dict, config: RunConfig, kind: str, out: Path) -> None:
    def settings(document: dict) -> dict:
        return {(section, key): value for section, values in document.items() if isinstance(values, dict)
                for key, value in values.items() if (section, key) not in _RUN_LENGTH_KEYS}

    if state.get("kind") != kind or settings(state["config"]) != settings(config.to_dict()):
        raise UsageError(f"{ckpt.state_path(out)} was written by a run with other settings; re-run the same "
                         "command to resume (only epochs/max_steps may change), or pass --overwrite to start again")


def _patience_exhausted(run: Run, progress: Progress) -> bool:
    patience = run.config.training.patience
    return patience is not None and progress.stale_validations >= patience


def _step_seed(seed: int, rank: int, step: int) -> int:
    """A seed for optimiser step `step` on `rank`: resumed runs draw exactly what the original would have."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


def _learning_rate(config: RunConfig, base: float, step: int, total_steps: float) -> float:
    """Linear warm-up, then constant (`none`) or cosine decay to 0 over the run (`cosine`)."""
    warmup = config.training.warmup_steps
    if step < warmup:
        return base * (step + 1) / warmup
    if config.training.lr_schedule == "cosine" and math.isfinite(total_steps):
        progress = (step - warmup) / max(1.0, total_steps - warmup)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


# ================================================================================================ data

class _SkipSampler(torch.utils.data.Sampler):
    """The indices of `sampler` after the first `skip` (resuming in the middle of an epoch)."""

    def __init__(self, sampler: torch.utils.data.Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _train_loader(train_set, config: RunConfig, ranks: Ranks, pin_memory: bool):
    """`loader_for_epoch(epoch, micro_done)` and the number of micro-batches per epoch on this rank."""
    from torch.utils.data import DataLoader, DistributedSampler

    from dyfcli.data import loader_batches

    sampler = DistributedSampler(train_set, num_replicas=ranks.world, rank=ranks.rank, shuffle=True,
                                 seed=config.training.seed, drop_last=False)
    batch_size = config.data.batch_size

    def loader_for_epoch(epoch: int, micro_done: int) -> Iterator[dict]:
        sampler.set_epoch(epoch)
        # loader_batches: a damaged store read by a worker stops the workers and exits 4 with one line
        return loader_batches(DataLoader(train_set, batch_size=batch_size,
                                         sampler=_SkipSampler(sampler, micro_done * batch_size),
                                         num_workers=config.data.num_workers, pin_memory=pin_memory,
                                         drop_last=False,
                                         worker_init_fn=ignore_stop_signals if config.data.num_workers else None))

    return loader_for_epoch, math.ceil(len(sampler) / batch_size)


def _validation_set(data: Path, store, config: RunConfig):
    """The validation windows (an evenly spaced subset when `val_max_batches` is set), or None."""
    from dyfcli.data import WindowDataset

    if "val" not in store.splits:
        log.warning("the store has no 'val' split: no validation; the final weights are kept")
        return None
    try:
        windows = WindowDataset(data, "val", config.data.horizon + 1, calendar=config.data.calendar)
    except DataError as err:
        log.warning("no validation (%s); the final weights are kept", err.message)
        return None
    count = len(windows)
    if config.training.val_max_batches is not None:
        count = min(count, config.training.val_max_batches * config.data.eval_batch_size)
    indices = sorted({round(i * (len(windows) - 1) / max(1, count - 1)) for i in range(count)})
    return torch.utils.data.Subset(windows, indices)


# ================================================================================================ validation

@torch.no_grad()
def _validate(run: Run, method: TrainingMethod, val_set, progress: Progress, ema: Ema | None,
              stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Ensemble CRPS (properscoring's, over valid points, mean over lead times) on the validation windows;
    save the network when it is the best so far."""
    from dyfcli.metrics import lead_mean

    progress.last_validated_step = progress.step
    if val_set is None:
        return
    network = method.network
    with (ema.swapped_in(network) if ema is not None else nullcontext()):
        per_lead = _validation_crps(run, method, val_set, stop_requested)
    if per_lead is None:
        progress.last_validated_step = -1
        return
    crps = lead_mean(per_lead)
    _require_finite(run, progress, "the validation CRPS", crps)
    improved = crps < progress.best_crps
    if improved:
        progress.best_crps, progress.best_step, progress.stale_validations = crps, progress.step, 0
        _save_inference_checkpoint(run, network, ema, progress, complete=False)
        fault_point("train.checkpoint_saved")
    else:
        progress.stale_validations += 1
    record = {"step": progress.step, "epoch": progress.epoch, "val_crps": crps, "best": improved}
    progress.history.append({"step": progress.step, "val_crps": crps})
    _append_metrics(run, {**record, "val_crps_per_lead": [float(v) for v in per_lead]})
    log.info("%s step %d: validation CRPS %.5g%s", run.kind, progress.step, crps, " (best)" if improved else "")


@torch.no_grad()
def _validation_crps(run: Run, method: TrainingMethod, val_set,
                     stop_requested: Callable[[], bool]) -> torch.Tensor | None:
    """Per-lead ensemble CRPS `(L,)` of `method` on the validation windows (ranks score disjoint windows and
    sum), or None when a stop was requested on any rank."""
    from dyfcli.data import loader_batches
    from dyfcli.metrics import crps_ensemble

    members, network = run.config.training.val_ensemble, method.network
    mine = torch.utils.data.Subset(val_set, list(range(run.ranks.rank, len(val_set), run.ranks.world)))
    loader = torch.utils.data.DataLoader(mine, batch_size=run.config.data.eval_batch_size, shuffle=False,
                                         num_workers=run.config.data.num_workers)
    leads = run.config.data.horizon - 1 if run.kind == "interpolator" else run.config.data.horizon
    sums = torch.zeros(2, leads, dtype=torch.float64, device=run.device)  # CRPS sum, valid points, per lead
    with eval_mode(network):
        for batch in loader_batches(loader):  # a damaged store: one-line error, workers stopped
            if stop_requested():
                break  # the caller saves the state; the validation is repeated after the resume
            batch = _to_device(batch, run.device)
            window_ids = batch["series"].to(torch.int64) * 1_000_000_007 + batch["start"].to(torch.int64)
            member_ids = (window_ids[None, :] * members + torch.arange(members, device=run.device)[:, None])
            noise = MemberNoise.for_members(run.config.training.seed, member_ids.flatten(), salt=VALIDATION_SALT,
                                            device=run.device)
            ensemble, truth = method.validation_ensemble(batch, noise, members)
            crps = crps_ensemble(ensemble.float(), truth.float()).to(torch.float64)  # (L, B, C, Y, X)
            valid = run.mask[batch["series"].cpu()].to(run.device)[None, :, None].expand_as(crps)
            sums[0] += torch.where(valid, crps, 0.0).flatten(1).sum(1)
            sums[1] += valid.flatten(1).sum(1)
    if run.ranks.any(stop_requested()):
        return None
    sums = run.ranks.sum(sums)
    return (sums[0] / sums[1].clamp(min=1)).cpu()


def _require_sigma_validation(run: Run, val_set) -> None:
    """`baseline.perturbation_sigma_grid` is scored on the validation split: refuse it up front without one."""
    if run.kind == "perturbation" and run.config.baseline.perturbation_sigma_grid and val_set is None:
        raise ConfigError("baseline.perturbation_sigma_grid chooses sigma on the 'val' split, which this store "
                          "lacks; set baseline.perturbation_sigma instead (--set baseline.perturbation_sigma_grid=[])")


@torch.no_grad()
def _select_perturbation_sigma(run: Run, method: TrainingMethod, val_set, progress: Progress,
                               stop: StopRequest) -> None:
    """Score every sigma of `baseline.perturbation_sigma_grid` with the best weights on the validation windows
    (ensemble CRPS, as model selection) and keep the lowest in `run.sigma_selection` for `_finish`.

    Runs after the last validation, while the training state is still on disk: a stop here exits 75 and
    the same command repeats only the selection."""
    from dyfcli.metrics import lead_mean

    grid = run.config.baseline.perturbation_sigma_grid
    if run.kind != "perturbation" or not grid or val_set is None:
        return
    if run.ranks.is_main and run.out.exists():
        method.network.load_state_dict(ckpt.load_checkpoint(run.out).state_dict)  # the best, not the last
    run.ranks.broadcast_module(method.network)
    scores = []
    for sigma in grid:
        per_lead = _validation_crps(run, dataclasses.replace(method, model=method.model.with_sigma(sigma)),
                                    val_set, stop)
        if per_lead is None:
            _interrupt(run, progress, stop)
        scores.append(lead_mean(per_lead))
        log.info("perturbation sigma %g: validation CRPS %.5g", sigma, scores[-1])
    best = min(range(len(grid)), key=lambda i: (scores[i], i))  # ties: the first (smallest in a sorted grid)
    run.sigma_selection = {"grid": list(grid), "val_crps": scores, "sigma": grid[best]}
    _append_metrics(run, {"event": "perturbation_sigma_selected", **run.sigma_selection})
    log.info("perturbation sigma %g chosen on the validation split (CRPS %.5g)", grid[best], scores[best])


# ================================================================================================ EMA

class Ema:
    """Exponential moving average of a network's floating-point state, warmed up as min(decay, (1+n)/(10+n))."""

    def __init__(self, network: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {name: value.detach().clone() for name, value in network.state_dict().items()
                       if value.is_floating_point()}

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = network.state_dict()
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [current[n].detach() for n in names], 1.0 - decay)

    def state_dict_of(self, network: nn.Module) -> dict[str, torch.Tensor]:
        """The network's state dict with the EMA values in place of the floating-point entries."""
        return {name: self.shadow.get(name, value) for name, value in network.state_dict().items()}

    @contextmanager
    def swapped_in(self, network: nn.Module) -> Iterator[None]:
        backup = {name: value.detach().clone() for name, value in network.state_dict().items()}
        network.load_state_dict(self.state_dict_of(network))
        try:
            yield
        finally:
            network.load_state_dict(backup)


# ================================================================================================ outputs

def _device(spec: str) -> torch.device:
    device = resolve_device(spec)  # under torchrun/srun: this rank's GPU
    configure_device(device)
    return device


def _claim_output(out: Path, overwrite: bool, inputs: list):
    """The lock on `--out` for the whole run, after checking it and its state file and run folder are
    dyf's (`outputs`); whether an existing run is resumed or refused is `_prepare_output`'s decision."""
    return outputs.claim_output(out, outputs.CHECKPOINT, overwrite=overwrite, resume=not overwrite, inputs=inputs)


def _prepare_output(out: Path, overwrite: bool, ranks: Ranks) -> dict | None:
    """The training state to resume from, or None for a fresh start (after clearing old outputs).

    The path itself (a folder, a missing parent) was checked by `_claim_output`."""
    state_file = ckpt.state_path(out)
    if overwrite:
        ranks.barrier()
        if ranks.is_main:  # only dyf's own files: `outputs.remove` checks each again
            for path, kind in ((out, outputs.CHECKPOINT), (state_file, outputs.TRAINING_STATE),
                               (Path(str(out) + ".run"), outputs.RUN_FOLDER)):
                outputs.remove(path, kind)
        ranks.barrier()
        return None
    if state_file.exists():
        return ckpt.load_training_state(state_file)
    if out.exists():
        finished = ckpt.load_checkpoint(out).training.get("complete", False)
        what = "a finished run" if finished else "an unfinished run that left no state to resume"
        raise UsageError(f"{out} already exists ({what}); pass --overwrite to replace it or choose another --out")
    return None


def _template(store, train_set, interpolator: ckpt.Checkpoint | None) -> dict[str, Any]:
    return {"fields": list(train_set.fields), "grid": tuple(train_set.grid), "cond_names": list(train_set.cond_names),
            "normalizer": train_set.normalizer.get_state(), "store": ckpt.store_identity(store),
            "interpolator": interpolator}


def _write_run_files(run: Run, resumed: bool) -> None:
    if not run.ranks.is_main:
        return
    run.run_dir.mkdir(exist_ok=True)
    (run.run_dir / "config.yaml").write_text(to_yaml(run.config))
    if resumed:
        _truncate_metrics(run.run_dir, run.saved_step)
    _append_metrics(run, {"event": "resumed" if resumed else "started", "kind": run.kind,
                          "world_size": run.ranks.world, "device": str(run.device), "data": str(run.data)})


def _truncate_metrics(run_dir: Path, saved_step: int | None) -> None:
    """Drop the step and validation records after `saved_step` from `metrics.jsonl` before a resume.

    The resumed run repeats those steps (from the saved state, drawing the same numbers), so without this
    each would appear twice. Events (started, resumed, interrupted, ...) are history and stay. A line a
    kill cut short is dropped too (the next record would otherwise be glued to it). The new file is written
    beside the run folder and renamed over the old one: a kill leaves the old file or the new one, and the
    temporary name is one that `outputs.remove_strays` clears (inside the folder it would make the run
    folder look foreign to `outputs`).
    """
    path = run_dir / "metrics.jsonl"
    if saved_step is None or not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if _keep_record(line, saved_step)]
    temporary = outputs.temporary_path(run_dir)
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def _keep_record(line: str, saved_step: int) -> bool:
    if not line.endswith("\n"):
        return False  # cut short by a kill
    try:
        record = json.loads(line)
    except ValueError:
        return False
    if not isinstance(record, dict):
        return False
    return "event" in record or not isinstance(record.get("step"), int) or record["step"] <= saved_step


def _append_metrics(run: Run, record: dict) -> None:
    if run.ranks.is_main:
        with open(run.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def describe_run(run_dir: Path | str) -> dict:
    """A JSON-ready summary of a run folder (`OUT.run/`) for `dyf inspect`: its config and where the run
    stands (the last step, validation and event of `metrics.jsonl`). Lines a kill cut short are skipped."""
    import yaml

    run_dir = Path(run_dir)
    config_file, metrics_file = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config_file.is_file() and not metrics_file.is_file():
        raise DataError(f"{run_dir} holds neither config.yaml nor metrics.jsonl; give a run folder "
                        "(OUT.run/ beside a `dyf train-*` output)")
    try:
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    except yaml.YAMLError as err:
        raise DataError(f"{config_file} is not readable YAML ({type(err).__name__}); it is a copy of the "
                        "checkpoint's config: `dyf inspect` the checkpoint instead") from None
    records = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    records = [record for record in records if isinstance(record, dict)]

    def last(predicate) -> dict | None:
        found = next((record for record in reversed(records) if predicate(record)), None)
        if found is not None and isinstance(found.get("time"), (int, float)):  # seconds since 1970 -> ISO, UTC
            found = {**found, "time": datetime.fromtimestamp(found["time"], timezone.utc).isoformat(timespec="seconds")}
        return found

    events = [record["event"] for record in records if "event" in record]
    return {"kind": "run-folder", "path": str(run_dir), "records": len(records), "events": events,
            "last_step": last(lambda record: "loss" in record),
            "last_validation": last(lambda record: "val_crps" in record),
            "last_event": last(lambda record: "event" in record),
            "config": config}


def _log_step(run: Run, progress: Progress, loss: torch.Tensor, learning_rate: float, extra: dict) -> dict:
    """Append a step record to metrics.jsonl; returns what the progress line shows."""
    record = {"step": progress.step, "epoch": progress.epoch, "loss": float(loss), "lr": learning_rate,
              **{name: float(value.detach()) for name, value in extra.items()}}
    _append_metrics(run, record)
    return {"loss": record["loss"]}


def _checkpoint(run: Run, state_dict: dict, progress: Progress, complete: bool) -> ckpt.Checkpoint:
    template = run.template
    return ckpt.Checkpoint(
        kind=run.kind, method=run.method_name, config=run.config.to_dict(), fields=template["fields"],
        grid=template["grid"], cond_names=template["cond_names"], normalizer=template["normalizer"],
        store=template["store"], state_dict=state_dict, interpolator=template["interpolator"],
        training={"step": progress.best_step if progress.best_step >= 0 else progress.step,
                  "epoch": progress.epoch, "val_crps": progress.best_crps if math.isfinite(progress.best_crps) else None,
                  "world_size": run.ranks.world, "complete": complete})


def _weights(network: nn.Module, ema: Ema | None) -> dict[str, torch.Tensor]:
    state = ema.state_dict_of(network) if ema is not None else network.state_dict()
    return {name: value.detach().cpu().clone() for name, value in state.items()}


def _save_inference_checkpoint(run: Run, network: nn.Module, ema: Ema | None, progress: Progress,
                               complete: bool) -> None:
    if run.ranks.is_main:
        ckpt.save_checkpoint(run.out, _checkpoint(run, _weights(network, ema), progress, complete))


def _save_training_state(run: Run, network: nn.Module, optimizer, ema: Ema | None, progress: Progress) -> None:
    """Everything a resume needs, in `<out>.state.pt` (rank 0 writes, every rank waits); never non-finite
    weights, so the state on disk stays the last finite one when training diverges."""
    _require_finite_weights(run, progress, network)
    if run.ranks.is_main:
        ckpt.save_training_state(ckpt.state_path(run.out), {
            "config": run.config.to_dict(), "kind": run.kind, "data": str(run.data),
            "progress": _progress_state(progress), "network": _weights(network, None),
            "optimizer": optimizer.state_dict(), "ema": None if ema is None else {
                "shadow": ema.shadow, "updates": ema.updates},
            "pending_validation": (progress.step > 0 and progress.last_validated_step != progress.step
                                   and _validation_due(run, progress)),
        })
    run.saved_step = progress.step
    run.ranks.barrier()


def _interrupt(run: Run, progress: Progress, stop: StopRequest) -> None:
    """Stop after the state was saved: exit 75 (SIGTERM/SIGUSR1) or 130 (Ctrl-C); the same command resumes."""
    signal_name = stop.signal_name or "a signal on another rank"
    _append_metrics(run, {"event": "interrupted", "step": progress.step, "signal": signal_name})
    error = Cancelled if signal_name == "SIGINT" else Interrupted
    raise error(f"stopped by {signal_name} at step {progress.step}; the training state is in "
                f"{ckpt.state_path(run.out)}: re-run the same command to resume")


def _require_finite(run: Run, progress: Progress, what: str, value: float) -> None:
    """Stop a diverged run (a NaN loss once trained on and saved NaN weights marked complete, exit 0).

    Exit 4 (DataError): the settings passed validation at load, so this is not exit 3's "invalid config"
    (which promises nothing ran); the numbers this run computed from its data are invalid, whatever the
    cause (too high a learning rate, non-finite data). The last finite state stays on disk.
    """
    if math.isfinite(value):
        return
    _append_metrics(run, {"event": "diverged", "step": progress.step, "what": what})
    stage = "interpolator" if run.kind == "interpolator" else "forecaster"
    kept = (f"the last finite training state (step {run.saved_step}) stays in {ckpt.state_path(run.out)}"
            if run.saved_step is not None else "nothing was saved")
    raise DataError(f"training diverged: {what} is {value} at step {progress.step}; {kept}, no non-finite weights "
                    f"were saved. Lower {stage}.lr (or check the data for non-finite values) and start again "
                    "with --overwrite")


def _require_finite_weights(run: Run, progress: Progress, network: nn.Module) -> None:
    flags = [torch.isfinite(value).all() for value in network.state_dict().values() if value.is_floating_point()]
    finite = bool(torch.stack(flags).all()) if flags else True  # one device sync, not one per tensor
    _require_finite(run, progress, "a network weight", 1.0 if finite else math.nan)


def _validation_due(run: Run, progress: Progress) -> bool:
    every = run.config.training.validate_every
    return progress.step % every == 0 if every else progress.micro_done == 0 and progress.epoch > 0


def _progress_state(progress: Progress) -> dict:
    return {"step": progress.step, "epoch": progress.epoch, "micro_done": progress.micro_done,
            "best_crps": progress.best_crps, "best_step": progress.best_step,
            "stale_validations": progress.stale_validations, "last_validated_step": progress.last_validated_step,
            "history": progress.history}


def _restore(state: dict, network: nn.Module, optimizer, ema: Ema | None) -> Progress:
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state.get("ema"):
        ema.shadow = {name: value.to(next(network.parameters()).device) for name, value in state["ema"]["shadow"].items()}
        ema.updates = int(state["ema"]["updates"])
    return Progress(**state["progress"])


def _finish(run: Run, network: nn.Module, ema: Ema | None, progress: Progress, resumed_from: int,
            started: float) -> dict:
    """Mark the best checkpoint complete (or save the final weights when nothing was validated)."""
    if not run.out.exists():
        _require_finite_weights(run, progress, network)
    if run.ranks.is_main:
        if run.out.exists():
            best = _with_sigma_selection(ckpt.load_checkpoint(run.out), run.sigma_selection)
            ckpt.save_checkpoint(run.out, dataclasses.replace(best, training={**best.training, "complete": True}))
        else:
            _save_inference_checkpoint(run, network, ema, progress, complete=True)
        fault_point("train.finished_checkpoint")
        ckpt.state_path(run.out).unlink(missing_ok=True)
        _append_metrics(run, {"event": "finished", "step": progress.step, "best_val_crps": _finite(progress.best_crps),
                              "best_step": progress.best_step})
    run.ranks.barrier()
    return {"out": str(run.out), "kind": run.kind, "method": run.method_name, "steps": progress.step,
            "epochs": progress.epoch, "best_val_crps": _finite(progress.best_crps), "best_step": progress.best_step,
            "validations": progress.history, "resumed_from_step": resumed_from or None,
            "parameters": sum(p.numel() for p in network.parameters() if p.requires_grad),
            "world_size": run.ranks.world, "rank": run.ranks.rank, "device": str(run.device),
            "run_dir": str(run.run_dir),
            **({"perturbation_sigma": run.sigma_selection} if run.sigma_selection else {}),
            "seconds": round(time.monotonic() - started, 2)}


def _with_sigma_selection(best: ckpt.Checkpoint, selection: dict | None) -> ckpt.Checkpoint:
    """The checkpoint with the chosen sigma in its config (what `dyf forecast` uses) and the scores of the
    grid in its training record."""
    if selection is None:
        return best
    config = {**best.config, "baseline": {**best.config["baseline"], "perturbation_sigma": selection["sigma"]}}
    return dataclasses.replace(best, config=config, training={**best.training, "perturbation_sigma": selection})


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@contextmanager
def _progress_bar(run: Run, remaining_steps: float):
    from dyfcli.runtime import progress

    if not run.ranks.is_main:
        yield _SilentBar()
        return
    total = int(remaining_steps) if math.isfinite(remaining_steps) else None
    with progress(f"train {run.kind}", total, "step") as bar:
        yield bar


class _SilentBar:
    def advance(self, n: int = 1, **info: object) -> None:
        pass
