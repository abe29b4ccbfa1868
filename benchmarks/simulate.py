"""Time the built-in simulators: the paper-size spring-mesh set and the Navier–Stokes cost per trajectory.

    .venv/bin/python benchmarks/simulate.py [--device auto|cpu|cuda] [--ns-batch 16] [--ns-intervals 4]
                                            [--ns-full]

Spring mesh: simulates the whole 100/3/15 set (805 snapshots each) and reports seconds.
Navier–Stokes: simulates one batch for a few output intervals of 0.08 (after one warm-up interval), then
extrapolates to a full trajectory (65 intervals) and to the paper's 107-trajectory set. `--ns-full`
simulates one whole batch of 65 snapshots instead of extrapolating.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dyfcli.runtime import resolve_device
from dyfcli.sources import navier_stokes, nnbenchmark, spring_mesh


def time_spring_mesh(device: torch.device) -> float:
    started = time.perf_counter()
    spring_mesh.simulated_trajectories(dict(spring_mesh.DEFAULT_COUNTS), seed=0, device=device)
    return time.perf_counter() - started


def time_navier_stokes(device: torch.device, batch: int, intervals: int, full: bool) -> float:
    """Seconds per trajectory for the whole 65-snapshot run."""
    obstacles = [navier_stokes.sample_obstacles(nnbenchmark.trajectory_rng(0, "train", i)) for i in range(batch)]
    if full:
        started = time.perf_counter()
        navier_stokes.simulate(obstacles, device=device)
        return (time.perf_counter() - started) / batch
    flow = navier_stokes.ChannelFlow(obstacles, [1.0] * batch, device=device)
    state = flow.advance(flow.initial_state(), navier_stokes.OUTPUT_STEP)     # warm-up
    _sync(device)
    started = time.perf_counter()
    for _ in range(intervals):
        state = flow.advance(state, navier_stokes.OUTPUT_STEP)
        flow.to_nodes(state)
    _sync(device)
    per_interval = (time.perf_counter() - started) / intervals
    return per_interval * navier_stokes.OUTPUT_STEPS / batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ns-batch", type=int, default=16)
    parser.add_argument("--ns-intervals", type=int, default=4)
    parser.add_argument("--ns-full", action="store_true")
    parser.add_argument("--skip-spring-mesh", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if not args.skip_spring_mesh:
        seconds = time_spring_mesh(device)
        counts = spring_mesh.DEFAULT_COUNTS
        print(f"spring mesh: {sum(counts.values())} trajectories ({counts}) x {spring_mesh.OUTPUT_STEPS} "
              f"snapshots in {seconds:.1f} s")
    per_trajectory = time_navier_stokes(device, args.ns_batch, args.ns_intervals, args.ns_full)
    total = sum(navier_stokes.DEFAULT_COUNTS.values())
    how = "measured" if args.ns_full else f"extrapolated from {args.ns_intervals} intervals"
    print(f"navier-stokes: {per_trajectory:.2f} s per trajectory (batch {args.ns_batch}, {how}); "
          f"full {total}-trajectory set about {per_trajectory * total / 60:.1f} min")


if __name__ == "__main__":
    main()
