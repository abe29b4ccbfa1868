"""`dyf forecast`: roll a trained model out from many initial conditions into a forecast store.

This workflow owns the loop over `(series, init)` blocks and member batches, autoregressive windows,
units, boundary conditions, progress and writing. It never looks inside the sampler: the model is any
object with `horizon`, `sample_window(x0, static_cond, noise, **options) -> (B, L, C, Y, X)` and
`network_calls(**options)` (DYffusion or a baseline; `load_method` is the one place that tells them apart).

Shapes: `B` batch rows (members of one block), `L` lead times, `C` fields, `Y, X` grid. Tensors handed to
the model are normalised with invalid points set to 0; everything written is in physical units with NaN on
invalid points.

Blocks are written by a `forecast_store.BackgroundWriter` thread while the next block is computed, so
disk writes overlap the network calls; leaving the loop (normally, by error or by signal) waits for them.

Under torchrun or srun (`runtime.distributed`, gloo: barriers and flags only) rank 0 creates or checks the
store, the pending blocks are dealt round-robin and rank 0 marks the store complete. SIGTERM/SIGUSR1
(`runtime.stop_signals`) stop after the current block with exit 75; running the same command again
continues (an existing unfinished store made with the same options is resumed by default; `prepare_output`).

Randomness: member `m` of block `(series s, init time t)` draws from
`MemberNoise.for_members(seed, [member_id(s, t, m)])`, folded once per autoregressive window, so the
forecast does not depend on `--member-batch`, on which other blocks run, or on the number of ranks.

Arithmetic: CPU kernels (oneDNN convolutions, MKL matmuls) pick their blocking and algorithm by batch
size, so the same member computed in a batch of 1, 7 or 48 differed in the last bits (up to 1.1e-5 after
a long rollout). On CPU every network call therefore has the same number of rows for a given ensemble
size, whatever `--member-batch`: members run in groups of at most CPU_GROUP (`member_groups`), the
last one padded with copies of its last member. A member's numbers then do not depend on its row, so
forecasts are bit-identical for any `--member-batch` (same machine and thread count). On CUDA,
`--member-batch` sets the rows (cuDNN autotuning is per shape anyway): members agree to float32 rounding.

Packing (`--pack N`): the members of N blocks are laid out block-major and cut into network batches
(`pack_rows`), so small grids and big GPUs get full batches. A batch may hold rows of two blocks: each row
carries its own member key, initial condition, condition, units and boundary. On CPU the batches keep the
row count above (padding only at the end of a pack), so packing changes no bit; on CUDA they hold
`--member-batch` x N rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dyfcli import forecast_store, outputs
from dyfcli.errors import CheckpointError, DataError, Interrupted, UsageError
from dyfcli.runtime import (COMPILE_MODES, Ranks, configure_device, cuda_speedups, distributed, launch_rank,
                            resolve_device, stop_signals)
from dyfcli.chunks import read_errors
from dyfcli.store import store_id

if TYPE_CHECKING:
    import torch

    from dyfcli.noise import MemberNoise

log = logging.getLogger("dyf.forecast")

# Global member ids pack (series index, init time index, member) into one int64 key.
_MEMBER_BITS = 20
_TIME_BITS = 26
_SERIES_LIMIT = 1 << (63 - _MEMBER_BITS - _TIME_BITS)

# Members per network call on CPU. Per member, batches of 4-16 run about as fast as larger ones for
# paper-sized networks (compute-bound); tiny networks lose some of their per-call overhead savings.
CPU_GROUP = 8


# ----------------------------------------------------------------------------------------------- request

@dataclass(frozen=True)
class ForecastRequest:
    """The options of one `dyf forecast` run, as parsed by the CLI."""

    checkpoint: Path
    out: Path
    horizon: int
    ensemble: int
    data: Path | None = None
    split: str = "test"
    init: str | None = None
    steps: str | None = None
    seed: int = 0
    member_batch: int | None = None
    device: str = "auto"
    output_times: tuple[float, ...] | None = None
    overwrite: bool = False
    resume: bool = False
    bf16: bool = False
    compile: bool = False
    perturbation_sigma: float | None = None  # overrides a Perturbation checkpoint's sigma
    pack: int = 1  # blocks whose members share network batches (`forecast_blocks`)
    compile_mode: str = "default"  # torch.compile mode with `compile` (runtime.COMPILE_MODES)


def check_request(request: ForecastRequest) -> None:
    """Flag values that are wrong whatever the checkpoint and data (UsageError, exit 2)."""
    if request.horizon < 1:
        raise UsageError(f"--horizon {request.horizon}: the forecast needs at least 1 lead time; "
                         "pass --horizon 1 or more")
    if request.ensemble < 1:
        raise UsageError(f"--ensemble {request.ensemble}: pass --ensemble 1 or more members")
    if request.ensemble >= 1 << _MEMBER_BITS:
        raise UsageError(f"--ensemble {request.ensemble}: at most {(1 << _MEMBER_BITS) - 1} members are supported")
    if request.member_batch is not None and request.member_batch < 1:
        raise UsageError(f"--member-batch {request.member_batch}: pass 1 or more (or leave it out for all members)")
    if request.compile_mode not in COMPILE_MODES:
        raise UsageError(f"--compile-mode {request.compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if request.compile_mode != "default" and not request.compile:
        raise UsageError(f"--compile-mode {request.compile_mode} needs --compile; add it or drop the mode")
    if request.pack < 1:
        raise UsageError(f"--pack {request.pack}: pass 1 or more blocks per network batch (1: one block at a time)")
    if request.overwrite and request.resume:
        raise UsageError("--overwrite and --resume contradict each other; pass only one")
    if request.perturbation_sigma is not None and not (request.perturbation_sigma >= 0
                                                       and math.isfinite(request.perturbation_sigma)):
        raise UsageError(f"--perturbation-sigma {request.perturbation_sigma}: pass a finite number >= 0")
    if request.output_times is not None and not request.output_times:
        raise UsageError("--output-times is empty; give lead times such as 0.5,1,1.5 or leave it out")
    outputs.check_path(Path(request.out), folder=True)
    outputs.check_distinct(Path(request.out), [request.checkpoint, request.data])
    # A finished forecast is refused before the model is loaded (an unfinished one is resumed when its
    # options match: `_create_or_check`). Checked again by rank 0 there; other ranks may see rank 0's new
    # store here.
    if not (request.overwrite or request.resume) and launch_rank() == 0:
        attrs = forecast_store.read_attrs(Path(request.out)) if Path(request.out).is_dir() else None
        if attrs is not None and attrs.get("dyf_complete"):
            raise UsageError(_finished_message(Path(request.out)))


def _finished_message(out: Path) -> str:
    return f"{out} already exists (a finished forecast); pass --overwrite to replace it or choose another --out"


# ----------------------------------------------------------------------------------------------- initial conditions

@dataclass(frozen=True)
class InitialConditions:
    """Which blocks to forecast: every series crossed with every initial time.

    `series_indices` and `time_indices` are indices into the data store; `init_time` holds the store's
    time coordinate at `time_indices` (datetime64 or float).
    """

    series_indices: tuple[int, ...]
    time_indices: tuple[int, ...]
    init_time: np.ndarray


def parse_init_selection(text: str) -> tuple[str, object]:
    """`--init` text -> (kind, value): ('all', None), ('first', None), ('every', N), ('positions', [..]),
    ('dates', [..])."""
    text = text.strip()
    if text in ("all", "first"):
        return text, None
    if match := re.fullmatch(r"every:(\d+)", text):
        step = int(match[1])
        if step < 1:
            raise UsageError(f"--init {text!r}: every:N needs N >= 1")
        return "every", step
    tokens = [token.strip() for token in text.split(",") if token.strip()]
    if tokens and all(re.fullmatch(r"\d+", token) for token in tokens):
        return "positions", [int(token) for token in tokens]
    if tokens and all(re.fullmatch(r"\d{4}-\d{2}-\d{2}(T\d{2}(:\d{2}){0,2})?", token) for token in tokens):
        try:
            return "dates", [np.datetime64(token) for token in tokens]
        except ValueError as err:
            raise UsageError(f"--init {text!r}: {err}") from None
    raise UsageError(f"--init {text!r} is not a selection: use all, first, every:N, positions such as 0,5,10 "
                     "or dates and date-times such as 2020-01-01,2020-02-01T06:00 (see `dyf forecast --help`)")


def select_initial_conditions(store, split: str, selection: str | None, horizon: int) -> InitialConditions:
    """Resolve `--split` and `--init` against the store (DataError, exit 4, when nothing fits)."""
    ranges = store.split_ranges(split)
    if not ranges:
        raise DataError(f"the {split!r} split of {store.path} is empty; choose another --split")
    spans = {(start, stop) for _, start, stop in ranges}
    if len(spans) != 1:
        raise DataError(f"the {split!r} split covers different time ranges in different series, which "
                        "`dyf forecast` does not support; choose another --split")
    start, stop = spans.pop()
    by_series = "series" in store.splits[split]
    kind, value = parse_init_selection(selection or ("first" if by_series else "all"))
    times = store.ds["time"].values
    positions = _init_positions(kind, value, stop - start, horizon, times[start:stop], split)
    time_indices = tuple(start + p for p in positions)
    return InitialConditions(tuple(s for s, _, _ in ranges), time_indices, times[list(time_indices)])


def _init_positions(kind: str, value, length: int, horizon: int, split_times: np.ndarray, split: str) -> list[int]:
    """Positions within a split of `length` steps chosen by one parsed `--init` selection."""
    if kind == "first":
        return [0]
    if kind in ("all", "every"):
        verifiable = length - horizon
        if verifiable < 1:
            raise DataError(f"the {split!r} split has {length} steps, too few for --horizon {horizon} with truth "
                            "for every lead; lower --horizon or choose --init first or explicit positions")
        return list(range(0, verifiable, value if kind == "every" else 1))
    if kind == "positions":
        outside = [p for p in value if p >= length]
        if outside:
            raise DataError(f"--init positions {outside} lie outside the {split!r} split ({length} steps, "
                            f"positions 0..{length - 1}); choose positions inside it")
        return sorted(set(value))
    if not np.issubdtype(split_times.dtype, np.datetime64):
        raise DataError("--init dates need a dated store; this store has simulation times, give positions instead")
    positions = []
    for when in value:  # exact times only: a date is its midnight, never the nearest step
        found = np.flatnonzero(split_times == when)
        if not len(found):
            raise DataError(f"--init {when} is not a time of the {split!r} split; "
                            f"{_nearest_times(split_times, when)}")
        positions.append(int(found[0]))
    return sorted(set(positions))


def _nearest_times(times: np.ndarray, when: np.datetime64) -> str:
    """The advice for an `--init` time the split lacks: the times either side of it, or the split's span."""
    unit = "D" if np.all(times.astype("datetime64[D]") == times) else "m"

    def text(value) -> str:
        return str(np.datetime_as_string(value, unit=unit))

    index = int(np.searchsorted(times, when))
    if index == 0 or index == len(times):
        return f"it runs from {text(times[0])} to {text(times[-1])}; choose times inside it"
    return f"the nearest are {text(times[index - 1])} and {text(times[index])}; choose one of them"


