"""Built-in simulator of nn-benchmark's spring mesh ("springmesh-10-perturball"), batched in PyTorch.

Physics, as in the original (docs/paper-notes.md §9.4): 10 × 10 particles of unit mass at integer positions
(x, y) ∈ {0..9}², joined by springs (k = 1, rest length = initial distance, 1 or √2) to all 8 neighbours
(342 springs); the top row y = 9 is pinned; velocity damping 0.1 (m q̈ = F(q) − 0.1 q̇), no gravity. Each
free particle starts displaced by a vector of uniform angle and radius uniform over the annulus area
(radius ≤ 0.35; 0.35–0.45 for the out-of-distribution test set), at rest. 805 snapshots, t = 0 … 6.28 in
steps of 0.00781.

Numerics: classical RK4 at the output step (optionally with substeps) in float64. It matches the
original semi-implicit Euler at step/128 to about 3e-5 in position (§3.4), i.e. to that integrator's own
error. Momentum p = m·q̇ and p = 0 on pinned particles.

Layout: nn-benchmark numbers particles `x·10 + y` (y fastest). Our frames are `(4, Y=10, X=10)` with the
channels (px, py, qx, qy) and dims (y, x): row y = 9 is the pinned row. DYffusion's grid axes (h = x,
w = y) are the transpose of ours.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from dyfcli.sources import nnbenchmark

log = logging.getLogger("dyf.spring_mesh")

SIZE = 10
SPRING_CONSTANT = 1.0
MASS = 1.0
DAMPING = 0.1
OUTPUT_STEP = 0.00781
OUTPUT_STEPS = math.ceil(2 * math.pi / OUTPUT_STEP)   # 805
RADIUS_RANGE = (0.0, 0.35)
OOD_RADIUS_RANGE = (0.35, 0.45)
FIELDS = ("px", "py", "qx", "qy")


def rest_positions() -> np.ndarray:
    """Particle positions at rest `(100, 2)`, particle index `x·10 + y`."""
    x, y = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=-1).astype(np.float64)


def pinned_mask() -> np.ndarray:
    """bool `(100,)`: the top row y = 9."""
    return rest_positions()[:, 1] == SIZE - 1


def springs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Springs between particles at Chebyshev distance 1: (a, b, rest_length), each `(342,)`, a < b."""
    positions = rest_positions()
    distance = np.abs(positions[:, None] - positions[None]).max(axis=-1)
    a, b = np.nonzero(np.triu(distance == 1))
    return a, b, np.linalg.norm(positions[a] - positions[b], axis=-1)


def sample_initial_positions(rng: np.random.Generator,
                             radius_range: tuple[float, float] = RADIUS_RANGE) -> np.ndarray:
    """nn-benchmark's `SpringMeshAllPerturb`: one annulus-uniform displacement per free particle `(100, 2)`."""
    inner, outer = radius_range
    theta = rng.uniform(0, 2 * np.pi, SIZE * SIZE)
    radius = np.sqrt(rng.uniform(size=SIZE * SIZE) * (outer**2 - inner**2) + inner**2)
    displacement = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=-1)
    displacement[pinned_mask()] = 0.0
    return rest_positions() + displacement


# The four spring directions on the (x, y) particle grid: neighbour offset and rest length.
SPRING_OFFSETS = (((1, 0), 1.0), ((0, 1), 1.0), ((1, 1), math.sqrt(2)), ((1, -1), math.sqrt(2)))


