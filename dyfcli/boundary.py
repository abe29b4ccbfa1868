"""Known values of the physical systems, imposed on every forecast frame (docs/paper-notes.md §5).

DYffusion writes the boundary conditions of the nn-benchmark systems into each predicted frame before it
is stored or fed back into the next autoregressive window:

* Navier–Stokes: velocity `u, v = 0` on fixed nodes (walls, inlet column, obstacles), pressure `p = 0` on
  obstacle nodes, then the ramped parabolic inflow `u(y, t) = U·4y(H−y)/H²·(1−e^{−5t})` on the inlet
  column x = 0.
* Spring mesh: pinned particles keep momentum `p = 0` and their positions at the first time step.

Unlike the official code (which, for Navier–Stokes, indexed the ensemble axis as if it were the batch axis
and so constrained only member 0), `apply` constrains every member and every lead time.

Everything here works on physical units and tensors shaped `(B, L, C, Y, X)`: batch (or member) B, lead
times L, channels C in the store's field order. `boundary_for(store, series)` reads what it needs from a
data store: the `dyf_boundary` attribute, the `cond_fixed` / `cond_obstacle` fields, the y coordinate and,
for the spring mesh, the first frame of the series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dyfcli.errors import DataError

NAVIER_STOKES = "navier-stokes"
SPRING_MESH = "spring-mesh"


def inflow_velocity(y: torch.Tensor, time: torch.Tensor, in_velocity: torch.Tensor | float,
                    height: float, ramp_rate: float) -> torch.Tensor:
    """Streamwise inflow `U·4y(H−y)/H²·(1−e^{−ramp·t})`; broadcasts `y`, `time` and `in_velocity`."""
    return in_velocity * 4.0 * y * (height - y) / (height * height) * (1.0 - torch.exp(-ramp_rate * time))


@dataclass(frozen=True)
class NavierStokesBoundary:
    """Walls, inlet and obstacles of the channel flow, for a batch of series.

    fixed, obstacle: bool `(S, Y, X)` (S = 1 or the batch size B); y: node heights `(Y,)`;
    in_velocity: `(S,)` peak inflow speed; channels: indices of u, v, p in the field order.
    """

    fixed: torch.Tensor
    obstacle: torch.Tensor
    y: torch.Tensor
    in_velocity: torch.Tensor
    height: float
    ramp_rate: float
    channels: tuple[int, int, int]

    def apply(self, x: torch.Tensor, times: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Return a copy of `x (B, L, C, Y, X)` with the known values set at physical `times` `(L,)` or `(B, L)`."""
        u, v, p = self.channels
        out = x.clone()
        times = _times_like(times, x)
        fixed = self.fixed.to(x.device)[:, None]          # (S, 1, Y, X)
        obstacle = self.obstacle.to(x.device)[:, None]
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        out[:, :, u] = torch.where(fixed, zero, out[:, :, u])
        out[:, :, v] = torch.where(fixed, zero, out[:, :, v])
        out[:, :, p] = torch.where(obstacle, zero, out[:, :, p])
        y = self.y.to(device=x.device, dtype=x.dtype)
        speed = self.in_velocity.to(device=x.device, dtype=x.dtype)[:, None, None]   # (S, 1, 1)
        out[:, :, u, :, 0] = inflow_velocity(y, times[..., None], speed, self.height, self.ramp_rate)
        return out


