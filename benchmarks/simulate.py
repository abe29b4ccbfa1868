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


class Clock:
    """Wall-clock and process CPU seconds; on a busy shared machine CPU seconds ≈ wall time when alone."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_spring_mesh(device: torch.device) -> Clock:
    with Clock() as clock:
        spring_mesh.simulated_trajectories(dict(spring_mesh.DEFAULT_COUNTS), seed=0, device=device)
    return clock


def time_navier_stokes(device: torch.device, batch: int, intervals: int, full: bool) -> tuple[float, float]:
    """(wall, CPU) seconds per trajectory for the whole 65-snapshot run."""
    obstacles = [navier_stokes.sample_obstacles(nnbenchmark.trajectory_rng(0, "train", i)) for i in range(batch)]
    if full:
        with Clock() as clock:
            navier_stokes.simulate(obstacles, device=device)
        return clock.wall / batch, clock.cpu / batch
    flow = navier_stokes.ChannelFlow(obstacles, [1.0] * batch, device=device)
    state = flow.advance(flow.initial_state(), navier_stokes.OUTPUT_STEP)     # warm-up
    _sync(device)
    with Clock() as clock:
        for _ in range(intervals):
            state = flow.advance(state, navier_stokes.OUTPUT_STEP)
            flow.to_nodes(state)
        _sync(device)
    scale = navier_stokes.OUTPUT_STEPS / intervals / batch
    return clock.wall * scale, clock.cpu * scale


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
        clock = time_spring_mesh(device)
        counts = spring_mesh.DEFAULT_COUNTS
        print(f"spring mesh: {sum(counts.values())} trajectories ({counts}) x {spring_mesh.OUTPUT_STEPS} "
              f"snapshots in {clock.wall:.1f} s wall, {clock.cpu:.1f} s CPU")
    wall, cpu = time_navier_stokes(device, args.ns_batch, args.ns_intervals, args.ns_full)
    total = sum(navier_stokes.DEFAULT_COUNTS.values())
    how = "measured" if args.ns_full else f"extrapolated from {args.ns_intervals} intervals"
    print(f"navier-stokes: per trajectory {wall:.2f} s wall, {cpu:.2f} s CPU (batch {args.ns_batch}, {how}); "
          f"full {total}-trajectory set about {wall * total / 60:.1f} min wall, {cpu * total / 60:.1f} CPU-min")


if __name__ == "__main__":
    main()
