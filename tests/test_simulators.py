"""Built-in simulators: physics of the Navier–Stokes and spring-mesh solvers, reproducibility, `dyf prepare`."""

import json
import math

import numpy as np
import pytest
import torch

from dyfcli.errors import UsageError
from dyfcli.sources import navier_stokes as ns
from dyfcli.sources import nnbenchmark
from dyfcli.sources import spring_mesh as sm
from dyfcli.store import open_store


# ------------------------------------------------------------------------------------------ Navier–Stokes

def test_obstacles_follow_nn_benchmark_rules():
    for seed in range(30):
        obstacles = ns.sample_obstacles(np.random.default_rng(seed))
        assert len(obstacles) == 4
        for o in obstacles:
            assert 0.05 <= o.radius <= 0.1
            assert 0.25 + o.radius <= o.x <= 2.2 - 0.25 - o.radius
            assert 0.05 + o.radius <= o.y <= 0.41 - 0.05 - o.radius
        for i, a in enumerate(obstacles):
            for b in obstacles[i + 1:]:
                assert math.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius + 0.05
    assert ns.sample_obstacles(np.random.default_rng(3)) == ns.sample_obstacles(np.random.default_rng(3))


def test_node_masks_match_extra_fixed_mask_layout():
    obstacles = (ns.Obstacle(1.0, 0.2, 0.08),)
    fixed, obstacle = ns.node_masks(obstacles)
    assert fixed.shape == obstacle.shape == (42, 221)
    assert obstacle[20, 100] and not obstacle[20, 90] and not obstacle[5, 100]   # node (x=1.0, y=0.2)
    assert fixed[0].all() and fixed[-1].all() and fixed[:, 0].all()
    assert not fixed[1:-1, -1].any()                                             # outlet is not fixed
    assert (fixed[1:-1, 1:] == obstacle[1:-1, 1:]).all()


def test_pressure_solver_inverts_the_channel_laplacian():
    flow = ns.ChannelFlow([()], [1.0], dtype=torch.float64)
    phi = torch.randn(1, flow.ny, flow.nx, dtype=torch.float64)
    padded = torch.cat([phi[:, :1], phi, phi[:, -1:]], dim=1)                    # Neumann walls
    padded = torch.cat([padded[..., :1], padded, -padded[..., -1:]], dim=-1)    # Neumann inlet, p = 0 outlet
    laplacian = (padded[:, 1:-1, 2:] + padded[:, 1:-1, :-2] + padded[:, 2:, 1:-1] + padded[:, :-2, 1:-1]
                 - 4 * padded[:, 1:-1, 1:-1]) / flow.h**2
    assert torch.allclose(flow.solve_poisson(laplacian), phi, atol=1e-9)


def test_advection_of_linear_fields_is_exact_away_from_boundaries():
    flow = ns.ChannelFlow([()], [1.0], dtype=torch.float64)
    x_faces = torch.arange(flow.nx + 1, dtype=torch.float64) * flow.h
    u = (0.3 + 0.5 * x_faces).expand(1, flow.ny, flow.nx + 1).clone()
    v = torch.zeros(1, flow.ny + 1, flow.nx, dtype=torch.float64)
    du, dv = flow.tendency(u, v)
    expected = -(0.3 + 0.5 * x_faces[1:]) * 0.5                                # −u ∂u/∂x
    assert torch.allclose(du[0, 3:-3, 2:-3], expected[2:-3].expand(flow.ny - 6, -1), atol=1e-9)
    y_faces = torch.arange(flow.ny + 1, dtype=torch.float64) * flow.h
    v = (0.2 - 0.7 * y_faces)[:, None].expand(1, flow.ny + 1, flow.nx).clone()
    du, dv = flow.tendency(torch.zeros_like(u), v)
    expected = -(0.2 - 0.7 * y_faces[1:-1]) * -0.7                              # −v ∂v/∂y
    assert torch.allclose(dv[0, 3:-3, 3:-3], expected[3:-3, None].expand(-1, flow.nx - 6), atol=1e-9)


