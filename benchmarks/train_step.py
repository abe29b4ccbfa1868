"""Training step time of `dyf train-*` (dyfcli.train) versus a bare forward/backward/AdamW loop.

The bare loop is what any training step must do: the method's loss on a batch already in memory,
backward, AdamW step. dyfcli.train adds batching, device transfer, per-step reseeding, gradient clipping,
learning-rate setting and logging (every step here: the worst case). Target: ratio <= 1.10 with the
windows in memory (the loop's own overhead); the run reading windows from the store is printed too.

    .venv/bin/python benchmarks/train_step.py [--stage interpolator|forecaster] [--grid 32] [--dim 16]
        [--batch 8] [--steps 40] [--threads 1] [--device cpu] [--clock cpu|wall] [--repeats 3]

How: dyf's time per step is (time of a run of WARMUP + steps steps - time of a run of WARMUP steps) /
steps, so set-up and the final validation cancel; the bare loop is timed over `steps` steps after WARMUP.
`--clock cpu` (the default on CPU) counts this process's CPU time, which other processes on a shared
machine disturb far less than wall time; DataLoader workers are off so all work is in this process.
Each figure is the best of `--repeats` interleaved repeats.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

WARMUP = 10


def settings(args, steps: int) -> list[str]:
    stage = args.stage
    return [f"{stage}.network.kind=unet", f"{stage}.network.hyper={{dim: {args.dim}, dim_mults: [1, 2]}}",
            f"{stage}.network.dropout={{block_dropout: 0.1}}", f"{stage}.max_steps={steps}", f"{stage}.epochs=1000",
            f"data.batch_size={args.batch}", "data.num_workers=0", "training.validate_every=100000",
            "training.val_max_batches=1", "training.log_every=1", "training.val_ensemble=2"]


def clock(args) -> float:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.process_time() if args.clock == "cpu" else time.perf_counter()


@contextmanager
def windows_in_memory():
    """Serve every window from memory, so the figure is the loop's alone (not the store reads')."""
    import dyfcli.data

    original = dyfcli.data.WindowDataset

    class CachedWindows(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.items = [super(CachedWindows, self).__getitem__(i) for i in range(len(self))]

        def __getitem__(self, index):
            return self.items[index]

    dyfcli.data.WindowDataset = CachedWindows
    try:
        yield
    finally:
        dyfcli.data.WindowDataset = original


def dyf_run(store: Path, out: Path, args, interpolator: Path | None, steps: int) -> float:
    """Time of one whole training run of `steps` steps."""
    from dyfcli.config import load_config
    from dyfcli.train import train_forecaster, train_interpolator

    started = clock(args)
    if args.stage == "interpolator":
        train_interpolator(store, out, load_config("tiny", settings(args, steps)), device=args.device, overwrite=True)
    else:
        train_forecaster(store, out, interpolator=interpolator, preset="tiny", overrides=settings(args, steps),
                         device=args.device, overwrite=True)
    return clock(args) - started


def dyf_seconds_per_step(store: Path, folder: Path, args, interpolator: Path | None) -> float:
    long = dyf_run(store, folder / "long.pt", args, interpolator, WARMUP + args.steps)
    short = dyf_run(store, folder / "short.pt", args, interpolator, WARMUP)
    return (long - short) / args.steps


def bare_seconds_per_step(store: Path, args, interpolator_path: Path | None) -> float:
    from dyfcli.checkpoint import load_checkpoint
    from dyfcli.config import load_config
    from dyfcli.data import WindowDataset
    from dyfcli.train import build_method, forecaster_config

    device = torch.device(args.device)
    interpolator = load_checkpoint(interpolator_path) if interpolator_path else None
    overrides = settings(args, WARMUP + args.steps)
    config = forecaster_config(interpolator, "tiny", overrides) if interpolator else load_config("tiny", overrides)
    dataset = WindowDataset(store, "train", config.data.horizon + 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True)
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for _, b in zip(range(8), loader)]
    torch.manual_seed(0)
    method = build_method("interpolator" if interpolator is None else "dyffusion", config, len(dataset.fields),
                          len(dataset.cond_names), interpolator)
    method.to(device)
    method.network.train()
    optimizer = torch.optim.AdamW([p for p in method.network.parameters() if p.requires_grad], lr=1e-4,
                                  betas=(0.9, 0.99))
    for step in range(WARMUP + args.steps):
        if step == WARMUP:
            started = clock(args)
        loss, _ = method.loss(batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (clock(args) - started) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("interpolator", "forecaster"), default="interpolator")
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    torch.set_num_threads(args.threads)
    from dyfcli.config import load_config
    from dyfcli.runtime import configure_device

    # The process settings dyf's training applies (CPU: glibc keeps freed tensor memory), for both loops.
    configure_device(torch.device(args.device))
    from dyfcli.train import train_interpolator
    from storefactory import make_store

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = make_store(folder / "bench.zarr", series=8, steps=60, grid=(args.grid, args.grid))
        interpolator = None
        if args.stage == "forecaster":  # a briefly trained interpolator with the same backbone
            interpolator = folder / "stage1.pt"
            stage1 = argparse.Namespace(**{**vars(args), "stage": "interpolator"})
            train_interpolator(store, interpolator, load_config("tiny", settings(stage1, 2)), device=args.device)
        bare, in_memory, from_store = math.inf, math.inf, math.inf
        for _ in range(args.repeats):
            bare = min(bare, bare_seconds_per_step(store, args, interpolator))
            with windows_in_memory():
                in_memory = min(in_memory, dyf_seconds_per_step(store, folder, args, interpolator))
            from_store = min(from_store, dyf_seconds_per_step(store, folder, args, interpolator))
    print(f"{args.stage} step, unet dim {args.dim}, batch {args.batch}, {args.grid}x{args.grid}, {args.device}, "
          f"{args.threads} thread(s); {args.clock} time per step, best of {args.repeats}, {args.steps} steps each")
    print(f"  bare forward/backward/AdamW (batches in memory): {bare * 1000:8.1f} ms")
    print(f"  dyf train loop, windows in memory:                {in_memory * 1000:8.1f} ms  "
          f"ratio {in_memory / bare:.3f} (target <= 1.10)")
    print(f"  dyf train loop, windows read from the store:      {from_store * 1000:8.1f} ms  "
          f"ratio {from_store / bare:.3f}")


if __name__ == "__main__":
    main()
