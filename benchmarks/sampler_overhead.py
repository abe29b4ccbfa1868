"""Overhead of `dyf forecast` around the network calls it makes.

    .venv/bin/python benchmarks/sampler_overhead.py [--grid 32x32] [--members 8] [--horizon 8]
        [--inits 16] [--threads 1] [--dim 32] [--rounds 5] [--clock wall|cpu] [--pack 1]

Builds a dated data store and an untrained tiny-preset DYffusion checkpoint (network width `--dim`),
then times `forecast.run_forecast` (everything: checkpoint and store loading, schema creation, the block
loop, writing, completion) and, separately, one interpolator call and one forecaster call at the same
batch (the rows of every call, `forecast.call_rows`: `--members` up to 8 on CPU; MC dropout masks
included, as the sampler calls them). `--pack N` forecasts with `dyf forecast --pack N`. Prints

    overhead = forecast wall time / (forecaster calls x t_F + interpolator calls x t_I)

where the call counts are the batched calls the forecast made. The target is <= 1.10 on CPU. The
process first gets the settings `dyf forecast` gives it (`runtime.configure_device`). On a shared machine
the speed of the same call drifts by several per cent over seconds, so every forecast is bracketed by
call timings just before and after it and the figure is the median over `--rounds` of the per-round
ratios. It also times the network calls inside each run (wrapping the model's two callables) and prints
forecast time / time spent inside network calls per round, and the time of the same run with a zero-cost
stand-in model (dyf's own loop, I/O and setup alone).

Every run writes a new forecast store (the previous one is deleted outside the timing): deleting an old
store is what `--overwrite` costs a user who asks for it (0.1-0.9 s here for 128 blocks, on a busy
disk), not part of forecasting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def build_checkpoint(store, path: Path, dim: int) -> Path:
    from storefactory import make_untrained_checkpoint

    return make_untrained_checkpoint(store, path, overrides=(f"interpolator.network.hyper.dim={dim}",
                                                             f"forecaster.network.hyper.dim={dim}"))


# What the timings count (`--clock`): wall time, or CPU time (the whole process's for runs, which
# includes the block-writer thread; the calling thread's for network calls).
CLOCKS = {"run": time.perf_counter, "call": time.perf_counter}


def _timed(call, total: dict):
    def wrapper(*args, **kwargs):
        start = CLOCKS["call"]()
        try:
            return call(*args, **kwargs)
        finally:
            total["seconds"] += CLOCKS["call"]() - start
    return wrapper


def time_calls(model, store, members: int, repeats: int) -> tuple[float, float]:
    """Mean seconds of one interpolator and one forecaster call at batch `members` (no_grad, CPU)."""
    import torch

    from dyfcli.noise import MemberNoise

    ny, nx = store.grid
    channels = len(store.fields)
    x0 = torch.randn(members, channels, ny, nx)
    xh = torch.randn(members, channels, ny, nx)
    noise = MemberNoise.for_members(0, list(range(members)))
    time_in = torch.full((members,), 1.5)
    step = torch.full((members,), 3.0)

    def mean(call) -> float:
        # The mean, not the median: the forecast's wall time is a sum, and under load the tail matters.
        for _ in range(3):
            call()
        samples = []
        for _ in range(repeats):
            start = CLOCKS["call"]()
            call()
            samples.append(CLOCKS["call"]() - start)
        return statistics.mean(samples)

    with torch.no_grad():
        model.forecaster.eval()
        t_interpolator = mean(lambda: model.interpolate(x0, xh, time_in, noise.fold(1), None))
        t_forecaster = mean(lambda: model.forecast(x0, time_in, step, x0, noise.fold(2), None))
    return t_interpolator, t_forecaster


def fresh_output(request):
    """The request writing into a new store: the previous run's store is removed first, untimed."""
    import shutil

    shutil.rmtree(request.out, ignore_errors=True)
    return request


def timed_forecast(forecast, request) -> tuple[float, float, dict]:
    """(wall seconds of run_forecast, seconds spent inside the model's network callables, summary)."""
    import dyfcli.model

    request = fresh_output(request)

    in_loop = {"seconds": 0.0}
    build = dyfcli.model.dyffusion_from_checkpoint

    def timed_build(checkpoint, device):
        """The real model, with its two network callables timed where the sampler calls them."""
        model = build(checkpoint, device)
        for name in ("interpolate", "forecast"):
            setattr(model, name, _timed(getattr(model, name), in_loop))
        return model

    dyfcli.model.dyffusion_from_checkpoint = timed_build  # forecast.load_method imports it at run time
    try:
        start = CLOCKS["run"]()
        summary = forecast.run_forecast(request)
        wall = CLOCKS["run"]() - start
    finally:
        dyfcli.model.dyffusion_from_checkpoint = build
    return wall, in_loop["seconds"], summary


class InstantModel:
    """A zero-cost stand-in with the real model's horizon and call counts: what is left is dyf's own loop."""

    def __init__(self, model):
        self.horizon = model.settings.horizon
        self._calls = model.network_calls("full")

    def sample_window(self, x0, static_cond, noise, **options):
        return x0[:, None].expand(x0.shape[0], self.horizon, *x0.shape[1:])

    def network_calls(self, **options):
        return self._calls


