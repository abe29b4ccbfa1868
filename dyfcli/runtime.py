"""Process-level concerns shared by every workflow: logging, progress reporting, device choice, the
process group of a multi-process launch (torchrun or srun) and stop requests by signal.

The library logs through `logging`; only the CLI prints. Progress is a Rich bar when stderr is a terminal
and plain periodic log lines otherwise, so batch jobs show progress in their log files.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dyf")

# Seconds between plain progress lines when stderr is not a terminal.
PLAIN_PROGRESS_INTERVAL_S = float(os.environ.get("DYF_PROGRESS_INTERVAL", "30"))


def setup_logging(verbose: bool = False) -> None:
    """Send `dyf` log records to stderr, one plain line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("dyf")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


# Units whose plural is not the singular + "s"; `Progress` takes either form.
_IRREGULAR_PLURALS = {"box": "boxes", "trajectory": "trajectories"}


def count_of(count: int | float, unit: str) -> str:
    """`count_of(1, "step")` -> "1 step", `count_of(150, "steps")` -> "150 steps" (`unit` in either form)."""
    singular = _singular(unit)
    return f"{count} {singular if count == 1 else _plural(singular)}"


def _singular(unit: str) -> str:
    for singular, plural in _IRREGULAR_PLURALS.items():
        if unit == plural:
            return singular
    return unit[:-1] if unit.endswith("s") and not unit.endswith("ss") and len(unit) > 2 else unit


def _plural(singular: str) -> str:
    return _IRREGULAR_PLURALS.get(singular, singular + "s")


def format_duration(seconds: float) -> str:
    """4.2 s, 42 s, 3 min 05 s, 2 h 07 min: what a person reads in a log line."""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _format_info(info: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())


class Progress:
    """Count work done towards a total; draw a bar on a terminal or log every few seconds otherwise.

    `advance(n, **info)` counts `n` more units; `info` (e.g. loss=0.12) is shown on the bar and in the
    log lines. Plain lines carry the rate and, with a total, the time left; the last line is written
    once, when the block ends, unless the previous line already said the same.
    """

    def __init__(self, description: str, total: int | None, unit: str = "it"):
        self.description = description
        self.total = total
        self.unit = _singular(unit)
        self.done = 0
        self.info: dict = {}
        self._start = time.monotonic()
        self._last_log = self._start
        self._logged_done: int | None = None
        self._rich = None
        self._task = None

    def __enter__(self) -> Progress:
        if stderr_is_terminal():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
            from rich.progress import TimeRemainingColumn

            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(_plural(self.unit)), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.description, total=self.total, info="")
        else:
            total = count_of(self.total, self.unit) if self.total is not None else f"? {_plural(self.unit)}"
            log.info("%s: started (%s)", self.description, total)
        return self

    def advance(self, n: int = 1, **info: object) -> None:
        self.done += n
        self.info.update(info)
        if self._rich is not None:
            self._rich.update(self._task, advance=n, info=_format_info(self.info))
            return
        now = time.monotonic()
        if now - self._last_log >= PLAIN_PROGRESS_INTERVAL_S:
            self._last_log = now
            self._log_line()

    def line(self) -> str:
        """The plain progress line: `train interpolator: 40/150 steps (3.1 steps/s, 13 s, ETA 35 s) loss=0.2`."""
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        done = f"{self.done}/{count_of(self.total, self.unit)}" if self.total is not None else count_of(self.done, self.unit)
        timing = [f"{rate:.3g} {_plural(self.unit)}/s", format_duration(elapsed)]
        if self.total is not None and self.done < self.total and rate > 0:
            timing.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        extra = _format_info(self.info)
        return f"{self.description}: {done} ({', '.join(timing)})" + (f" {extra}" if extra else "")

    def _log_line(self) -> None:
        self._logged_done = self.done
        log.info("%s", self.line())

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
        elif exc[0] is None and self._logged_done != self.done:
            self._log_line()


@contextmanager
def progress(description: str, total: int | None, unit: str = "it") -> Iterator[Progress]:
    """A `Progress` for the `with` block; `unit` is a noun in either number ("step" or "steps")."""
    with Progress(description, total, unit) as bar:
        yield bar


def resolve_device(spec: str = "auto"):
    """Turn `auto|cpu|cuda|cuda:N` into a torch.device; auto picks the GPU when there is one. Under
    torchrun/srun `auto` and `cuda` mean the rank's local GPU (`cuda:N` is taken as given)."""
    import torch

    from dyfcli.errors import UsageError

    if spec not in ("auto", "cpu", "cuda") and not spec.startswith("cuda:"):
        raise UsageError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA device is visible here; use --device cpu or auto")
    if spec in ("auto", "cuda"):
        launch = launch_environment()  # known before the process group is joined
        return torch.device("cuda") if launch is None else torch.device("cuda", local_gpu(launch))
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def local_gpu(launch: dict[str, int]) -> int:
    """The index of a launched rank's GPU: its local rank, modulo the GPUs the process sees (a job step
    that shows each task only its own GPU, `srun --gpus-per-task=1`, has one)."""
    import torch

    return launch["local_rank"] % torch.cuda.device_count()


