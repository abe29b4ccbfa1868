"""Training step time of `dyf train-*` (dyfcli.train) versus a bare forward/backward/AdamW loop.

The bare loop is what any training step must do: the method's loss on a batch already in memory,
backward, AdamW step. dyfcli.train adds batching, device transfer, per-step reseeding, gradient clipping,
learning-rate setting and logging (every step here: the worst case). Target: ratio <= 1.10 with the
windows in memory (the loop's own overhead); the run reading windows from the store is printed too.

    .venv/bin/python benchmarks/train_step.py [--stage interpolator|forecaster] [--grid 32] [--dim 16]
        [--batch 8] [--steps 40] [--workers 1] [--threads 2] [--device cpu] [--repeats 3]

Each figure is the best of `--repeats` interleaved medians over `--steps` steps after a warm-up of 10:
dyf's from the timestamps of its metrics.jsonl step records (millisecond resolution, no validation in
between), the bare loop's timed directly.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

WARMUP = 10


def settings(args) -> list[str]:
    network = [f"{args.stage}.network.kind=unet", f"{args.stage}.network.hyper={{dim: {args.dim}, dim_mults: [1, 2]}}",
               f"{args.stage}.network.dropout={{block_dropout: 0.1}}"]
    return [*network, f"{args.stage}.max_steps={args.steps + WARMUP}", f"{args.stage}.epochs=1000",
            f"data.batch_size={args.batch}", f"data.num_workers={args.workers}", "training.validate_every=100000",
            "training.val_max_batches=1", "training.log_every=1", "training.val_ensemble=2"]


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


def dyf_seconds_per_step(store: Path, folder: Path, args, interpolator: Path | None, name: str) -> float:
    from dyfcli.config import load_config
    from dyfcli.train import train_forecaster, train_interpolator

    out = folder / f"{args.stage}-{name}.pt"
    if args.stage == "interpolator":
        train_interpolator(store, out, load_config("tiny", settings(args)), device=args.device)
    else:
        train_forecaster(store, out, interpolator=interpolator, preset="tiny", overrides=settings(args),
                         device=args.device)
    records = [json.loads(line) for line in (Path(str(out) + ".run") / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if "loss" in r}
    return statistics.median(times[step] - times[step - 1] for step in times if step > WARMUP)


def bare_seconds_per_step(store: Path, args, interpolator_path: Path | None) -> float:
    from dyfcli.checkpoint import load_checkpoint
    from dyfcli.config import load_config
    from dyfcli.data import WindowDataset
    from dyfcli.train import build_method, forecaster_config

    device = torch.device(args.device)
    interpolator = load_checkpoint(interpolator_path) if interpolator_path else None
    config = (forecaster_config(interpolator, "tiny", settings(args)) if interpolator
              else load_config("tiny", settings(args)))
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
    durations = []
    for step in range(args.steps + WARMUP):
        started = time.perf_counter()
        loss, _ = method.loss(batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= WARMUP:
            durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("interpolator", "forecaster"), default="interpolator")
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dyfcli.config import load_config
    from dyfcli.runtime import setup_logging
    from dyfcli.train import train_interpolator
    from storefactory import make_store

    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = make_store(folder / "bench.zarr", series=8, steps=60, grid=(args.grid, args.grid))
        interpolator = None
        if args.stage == "forecaster":  # a briefly trained interpolator with the same backbone
            interpolator = folder / "stage1.pt"
            stage1 = argparse.Namespace(**{**vars(args), "stage": "interpolator", "steps": 2})
            train_interpolator(store, interpolator, load_config("tiny", settings(stage1)), device=args.device)
        # Interleaved repeats, keeping each variant's fastest median: on a shared machine the minimum is the
        # figure least disturbed by other processes.
        bare, in_memory, from_store = math.inf, math.inf, math.inf
        for repeat in range(args.repeats):
            bare = min(bare, bare_seconds_per_step(store, args, interpolator))
            with windows_in_memory():
                in_memory = min(in_memory, dyf_seconds_per_step(store, folder, args, interpolator, f"memory{repeat}"))
            from_store = min(from_store, dyf_seconds_per_step(store, folder, args, interpolator, f"store{repeat}"))
    print(f"{args.stage} step, unet dim {args.dim}, batch {args.batch}, {args.grid}x{args.grid}, {args.device}, "
          f"{args.threads} threads, {args.workers} loader workers; best of {args.repeats} medians of {args.steps} steps")
    print(f"  bare forward/backward/AdamW (batches in memory): {bare * 1000:8.1f} ms/step")
    print(f"  dyf train loop, windows in memory:                {in_memory * 1000:8.1f} ms/step  "
          f"ratio {in_memory / bare:.3f} (target <= 1.10)")
    print(f"  dyf train loop, windows read from the store:      {from_store * 1000:8.1f} ms/step  "
          f"ratio {from_store / bare:.3f}")


if __name__ == "__main__":
    main()