class SpringMesh:
    """Forces and RK4 stepping for a batch of meshes; states are `(B, 100, 2)` float64 tensors.

    Springs are evaluated as shifted slices of the `(B, x, y, 2)` particle grid, which is several times
    faster than gathering the 342 particle pairs.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.free = torch.as_tensor(~pinned_mask(), dtype=torch.float64, device=self.device)[:, None]

    def spring_forces(self, q: torch.Tensor) -> torch.Tensor:
        """Σ −k(|d| − L₀)·d/|d| per particle over its springs, d = own − other position; 0 when pinned."""
        grid = q.reshape(q.shape[0], SIZE, SIZE, 2)
        total = torch.zeros_like(grid)
        for (dx, dy), rest in SPRING_OFFSETS:
            own, other = _ends(grid, dx, dy)
            d = own - other
            length = d.norm(dim=-1, keepdim=True)
            force = -SPRING_CONSTANT * (length - rest) / length * d        # on `own`; the reverse on `other`
            _add_ends(total, force, dx, dy)
        return total.reshape(q.shape) * self.free

    def derivative(self, q: torch.Tensor, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q̇, q̈) with damping; pinned particles stay put."""
        acceleration = (self.spring_forces(q) - DAMPING * velocity) / MASS
        return velocity * self.free, acceleration * self.free

    def step(self, q: torch.Tensor, velocity: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One classical RK4 step."""
        k1q, k1v = self.derivative(q, velocity)
        k2q, k2v = self.derivative(q + 0.5 * dt * k1q, velocity + 0.5 * dt * k1v)
        k3q, k3v = self.derivative(q + 0.5 * dt * k2q, velocity + 0.5 * dt * k2v)
        k4q, k4v = self.derivative(q + dt * k3q, velocity + dt * k3v)
        q = q + dt / 6 * (k1q + 2 * k2q + 2 * k3q + k4q)
        velocity = velocity + dt / 6 * (k1v + 2 * k2v + 2 * k3v + k4v)
        return q, velocity

    def energy(self, q: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """Kinetic plus spring energy per mesh `(B,)`."""
        a, b, rest = (torch.as_tensor(array, device=q.device) for array in springs())
        stretch = (q[:, a] - q[:, b]).norm(dim=-1) - rest
        return 0.5 * MASS * (velocity**2).sum(dim=(1, 2)) + 0.5 * SPRING_CONSTANT * (stretch**2).sum(dim=1)


def _ends(grid: torch.Tensor, dx: int, dy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ends of every spring with offset (dx, dy) as aligned slices of `grid (B, x, y, 2)`."""
    ys = slice(0, SIZE - dy) if dy >= 0 else slice(-dy, SIZE)
    ys_other = slice(dy, SIZE) if dy >= 0 else slice(0, SIZE + dy)
    return grid[:, : SIZE - dx, ys], grid[:, dx:, ys_other]


def _add_ends(total: torch.Tensor, force: torch.Tensor, dx: int, dy: int) -> None:
    own, other = _ends(total, dx, dy)
    own += force
    other -= force


def simulate(initial_positions: np.ndarray, *, snapshots: int = OUTPUT_STEPS, substeps: int = 1,
             device: torch.device | str = "cpu") -> np.ndarray:
    """Trajectories from rest: float32 `(B, snapshots, 4, 10, 10)` = (px, py, qx, qy) on (y, x).

    initial_positions: `(B, 100, 2)`; snapshot k is at t = k·0.00781, k = 0..snapshots−1.
    """
    mesh = SpringMesh(device)
    q = torch.as_tensor(np.asarray(initial_positions, dtype=np.float64), device=mesh.device)
    velocity = torch.zeros_like(q)
    dt = OUTPUT_STEP / substeps
    frames = [to_grid(MASS * velocity, q)]
    for _ in range(snapshots - 1):
        for _ in range(substeps):
            q, velocity = mesh.step(q, velocity, dt)
        frames.append(to_grid(MASS * velocity, q))
    return np.stack(frames, axis=1)


def to_grid(momentum: torch.Tensor, positions: torch.Tensor) -> np.ndarray:
    """Particles `(B, 100, 2)` -> float32 `(B, 4, 10, 10)` with dims (y, x)."""
    state = torch.cat([momentum, positions], dim=-1)                   # (B, 100, 4)
    state = state.reshape(state.shape[0], SIZE, SIZE, 4)               # (B, x, y, channel)
    return state.permute(0, 3, 2, 1).float().cpu().numpy()


def grid_times(snapshots: int = OUTPUT_STEPS) -> np.ndarray:
    """Physical times of the snapshots: 0, 0.00781, …"""
    return np.round(OUTPUT_STEP * np.arange(snapshots), 10)


# ------------------------------------------------------------------------------------------ workflow

DEFAULT_COUNTS = {"train": 100, "val": 3, "test": 15}


def simulated_trajectories(counts: dict[str, int], *, seed: int, device: torch.device,
                           snapshots: int = OUTPUT_STEPS, substeps: int = 1) -> nnbenchmark.Trajectories:
    """Simulate every split (`test_ood` with the larger displacements); trajectory i of a split depends
    only on (seed, split, i)."""
    from dyfcli.runtime import progress

    order = [(split, i) for split, count in counts.items() for i in range(count)]
    initial = np.stack([
        sample_initial_positions(nnbenchmark.trajectory_rng(seed, split, i),
                                 OOD_RADIUS_RANGE if split == nnbenchmark.OOD_SPLIT else RADIUS_RANGE)
        for split, i in order])
    with progress("simulating spring mesh", total=len(order), unit="trajectories") as bar:
        frames = simulate(initial, snapshots=snapshots, substeps=substeps, device=device)
        bar.advance(len(order))
    pinned = np.broadcast_to(pinned_mask().reshape(SIZE, SIZE).T, (len(order), SIZE, SIZE))   # (S, y, x)
    return nnbenchmark.Trajectories(
        system=nnbenchmark.SPRING_MESH, times=grid_times(snapshots), time_step=OUTPUT_STEP,
        y=np.arange(SIZE, dtype=np.float64), x=np.arange(SIZE, dtype=np.float64), splits=dict(counts),
        load=lambda series: frames[series], mask=np.ones((len(order), SIZE, SIZE), dtype=bool),
        cond={"fixed": pinned.astype(np.float32)}, boundary=nnbenchmark.spring_mesh_boundary(),
        source="dyf built-in spring-mesh simulator (RK4; reproduces nn-benchmark's springmesh-10-perturball "
               "dynamics to its integrator error)",
        recipe={"simulator": "spring-mesh", "trajectories": dict(counts), "seed": seed, "snapshots": snapshots,
                "substeps": substeps, "damping": DAMPING, "spring_constant": SPRING_CONSTANT,
                "radius_range": list(RADIUS_RANGE), "ood_radius_range": list(OOD_RADIUS_RANGE)},
        series_names=[f"{split}/{i:05d}" for split, i in order],
    )


def prepare_spring_mesh(out: Path, *, source: Path | None = None, counts: dict[str, int] | None = None,
                        ood: bool = False, seed: int = 0, device: str = "auto", overwrite: bool = False,
                        snapshots: int = OUTPUT_STEPS, substeps: int = 1, normalization: str = "global") -> dict:
    """`dyf prepare spring-mesh`: read the nn-benchmark files under `source`, or simulate; write the store
    (`normalization`: `global` z-scores, or `none` for raw units).

    With `ood`, an extra split `test_ood` holds as many trajectories as `test` with initial displacements
    of radius 0.35–0.45 (the archive's `_eval-outdist-` folder when reading).
    """
    from dyfcli.errors import UsageError
    from dyfcli.runtime import resolve_device
    from dyfcli.store import claim_output

    with claim_output(Path(out), overwrite, inputs=[source]):  # held until the store is in place
        if not 2 <= snapshots <= OUTPUT_STEPS:
            raise UsageError(f"--snapshots {snapshots}: choose 2..{OUTPUT_STEPS}")
        if substeps < 1:
            raise UsageError(f"--substeps {substeps}: choose 1 or more")
        nnbenchmark.check_normalization(normalization)
        if counts:
            counts = nnbenchmark.check_counts(dict(counts))
            if ood:
                counts[nnbenchmark.OOD_SPLIT] = counts["test"]
        if source is not None:
            trajectories = nnbenchmark.read_archive(Path(source), nnbenchmark.SPRING_MESH, counts=counts, ood=ood)
        else:
            counts = counts or nnbenchmark.check_counts(dict(DEFAULT_COUNTS))
            if ood:
                counts.setdefault(nnbenchmark.OOD_SPLIT, counts["test"])
            started = time.monotonic()
            trajectories = simulated_trajectories(counts, seed=seed, device=resolve_device(device),
                                                  snapshots=snapshots, substeps=substeps)
            log.info("simulated %d trajectories in %.1f s", trajectories.count, time.monotonic() - started)
        return nnbenchmark.write_trajectories(trajectories, Path(out), overwrite, normalization)