def configure_device(device) -> None:
    """Process-wide settings for running networks on `device` (a torch.device from `resolve_device`).

    CUDA: make it the current device, allow TF32 matmuls (as the reference trains) and let cuDNN pick the
    fastest convolution algorithms for our fixed shapes. CPU: `tune_cpu_allocator`.
    """
    import torch

    if device.type == "cuda":
        if device.index is not None:  # plain "cuda" is the current device already
            torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
    elif device.type == "cpu":
        tune_cpu_allocator()


# torch.compile modes: "reduce-overhead" replays CUDA graphs (one launch per graph instead of one per
# kernel: what small, launch-bound network calls need), "max-autotune" also benchmarks kernel choices.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def cuda_speedups(networks, device, *, bf16: bool, compile: bool, action: str, compile_mode: str = "default") -> bool:
    """The `bf16` / `compile` options of training and forecasting, which apply on CUDA only: compiles
    `networks` in place when asked (`compile_mode`, one of COMPILE_MODES); returns whether to run under
    bfloat16 autocast. Elsewhere both are logged as ignored (`action` says what runs instead, e.g.
    "training in float32")."""
    assert compile_mode in COMPILE_MODES, compile_mode  # callers check user input
    if device.type != "cuda":
        if bf16 or compile:
            log.info("bf16 and compile apply on CUDA only; %s on %s", action, device)
        return False
    if compile:
        for network in networks:
            network.compile(mode=None if compile_mode == "default" else compile_mode)
    return bf16


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def tune_cpu_allocator() -> bool:
    """Make glibc keep freed tensor memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above its (adaptive) mmap threshold with a fresh mmap and
    trims the heap as soon as its free top exceeds a few hundred KiB, so every network call on the CPU
    page-faults its activations in again: in `benchmarks/sampler_overhead.py` a 6-7 s forecast took
    1.0-1.5 M page faults and 0.6-1.8 s of system time. With a 32 MiB mmap threshold (glibc's maximum) and
    a 1 GiB trim threshold the same run takes ~100 page faults and 0.1 s (the remedy PyTorch's CPU tuning
    guide reaches with jemalloc or tcmalloc). Costs at most 1 GiB of freed memory kept by the process.
    Returns False where the C library has no `mallopt` (not glibc); nothing changes then. Runs once per
    process (cached).
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the symbols already loaded into this process: libc's
    except (OSError, AttributeError):
        return False
    ok = all(mallopt(parameter, value) == 1 for parameter, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))
    log.debug("CPU allocator tuning %s", "applied" if ok else "refused by the C library")
    return ok


# ------------------------------------------------------------------------------------------------ process group

def launch_environment(environ: dict[str, str] | None = None) -> dict[str, int] | None:
    """Rank, world size and local rank from torchrun, or from srun when torchrun's variables are absent.

    srun's SLURM_PROCID/SLURM_NTASKS count only when the job step really has several tasks (a plain
    `sbatch` script with one task runs single-process); None when this process runs alone.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return {"rank": int(env["RANK"]), "world": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", "0"))}
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return {"rank": int(env["SLURM_PROCID"]), "world": int(env["SLURM_NTASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", "0"))}
    return None


def launch_rank(environ: dict[str, str] | None = None) -> int:
    """This process's rank in the launch (0 when it runs alone), known before the process group exists."""
    launch = launch_environment(environ)
    return launch["rank"] if launch is not None else 0


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; the collective helpers are no-ops for a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (on the backend's device, returned on `tensor`'s)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        reduced = tensor.to(_collective_device())
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sum(tensor) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (a stop request, "rank 0 failed")."""
        if self.world == 1:
            return flag
        import torch

        return bool(self.sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def average_gradients(self, network: torch.nn.Module) -> None:
        """One flat all-reduce of every gradient, divided by the world size."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad for p in network.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_module(self, network: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere (same start, same BatchNorm statistics)."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in list(network.parameters()) + list(network.buffers()):
                dist.broadcast(tensor.data, src=0)


def _collective_device() -> torch.device:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@contextmanager
def distributed(backend: str | None = None) -> Iterator[Ranks]:
    """Join (and leave) the process group when launched with several processes, else yield `Ranks()`.

    `backend` None picks nccl when CUDA is available and gloo otherwise; a workflow that only needs
    barriers and flags passes "gloo". Ranks other than 0 log warnings only, so a job logs its progress once.
    """
    launch = launch_environment()
    if launch is None or launch["world"] <= 1:
        yield Ranks()
        return
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    joined = not dist.is_initialized()
    if joined:
        if backend == "nccl":
            torch.cuda.set_device(local_gpu(launch))
        dist.init_process_group(backend, rank=launch["rank"], world_size=launch["world"])
    if launch["rank"] != 0:
        log.setLevel(logging.WARNING)
    try:
        yield Ranks(launch["rank"], launch["world"], launch["local_rank"])
    finally:
        if joined:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ signals

# SIGTERM: a batch system's pre-emption or `scancel`; SIGUSR1: SLURM's warning before the time limit.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopRequest:
    """The flag `stop_signals` yields: call it to poll; `signal_name` says which signal asked first."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self) -> bool:
        return self.signal_name is not None


def stop_after_block(stop_requested: StopRequest, written: int, total: int, command: str,
                     blocks: str = "time blocks") -> None:
    """Between two blocks of a prepare job that leaves a marker per block written (`prepare netcdf`,
    `prepare sst`): once a stop signal came, raise Interrupted (exit 75); the same command, re-run, skips
    the blocks written."""
    from dyfcli.errors import Interrupted

    if stop_requested():
        raise Interrupted(f"stopped by {stop_requested.signal_name} after writing {written} of {total} {blocks}; "
                          f"re-run the same `{command}` command to write the rest")


# Set (for the life of the process) by the first stop signal a `stop_signals` block receives: from then on
# the process is saving its state and exiting, and `stop_signals_outside` ignores further signals instead
# of cutting that short (a second SIGTERM once exited -15 after the state was saved, not 75).
_STOPPING = StopRequest()


@contextmanager
def stop_signals(action: str, sigint: bool = False) -> Iterator[StopRequest]:
    """Turn SIGTERM/SIGUSR1 (and SIGINT when `sigint`) into a flag the caller polls at a safe point.

    Yields a `StopRequest`: `stop_requested()` is True once a signal came. `action` completes the warning
    logged at the first signal ("received SIGTERM: <action>"); later signals are logged and change nothing.
    Python delivers signals to the main thread only, so elsewhere no handler is installed and the flag
    stays False.
    """
    requested = StopRequest()

    def request_stop(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if requested():
            log.warning("received %s again: still %s", name, action)
            return
        log.warning("received %s: %s", name, action)
        requested.signal_name = name
        _STOPPING.signal_name = _STOPPING.signal_name or name

    numbers = STOP_SIGNALS + ((signal.SIGINT,) if sigint and _sigint_wanted() else ())
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {number: signal.signal(number, request_stop) for number in numbers}
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class Terminated(BaseException):
    """SIGTERM/SIGUSR1 outside a `stop_signals` block (start-up, or a command that saves nothing): stop now.

    A BaseException, like KeyboardInterrupt, so that `except Exception` clean-up code does not swallow it.
    `exit_code` follows the shell's convention for a process ended by a signal: 128 + the signal number.
    """

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + int(signum)
        super().__init__(self.signal_name)


@contextmanager
def stop_signals_outside() -> Iterator[None]:
    """For the whole of a command: a stop signal outside any `stop_signals` block raises `Terminated`
    (SIGINT keeps raising KeyboardInterrupt), so the CLI still prints its error line (and JSON document)
    and exits with a documented code instead of dying silently; once a `stop_signals` block is saving
    state after a first signal, further signals are ignored so that its exit 75 (or 130) stands."""

    def stop(signum: int, _frame) -> None:
        if _STOPPING():
            log.warning("received %s again: already stopping after saving the state", signal.Signals(signum).name)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STOPPING.signal_name = None  # a new command (tests run several in one process)
    numbers = (*STOP_SIGNALS, signal.SIGINT) if _sigint_wanted() else STOP_SIGNALS
    previous = {number: signal.signal(number, stop) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            # Once stopping, the process is about to exit with its code: a late signal must not cut that short.
            signal.signal(number, signal.SIG_IGN if _STOPPING() else handler)


def _sigint_wanted() -> bool:
    """False when SIGINT was ignored when we started (a background job of a shell script): keep it so."""
    return signal.getsignal(signal.SIGINT) is not signal.SIG_IGN


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """Leave the stop signals (and Ctrl-C, which a terminal sends to every process of the job) to the main
    process (a DataLoader `worker_init_fn`: SLURM signals every process)."""
    for number in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)


def fault_point(name: str) -> None:
    """Test hook: die here (SIGKILL) when DYF_FAULT_KILL_AT names this point; a no-op otherwise."""
    if os.environ.get("DYF_FAULT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("DYF_FAULT_SIGTERM_AT") == name:  # handled before os.kill returns: a signal at this point
        os.kill(os.getpid(), signal.SIGTERM)
