"""Process-level concerns shared by every workflow: logging, progress reporting, device choice.

The library logs through `logging`; only the CLI prints. Progress is a Rich bar when stderr is a terminal
and plain periodic log lines otherwise, so batch jobs show progress in their log files.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

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


class Progress:
    """Count work done towards a total; draw a bar on a terminal or log every few seconds otherwise."""

    def __init__(self, description: str, total: int | None, unit: str = "it"):
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self._start = time.monotonic()
        self._last_log = self._start
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
                TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.description, total=self.total)
        else:
            log.info("%s: started (%s %s)", self.description, self.total if self.total is not None else "?", self.unit)
        return self

    def advance(self, n: int = 1, **info: object) -> None:
        self.done += n
        if self._rich is not None:
            self._rich.update(self._task, advance=n)
            return
        now = time.monotonic()
        if now - self._last_log >= PLAIN_PROGRESS_INTERVAL_S:
            self._last_log = now
            self._log_line(info)

    def _log_line(self, info: dict) -> None:
        elapsed = time.monotonic() - self._start
        total = f"/{self.total}" if self.total is not None else ""
        rate = self.done / elapsed if elapsed > 0 else 0.0
        extra = "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in info.items())
        log.info("%s: %d%s %s (%.3g %s/s, %.0f s)%s", self.description, self.done, total, self.unit,
                 rate, self.unit, elapsed, extra)

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
        elif exc[0] is None:
            self._log_line({})


@contextmanager
def progress(description: str, total: int | None, unit: str = "it") -> Iterator[Progress]:
    with Progress(description, total, unit) as bar:
        yield bar


def resolve_device(spec: str = "auto"):
    """Turn `auto|cpu|cuda|cuda:N` into a torch.device; auto picks the GPU when there is one."""
    import torch

    from dyfcli.errors import UsageError

    if spec == "auto":
        if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA device is visible here; use --device cpu or auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise UsageError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N")