@dataclass(frozen=True)
class SpringMeshBoundary:
    """Pinned particles of the spring mesh, for a batch of series.

    pinned: bool `(S, Y, X)`; initial_positions: `(S, 2, Y, X)` positions at the first time step;
    momentum_channels / position_channels: indices of (px, py) and (qx, qy) in the field order.
    """

    pinned: torch.Tensor
    initial_positions: torch.Tensor
    momentum_channels: tuple[int, int]
    position_channels: tuple[int, int]

    def apply(self, x: torch.Tensor, times: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
        """Return a copy of `x (B, L, C, Y, X)` with pinned particles at rest at their first positions."""
        out = x.clone()
        pinned = self.pinned.to(x.device)[:, None]                       # (S, 1, Y, X)
        positions = self.initial_positions.to(device=x.device, dtype=x.dtype)[:, None]  # (S, 1, 2, Y, X)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        for channel in self.momentum_channels:
            out[:, :, channel] = torch.where(pinned, zero, out[:, :, channel])
        for component, channel in enumerate(self.position_channels):
            out[:, :, channel] = torch.where(pinned, positions[:, :, component], out[:, :, channel])
        return out


Boundary = NavierStokesBoundary | SpringMeshBoundary


def _times_like(times, x: torch.Tensor) -> torch.Tensor:
    # torch.tensor copies: times often arrive as read-only arrays from xarray
    times = (times.to(x.device, x.dtype) if isinstance(times, torch.Tensor)
             else torch.tensor(times, dtype=x.dtype, device=x.device))
    if times.shape[-1] != x.shape[1]:
        raise ValueError(f"times has {times.shape[-1]} lead times but x has {x.shape[1]}")
    return times if times.ndim == 2 else times[None]


# ------------------------------------------------------------------------------------------ from a store

def boundary_for(store, series_index: int | Sequence[int]) -> Boundary | None:
    """The boundary conditions of one series (or a batch of series) of an opened data store.

    `store` is a `dyfcli.store.DataStore`; returns None when the store has no `dyf_boundary` attribute.
    With a list of series indices, the returned boundary's leading axis matches `x`'s batch axis.
    """
    spec = store.ds.attrs.get("dyf_boundary")
    if not spec:
        return None
    indices = [int(series_index)] if isinstance(series_index, int) else [int(i) for i in series_index]
    kind = spec.get("kind")
    if kind == NAVIER_STOKES:
        return _navier_stokes_boundary(store, spec, indices)
    if kind == SPRING_MESH:
        return _spring_mesh_boundary(store, spec, indices)
    raise DataError(f"the store's dyf_boundary kind {kind!r} is unknown (expected {NAVIER_STOKES!r} or "
                    f"{SPRING_MESH!r}); re-create the store with `dyf prepare`")


def _channel(store, name: str) -> int:
    fields = store.fields
    if name not in fields:
        raise DataError(f"the store's boundary conditions need field {name!r} but it has {fields}; "
                        "re-create the store with `dyf prepare`")
    return fields.index(name)


def _static(store, name: str, indices: list[int]) -> torch.Tensor:
    if name not in store.ds.data_vars:
        raise DataError(f"the store's boundary conditions need {name}(series, y, x); "
                        "re-create the store with `dyf prepare`")
    values = store.ds[name].isel(series=indices).values
    return torch.as_tensor(values != 0)


def _navier_stokes_boundary(store, spec: dict, indices: list[int]) -> NavierStokesBoundary:
    speeds = spec.get("in_velocity", 1.0)
    speeds = [speeds[i] for i in indices] if isinstance(speeds, list) else [speeds] * len(indices)
    u, v, p = (_channel(store, spec.get(key, default)) for key, default in
               (("u_field", "u"), ("v_field", "v"), ("p_field", "p")))
    return NavierStokesBoundary(
        fixed=_static(store, "cond_fixed", indices),
        obstacle=_static(store, "cond_obstacle", indices),
        y=torch.tensor(store.ds["y"].values, dtype=torch.float64),
        in_velocity=torch.tensor(speeds, dtype=torch.float64),
        height=float(spec.get("height", 0.41)),
        ramp_rate=float(spec.get("ramp_rate", 5.0)),
        channels=(u, v, p),
    )


def _spring_mesh_boundary(store, spec: dict, indices: list[int]) -> SpringMeshBoundary:
    momentum = tuple(_channel(store, name) for name in spec.get("momentum_fields", ["px", "py"]))
    position_names = spec.get("position_fields", ["qx", "qy"])
    position = tuple(_channel(store, name) for name in position_names)
    first = [store.ds[name].isel(series=indices, time=0).values for name in position_names]
    initial = torch.as_tensor(np.stack(first, axis=1).astype(np.float64))   # (S, 2, Y, X)
    if not torch.isfinite(initial).all():
        raise DataError("the first frame of a spring-mesh series has missing positions; "
                        "re-create the store with `dyf prepare spring-mesh`")
    return SpringMeshBoundary(pinned=_static(store, "cond_fixed", indices), initial_positions=initial,
                              momentum_channels=momentum, position_channels=position)


__all__ = ["Boundary", "NavierStokesBoundary", "SpringMeshBoundary", "boundary_for", "inflow_velocity",
           "NAVIER_STOKES", "SPRING_MESH"]