def member_ids(series_index: int, time_index: int, members: range) -> torch.Tensor:
    """Global member ids `(B,)` int64: unique per (series, init time, member), independent of batching."""
    import torch

    if series_index >= _SERIES_LIMIT or time_index >= 1 << _TIME_BITS:
        raise DataError(f"series {series_index} / time index {time_index} exceed the member-id range of dyf")
    base = (series_index << (_TIME_BITS + _MEMBER_BITS)) | (time_index << _MEMBER_BITS)
    return torch.tensor([base + m for m in members], dtype=torch.int64)


# ----------------------------------------------------------------------------------------------- lead times

@dataclass(frozen=True)
class LeadPlan:
    """Which lead times each autoregressive window produces and which of them are written.

    `window_times` are the times asked of every window, in data steps within (0, h], always ending
    with h (its output seeds the next window); `leads` `(L,)` are the written lead times in (0, H];
    `take[w]` lists, for window w, the indices into `window_times` that are written, in order.
    """

    model_horizon: int
    window_times: tuple[float, ...] | None
    windows: int
    leads: np.ndarray
    take: tuple[tuple[int, ...], ...]

    @property
    def times_per_window(self) -> tuple[float, ...]:
        return self.window_times or tuple(float(i) for i in range(1, self.model_horizon + 1))