def loop_only_seconds(forecast, request, model) -> float:
    """Wall time of run_forecast with the network calls replaced by nothing."""
    load = forecast.load_method
    forecast.load_method = lambda checkpoint, device, steps: forecast.Method("instant", InstantModel(model), {})
    request = fresh_output(request)
    try:
        start = CLOCKS["run"]()
        forecast.run_forecast(request)
        return CLOCKS["run"]() - start
    finally:
        forecast.load_method = load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="32x32")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--horizon", type=int, default=8, help="lead times (the tiny model's h is 4)")
    parser.add_argument("--inits", type=int, default=16,
                        help="initial times per series (4 series): 64 blocks by default, a ~12 s forecast, so the "
                             "one-off start-up (checkpoint, store schema, completion: ~0.2 s) weighs as little "
                             "as in real forecasts of hundreds to thousands of blocks; --inits 4 shows it")
    parser.add_argument("--dim", type=int, default=32, help="network width")
    parser.add_argument("--pack", type=int, default=1, help="blocks per network batch (`dyf forecast --pack`)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per network and round")
    parser.add_argument("--rounds", type=int, default=5, help="forecasts, each bracketed by call timings")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="wall",
                        help="wall (default): elapsed time, as the target is stated; cpu: CPU time (the "
                             "process's for forecasts, block-writer thread included; the thread's for calls)")
    args = parser.parse_args()
    if args.clock == "cpu":
        CLOCKS.update(run=time.process_time, call=time.thread_time)

    import torch

    import dyfcli.model
    from dyfcli import forecast
    from dyfcli.checkpoint import load_checkpoint
    from dyfcli.runtime import configure_device
    from dyfcli.store import open_store
    from storefactory import make_store

    torch.set_num_threads(args.threads)
    # The process settings `dyf forecast` applies (CPU: glibc keeps freed tensor memory), so the network
    # calls timed alone below run under the same conditions as inside the forecast.
    configure_device(torch.device("cpu"))
    ny, nx = (int(n) for n in args.grid.split("x"))
    folder = Path(tempfile.mkdtemp(prefix="dyf-bench-forecast-"))
    steps = 3 * (args.inits + args.horizon)  # the test split is the last third
    store = open_store(make_store(folder / "data.zarr", dated=True, steps=steps, grid=(ny, nx), series=4))
    ckpt = build_checkpoint(store, folder / "model.pt", args.dim)
    request = forecast.ForecastRequest(checkpoint=ckpt, out=folder / "forecast.zarr", horizon=args.horizon,
                                       ensemble=args.members, data=store.path, seed=0, device="cpu",
                                       pack=args.pack)
    model = dyfcli.model.dyffusion_from_checkpoint(load_checkpoint(ckpt), torch.device("cpu"))

    # Each forecast is bracketed by timings of the calls alone just before and just after it, so the
    # forecast and its denominator see the same machine conditions (on a shared machine the speed of the
    # same call drifts by several per cent over seconds); the figure is the median of the per-round ratios.
    calls = model.network_calls("full")
    rows, _ = forecast.call_rows(args.members, args.members, args.pack, torch.device("cpu"))  # rows per call

    def network_seconds(timings: tuple[float, float], summary: dict) -> float:
        t_interpolator, t_forecaster = timings
        batches = summary["batched_network_calls"] // calls.total  # sampling passes: one per batch and window
        return batches * (calls.forecaster * t_forecaster + calls.interpolator * t_interpolator)

    rounds = []
    before = time_calls(model, store, rows, args.repeats)
    for _ in range(args.rounds):
        wall, in_loop, summary = timed_forecast(forecast, request)
        after = time_calls(model, store, rows, args.repeats)
        alone = statistics.mean(network_seconds(timings, summary) for timings in (before, after))
        rounds.append({"wall": wall, "in_loop": in_loop, "network": alone, "timings": (before, after)})
        before = after
    loop_only = min(loop_only_seconds(forecast, request, model) for _ in range(args.rounds))
    ratios = [r["wall"] / r["network"] for r in rounds]
    overhead = statistics.median(ratios)
    network = statistics.median(r["network"] for r in rounds)
    t_interpolator = statistics.median(t[0] for r in rounds for t in r["timings"])
    t_forecaster = statistics.median(t[1] for r in rounds for t in r["timings"])
    result = {
        "clock": args.clock, "grid": [ny, nx], "members": args.members, "horizon": args.horizon,
        "windows": summary["windows"], "blocks": summary["blocks_written"], "threads": args.threads,
        "dim": args.dim, "pack": args.pack, "rows_per_call": rows, "batched_calls": summary["batched_network_calls"],
        "t_interpolator_ms": round(1e3 * t_interpolator, 3), "t_forecaster_ms": round(1e3 * t_forecaster, 3),
        "forecast_s_per_round": [round(r["wall"], 3) for r in rounds],
        "network_s_per_round": [round(r["network"], 3) for r in rounds],
        "overhead_per_round": [round(ratio, 3) for ratio in ratios],
        "overhead": round(overhead, 3),
        "overhead_vs_in_loop_per_round": [round(r["wall"] / r["in_loop"], 3) for r in rounds],
        "loop_only_s": round(loop_only, 3),
        "loop_only_ms_per_block": round(1e3 * loop_only / summary["blocks_written"], 2),
        "loop_only_share_of_network": round(loop_only / network, 4),
    }
    print(json.dumps(result, indent=2))
    print(f"overhead = {result['overhead']} (target <= 1.10; median of rounds {result['overhead_per_round']}): "
          f"forecast of {summary['batched_network_calls']} batched calls; forecast / in-loop network time per "
          f"round: {result['overhead_vs_in_loop_per_round']}; with a zero-cost model the whole run takes "
          f"{loop_only:.2f} s ({result['loop_only_share_of_network']:.1%} of the network time)")


if __name__ == "__main__":
    main()
