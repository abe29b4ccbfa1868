"""Built-in simulator of nn-benchmark's "navier-stokes-multi": channel flow past four random cylinders.

Physics, as in the original (docs/paper-notes.md §9.3): incompressible flow of density 1 and viscosity 1e-3
in the DFG channel [0, 2.2] × [0, 0.41]; at x = 0 the parabolic inflow `U·4y(H−y)/H²·(1−e^{−5t})` with
U = 1, no-slip walls at y = 0 and y = 0.41 and on four circular obstacles (radius ~ U(0.05, 0.1), placed by
nn-benchmark's rejection sampling), do-nothing outflow at x = 2.2, fluid at rest at t = 0. Snapshots at
t = 0.08, 0.16, …, 5.2 on the 221 × 42 node grid of spacing 0.01; nodes inside an obstacle are invalid.

Numerics (ours; the original used PolyFEM's P2/P1 elements with BDF3): a fractional-step projection
method on a staggered (MAC) grid of spacing h = 0.01 / resolution. Advection is third-order upwind-biased,
diffusion second-order central, time stepping SSP-RK3 with a projection after every stage, so each stage
velocity is divergence-free to round-off. Obstacles act by direct forcing (zero velocity on the faces
inside a circle before each projection), which keeps the pressure operator the same for every trajectory:
one fast solver (cosine transforms as dense matrix products, Neumann at inlet and walls, p = 0 at the
outlet) serves a whole batch, on a GPU when there is one. The data are statistically similar to the
PolyFEM originals, not identical: expect somewhat different shedding onset and pressure levels (§3.4).

Shapes: MAC unknowns `u (B, Ny, Nx+1)` on x-faces, `v (B, Ny+1, Nx)` on y-faces, `p (B, Ny, Nx)` at cell
centres (Nx = 220·resolution, Ny = 41·resolution). Output frames are `(B, 3, 42, 221)` = (u, v, p) on the
nodes, dims (y, x) with y the vertical axis; DYffusion's (221, 42) layout is the transpose of ours.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dyfcli.boundary import inflow_velocity
from dyfcli.sources import nnbenchmark

log = logging.getLogger("dyf.navier_stokes")

LENGTH = 2.2
HEIGHT = 0.41
VISCOSITY = 1e-3
IN_VELOCITY = 1.0
RAMP_RATE = 5.0
NODE_SPACING = 0.01
NODES_X = 221
NODES_Y = 42
OUTPUT_STEP = 0.08
OUTPUT_STEPS = 65
N_OBSTACLES = 4
RADIUS_RANGE = (0.05, 0.1)
EDGE_MARGIN = (0.25, 0.05)     # obstacle-free margins in x (inlet/outlet) and y (walls)
PACK_MARGIN = 0.05             # least gap between two obstacles
PLACEMENT_ATTEMPTS = 100
# Substeps per output interval at resolution 1: dt = 0.08/28 ≈ 0.0029, so CFL (|u| + |v|)·dt/h ≤ 1.2 up to
# |u| + |v| = 4.2 (seen: about 3.4; SSP-RK3 with third-order upwinding is stable to about 1.6). A fixed
# step keeps each trajectory independent of its batch mates; faster flows take more (see `advance`).
SUBSTEPS_PER_OUTPUT = 28
MAX_CFL = 1.2
FIELDS = ("u", "v", "p")


# ------------------------------------------------------------------------------------ obstacles and grid

@dataclass(frozen=True)
class Obstacle:
    """A circular obstacle: centre (x, y) and radius, in the channel's length units."""

    x: float
    y: float
    radius: float


