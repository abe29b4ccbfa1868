"""Boundary conditions imposed on forecasts: every member, every lead time, each series its own geometry."""

import math

import numpy as np
import pytest
import torch
import xarray as xr

from dyfcli.boundary import NavierStokesBoundary, SpringMeshBoundary, boundary_for
from dyfcli.errors import DataError
from dyfcli.sources import navier_stokes as ns
from dyfcli.sources import spring_mesh as sm
from dyfcli.store import open_store
from storefactory import make_store


@pytest.fixture(scope="module")
def ns_store(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("boundary") / "ns.zarr"
    ns.prepare_navier_stokes(path, counts={"train": 1, "val": 1, "test": 1}, seed=1, device="cpu", snapshots=2)
    torch.set_num_threads(threads)
    return open_store(path)


@pytest.fixture(scope="module")
def sm_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("boundary") / "sm.zarr"
    sm.prepare_spring_mesh(path, counts={"train": 2, "val": 1, "test": 1}, seed=1, device="cpu", snapshots=40)
    return open_store(path)


def inflow(y: np.ndarray, t: float, speed: float = 1.0) -> np.ndarray:
    return speed * 4 * y * (0.41 - y) / 0.41**2 * (1 - math.exp(-5 * t))


def test_navier_stokes_boundary_sets_every_member(ns_store):
    boundary = boundary_for(ns_store, 2)
    assert isinstance(boundary, NavierStokesBoundary)
    fixed = ns_store.ds["cond_fixed"].values[2] == 1
    obstacle = ns_store.ds["cond_obstacle"].values[2] == 1
    x = torch.randn(5, 4, 3, 42, 221) + 3.0                    # 5 members, 4 lead times, (u, v, p)
    times = torch.tensor([0.4, 0.48, 0.56, 0.64])
    out = boundary.apply(x, times)
    assert out.shape == x.shape and not torch.equal(out, x)
    y = ns_store.ds["y"].values
    for member in range(5):
        for lead, t in enumerate(times.tolist()):
            frame = out[member, lead].numpy()
            assert np.allclose(frame[0][:, 0], inflow(y, t), atol=1e-6)     # inlet column
            inner_fixed = fixed.copy()
            inner_fixed[:, 0] = False
            assert (frame[0][inner_fixed] == 0).all() and (frame[1][fixed] == 0).all()
            assert (frame[2][obstacle] == 0).all()
            free = ~fixed
            assert np.array_equal(frame[:2][:, free], x[member, lead, :2].numpy()[:, free])
            assert np.array_equal(frame[2][~obstacle], x[member, lead, 2].numpy()[~obstacle])


def test_navier_stokes_truth_already_satisfies_its_boundary(ns_store):
    truth = torch.as_tensor(np.stack([ns_store.ds[f].values[0] for f in ("u", "v", "p")], axis=1))[None]
    times = ns_store.ds["time"].values
    out = boundary_for(ns_store, 0).apply(truth, times)
    valid = torch.as_tensor(ns_store.ds["mask"].values[0])
    assert torch.allclose(out[..., valid], truth[..., valid], atol=1e-6)


def test_batched_navier_stokes_boundary_uses_each_series_geometry(ns_store):
    batched = boundary_for(ns_store, [0, 2])
    x = torch.ones(2, 1, 3, 42, 221)
    out = batched.apply(x, torch.tensor([[1.0], [2.0]]))                # per-series times (B, L)
    for row, series in enumerate([0, 2]):
        single = boundary_for(ns_store, series).apply(x[row:row + 1], [1.0 + row])
        assert torch.equal(out[row:row + 1], single)
    assert not torch.equal(out[0], out[1])


def test_in_velocity_per_series_scales_the_inflow():
    boundary = NavierStokesBoundary(
        fixed=torch.zeros(2, 4, 3, dtype=torch.bool), obstacle=torch.zeros(2, 4, 3, dtype=torch.bool),
        y=torch.linspace(0, 0.41, 4, dtype=torch.float64), in_velocity=torch.tensor([1.0, 2.0]),
        height=0.41, ramp_rate=5.0, channels=(0, 1, 2))
    out = boundary.apply(torch.zeros(2, 1, 3, 4, 3), [10.0])
    assert torch.allclose(out[1, 0, 0, :, 0], 2 * out[0, 0, 0, :, 0])
    assert out[0, 0, 0, 1, 0] == pytest.approx(inflow(np.array(0.41 / 3), 10.0), rel=1e-5)


def test_spring_mesh_boundary_pins_every_member(sm_store):
    boundary = boundary_for(sm_store, 3)
    assert isinstance(boundary, SpringMeshBoundary)
    x = torch.randn(6, 3, 4, 10, 10)
    out = boundary.apply(x, torch.zeros(3))
    first_q = np.stack([sm_store.ds[f].values[3, 0] for f in ("qx", "qy")])
    assert (out[:, :, :2, 9] == 0).all()
    assert torch.allclose(out[:, :, 2:, 9], torch.as_tensor(first_q[:, 9]).float().expand(6, 3, 2, 10))
    assert torch.equal(out[:, :, :, :9], x[:, :, :, :9])
    assert (first_q[1, 9] == 9).all() and np.allclose(first_q[0, 9], np.arange(10))


def test_spring_mesh_truth_already_satisfies_its_boundary(sm_store):
    truth = torch.as_tensor(np.stack([sm_store.ds[f].values[1] for f in ("px", "py", "qx", "qy")], axis=1))[None]
    assert torch.equal(boundary_for(sm_store, 1).apply(truth), truth)


def test_store_without_boundary_and_unknown_kind(tmp_path):
    store = open_store(make_store(tmp_path / "plain.zarr"))
    assert boundary_for(store, 0) is None
    ds = xr.open_zarr(tmp_path / "plain.zarr").load()
    ds.attrs["dyf_boundary"] = {"kind": "heat-equation"}
    ds.to_zarr(tmp_path / "odd.zarr", mode="w")
    with pytest.raises(DataError, match="heat-equation"):
        boundary_for(open_store(tmp_path / "odd.zarr"), 0)


def test_apply_does_not_modify_its_input(sm_store):
    x = torch.randn(2, 2, 4, 10, 10)
    before = x.clone()
    boundary_for(sm_store, 0).apply(x)
    assert torch.equal(x, before)
