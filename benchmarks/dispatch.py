"""Dispatch cost: operations and microseconds per network call at a tiny grid, on CPU.

    .venv/bin/python benchmarks/dispatch.py [--preset sst] [--grid 8] [--members 8] [--batch 8]
        [--threads 1] [--repeats 20] [--json F]

On a big GPU a small network call is launch-bound: its time is the number of kernels it launches times
the CPU cost of launching one, not its FLOPs. At a tiny grid a CPU is in the same regime (the arithmetic
of each operation is negligible next to PyTorch's per-operation dispatch), so a change that cuts GPU
launch overhead (fewer operations, fused mask generation, CUDA graphs, compile) shows here as fewer
operations per network call and fewer microseconds per call, without a GPU.

Rows of the table (networks of `--preset`, untrained; one store field, no conditioning):
  interpolator call   one MC-dropout interpolator call of `--members` rows, masks from `MemberNoise`
                      (all masks of the call drawn together: `mc_dropout`'s mask plan, learnt on the first call)
  interpolator 1-by-1 the same call with each dropout layer drawing its own mask (`batch_masks=False`, as
                      before mask batching; the masks are bit for bit the same)
  interpolator plain  the same call without MC dropout (the difference is the cost of the masks)
  forecaster call     one forecaster call (its forward conditioning included)
  sampling window     `model.sample_window` of one DYffusion window (all its network calls; per call)
  train interpolator  one optimiser step of stage 1 (loss, backward, clipping, AdamW) on `--batch` windows
  train forecaster    one optimiser step of stage 2 (per network call it makes)
Columns: network calls per measured unit; aten operations (TorchDispatchMode: what reaches the kernels,
backward included) and torch calls (TorchFunctionMode: Python-level torch functions and tensor methods)
per network call; microseconds per network call (median of `--repeats` timed units, no mode active) and
per aten operation. Last line: the interpolator call with its MC-dropout masks drawn together against layer
by layer, timed side by side (alternated pairs: a ratio that holds on a shared machine).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


class AtenOps(TorchDispatchMode):
    """Counts the aten operations that reach the kernels (by name, for the top list)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class TorchCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called from Python."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class NetworkCalls:
    """Counts forward calls of the given top-level networks (hooks removed on `close`)."""

    def __init__(self, networks):
        self.count = 0
        self.handles = [net.register_forward_pre_hook(self._seen) for net in networks]

    def _seen(self, *_):
        self.count += 1

    def close(self):
        for handle in self.handles:
            handle.remove()


def measure(name: str, unit, networks, repeats: int) -> dict:
    """Operations and time of `unit()` (called untimed twice first: MC-dropout calls learn their mask plan on
    the first call with a shape and build its constant vectors on the second) per network call."""
    unit()
    unit()
    calls = NetworkCalls(networks)
    aten, python = AtenOps(), TorchCalls()
    with aten, python:
        unit()
    calls.close()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        unit()
        samples.append(time.perf_counter() - start)
    per_call = statistics.median(samples) / calls.count
    ops = sum(aten.ops.values())
    return {"what": name, "network_calls": calls.count, "aten_ops_per_call": round(ops / calls.count, 1),
            "torch_calls_per_call": round(python.count / calls.count, 1), "us_per_call": round(1e6 * per_call, 1),
            "us_per_aten_op": round(1e6 * per_call * calls.count / ops, 2),
            "top_ops": dict(aten.ops.most_common(8))}


def _interpolate_layer_by_layer(model, x, time_in, noise):
    """`model.interpolate` as before mask batching: each dropout layer hashes its own mask."""
    from dyfcli.networks import mc_dropout

    with mc_dropout(model.interpolator, noise, batch_masks=False):
        return model.interpolator(torch.cat([x, x], 1), time_in, None)