def plan_leads(horizon: int, model_horizon: int, output_times: tuple[float, ...] | None) -> LeadPlan:
    """Cover lead times up to `horizon` with windows of `model_horizon` steps."""
    if output_times is not None:
        bad = [t for t in output_times if not 0 < t <= model_horizon]
        if bad:
            raise UsageError(f"--output-times {bad}: times must lie in (0, {model_horizon}], the model's horizon; "
                             "longer lead times come from --horizon")
        window_times = tuple(sorted(set(float(t) for t in output_times) | {float(model_horizon)}))
    else:
        window_times = None
    times = window_times or tuple(float(i) for i in range(1, model_horizon + 1))
    windows = math.ceil(horizon / model_horizon)
    wanted = {float(t) for t in output_times} if output_times is not None else set(times)
    leads, take = [], []
    for window in range(windows):
        kept = tuple(i for i, t in enumerate(times)
                     if t in wanted and window * model_horizon + t <= horizon + 1e-9)
        take.append(kept)
        leads.extend(window * model_horizon + times[i] for i in kept)
    return LeadPlan(model_horizon, window_times, windows, np.asarray(leads, dtype=np.float64), tuple(take))


def lead_coordinates(time_step, init_time: np.ndarray, leads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`lead_time (L,)` and `valid_time (I, L)` from the store's `dyf_time_step` (pandas frequency or float)."""
    if time_step is None:
        raise DataError("the data store has no dyf_time_step attribute; re-create it with `dyf prepare`")
    if not np.issubdtype(np.asarray(init_time).dtype, np.datetime64):
        step = float(time_step)
        lead_time = leads * step
        return lead_time, np.asarray(init_time, dtype=np.float64)[:, None] + lead_time[None, :]
    import pandas as pd

    offset = pd.tseries.frequencies.to_offset(str(time_step))
    try:
        delta = pd.Timedelta(offset)
    except (ValueError, TypeError):
        delta = None
    if delta is not None:
        lead_time = np.array([pd.Timedelta(delta * lead).to_timedelta64() for lead in leads], dtype="timedelta64[ns]")
        valid = np.asarray(init_time, dtype="datetime64[ns]")[:, None] + lead_time[None, :]
        return lead_time, valid
    # Calendar steps (months): lead times are counts of steps; valid times follow the calendar.
    if np.any(leads != np.round(leads)):
        raise UsageError(f"--output-times: fractional lead times need a fixed time step, not {time_step!r}")
    valid = np.array([[(pd.Timestamp(t) + int(lead) * offset).to_datetime64() for lead in leads]
                      for t in np.asarray(init_time)], dtype="datetime64[ns]")
    return leads.copy(), valid


def day_of_year(valid_time: np.ndarray) -> np.ndarray | None:
    """Day of year (1..366, as xarray's `time.dt.dayofyear`) of datetime valid times; None otherwise."""
    if not np.issubdtype(np.asarray(valid_time).dtype, np.datetime64):
        return None
    import pandas as pd

    return pd.DatetimeIndex(np.asarray(valid_time).ravel()).day_of_year.to_numpy().reshape(np.shape(valid_time))


# ----------------------------------------------------------------------------------------------- one block

@dataclass
class BlockInputs:
    """What one `(series, init)` block needs besides the model.

    `x0` `(C, Y, X)` normalised initial condition (0 on invalid points), `static_cond` `(C_cond, Y, X)`,
    `mask` `(Y, X)` bool, `valid_time` `(L_all,)` for every window time of every window (flattened
    window-major), `to_physical(x (N, C, Y, X), positions (N,)) / to_normalised(...)` convert units at
    the given positions into `valid_time`, `boundary` None or an object with `apply(x (B, L, C, Y, X), times (L,))`.
    `calendar` `(W, K)`: the calendar channels (`data.calendar_features`) of each autoregressive window,
    from the valid time of the state the window starts from (`window_start_times`), or None.

    The model's condition is per batch row and per window: `condition(window, rows)` -> `(rows, C_cond, Y, X)`
    (static fields, then the calendar channels of `window`, constant over the grid). A batch that packs
    rows of several blocks concatenates each block's `condition(window, its rows)` along the batch, in
    row order, for the window each row is at.
    """

    series_index: int
    time_index: int
    x0: torch.Tensor
    static_cond: torch.Tensor
    mask: torch.Tensor
    valid_time: np.ndarray
    to_physical: Callable[[torch.Tensor, np.ndarray], torch.Tensor]
    to_normalised: Callable[[torch.Tensor, np.ndarray], torch.Tensor]
    boundary: object | None = None
    calendar: torch.Tensor | None = None

    def condition(self, window: int, rows: int) -> torch.Tensor:
        """The model condition of autoregressive window `window` for `rows` batch rows: `(rows, C_cond, Y, X)`."""
        import torch

        condition = self.static_cond
        if self.calendar is not None:
            channels = self.calendar[window][:, None, None].expand(-1, *self.static_cond.shape[1:])
            condition = torch.cat([condition, channels])
        return condition.unsqueeze(0).expand(rows, *condition.shape)


@dataclass
class Counter:
    """Batched network calls made so far (for the summary); `on_window` is called after every window of
    every member group, so the loop owner can show progress long before the first block is written."""

    batched_calls: int = 0
    on_window: Callable[[], None] = lambda: None

    def window_done(self, calls: int) -> None:
        self.batched_calls += calls
        self.on_window()


def rollout(model, sample_options: dict, inputs: BlockInputs, plan: LeadPlan, noise: MemberNoise,
            counter: Counter, calls_per_window: int, bf16: bool = False) -> torch.Tensor:
    """`rollout_rows` for one batch of members of one block: `(B, L, C, Y, X)` physical units."""
    return rollout_rows(model, sample_options, [(inputs, len(noise))], plan, noise, counter, calls_per_window, bf16)


def rollout_rows(model, sample_options: dict, parts: list[tuple[BlockInputs, int]], plan: LeadPlan,
                 noise: MemberNoise, counter: Counter, calls_per_window: int, bf16: bool = False) -> torch.Tensor:
    """Run `plan.windows` autoregressive windows for one batch; returns `(B, L, C, Y, X)` physical units.

    The batch packs rows of one or more blocks: `parts` lists `(inputs, rows)` in row order (`rows`
    consecutive batch rows start from that block's initial condition; their sum is `len(noise)`). Every
    row continues from its own x̂_h; units and boundary conditions are applied per block, in physical
    units, to every window's output before it is fed back and before it is written. With `bf16` the
    sampler runs under bfloat16 autocast; everything after it (units, boundaries, the next x0) is float32.
    """
    import torch

    sizes = [rows for _, rows in parts]
    assert sum(sizes) == len(noise), (sizes, len(noise))
    x0 = torch.cat([inputs.x0.unsqueeze(0).expand(rows, *inputs.x0.shape) for inputs, rows in parts])
    per_window = len(plan.times_per_window)
    written = []
    for window in range(plan.windows):
        condition = _joined([inputs.condition(window, rows) for inputs, rows in parts])
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
            # A model with `uses_window_index` (the Perturbation baseline perturbs window 0 only) gets `window=`.
            at_window = {"window": window} if getattr(model, "uses_window_index", False) else {}
            out = model.sample_window(x0, condition, noise.fold(window), **sample_options, **at_window).float()
        counter.window_done(calls_per_window)
        positions = np.arange(window * per_window, (window + 1) * per_window)
        physical = _per_block(out, parts, lambda piece, inputs: _window_to_physical(piece, inputs, positions))
        written.append(physical[:, list(plan.take[window])])
        if window + 1 < plan.windows:
            x0 = _per_block(physical[:, -1], parts, lambda last, inputs: _masked(
                inputs.to_normalised(last, np.full(len(last), positions[-1])), inputs.mask, 0.0))
    result = torch.cat(written, dim=1)
    return _per_block(result, parts, lambda piece, inputs: _masked(piece, inputs.mask, float("nan")))


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The rows of several blocks as one batch (no copy for one block)."""
    import torch

    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _per_block(x: torch.Tensor, parts: list[tuple[BlockInputs, int]], convert) -> torch.Tensor:
    """`convert(rows of one block, its inputs)` for each block of a packed batch, joined in row order."""
    if len(parts) == 1:
        return convert(x, parts[0][0])
    pieces = x.split([rows for _, rows in parts])
    return _joined([convert(piece, inputs) for piece, (inputs, _) in zip(pieces, parts)])


def _masked(x: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """`x` with `fill` where `mask` (Y, X) is False."""
    import torch

    return torch.where(mask, x, torch.full((), fill, dtype=x.dtype, device=x.device))


def _window_to_physical(out: torch.Tensor, inputs: BlockInputs, positions: np.ndarray) -> torch.Tensor:
    """Normalised window output `(B, Lw, C, Y, X)` -> physical units with boundary conditions applied."""
    batch, lead_count = out.shape[:2]
    flat = out.reshape(batch * lead_count, *out.shape[2:])
    physical = inputs.to_physical(flat, np.tile(positions, batch)).reshape(out.shape)
    if inputs.boundary is not None:
        applied = inputs.boundary.apply(physical, inputs.valid_time[positions])
        physical = physical if applied is None else applied
    return physical


def member_groups(members: int, member_batch: int, device) -> tuple[list[range], int | None]:
    """The members that run through the networks together, and the rows every call has (None: as many as
    the group's members).

    CPU: groups of at most CPU_GROUP, as equal as possible (so padding wastes fewer rows than there are
    groups), whatever `member_batch`, with a fixed row count: see the module docstring. Elsewhere:
    `member_batch` members at a time."""
    if device.type == "cpu":
        size = -(-members // -(-members // CPU_GROUP))
        return [range(first, min(first + size, members)) for first in range(0, members, size)], size
    return [range(first, min(first + member_batch, members)) for first in range(0, members, member_batch)], None


@dataclass(frozen=True)
class Segment:
    """Consecutive rows of a packed batch from one block: `block` (its index in the pack), its `members`
    in order, then `padding` copies of the last of them (rows that only keep the call's row count fixed)."""

    block: int
    members: range
    padding: int = 0

    @property
    def rows(self) -> int:
        return len(self.members) + self.padding


def call_rows(members: int, member_batch: int, pack: int, device) -> tuple[int, bool]:
    """Rows of every network call for `pack` blocks of `members` at a time, and whether a short last call
    is padded to that count.

    CPU: the fixed row count of `member_groups` (at most CPU_GROUP, set by the ensemble size alone), padded:
    the rows a member's numbers depend on do not change with `--pack` or `--member-batch`, so forecasts are
    bit-identical whatever both are. Packing then fills every call with the members of consecutive blocks
    (the padding of an ensemble that does not divide into calls is paid once per pack, not per block).
    Elsewhere: `member_batch` members of each of `pack` blocks per call, not padded (a GPU's kernels agree to
    float rounding across batch sizes)."""
    if device.type == "cpu":
        return member_groups(members, member_batch, device)[1], True
    return min(member_batch, members) * pack, False


def pack_rows(blocks: int, members: int, rows: int, padded: bool) -> list[list[Segment]]:
    """The network batches of a pack: the rows `(block, member)`, block-major, cut into batches of `rows`;
    with `padded` the last batch is filled up with copies of its last member."""
    batches, current, filled = [], [], 0
    for block in range(blocks):
        first = 0
        while first < members:
            take = min(members - first, rows - filled)
            current.append(Segment(block, range(first, first + take)))
            first, filled = first + take, filled + take
            if filled == rows:
                batches.append(current)
                current, filled = [], 0
    if current:
        if padded:
            last = current[-1]
            current[-1] = Segment(last.block, last.members, rows - filled)
        batches.append(current)
    return batches


def forecast_block(model, sample_options: dict, inputs: BlockInputs, plan: LeadPlan, *, seed: int,
                   members: int, member_batch: int, device, counter: Counter, calls_per_window: int,
                   bf16: bool = False) -> np.ndarray:
    """All members of one block (`forecast_blocks` of a pack of one): `(M, L, C, Y, X)` float32 physical."""
    return forecast_blocks(model, sample_options, [inputs], plan, seed=seed, members=members,
                           member_batch=member_batch, device=device, counter=counter,
                           calls_per_window=calls_per_window, bf16=bf16)[0]


def forecast_blocks(model, sample_options: dict, pack: list[BlockInputs], plan: LeadPlan, *, seed: int,
                    members: int, member_batch: int, device, counter: Counter, calls_per_window: int,
                    bf16: bool = False) -> list[np.ndarray]:
    """All members of the blocks of one pack, their rows packed into network batches (`call_rows`,
    `pack_rows`): one `(M, L, C, Y, X)` float32 array in physical units per block, in order.

    Row r of a batch draws from its member's own key (`member_ids`), so what a member gets does not depend
    on the other rows: the same forecast whatever the packing."""
    import torch

    from dyfcli.noise import MemberNoise

    rows, padded = call_rows(members, member_batch, len(pack), device)
    kept: list[list[torch.Tensor]] = [[] for _ in pack]
    for batch in pack_rows(len(pack), members, rows, padded):
        ids = torch.cat([_segment_ids(pack[segment.block], segment) for segment in batch])
        noise = MemberNoise.for_members(seed, ids.to(device))
        parts = [(pack[segment.block], segment.rows) for segment in batch]
        with torch.inference_mode():  # no autograd bookkeeping at all: outputs only go to disk
            out = rollout_rows(model, sample_options, parts, plan, noise, counter, calls_per_window, bf16)
        for segment, piece in zip(batch, out.split([segment.rows for segment in batch])):
            kept[segment.block].append(piece[:len(segment.members)].cpu())
    return [torch.cat(pieces, dim=0).numpy() for pieces in kept]


def _segment_ids(inputs: BlockInputs, segment: Segment) -> torch.Tensor:
    """Member ids of a segment's rows, padding rows repeating the last member (dropped after the call)."""
    import torch

    ids = member_ids(inputs.series_index, inputs.time_index, segment.members)
    return torch.cat([ids, ids[-1:].repeat(segment.padding)])


# ----------------------------------------------------------------------------------------------- the loop

@dataclass
class Collaborators:
    """The objects the block loop works with (built from files by `run_forecast`, or fakes in tests).

    `method.model` is the sampler object; `block_inputs(series_index, time_index, valid_time_row)` returns
    a `BlockInputs` on `device`.
    """

    method: Method
    block_inputs: Callable[[int, int, np.ndarray], BlockInputs]
    device: torch.device


@dataclass(frozen=True)
class Method:
    """A loaded model and how `dyf forecast` calls it (`bf16`: under bfloat16 autocast)."""

    kind: str
    model: object
    sample_options: dict = field(default_factory=dict)
    schedule: str | None = None
    bf16: bool = False
    perturbation_sigma: float | None = None  # the Perturbation baseline's sigma in use (recorded in the store)


def run_blocks(collaborators: Collaborators, writer, blocks: list[tuple[int, int]], init: InitialConditions,
               plan: LeadPlan, window_valid_time: np.ndarray, *, seed: int, members: int,
               member_batch: int, pack: int = 1, stop_requested=lambda: False) -> Counter:
    """Forecast and write `blocks` (pairs of positions into `init.series_indices`, `init.time_indices`),
    `pack` blocks at a time (`forecast_blocks`); a stop request is honoured after each pack is written.

    The next pack's inputs are read on a helper thread while the current pack computes (`prefetched`):
    on a small grid reading a block's initial condition costs a tenth of its network time, and network
    calls release the GIL.
    """
    from dyfcli.runtime import progress

    method = collaborators.method
    calls_per_window = _calls_per_window(method)
    packs = [blocks[first:first + pack] for first in range(0, len(blocks), pack)]
    batches = sum(len(pack_rows(len(part), members, *call_rows(members, member_batch, len(part),
                                                                collaborators.device))) for part in packs)
    start = time.monotonic()
    written = 0
    with progress("forecast", total=batches * plan.windows, unit="window") as bar:
        counter = Counter(on_window=lambda: bar.advance(
            1, network_evals_per_s=counter.batched_calls / max(time.monotonic() - start, 1e-9)))
        def read(part: list[tuple[int, int]]) -> list[BlockInputs]:
            return [collaborators.block_inputs(init.series_indices[series_position], init.time_indices[init_position],
                                               window_valid_time[init_position])
                    for series_position, init_position in part]

        with contextlib.closing(prefetched(read, packs)) as pack_inputs:
            for part, inputs in zip(packs, pack_inputs):
                outputs = forecast_blocks(method.model, method.sample_options, inputs, plan, seed=seed,
                                          members=members, member_batch=member_batch, device=collaborators.device,
                                          counter=counter, calls_per_window=calls_per_window, bf16=method.bf16)
                for (series_position, init_position), block in zip(part, outputs):
                    writer.write(series_position, init_position, block)
                written += len(part)
                if stop_requested():
                    raise Interrupted(f"stopped by a signal after writing {written} blocks; re-run the same "
                                      "`dyf forecast` command to continue")
    return counter


def prefetched(read: Callable, items: list) -> Iterator:
    """`read(item)` for each item in order, the next one read on a helper thread while the caller works on
    the current one (errors surface, in order, where the item is taken)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dyf-block-reader") as pool:
        pending = pool.submit(read, items[0]) if items else None
        for position in range(len(items)):
            current = pending.result()
            pending = pool.submit(read, items[position + 1]) if position + 1 < len(items) else None
            yield current


def _calls_per_window(method: Method) -> int:
    """Network calls of one window per batch (a batched call counts once whatever the batch size)."""
    return _calls_by_network(method.model.network_calls(**method.sample_options))[0]


def _calls_by_network(calls) -> tuple[int, dict]:
    """`network_calls(...)` may be an int, a dict or a NamedTuple by network: (total, by network)."""
    if hasattr(calls, "_asdict"):
        calls = calls._asdict()
    if isinstance(calls, dict):
        return int(sum(calls.values())), {name: int(n) for name, n in calls.items()}
    return int(calls), {}


# ----------------------------------------------------------------------------------------------- distributed

def blocks_for_rank(pending: list[tuple[int, int]], ranks: Ranks) -> list[tuple[int, int]]:
    """Round-robin share of the pending blocks, so every rank gets a spread of initial times."""
    return pending[ranks.rank::ranks.world]


# ----------------------------------------------------------------------------------------------- the workflow

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_method(checkpoint, device, steps: str | None) -> Method:
    """Rebuild the sampler a checkpoint describes: the one place that tells DYffusion from the baselines.

    Every method yields an object with `horizon`, `sample_window(x0, static_cond, noise, **options)` and
    `network_calls(**options)`; only the options differ (DYffusion takes a diffusion schedule).
    """
    if checkpoint.kind == "interpolator":
        raise CheckpointError("this is an interpolator checkpoint; give the model.pt written by "
                              "`dyf train-forecaster` (it embeds the interpolator)")
    if checkpoint.kind == "forecaster":
        from dyfcli.model import dyffusion_from_checkpoint

        model = dyffusion_from_checkpoint(checkpoint, device)
        schedule = steps or checkpoint.config.get("sampling", {}).get("schedule", "full")
        return Method(checkpoint.kind, model, {"schedule": schedule}, schedule=schedule)
    if steps is not None:
        raise UsageError(f"--steps is a DYffusion sampling schedule; a {checkpoint.kind} checkpoint takes none")
    from dyfcli.baselines import build_model_from_checkpoint

    return Method(checkpoint.kind, build_model_from_checkpoint(checkpoint, device), {}, schedule=None)


def perturbation_sigma(method: Method, sigma: float | None) -> Method:
    """`--perturbation-sigma`: the Perturbation baseline with another sigma (other methods refuse it). The
    sigma in use (the flag's or the checkpoint's) is kept in `Method.perturbation_sigma`: the store records
    it and a resume must repeat it."""
    if sigma is None:
        return dataclasses.replace(method, perturbation_sigma=getattr(method.model, "sigma", None)
                                   if method.kind == "perturbation" else None)
    if method.kind != "perturbation":
        raise UsageError(f"--perturbation-sigma is for Perturbation checkpoints; this one is {method.kind!r} "
                         "(drop the flag)")
    return dataclasses.replace(method, model=method.model.with_sigma(sigma), perturbation_sigma=sigma)


def speed_up(method: Method, device, *, bf16: bool, compile: bool, compile_mode: str = "default") -> Method:
    """`--bf16` / `--compile` / `--compile-mode` (`runtime.cuda_speedups`): compile the model's networks in
    place, run the sampler under bf16 autocast; all on CUDA only.

    Compile modes that replay CUDA graphs write every call's outputs into the same static buffers, while
    the sampler keeps earlier outputs (x̂_h, the interpolations of a cold update): on CUDA each network is
    then wrapped (`graph_outputs`): a new graph step per call, and it hands back a copy.
    """
    import torch

    names = [name for name, value in vars(method.model).items() if isinstance(value, torch.nn.Module)]
    networks = [getattr(method.model, name) for name in names]
    on = cuda_speedups(networks, device, bf16=bf16, compile=compile, action="forecasting in float32",
                       compile_mode=compile_mode)
    if compile and device.type == "cuda" and compile_mode in CUDA_GRAPH_MODES:
        for name, network in zip(names, networks):
            setattr(method.model, name, graph_outputs(network))
    return dataclasses.replace(method, bf16=on)


# torch.compile modes that replay CUDA graphs (runtime.COMPILE_MODES)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def graph_outputs(network):
    """`network`, compiled to replay CUDA graphs, as a module whose outputs stay valid after its next call."""
    import torch

    class GraphOutputs(torch.nn.Module):
        def __init__(self, network: torch.nn.Module):
            super().__init__()
            self.network = network

        def forward(self, *args, **kwargs):
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the previous call's buffers may be reused
            return self.network(*args, **kwargs).clone()

    return GraphOutputs(network)


class StoreInputs:
    """Builds each block's `BlockInputs` from a data store: `inputs(series_index, time_index, valid_time)`.

    `valid_time` `(W * Lw,)` are the valid times of every window time (see `window_valid_times`); units
    conversions look up the day of year there when the normaliser is `pixel-dayofyear`. With `calendar`
    (the checkpoint's `data.calendar`), each window's calendar channels come from the valid time of the
    state it starts from (`window_start_times`, `window_length` = Lw), as in training, where they come
    from each window's first step.
    """

    def __init__(self, store, normalizer, device, calendar: tuple[str, ...] | list[str] = (),
                 window_length: int | None = None):
        import zarr

        self.store, self.normalizer, self.device = store, normalizer, device
        self.calendar, self.window_length = tuple(calendar), window_length
        if self.calendar and window_length is None:
            raise ValueError("calendar channels need the window length (times per window) to find window starts")
        # Raw Zarr reads (no Dask graph per block): one small slice per field and block.
        group = zarr.open_group(str(store.path), mode="r")
        self._arrays = [group[name] for name in store.fields]
        self._masks = np.asarray(store.ds["mask"].values, dtype=bool)
        self._by_day = normalizer.mode == "pixel-dayofyear"
        self._store_days = store.ds["time"].dt.dayofyear.values if self._by_day else None
        self._series: dict[int, tuple] = {}

    def __call__(self, series_index: int, time_index: int, valid_time: np.ndarray) -> BlockInputs:
        import torch

        mask, static_cond, boundary = self._series_inputs(series_index)
        with read_errors(self.store.path, f"the initial condition of series {series_index}, time index {time_index}"):
            physical = np.stack([np.asarray(array[series_index, time_index], dtype=np.float32)
                                 for array in self._arrays])
        day = self._store_days[[time_index]] if self._by_day else None
        x0 = self.normalizer.normalize_at(torch.from_numpy(physical)[None].to(self.device), series_index, day)[0]
        x0 = torch.where(mask & torch.isfinite(x0), x0, torch.zeros((), device=self.device))
        valid_days = day_of_year(valid_time) if self._by_day else None

        def at_valid_times(convert):
            return lambda x, positions: convert(x, series_index, None if valid_days is None else valid_days[positions])

        return BlockInputs(series_index, time_index, x0, static_cond, mask, valid_time,
                           at_valid_times(self.normalizer.denormalize_at), at_valid_times(self.normalizer.normalize_at),
                           boundary, self._calendar(time_index, valid_time))

    def _calendar(self, time_index: int, valid_time: np.ndarray):
        """`(W, K)` calendar channels of every window on the device, or None without `calendar`."""
        import torch

        from dyfcli.data import calendar_features

        if not self.calendar:
            return None
        starts = window_start_times(self.store.ds["time"].values[time_index], valid_time, self.window_length)
        return torch.from_numpy(calendar_features(starts, self.calendar)).to(self.device)

    def _series_inputs(self, series_index: int) -> tuple:
        """(mask (Y, X), static_cond (C_cond, Y, X), boundary or None) of one series, on the device, cached.

        The boundary is None when the store declares none (`boundary.boundary_for`).
        """
        import torch

        from dyfcli.boundary import boundary_for

        if series_index not in self._series:
            # the boundary reads the first frame of some fields (spring mesh): a damaged chunk is exit 4
            with read_errors(self.store.path, f"the boundary inputs of series {series_index}"):
                self._series[series_index] = (torch.from_numpy(self._masks[series_index]).to(self.device),
                                              static_condition(self.store, series_index).to(self.device),
                                              boundary_for(self.store, series_index))
        return self._series[series_index]


def static_condition(store, series_index: int):
    """The store's `cond_*` fields of one series `(C_cond, Y, X)` float32 (sorted names; NaN -> 0)."""
    import torch

    arrays = [np.asarray(store.ds[name].isel(series=series_index).values, dtype=np.float32)
              for name in store.cond_names]
    if not arrays:
        return torch.zeros((0, *store.grid), dtype=torch.float32)
    return torch.from_numpy(np.nan_to_num(np.stack(arrays), nan=0.0))


def forecast_layout(store, init: InitialConditions, plan: LeadPlan, members: int, identity: dict,
                    attrs: dict) -> forecast_store.ForecastLayout:
    lead_time, valid_time = lead_coordinates(store.ds.attrs.get("dyf_time_step"), init.init_time, plan.leads)
    ds = store.ds
    return forecast_store.ForecastLayout(
        fields=store.fields,
        field_attrs={name: dict(ds[name].attrs) for name in store.fields},
        series=ds["series"].values[list(init.series_indices)],
        init_time=init.init_time, members=members, lead=plan.leads, lead_time=lead_time, valid_time=valid_time,
        mask=ds["mask"].isel(series=list(init.series_indices)).load(), identity=identity, attrs=attrs,
        time_units=ds["time"].attrs.get("units"))


def window_start_times(init_time, valid_time: np.ndarray, window_length: int) -> np.ndarray:
    """`(W,)` valid time of the state each autoregressive window starts from: the initial time, then the
    valid time of the previous window's last output (every window ends at the model's horizon, its
    output seeds the next). `valid_time` `(W * window_length,)` is one row of `window_valid_times`."""
    return np.concatenate([np.asarray([init_time]).astype(valid_time.dtype),
                           valid_time[window_length - 1:-1:window_length]])


def window_valid_times(store, init: InitialConditions, plan: LeadPlan) -> np.ndarray:
    """`(I, W * Lw)` valid times of every time of every window (the boundary and units need them)."""
    times = plan.times_per_window
    every = np.asarray([w * plan.model_horizon + t for w in range(plan.windows) for t in times], dtype=np.float64)
    return lead_coordinates(store.ds.attrs.get("dyf_time_step"), init.init_time, every)[1]


def prepare_output(out: Path, layout: forecast_store.ForecastLayout, *, overwrite: bool, resume: bool,
                   ranks: Ranks) -> np.ndarray:
    """Create the store (rank 0) or check that an existing one is the same forecast; returns `done` (S, I)."""
    failure, resumed = None, False
    if ranks.is_main:
        try:
            resumed = _create_or_check(out, layout, overwrite=overwrite, resume=resume)
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = err
    if ranks.any(failure is not None):
        if failure is not None:
            raise failure
        raise DataError(f"rank 0 could not prepare {out}; see its error message")
    done = forecast_store.BlockWriter(out).done()
    if resumed:
        log.info("resuming %s: %d of %d blocks written", out, int(done.sum()), done.size)
    ranks.barrier()  # no rank writes before every rank has read `done`: all deal the same pending blocks
    return done


def _create_or_check(out: Path, layout: forecast_store.ForecastLayout, *, overwrite: bool, resume: bool) -> bool:
    """Create the store, replace it (`overwrite`) or continue it; True when an existing store is continued.

    An existing dyf forecast store made with the same options (`layout.identity`) is continued without
    `--resume`, so "re-run the same command" after an interruption holds; one made with other options is
    refused naming them, and a finished one is refused unless `resume` was asked for (then nothing is left
    to do). Only `--overwrite` replaces, and only a dyf forecast store (`outputs`).
    """
    truth = layout.attrs.get("dyf_truth_absolute") or layout.attrs.get("dyf_truth")  # the checkpoint's data store
    outputs.check_distinct(out, [truth])
    if not out.exists():
        forecast_store.create(out, layout)
        return False
    attrs = forecast_store.read_attrs(out)
    if attrs is None:
        # Never delete something that is not a forecast (a data store, a folder of results) by mistake.
        raise UsageError(f"{out} exists and is not a dyf forecast store; choose another --out or remove it first")
    if overwrite:
        forecast_store.create(out, layout)
        return False
    found = attrs.get("dyf_identity", {})
    expected = forecast_store.jsonable(layout.identity)  # compared as stored: tuples become lists, etc.
    differing = sorted(key for key in set(found) | set(expected) if found.get(key) != expected.get(key))
    if differing:
        raise UsageError(f"{out} already exists, made with other {', '.join(differing)}; repeat its options to "
                         "continue it, pass --overwrite to replace it, or choose another --out")
    if attrs.get("dyf_complete") and not resume:
        raise UsageError(_finished_message(out))
    return True


@dataclass
class ForecastJob:
    """Everything resolved before the first block: inputs checked, model loaded, schema laid out."""

    out: Path
    collaborators: Collaborators
    init: InitialConditions
    plan: LeadPlan
    layout: forecast_store.ForecastLayout
    window_valid_time: np.ndarray
    calls: dict
    checkpoint_sha256: str


def run_forecast(request: ForecastRequest) -> dict:
    """The whole `dyf forecast` run, holding the lock on `--out` throughout; returns a JSON-ready summary."""
    check_request(request)
    # resume: an existing dyf forecast store may be continued (whether it is: `_create_or_check`)
    with outputs.claim_output(request.out, outputs.FORECAST, overwrite=request.overwrite,
                              resume=not request.overwrite, inputs=[request.checkpoint, request.data]):
        return _run_forecast(request)


def _run_forecast(request: ForecastRequest) -> dict:
    job = prepare_job(request)
    started = time.monotonic()
    with distributed(backend="gloo") as ranks:  # barriers and flags only: gloo, whatever the device
        done = prepare_output(job.out, job.layout, overwrite=request.overwrite, resume=request.resume, ranks=ranks)
        mine = blocks_for_rank(_pending_blocks(job.out, done), ranks)
        if request.pack > 1 and job.collaborators.device.type == "cpu":
            log.info("--pack %d on CPU: network calls keep %d rows (set by --ensemble alone, so the forecast is "
                     "bit-identical whatever --pack), filled with the members of consecutive blocks",
                     request.pack, _rows_per_call(request, job.collaborators.device))
        # Blocks are written on a background thread while the next ones are computed; a whole pack (and one
        # more block, as slack when the writer falls behind for a moment) is handed over without waiting.
        with stop_signals("stopping after the current block") as stop_requested, \
                forecast_store.BackgroundWriter(forecast_store.BlockWriter(job.out), depth=request.pack + 1) as writer:
            counter = run_blocks(job.collaborators, writer, mine, job.init, job.plan,
                                 job.window_valid_time, seed=request.seed, members=request.ensemble,
                                 member_batch=request.member_batch or request.ensemble, pack=request.pack,
                                 stop_requested=stop_requested)
        ranks.barrier()  # every block is written before rank 0 checks them all
        if ranks.is_main:
            forecast_store.mark_complete(job.out)
    return _summary(request, job, done, len(mine), counter, time.monotonic() - started, ranks)


def _rows_per_call(request: ForecastRequest, device) -> int:
    """Batch rows of the network calls (`call_rows`)."""
    return call_rows(request.ensemble, request.member_batch or request.ensemble, request.pack, device)[0]


def _pending_blocks(out: Path, done: np.ndarray) -> list[tuple[int, int]]:
    """The `(series position, init position)` pairs not yet written, in store order."""
    return [(s, i) for s in range(done.shape[0]) for i in range(done.shape[1]) if not done[s, i]]


def _summary(request: ForecastRequest, job: ForecastJob, done: np.ndarray, written: int, counter: Counter,
             seconds: float, ranks: Ranks) -> dict:
    """What `dyf forecast` reports (this rank's share of the work; `run_command` prints rank 0's)."""
    return {"out": str(job.out), "blocks": int(done.size), "blocks_written": written,
            "blocks_resumed": int(done.sum()), "members": request.ensemble, "leads": len(job.plan.leads),
            "windows": job.plan.windows, "network_calls_per_member": job.calls["per_member"],
            "batched_network_calls": counter.batched_calls, "pack": request.pack,
            "rows_per_call": _rows_per_call(request, job.collaborators.device), "seconds": round(seconds, 3),
            "network_evals_per_s": round(counter.batched_calls / seconds, 3) if seconds > 0 else None,
            "device": str(job.collaborators.device), "checkpoint_sha256": job.checkpoint_sha256,
            "rank": ranks.rank, "world_size": ranks.world}


def prepare_job(request: ForecastRequest) -> ForecastJob:
    """Check checkpoint and data, load the model and lay out the store (flags: `check_request`, which
    `run_forecast` calls before it takes the output's lock)."""
    from dyfcli.checkpoint import check_compatible, load_checkpoint, require_complete
    from dyfcli.data import Normalizer
    from dyfcli.store import open_store

    checkpoint = load_checkpoint(Path(request.checkpoint))
    require_complete(checkpoint, Path(request.checkpoint))  # a killed run's best-so-far is not the model
    store = open_store(_data_path(request, checkpoint))
    check_compatible(checkpoint, store)
    init = select_initial_conditions(store, request.split, request.init, request.horizon)
    device = resolve_device(request.device)
    configure_device(device)
    method = speed_up(load_method(checkpoint, device, request.steps), device, bf16=request.bf16,
                      compile=request.compile, compile_mode=request.compile_mode)
    method = perturbation_sigma(method, request.perturbation_sigma)
    plan = plan_leads(request.horizon, method.model.horizon, request.output_times)
    if plan.window_times is not None:
        method = dataclasses.replace(method, sample_options={**method.sample_options,
                                                             "output_times": plan.window_times})
    calls = _network_calls(method, plan)
    sha = file_sha256(Path(request.checkpoint))
    identity = _identity(request, store, init, method, plan, sha)
    attrs = _store_attrs(request, checkpoint, store, method, calls, plan, sha)
    normalizer = Normalizer.from_state(checkpoint.normalizer)
    inputs = StoreInputs(store, normalizer, device, checkpoint.calendar, len(plan.times_per_window))
    collaborators = Collaborators(method, inputs, device)
    return ForecastJob(Path(request.out).absolute(), collaborators, init, plan,
                       forecast_layout(store, init, plan, request.ensemble, identity, attrs),
                       window_valid_times(store, init, plan), calls, sha)


def _identity(request: ForecastRequest, store, init: InitialConditions, method: Method, plan: LeadPlan,
              sha: str) -> dict:
    """The options a resume must repeat: a store made with other ones is a different forecast."""
    return {"checkpoint_sha256": sha, "seed": request.seed, "horizon": request.horizon,
            "ensemble": request.ensemble, "schedule": method.schedule, "precision": _precision(method),
            **({"perturbation_sigma": method.perturbation_sigma} if method.perturbation_sigma is not None else {}),
            "output_times": list(plan.window_times or []), "split": request.split,
            "truth": str(Path(store.path).resolve()),
            "series": [str(s) for s in store.ds["series"].values[list(init.series_indices)]],
            "init_time": [str(t) for t in init.init_time]}


def _precision(method: Method) -> str:
    """What the sampler's network calls ran in: bfloat16 (autocast, CUDA) or float32."""
    return "bfloat16" if method.bf16 else "float32"


def _data_path(request: ForecastRequest, checkpoint) -> Path:
    if request.data is not None:
        return Path(request.data)
    recorded = checkpoint.store.get("path")
    if not recorded:
        raise DataError("the checkpoint records no data store; pass --data STORE")
    if not Path(recorded).exists():
        raise DataError(f"the checkpoint's data store {recorded} does not exist here; pass --data STORE")
    return Path(recorded)


def _network_calls(method: Method, plan: LeadPlan) -> dict:
    """Network evaluations per member: per window (by network when known), and for the whole rollout."""
    try:
        calls = method.model.network_calls(**method.sample_options)
    except ValueError as err:  # an unknown --steps kind, fractional --output-times without refinement
        raise UsageError(f"--steps/--output-times: {err}") from None
    per_window, by_network = _calls_by_network(calls)
    return {"per_window": per_window, "by_network": by_network, "windows": plan.windows,
            "per_member": per_window * plan.windows}


def _store_attrs(request: ForecastRequest, checkpoint, store, method: Method, calls: dict, plan: LeadPlan,
                 sha: str) -> dict:
    return {
        **forecast_store.truth_attrs(store.path, request.out),  # dyf_truth: relative when they share a folder
        "dyf_truth_id": store_id(store),  # `dyf evaluate` refuses another data store of the same schema
        "dyf_split": request.split,
        "dyf_init_selection": request.init or "default",
        "dyf_checkpoint": str(Path(request.checkpoint).resolve()),
        "dyf_checkpoint_sha256": sha,
        "dyf_method": method.kind,
        "dyf_seed": request.seed,
        "dyf_horizon": request.horizon,
        "dyf_model_horizon": plan.model_horizon,
        "dyf_schedule": method.schedule,
        "dyf_precision": _precision(method),
        **({"dyf_perturbation_sigma": method.perturbation_sigma} if method.perturbation_sigma is not None else {}),
        "dyf_output_times": list(plan.window_times or []),
        "dyf_network_calls": calls,
        "dyf_time_step": store.ds.attrs.get("dyf_time_step"),
        "dyf_config": checkpoint.config,
    }
