"""Dask distributed clusters: connect to a scheduler (`--scheduler ADDRESS`, default env
DASK_SCHEDULER_ADDRESS) and run tasks on its workers with their results handed back in submission order.

Used by `dyf prepare sst` and `dyf prepare netcdf` (the workers read and decode raw files) and by
`dyf evaluate` (the workers score blocks). Paths travel to the workers, not arrays, so the workers must see
the same file system as this process. `distributed` is optional (the `cluster` extra) and imported only
when an address is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from dyfcli.errors import UsageError

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
WORKER_WAIT = "30s"  # how long `dyf evaluate` waits for a scheduler without workers to get one


def scheduler_address(address: str | None) -> str | None:
    """`--scheduler`, else env DASK_SCHEDULER_ADDRESS; None (work in this process) when neither is set."""
    return address or os.environ.get(SCHEDULER_ENV) or None


def connect_scheduler(address: str | None):
    """A `distributed.Client` for `address` (or env DASK_SCHEDULER_ADDRESS); None for local threads.
    UsageError (exit 2) when `distributed` is missing or the scheduler cannot be reached."""
    address = scheduler_address(address)
    if not address:
        return None
    try:
        from distributed import Client
    except ImportError:
        raise UsageError(f"--scheduler {address} needs the Dask 'distributed' package: pip install distributed") from None
    _check_address(address)
    try:
        return Client(address, timeout="15s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        raise UsageError(f"cannot reach the Dask scheduler at {address} ({err}); check --scheduler "
                         f"or {SCHEDULER_ENV}") from None


def _check_address(address: str) -> None:
    """UsageError for an address that cannot name a scheduler: a Client that fails on it before
    connecting hangs 30 s in its finaliser at exit and prints a traceback."""
    from distributed.comm import parse_address, parse_host_port
    from distributed.comm.registry import backends

    try:
        scheme, location = parse_address(address, strict=False)
        if scheme not in backends:
            raise ValueError(f"unknown scheme {scheme!r}, known: {', '.join(sorted(backends))}")
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except ValueError as err:
        raise UsageError(f"--scheduler {address} is not a Dask scheduler address ({err}); give one like "
                         f"tcp://HOST:8786, or check {SCHEDULER_ENV}") from None


@contextmanager
def connected(address: str | None) -> Iterator[object | None]:
    """`connect_scheduler(address)` for the `with` block, closed at its end (None without an address)."""
    client = connect_scheduler(address)
    try:
        yield client
    finally:
        if client is not None:
            client.close()


def worker_threads(client, address: str) -> int:
    """The threads of all the scheduler's workers, waiting `WORKER_WAIT` for a first worker (a cluster
    just started); UsageError when none comes, since tasks would wait for ever."""
    if not client.nthreads():
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT)
        except TimeoutError:
            raise UsageError(f"the Dask scheduler at {address} has no workers (waited {WORKER_WAIT}); start "
                             f"some with `dask worker {address}`, or drop --scheduler/{SCHEDULER_ENV}") from None
    return max(1, sum(client.nthreads().values()))


def in_order(client, function: Callable, batches: Sequence, *args, in_flight: int) -> Iterator:
    """`function(batch, *args)` for every batch as a Dask task, at most `in_flight` tasks ahead of the
    first unfinished one; yields the results in the order of `batches`, each as soon as it and all
    before it are done, so the caller can add them up in a fixed order whichever worker finished first.
    A task's exception (a `DyfError` raised on a worker keeps its class) is raised here; the tasks not
    yet finished are then cancelled."""
    from distributed import as_completed

    finished = as_completed(loop=client.loop)
    pending = {}  # task key -> (batch index, future)
    results: dict[int, object] = {}  # finished out of order, waiting for an earlier batch
    submitted = next_out = 0

    def submit_up_to(limit: int) -> None:
        nonlocal submitted
        while submitted < min(len(batches), limit):
            future = client.submit(function, batches[submitted], *args, pure=False)
            pending[future.key] = (submitted, future)
            finished.add(future)
            submitted += 1

    try:
        submit_up_to(in_flight)
        for future in finished:
            index, _ = pending.pop(future.key)
            results[index] = future.result()
            future.release()
            while next_out in results:
                yield results.pop(next_out)
                next_out += 1
            submit_up_to(next_out + in_flight)
    finally:
        if pending:  # stopped early (an error, a signal): leave no tasks running on the cluster
            client.cancel([future for _, future in pending.values()])
