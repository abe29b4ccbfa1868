"""`dyf evaluate --scheduler ADDRESS`: the blocks of a forecast scored by the workers of a Dask cluster.

The client splits the `(field, series, init)` keys into tasks of a few whole blocks (all fields of a
`(series, init)`), enough tasks to keep every worker thread busy. A task gets paths and options, never
arrays: it opens the forecast and data stores itself (once per worker process and evaluation, kept in
`_OPENED`), scores its blocks with `evaluate.scored_sums` and returns their sums (a few KB per block).
The client adds them in block order, as one process and torchrun's rank 0 do, so the scores are the same
bit for bit (the same additions in the same order; the workers run the same numpy code). Tie-breaking
draws for the rank histogram happen when sums are added, on the client, from `--seed`.

The workers must see the stores at the same absolute paths as this process (a shared file system) and
run the same dyf; a worker that cannot find a store raises a DataError naming the path.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dyfcli.errors import DataError, UsageError

log = logging.getLogger("dyf.evaluate")

TASKS_PER_THREAD = 4  # tasks per worker thread: the slow last ones are short, and the in-order window stays full
MAX_BLOCKS_PER_TASK = 8  # blocks per task at most: progress moves, and a lost worker redoes little


@dataclass(frozen=True)
class Run:
    """What a task needs to open the inputs of one evaluation (paths absolute, options resolved)."""

    token: str  # one evaluation: a worker reopens the stores for the next one
    forecast_path: str
    truth_path: str
    allow_other_truth: bool
    options: object  # evaluate.ScoreOptions with the weights decided
    device: str


@dataclass(frozen=True)
class Cluster:
    """A connected Dask cluster for `evaluate.score`."""

    client: object  # distributed.Client
    address: str
    allow_other_truth: bool = False

    def scored(self, inputs, keys: list[tuple[str, int, int]], options, device: str) -> Iterator[tuple[int, list, int]]:
        """(key number, the sums that key adds, bytes it read) for every key of `keys`, in that order,
        scored by the cluster's tasks; a progress bar on this process counts the blocks."""
        from dyfcli.cluster import in_order, worker_threads
        from dyfcli.runtime import progress

        threads = worker_threads(self.client, self.address)
        n_fields = len(inputs.fields)
        batches = task_batches(len(keys), n_fields, threads)
        run = Run(uuid.uuid4().hex, str(Path(inputs.forecast_path).resolve()),
                  str(Path(inputs.truth_path).resolve()), self.allow_other_truth, options, device)
        log.info("scoring %d blocks in %d tasks on %d worker threads of %s", len(keys) // n_fields, len(batches),
                 threads, self.address)
        with progress("evaluate", len(keys) // n_fields, "blocks") as bar:
            results = in_order(self.client, score_task, [[keys[n] for n in batch] for batch in batches], run,
                               in_flight=TASKS_PER_THREAD * threads)
            for batch, sums in zip(batches, results):
                for number, (parts, n_bytes) in zip(batch, sums):
                    yield number, parts, n_bytes
                bar.advance(len(batch) // n_fields)
        self.client.run(_forget, run.token)  # the workers drop the opened stores (their statistics are large)


def task_batches(n_keys: int, n_fields: int, threads: int) -> list[range]:
    """Consecutive key numbers, a whole number of blocks (`n_fields` keys each) per task: about
    `TASKS_PER_THREAD` tasks per worker thread, 1 to `MAX_BLOCKS_PER_TASK` blocks each."""
    n_blocks = n_keys // n_fields
    blocks = max(1, min(MAX_BLOCKS_PER_TASK, n_blocks // (TASKS_PER_THREAD * threads)))
    size = blocks * n_fields
    return [range(start, min(start + size, n_keys)) for start in range(0, n_keys, size)]


def score_task(keys: list[tuple[str, int, int]], run: Run) -> list[tuple[list, int]]:
    """A Dask task: the sums of `keys` and the bytes each read (`evaluate.scored_sums`), in key order."""
    from dyfcli.evaluate import scored_sums

    inputs = _opened(run)
    return scored_sums(inputs, keys, run.options.units == "standardized", run.device)


_OPENED: dict[str, object] = {}  # run token -> evaluate.Inputs, in a worker process: the latest run only
_OPENING = threading.Lock()


def _opened(run: Run):
    """The inputs of `run`, opened and checked once per worker process (a worker with several threads
    opens them once); the previous evaluation's are dropped."""
    with _OPENING:
        if run.token not in _OPENED:
            _OPENED.clear()
            _OPENED[run.token] = _open(run)
        return _OPENED[run.token]


def _forget(token: str) -> None:
    """Drop the inputs of the evaluation `token` (run on every worker when it is done)."""
    with _OPENING:
        _OPENED.pop(token, None)


def _open(run: Run):
    from dyfcli.evaluate import open_inputs, resolve_options

    for what, path in (("forecast store", run.forecast_path), ("data store", run.truth_path)):
        if not Path(path).exists():
            raise DataError(f"the Dask worker {_worker_name()} cannot open the {what} {path}: it does not exist "
                            "there; the workers must see the same file system as `dyf evaluate` (put the "
                            "stores on a shared path, or drop --scheduler)")
    if run.device != "cpu":
        _check_device(run.device)
    inputs = open_inputs(Path(run.forecast_path), Path(run.truth_path), run.allow_other_truth)
    resolve_options(inputs, run.options)  # sets the area weights; the weights were decided by the client
    return inputs


def _check_device(device: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: the Dask worker {_worker_name()} has no CUDA device; "
                         "pass --device cpu to score on the workers' CPUs")


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # called outside a worker
        return "(not a worker)"