def sampler_rows(model, members: int, grid: int, repeats: int) -> list[dict]:
    from dyfcli.noise import MemberNoise

    x = torch.randn(members, 1, grid, grid)
    noise = MemberNoise.for_members(0, list(range(members)))
    time_in, step = torch.full((members,), 1.5), torch.full((members,), 3.0)
    nets = [model.interpolator, model.forecaster]
    with torch.inference_mode():
        model.forecaster.eval()
        model.interpolator.eval()
        return [
            measure("interpolator call", lambda: model.interpolate(x, x, time_in, noise.fold(1), None), nets, repeats),
            measure("interpolator 1-by-1", lambda: _interpolate_layer_by_layer(model, x, time_in, noise.fold(1)), nets,
                    repeats),
            measure("interpolator plain", lambda: model.interpolator(torch.cat([x, x], 1), time_in, None), nets,
                    repeats),
            measure("forecaster call", lambda: model.forecast(x, time_in, step, x, noise.fold(2), None), nets,
                    repeats),
            measure("sampling window", lambda: model.sample_window(x, None, noise), nets, max(2, repeats // 10)),
        ]


def paired_ratio(first, second, pairs: int) -> dict:
    """Seconds of `first()` over seconds of `second()`, timed alternately (on a shared machine the speed
    drifts over seconds, so each ratio compares calls made side by side); medians over `pairs` pairs."""
    first(), second()
    units = [first, second]
    times: list[list[float]] = []
    for index in range(pairs):
        seconds = [0.0, 0.0]
        for which in ((0, 1) if index % 2 == 0 else (1, 0)):  # alternate which goes first
            start = time.perf_counter()
            units[which]()
            seconds[which] = time.perf_counter() - start
        times.append(seconds)
    return {"ratio": round(statistics.median(a / b for a, b in times), 3),
            "us_first": round(1e6 * statistics.median(a for a, _ in times), 1),
            "us_second": round(1e6 * statistics.median(b for _, b in times), 1), "pairs": pairs}


def mask_batching(model, members: int, grid: int, pairs: int) -> dict:
    """One MC-dropout interpolator call with its masks drawn together vs layer by layer, side by side."""
    from dyfcli.noise import MemberNoise

    x = torch.randn(members, 1, grid, grid)
    noise = MemberNoise.for_members(0, list(range(members))).fold(1)
    time_in = torch.full((members,), 1.5)
    with torch.inference_mode():
        model.interpolator.eval()
        return paired_ratio(lambda: model.interpolate(x, x, time_in, noise, None),
                            lambda: _interpolate_layer_by_layer(model, x, time_in, noise), pairs)


def training_rows(config, checkpoint, batch: int, grid: int, repeats: int) -> list[dict]:
    from dyfcli.train import build_method

    horizon = config.data.horizon
    data = {"dynamics": torch.randn(batch, horizon + 1, 1, grid, grid),
            "condition": torch.zeros(batch, 0, grid, grid)}
    rows = []
    for stage, label in (("interpolator", "train interpolator"), ("dyffusion", "train forecaster")):
        torch.manual_seed(0)
        method = build_method(stage, config, 1, 0, checkpoint.interpolator if stage == "dyffusion" else None)
        network = method.network
        network.train()
        optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            loss, _ = method.loss(data)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        model = method.model if hasattr(method, "model") else None
        nets = [net for net in (getattr(model, "interpolator", None), getattr(model, "forecaster", None)) if net]
        rows.append(measure(label, step, nets or [network], repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sst", help="networks of this preset (sst: the paper's Unet)")
    parser.add_argument("--grid", type=int, default=8, help="tiny square grid: the launch-bound regime")
    parser.add_argument("--members", type=int, default=8, help="rows of a sampler call")
    parser.add_argument("--batch", type=int, default=8, help="windows of a training step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    from dyfcli.checkpoint import load_checkpoint
    from dyfcli.config import load_config
    from dyfcli.model import dyffusion_from_checkpoint
    from dyfcli.runtime import configure_device
    from dyfcli.store import open_store
    from storefactory import make_store, make_untrained_checkpoint

    torch.set_num_threads(args.threads)
    configure_device(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="dyf-dispatch-") as tmp:
        store = open_store(make_store(Path(tmp) / "s.zarr", fields=("sst",), series=1, steps=24,
                                      grid=(args.grid, args.grid)))
        checkpoint = load_checkpoint(make_untrained_checkpoint(store, Path(tmp) / "m.pt", preset=args.preset))
    model = dyffusion_from_checkpoint(checkpoint, torch.device("cpu"))
    rows = sampler_rows(model, args.members, args.grid, args.repeats)
    masks = mask_batching(model, args.members, args.grid, max(10, 2 * args.repeats))
    rows += training_rows(load_config(args.preset, []), checkpoint, args.batch, args.grid, max(3, args.repeats // 4))
    print(f"preset {args.preset}, grid {args.grid}x{args.grid}, {args.members} member rows, training batch "
          f"{args.batch}, {args.threads} thread(s), torch {torch.__version__}")
    header = f"{'':20} {'net calls':>9} {'aten ops/call':>14} {'torch calls/call':>17} {'us/call':>10} {'us/op':>7}"
    print(header)
    for row in rows:
        print(f"{row['what']:20} {row['network_calls']:>9} {row['aten_ops_per_call']:>14} "
              f"{row['torch_calls_per_call']:>17} {row['us_per_call']:>10} {row['us_per_aten_op']:>7}")
    for row in rows:
        print(f"top aten ops, {row['what']}: {row['top_ops']}")
    ops = {row["what"]: row["aten_ops_per_call"] for row in rows}
    print(f"MC-dropout masks drawn together: {ops['interpolator call']} aten ops per interpolator call vs "
          f"{ops['interpolator 1-by-1']} layer by layer ({ops['interpolator plain']} without dropout); time "
          f"together / layer by layer = {masks['ratio']} ({masks['us_first']} vs {masks['us_second']} us, "
          f"medians of {masks['pairs']} alternated pairs)")
    if args.json is not None:
        args.json.write_text(json.dumps({"preset": args.preset, "grid": args.grid, "members": args.members,
                                         "batch": args.batch, "threads": args.threads, "rows": rows,
                                         "mask_batching": masks}, indent=2))


if __name__ == "__main__":
    main()
