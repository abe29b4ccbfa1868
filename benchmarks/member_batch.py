"""Cost of bit-exact member batching on CPU: `forecast_block` with members in fixed groups of at most 8
(`forecast.member_groups`, what dyf does) against one network call per `--member-batch` members (what it
did before, and still does on CUDA).

    .venv/bin/python benchmarks/member_batch.py [--threads 1] [--members 48] [--dim 16] [--grid 8x12]
        [--member-batch 1,7,48] [--rounds 3]

Builds a dated store and an untrained tiny-preset checkpoint of network width `--dim`, then prints, for
each member batch, the best of `--rounds` timings of one block (two autoregressive windows) both ways,
and whether the two ways give the same numbers as a forecast with all members in one batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--members", type=int, default=48)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--grid", default="8x12")
    parser.add_argument("--member-batch", default="1,7,48")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import torch

    from dyfcli import forecast
    from dyfcli.store import open_store
    from storefactory import make_store, make_untrained_checkpoint

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="dyf-bench-member-batch-"))
    ny, nx = (int(n) for n in args.grid.split("x"))
    store = open_store(make_store(folder / "data.zarr", dated=True, grid=(ny, nx)))
    ckpt = make_untrained_checkpoint(store, folder / "model.pt", overrides=(
        f"interpolator.network.hyper.dim={args.dim}", f"forecaster.network.hyper.dim={args.dim}"))
    request = forecast.ForecastRequest(checkpoint=ckpt, out=folder / "f.zarr", horizon=8, ensemble=args.members,
                                       data=store.path, init="0", device="cpu")
    job = forecast.prepare_job(request)
    method, device = job.collaborators.method, job.collaborators.device
    inputs = job.collaborators.block_inputs(job.init.series_indices[0], job.init.time_indices[0],
                                            job.window_valid_time[0])
    grouped = forecast.member_groups

    def per_batch(members, member_batch, _device):  # the CUDA rule: one call per member batch
        return grouped(members, member_batch, torch.device("meta"))

    def block(member_batch: int, groups) -> tuple[float, np.ndarray]:
        forecast.member_groups = groups
        best, out = float("inf"), None
        for _ in range(args.rounds + 1):  # the first run warms up
            start = time.perf_counter()
            out = forecast.forecast_block(method.model, method.sample_options, inputs, job.plan, seed=0,
                                          members=args.members, member_batch=member_batch, device=device,
                                          counter=forecast.Counter(), calls_per_window=1)
            best = min(best, time.perf_counter() - start)
        forecast.member_groups = grouped
        return best, out

    _, reference = block(args.members, per_batch)
    _, grouped_reference = block(args.members, grouped)
    for member_batch in (int(b) for b in args.member_batch.split(",")):
        old, old_out = block(member_batch, per_batch)
        new, new_out = block(member_batch, grouped)
        print(f"dim {args.dim} grid {args.grid} threads {args.threads} members {args.members} "
              f"--member-batch {member_batch}: one call per batch {old:.3f} s (max |diff| to all-in-one "
              f"{np.nanmax(np.abs(old_out - reference)):.1e}), groups of <= {forecast.CPU_GROUP} {new:.3f} s "
              f"(bit-identical: {np.array_equal(new_out, grouped_reference, equal_nan=True)}), "
              f"ratio {new / old:.2f}")


if __name__ == "__main__":
    main()