def sample_obstacles(rng: np.random.Generator, count: int = N_OBSTACLES,
                     radius_range: tuple[float, float] = RADIUS_RANGE) -> tuple[Obstacle, ...]:
    """nn-benchmark's `NavierStokesMeshInitialConditionSource`: up to 100 tries per circle.

    Each try draws a radius, then a centre at least `EDGE_MARGIN + r` from the channel's ends and walls,
    and keeps it when it is at least `r1 + r2 + 0.05` from every circle placed before. Where the original
    raised after 100 failed tries, we start the set again.
    """
    while True:
        placed: list[Obstacle] = []
        for _ in range(count):
            for _attempt in range(PLACEMENT_ATTEMPTS):
                radius = rng.uniform(*radius_range)
                x = rng.uniform(EDGE_MARGIN[0] + radius, LENGTH - EDGE_MARGIN[0] - radius)
                y = rng.uniform(EDGE_MARGIN[1] + radius, HEIGHT - EDGE_MARGIN[1] - radius)
                if all(math.hypot(x - o.x, y - o.y) >= o.radius + radius + PACK_MARGIN for o in placed):
                    placed.append(Obstacle(float(x), float(y), float(radius)))
                    break
            else:
                break
        if len(placed) == count:
            return tuple(placed)


def node_coordinates() -> tuple[np.ndarray, np.ndarray]:
    """Node positions of the output grid: y `(42,)` and x `(221,)`, spacing 0.01."""
    return np.arange(NODES_Y) * NODE_SPACING, np.arange(NODES_X) * NODE_SPACING