@pytest.fixture(scope="module")
def short_flow():
    """Two trajectories advanced by four output intervals (t = 0.32) with the production time stepper."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    obstacles = [ns.sample_obstacles(nnbenchmark.trajectory_rng(0, "train", i)) for i in range(2)]
    flow = ns.ChannelFlow(obstacles, [1.0, 1.0])
    state = flow.initial_state()
    nodes = []
    for _ in range(4):
        state = flow.advance(state, ns.OUTPUT_STEP)
        nodes.append(flow.to_nodes(state))
    torch.set_num_threads(threads)
    return flow, state, torch.stack(nodes, dim=1), obstacles


def test_velocity_is_divergence_free_and_mass_is_conserved(short_flow):
    flow, state, _, _ = short_flow
    speed = max(state.u.abs().max(), state.v.abs().max())
    assert speed > 0.5
    assert flow.divergence(state.u, state.v).abs().max() * flow.h / speed < 1e-4
    inflow, outflow = state.u[..., 0].sum(-1), state.u[..., -1].sum(-1)
    assert torch.allclose(inflow, outflow, rtol=1e-4)


def test_no_slip_walls_obstacles_and_inflow(short_flow):
    flow, state, nodes, obstacles = short_flow
    speed = state.u.abs().max()
    # direct forcing: velocity inside obstacles stays a small fraction of the flow speed
    assert (state.u * (1 - flow.fluid_u)).abs().max() < 0.1 * speed
    assert (state.v * (1 - flow.fluid_v)).abs().max() < 0.1 * speed
    assert (state.v[:, [0, -1]] == 0).all()
    # output nodes: walls at rest, inlet profile of the reference formula at each snapshot time
    assert (nodes[:, :, :2, [0, -1]] == 0).all()
    y = torch.arange(42, dtype=torch.float64) * 0.01
    for k, t in enumerate(ns.output_times(4)):
        profile = 1.0 * 4 * y * (0.41 - y) / 0.41**2 * (1 - math.exp(-5 * t))
        assert torch.allclose(nodes[:, k, 0, :, 0].double(), profile.expand(2, -1), atol=1e-6)
        assert (nodes[:, k, 1, :, 0] == 0).all()
    assert torch.isfinite(nodes).all()


def test_simulate_marks_obstacle_nodes_invalid():
    obstacles = [ns.sample_obstacles(np.random.default_rng(5))]
    frames = ns.simulate(obstacles, snapshots=1)
    assert frames.shape == (1, 1, 3, 42, 221) and frames.dtype == np.float32
    _, obstacle = ns.node_masks(obstacles[0])
    assert np.isnan(frames[0, 0][:, obstacle]).all()
    assert np.isfinite(frames[0, 0][:, ~obstacle]).all()


def test_navier_stokes_sets_are_reproducible_by_seed():
    cpu = torch.device("cpu")
    counts = {"train": 1, "val": 1, "test": 1}
    first = ns.simulated_trajectories(counts, seed=8, device=cpu, snapshots=1)
    again = ns.simulated_trajectories(counts, seed=8, device=cpu, snapshots=1)
    other = ns.simulated_trajectories(counts, seed=9, device=cpu, snapshots=1)
    for series in range(3):
        assert np.array_equal(first.load(series), again.load(series), equal_nan=True)
        assert not np.array_equal(first.load(series), other.load(series), equal_nan=True)
    assert first.recipe["obstacles"] == again.recipe["obstacles"] != other.recipe["obstacles"]
    assert (first.cond["obstacle"] == 1).sum() > 0 and (first.mask == (first.cond["obstacle"] == 0)).all()


# ---------------------------------------------------------------------------------------------- spring mesh

def test_mesh_topology_and_initial_conditions():
    a, b, rest = sm.springs()
    assert len(a) == 342
    assert np.isclose(rest, 1).sum() == 180 and np.isclose(rest, math.sqrt(2)).sum() == 162
    assert sm.pinned_mask().sum() == 10
    q0 = sm.sample_initial_positions(np.random.default_rng(1))
    displacement = np.linalg.norm(q0 - sm.rest_positions(), axis=-1)
    assert (displacement[sm.pinned_mask()] == 0).all()
    assert displacement[~sm.pinned_mask()].max() <= 0.35 and displacement[~sm.pinned_mask()].min() > 0
    far = np.linalg.norm(sm.sample_initial_positions(np.random.default_rng(1), sm.OOD_RADIUS_RANGE)
                         - sm.rest_positions(), axis=-1)[~sm.pinned_mask()]
    assert far.min() >= 0.35 and far.max() <= 0.45


def test_grid_layout_is_y_by_x_with_pinned_top_row():
    q0 = np.stack([sm.sample_initial_positions(np.random.default_rng(i)) for i in range(2)])
    frames = sm.simulate(q0, snapshots=3)
    assert frames.shape == (2, 3, 4, 10, 10)
    qx, qy = frames[:, 0, 2], frames[:, 0, 3]
    columns, rows = np.meshgrid(np.arange(10), np.arange(10))
    assert np.abs(qx - columns).max() <= 0.35 + 1e-6 and np.abs(qy - rows).max() <= 0.35 + 1e-6
    assert (qy[:, 9] == 9).all() and (qx[:, 9] == np.arange(10)).all()
    assert (frames[:, 0, :2] == 0).all()                                        # at rest


def test_pinned_particles_never_move_and_energy_decays():
    q0 = np.stack([sm.sample_initial_positions(np.random.default_rng(i)) for i in range(3)])
    mesh = sm.SpringMesh()
    q, velocity = torch.as_tensor(q0), torch.zeros(3, 100, 2, dtype=torch.float64)
    energies = [mesh.energy(q, velocity)]
    for _ in range(300):
        q, velocity = mesh.step(q, velocity, sm.OUTPUT_STEP)
        energies.append(mesh.energy(q, velocity))
    energies = torch.stack(energies)
    pinned = torch.as_tensor(sm.pinned_mask())
    assert (q[:, pinned] == torch.as_tensor(q0)[:, pinned]).all()
    assert (velocity[:, pinned] == 0).all()
    assert (energies[1:] <= energies[:-1] + 1e-9).all()                         # damping only removes energy
    assert (energies[-1] < 0.9 * energies[0]).all()
    moved = (q[:, ~pinned] - torch.as_tensor(q0)[:, ~pinned]).norm(dim=-1)
    assert moved.max() > 0.1


def test_rk4_at_the_output_step_is_converged():
    q0 = torch.as_tensor(np.stack([sm.sample_initial_positions(np.random.default_rng(7))]))
    frames_1 = sm.simulate(q0.numpy(), snapshots=60)
    frames_4 = sm.simulate(q0.numpy(), snapshots=60, substeps=4)
    assert np.abs(frames_1 - frames_4).max() < 1e-5


def test_simulated_sets_are_reproducible_by_seed():
    counts = {"train": 2, "val": 1, "test": 1, "test_ood": 1}
    first = sm.simulated_trajectories(counts, seed=4, device=torch.device("cpu"), snapshots=20)
    again = sm.simulated_trajectories(counts, seed=4, device=torch.device("cpu"), snapshots=20)
    other = sm.simulated_trajectories(counts, seed=5, device=torch.device("cpu"), snapshots=20)
    for series in range(5):
        assert np.array_equal(first.load(series), again.load(series))
        assert not np.array_equal(first.load(series), other.load(series))
    # a trajectory depends on (seed, split, index) only, not on the split sizes
    bigger = sm.simulated_trajectories({"train": 3, "val": 1, "test": 1}, seed=4, device=torch.device("cpu"),
                                       snapshots=20)
    assert np.array_equal(first.load(1), bigger.load(1))
    columns, rows = np.meshgrid(np.arange(10), np.arange(10))
    qx, qy = first.load(4)[0, 2], first.load(4)[0, 3]                          # test_ood series at t = 0
    displacement = np.hypot(qx - columns, qy - rows)[:9]
    assert displacement.min() >= 0.35 - 1e-6 and displacement.max() <= 0.45 + 1e-6


def test_prepare_spring_mesh_store_contents(tmp_path):
    summary = sm.prepare_spring_mesh(tmp_path / "sm.zarr", counts={"train": 3, "val": 1, "test": 1}, ood=True,
                                     seed=2, device="cpu", snapshots=30)
    store = open_store(tmp_path / "sm.zarr")
    ds = store.ds
    assert store.fields == ["px", "py", "qx", "qy"] and store.grid == (10, 10)
    assert summary["splits"] == {"train": 3, "val": 1, "test": 1, "test_ood": 1}
    assert store.splits["test_ood"] == {"series": [5]}
    assert ds.attrs["dyf_time_step"] == pytest.approx(0.00781)
    assert np.allclose(ds["time"].values, np.arange(30) * 0.00781)
    assert ds["mask"].values.all()
    assert (ds["cond_fixed"].values[:, 9] == 1).all() and (ds["cond_fixed"].values[:, :9] == 0).all()
    train = ds["qy"].isel(series=[0, 1, 2]).values.astype(np.float64)
    assert float(ds["stats_mean_qy"]) == pytest.approx(train.mean(), rel=1e-5)
    assert float(ds["stats_std_qy"]) == pytest.approx(train.std(), rel=1e-5)
    assert ds.attrs["dyf_boundary"]["kind"] == "spring-mesh"
    with pytest.raises(UsageError, match="already exists"):
        sm.prepare_spring_mesh(tmp_path / "sm.zarr", counts={"train": 1, "val": 1, "test": 1}, snapshots=5)


def test_prepare_rejects_bad_counts(tmp_path):
    with pytest.raises(UsageError, match="at least one"):
        ns.prepare_navier_stokes(tmp_path / "ns.zarr", counts={"train": 0, "val": 1, "test": 1})


# ---------------------------------------------------------------------------------------------- the CLI

def test_cli_prepare_navier_stokes_tiny(dyf, tmp_path):
    out = tmp_path / "ns.zarr"
    proc = dyf("--json", "prepare", "navier-stokes", "--out", str(out), "--trajectories", "1,1,1",
               "--snapshots", "2", "--seed", "3", "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["series"] == 3 and doc["grid"] == [42, 221] and doc["steps"] == 2
    ds = open_store(out).ds
    assert sorted(ds.data_vars) == sorted(["u", "v", "p", "mask", "cond_fixed", "cond_obstacle"]
                                          + [f"stats_{s}_{f}" for s in ("mean", "std") for f in "uvp"])
    assert np.allclose(ds["time"].values, [0.08, 0.16])
    u, mask = ds["u"].values, ds["mask"].values
    assert np.isnan(u[:, :, ~mask[0]][0]).all() and np.isfinite(u[0][:, mask[0]]).all()
    assert ((ds["cond_obstacle"].values == 1) == ~mask).all()
    assert ds.attrs["dyf_boundary"]["kind"] == "navier-stokes"


def test_cli_prepare_spring_mesh_with_ood(dyf, tmp_path):
    out = tmp_path / "sm.zarr"
    doc = json.loads(dyf("--json", "prepare", "spring-mesh", "--out", str(out), "--trajectories", "2,1,1",
                         "--ood", "--snapshots", "10", env={"OMP_NUM_THREADS": "1"}).stdout)
    assert doc["splits"] == {"train": 2, "val": 1, "test": 1, "test_ood": 1}
    assert open_store(out).splits["test_ood"] == {"series": [4]}


def run_in_process(capsys, *args: str) -> tuple[int, str]:
    """The real command-line entry point without a new process: (exit code, stderr)."""
    import logging

    from dyfcli.cli import main

    logger = logging.getLogger("dyf")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        with pytest.raises(SystemExit) as stop:
            main(list(args))
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("bad", ["2,1", "a,b,c", "1,0,1", "1,1,-1"])
def test_cli_bad_trajectories_is_usage_error(capsys, tmp_path, bad):
    code, err = run_in_process(capsys, "prepare", "spring-mesh", "--out", str(tmp_path / "x.zarr"),
                               "--trajectories", bad)
    assert code == 2 and "--trajectories" in err and "Traceback" not in err
    assert not (tmp_path / "x.zarr").exists()


def test_cli_existing_output_needs_overwrite(capsys, tmp_path):
    (tmp_path / "ns.zarr").mkdir()
    code, err = run_in_process(capsys, "prepare", "navier-stokes", "--out", str(tmp_path / "ns.zarr"))
    assert code == 2 and "--overwrite" in err