def inside(obstacles: tuple[Obstacle, ...], y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """bool `(len(y), len(x))`: points strictly inside any obstacle (the original's NaN nodes)."""
    yy, xx = np.meshgrid(y, x, indexing="ij")
    hit = np.zeros(yy.shape, dtype=bool)
    for o in obstacles:
        hit |= (xx - o.x) ** 2 + (yy - o.y) ** 2 < o.radius ** 2
    return hit


def node_masks(obstacles: tuple[Obstacle, ...]) -> tuple[np.ndarray, np.ndarray]:
    """nn-benchmark's `extra_fixed_mask` on our (y, x) nodes: (fixed, obstacle), bool `(42, 221)`.

    fixed = obstacle nodes, both walls (first and last y row) and the inlet column (first x column).
    """
    y, x = node_coordinates()
    obstacle = inside(obstacles, y, x)
    fixed = obstacle.copy()
    fixed[0, :] = fixed[-1, :] = True
    fixed[:, 0] = True
    return fixed, obstacle


# --------------------------------------------------------------------------------------------- solver

@dataclass
class FlowState:
    """Velocities on the MAC faces, last pressure at cell centres, physical time `t`."""

    u: torch.Tensor
    v: torch.Tensor
    p: torch.Tensor
    t: float


class ChannelFlow:
    """The staggered grid, its pressure solver and the time stepper for a batch of trajectories.

    obstacles: one tuple of obstacles per trajectory; in_velocity: peak inflow per trajectory.
    """

    def __init__(self, obstacles: list[tuple[Obstacle, ...]], in_velocity: list[float], *,
                 resolution: int = 1, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.resolution = resolution
        self.h = NODE_SPACING / resolution
        self.nx = round(LENGTH / self.h)
        self.ny = round(HEIGHT / self.h)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch = len(obstacles)
        self.in_velocity = torch.tensor(in_velocity, dtype=dtype, device=self.device)[:, None]   # (B, 1)
        self._build_pressure_solver()
        self._build_forcing(obstacles)
        self.stencils = self._tensor(_stencils())
        self.y_cells = self._tensor((np.arange(self.ny) + 0.5) * self.h)

    def _tensor(self, array) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=self.dtype, device=self.device)

    def _build_pressure_solver(self) -> None:
        """Eigenvectors of the cell-centred Laplacian: DCT-II in y (Neumann, Neumann), DCT-IV in x (Neumann, 0)."""
        h, nx, ny = self.h, self.nx, self.ny
        j, k = np.meshgrid(np.arange(ny), np.arange(ny), indexing="ij")
        basis_y = np.cos(np.pi * k * (j + 0.5) / ny) * np.where(k == 0, math.sqrt(1 / ny), math.sqrt(2 / ny))
        i, m = np.meshgrid(np.arange(nx), np.arange(nx), indexing="ij")
        basis_x = np.cos(np.pi * (m + 0.5) * (i + 0.5) / nx) * math.sqrt(2 / nx)
        eig_y = -4 / h**2 * np.sin(np.pi * np.arange(ny) / (2 * ny)) ** 2
        eig_x = -4 / h**2 * np.sin(np.pi * (np.arange(nx) + 0.5) / (2 * nx)) ** 2
        self.basis_y, self.basis_x = self._tensor(basis_y), self._tensor(basis_x)
        self.inverse_eigenvalues = self._tensor(1.0 / (eig_y[:, None] + eig_x[None, :]))

    def _build_forcing(self, obstacles: list[tuple[Obstacle, ...]]) -> None:
        """1 on fluid faces, 0 on faces whose centre lies inside an obstacle: `(B, Ny, Nx+1)`, `(B, Ny+1, Nx)`."""
        h = self.h
        u_y, u_x = (np.arange(self.ny) + 0.5) * h, np.arange(self.nx + 1) * h
        v_y, v_x = np.arange(self.ny + 1) * h, (np.arange(self.nx) + 0.5) * h
        self.fluid_u = self._tensor(np.stack([~inside(o, u_y, u_x) for o in obstacles]))
        self.fluid_v = self._tensor(np.stack([~inside(o, v_y, v_x) for o in obstacles]))

    # -------------------------------------------------------------------------------------- operators

    def solve_poisson(self, rhs: torch.Tensor) -> torch.Tensor:
        """φ with Lφ = rhs `(B, Ny, Nx)`, L the 5-point Laplacian with the channel's pressure conditions."""
        spectrum = self.basis_y.T @ rhs @ self.basis_x
        return self.basis_y @ (spectrum * self.inverse_eigenvalues) @ self.basis_x.T

    def divergence(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Discrete divergence per cell `(B, Ny, Nx)`."""
        return (u[..., 1:] - u[..., :-1] + v[:, 1:, :] - v[:, :-1, :]) / self.h

    def project(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove the divergent part: returns (u, v, φ) with u_new = u − ∇φ; inlet and wall faces unchanged."""
        phi = self.solve_poisson(self.divergence(u, v))
        # the outlet ghost cell holds −φ (p = 0 on the outlet face)
        grad_x = torch.cat([phi[..., 1:] - phi[..., :-1], -2 * phi[..., -1:]], dim=-1) / self.h
        grad_y = (phi[:, 1:] - phi[:, :-1]) / self.h
        u = torch.cat([u[..., :1], u[..., 1:] - grad_x], dim=-1)
        v = torch.cat([v[:, :1], v[:, 1:-1] - grad_y, v[:, -1:]], dim=1)
        return u, v, phi

    def tendency(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """−(u·∇)u + ν∇²u on the unknown faces.

        Returns du on u faces 1..Nx `(B, Ny, Nx)` and dv on v faces 1..Ny−1 `(B, Ny−1, Nx)`.
        """
        # u with two ghost layers: copies beyond inlet and outlet, mirrored (no-slip) beyond the walls;
        # the stencil centres are faces 1..Nx, so the first padded column is not needed
        up = torch.cat([u[..., :1], u, u[..., -1:], u[..., -1:]], dim=-1)
        up = torch.cat([-up[:, 1:2], -up[:, 0:1], up, -up[:, -1:], -up[:, -2:-1]], dim=1)
        vx = torch.cat([v, v[..., -1:]], dim=-1)
        v_on_u = 0.25 * (vx[:, :-1, :-1] + vx[:, :-1, 1:] + vx[:, 1:, :-1] + vx[:, 1:, 1:])
        du = self._advection_diffusion(up, u[..., 1:], v_on_u)

        # v with two ghost layers: mirrored (v = 0) beyond inlet and walls, copies beyond the outlet;
        # the stencil centres are faces 1..Ny-1, so the outermost padded rows are not needed
        vp = torch.cat([-v[..., 1:2], -v[..., 0:1], v, v[..., -1:], v[..., -1:]], dim=-1)
        vp = torch.cat([-vp[:, 1:2], vp, -vp[:, -2:-1]], dim=1)
        u_on_v = 0.25 * (u[:, :-1, :-1] + u[:, :-1, 1:] + u[:, 1:, :-1] + u[:, 1:, 1:])
        dv = self._advection_diffusion(vp, u_on_v, v[:, 1:-1])
        return du, dv

    def _advection_diffusion(self, padded: torch.Tensor, a_x: torch.Tensor, a_y: torch.Tensor) -> torch.Tensor:
        """−a·∇φ + ν∇²φ at the centres of the 5 × 5 stencils over `padded (B, H+4, W+4)` -> `(B, H, W)`.

        Advection is third-order upwind-biased: a fourth-order central difference plus |a| times a
        fourth-difference dissipation; for a > 0 this is the upwind-biased (φ₋₂ − 6φ₋₁ + 3φ₀ + 2φ₊₁)/6h.
        """
        d = torch.nn.functional.conv2d(padded[:, None], self.stencils)   # (B, 5, H, W)
        advection = a_x * d[:, 0] + a_x.abs() * d[:, 1] + a_y * d[:, 2] + a_y.abs() * d[:, 3]
        return advection * (-1.0 / (12 * self.h)) + d[:, 4] * (VISCOSITY / (self.h * self.h))

    # ------------------------------------------------------------------------------------ time stepping

    def initial_state(self) -> FlowState:
        """Fluid at rest at t = 0."""
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(self.batch, *shape, dtype=self.dtype, device=self.device)

        return FlowState(u=zeros(self.ny, self.nx + 1), v=zeros(self.ny + 1, self.nx), p=zeros(self.ny, self.nx), t=0.0)

    def _stage(self, base: FlowState, current: tuple[torch.Tensor, torch.Tensor], keep: float, dt: float,
               t_stage: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One Shu–Osher stage: keep·base + (1−keep)·(current + dt·F(current)), forced and projected."""
        u, v = current
        du, dv = self.tendency(u, v)
        step = 1.0 - keep
        u_new = keep * base.u[..., 1:] + step * (u[..., 1:] + dt * du)
        v_new = keep * base.v[:, 1:-1] + step * (v[:, 1:-1] + dt * dv)
        inlet = inflow_velocity(self.y_cells, torch.tensor(t_stage, dtype=self.dtype), self.in_velocity,
                                HEIGHT, RAMP_RATE)
        u_new = torch.cat([inlet[..., None], u_new], dim=-1) * self.fluid_u
        v_new = torch.cat([v[:, :1], v_new, v[:, -1:]], dim=1) * self.fluid_v
        u_new, v_new, phi = self.project(u_new, v_new)
        return u_new, v_new, phi / (step * dt)

    def step(self, state: FlowState, dt: float) -> FlowState:
        """One SSP-RK3 step of size dt (the pressure is the one of the last stage)."""
        u1, v1, _ = self._stage(state, (state.u, state.v), 0.0, dt, state.t + dt)
        u2, v2, _ = self._stage(state, (u1, v1), 0.75, dt, state.t + 0.5 * dt)
        u3, v3, p = self._stage(state, (u2, v2), 1.0 / 3.0, dt, state.t + dt)
        return FlowState(u=u3, v=v3, p=p, t=state.t + dt)

    def advance(self, state: FlowState, interval: float) -> FlowState:
        """Advance by `interval` in equal substeps: the fixed count, or more where the CFL number would pass MAX_CFL."""
        base = SUBSTEPS_PER_OUTPUT * self.resolution
        speed = float(state.u.abs().amax() + state.v.abs().amax())
        substeps = max(base, math.ceil(interval * speed / (self.h * MAX_CFL)))
        if substeps > base:
            log.debug("t=%.3f: max speed %.2f, using %d substeps", state.t, speed, substeps)
        t_end = state.t + interval
        for _ in range(substeps):
            state = self.step(state, interval / substeps)
        state.t = t_end  # no drift from summing substeps
        if not torch.isfinite(state.u).all():
            raise RuntimeError(f"the Navier–Stokes solver became unstable at t={t_end:.2f}")
        return state

    def to_nodes(self, state: FlowState) -> torch.Tensor:
        """(u, v, p) on the 42 × 221 output nodes `(B, 3, 42, 221)`; exact Dirichlet values at inlet and walls."""
        r = self.resolution
        rows = torch.arange(NODES_Y, device=self.device) * r
        cols = torch.arange(NODES_X, device=self.device) * r
        u = torch.cat([-state.u[:, :1], state.u, -state.u[:, -1:]], dim=1)             # wall ghosts
        u_nodes = 0.5 * (u[:, rows][:, :, cols] + u[:, rows + 1][:, :, cols])
        v = torch.cat([-state.v[..., :1], state.v, state.v[..., -1:]], dim=-1)         # inlet/outlet ghosts
        v_nodes = 0.5 * (v[:, rows][:, :, cols] + v[:, rows][:, :, cols + 1])
        p = torch.cat([state.p[:, :1], state.p, state.p[:, -1:]], dim=1)
        p = torch.cat([p[..., :1], p, -p[..., -1:]], dim=-1)                           # p = 0 at the outlet
        p_nodes = 0.25 * (p[:, rows][:, :, cols] + p[:, rows][:, :, cols + 1]
                          + p[:, rows + 1][:, :, cols] + p[:, rows + 1][:, :, cols + 1])
        y = torch.arange(NODES_Y, dtype=self.dtype, device=self.device) * NODE_SPACING
        u_nodes[:, :, 0] = inflow_velocity(y, torch.tensor(state.t, dtype=self.dtype), self.in_velocity,
                                           HEIGHT, RAMP_RATE)
        v_nodes[:, :, 0] = 0.0
        u_nodes[:, [0, -1]] = 0.0
        v_nodes[:, [0, -1]] = 0.0
        return torch.stack([u_nodes, v_nodes, p_nodes], dim=1)


def _stencils() -> np.ndarray:
    """5 × 5 stencils `(5, 1, 5, 5)`: central and dissipative differences along x, then along y; Laplacian."""
    central = np.array([1.0, -8.0, 0.0, 8.0, -1.0])
    dissipation = np.array([1.0, -4.0, 6.0, -4.0, 1.0])
    kernels = np.zeros((5, 1, 5, 5))
    kernels[0, 0, 2, :] = central
    kernels[1, 0, 2, :] = dissipation
    kernels[2, 0, :, 2] = central
    kernels[3, 0, :, 2] = dissipation
    kernels[4, 0, 2, 1] = kernels[4, 0, 2, 3] = kernels[4, 0, 1, 2] = kernels[4, 0, 3, 2] = 1.0
    kernels[4, 0, 2, 2] = -4.0
    return kernels


# ------------------------------------------------------------------------------------------ trajectories

def simulate(obstacles: list[tuple[Obstacle, ...]], *, in_velocity: float = IN_VELOCITY,
             snapshots: int = OUTPUT_STEPS, resolution: int = 1, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Simulate a batch of trajectories; float32 `(B, snapshots, 3, 42, 221)` at t = 0.08·k, k = 1..snapshots.

    Nodes inside an obstacle hold NaN.
    """
    flow = ChannelFlow(obstacles, [in_velocity] * len(obstacles), resolution=resolution, device=device, dtype=dtype)
    state = flow.initial_state()
    frames = []
    for _ in range(snapshots):
        state = flow.advance(state, OUTPUT_STEP)
        frames.append(flow.to_nodes(state).float().cpu().numpy())
    out = np.stack(frames, axis=1)
    for b, obstacle_set in enumerate(obstacles):
        out[b][:, :, node_masks(obstacle_set)[1]] = np.nan
    return out


def output_times(snapshots: int = OUTPUT_STEPS) -> np.ndarray:
    """Physical times of the snapshots: 0.08, 0.16, …"""
    return np.round(OUTPUT_STEP * np.arange(1, snapshots + 1), 10)


# ------------------------------------------------------------------------------------------ workflow

DEFAULT_COUNTS = {"train": 100, "val": 2, "test": 5}
CPU_BATCH = 16


def simulated_trajectories(counts: dict[str, int], *, seed: int, device: torch.device,
                           snapshots: int = OUTPUT_STEPS, resolution: int = 1,
                           batch_size: int | None = None) -> nnbenchmark.Trajectories:
    """Simulate every split; obstacles of trajectory i of a split depend only on (seed, split, i)."""
    from dyfcli.runtime import progress

    order = [(split, i) for split, count in counts.items() for i in range(count)]
    obstacles = [sample_obstacles(nnbenchmark.trajectory_rng(seed, split, i)) for split, i in order]
    batch_size = batch_size or (len(order) if device.type == "cuda" else CPU_BATCH)
    frames = np.empty((len(order), snapshots, len(FIELDS), NODES_Y, NODES_X), dtype=np.float32)
    with progress("simulating Navier–Stokes", total=len(order), unit="trajectories") as bar:
        for start in range(0, len(order), batch_size):
            batch = obstacles[start:start + batch_size]
            frames[start:start + len(batch)] = simulate(batch, snapshots=snapshots, resolution=resolution,
                                                        device=device)
            bar.advance(len(batch))
    masks = [node_masks(o) for o in obstacles]
    y, x = node_coordinates()
    return nnbenchmark.Trajectories(
        system=nnbenchmark.NAVIER_STOKES, times=output_times(snapshots), time_step=OUTPUT_STEP, y=y, x=x,
        splits=dict(counts), load=lambda series: frames[series],
        mask=np.stack([~obstacle for _, obstacle in masks]),
        cond={"fixed": np.stack([f for f, _ in masks]).astype(np.float32),
              "obstacle": np.stack([o for _, o in masks]).astype(np.float32)},
        boundary=nnbenchmark.navier_stokes_boundary([IN_VELOCITY] * len(order)),
        source="dyf built-in Navier–Stokes simulator (MAC projection; statistically similar to nn-benchmark's "
               "PolyFEM navier-stokes-multi, not identical)",
        recipe={"simulator": "navier-stokes", "trajectories": dict(counts), "seed": seed, "snapshots": snapshots,
                "resolution": resolution, "grid_spacing": NODE_SPACING / resolution,
                "substeps_per_output": SUBSTEPS_PER_OUTPUT * resolution, "viscosity": VISCOSITY,
                "in_velocity": IN_VELOCITY, "obstacles": [[vars(o) for o in obs] for obs in obstacles]},
        series_names=[f"{split}/{i:05d}" for split, i in order],
    )


def prepare_navier_stokes(out: Path, *, source: Path | None = None, counts: dict[str, int] | None = None,
                          seed: int = 0, device: str = "auto", overwrite: bool = False,
                          snapshots: int = OUTPUT_STEPS, resolution: int = 1, normalization: str = "global") -> dict:
    """`dyf prepare navier-stokes`: read the nn-benchmark files under `source`, or simulate; write the store
    (`normalization`: `global` z-scores, or `none` for raw units)."""
    from dyfcli.errors import UsageError
    from dyfcli.runtime import resolve_device
    from dyfcli.store import claim_output

    with claim_output(Path(out), overwrite, inputs=[source]):  # held until the store is in place
        if not 1 <= snapshots <= OUTPUT_STEPS:
            raise UsageError(f"--snapshots {snapshots}: choose 1..{OUTPUT_STEPS}")
        if resolution < 1:
            raise UsageError(f"--resolution {resolution}: choose 1 (h = 0.01) or more")
        nnbenchmark.check_normalization(normalization)
        if source is not None:
            trajectories = nnbenchmark.read_archive(Path(source), nnbenchmark.NAVIER_STOKES,
                                                    counts=nnbenchmark.check_counts(counts) if counts else None)
        else:
            counts = nnbenchmark.check_counts(counts or dict(DEFAULT_COUNTS))
            started = time.monotonic()
            trajectories = simulated_trajectories(counts, seed=seed, device=resolve_device(device),
                                                  snapshots=snapshots, resolution=resolution)
            log.info("simulated %d trajectories in %.1f s", trajectories.count, time.monotonic() - started)
        return nnbenchmark.write_trajectories(trajectories, Path(out), overwrite, normalization)
