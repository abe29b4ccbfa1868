"""Reading the original nn-benchmark files: tiny fake split folders in the exact on-disk format."""

import json
from pathlib import Path

import numpy as np
import pytest

from dyfcli.errors import DataError, UsageError
from dyfcli.sources import navier_stokes as ns
from dyfcli.sources import nnbenchmark
from dyfcli.sources import spring_mesh as sm
from dyfcli.store import open_store

NS_DIRS = nnbenchmark.NAVIER_STOKES.split_dirs
SM_DIRS = nnbenchmark.SPRING_MESH.split_dirs


def ns_value(trajectory: int, step: int, channel: int, x, y):
    """An integer (exact in float32) that says where it came from: trajectory, time step, channel, node x, y."""
    return (((trajectory * 4 + step) * 4 + channel) * 221 + x) * 42 + y


def write_ns_split(directory: Path, count: int, steps: int = 3, offset: int = 0,
                   system: str = "navier-stokes", nodes: int = 9282) -> None:
    """An nn-benchmark Navier–Stokes split: per-trajectory arrays, per-trajectory masks, shared vertices.

    The npz keys of trajectory 1 deliberately differ from the usual names: the reader must follow field_keys.
    """
    directory.mkdir(parents=True)
    node_x, node_y = np.divmod(np.arange(nodes), 42)            # y fastest
    arrays = {"vertices": np.stack([node_x * 0.01, node_y * 0.01], axis=-1)}
    metas = []
    for i in range(count):
        t = offset + i
        solutions = np.stack([[ns_value(t, k, c, node_x, node_y) for c in (0, 1)] for k in range(steps)])
        solutions = np.moveaxis(solutions, 1, -1)               # (T, nodes, 2)
        pressures = np.stack([ns_value(t, k, 2, node_x, node_y) for k in range(steps)])
        obstacle = (node_x - (20 + i)) ** 2 + (node_y - 20) ** 2 < 9
        fixed = obstacle | (node_y == 0) | (node_y == 41) | (node_x == 0)
        solutions[:, obstacle] = 0
        pressures[:, obstacle] = 0
        prefix = f"traj_{i:05d}" if i != 1 else f"odd_name_{i}"
        arrays.update({f"{prefix}_solutions": solutions, f"{prefix}_pressures": pressures,
                       f"{prefix}_t": 0.08 * np.arange(1, steps + 1),
                       f"{prefix}_extra_fixed_mask": np.stack([fixed, obstacle], axis=-1)})
        metas.append({"name": f"traj_{i:05d}", "num_time_steps": steps, "time_step_size": 0.08,
                      "in_velocity": 1.0 + 0.5 * i, "viscosity": 0.001, "noise_sigma": 0,
                      "field_keys": {"p": f"{prefix}_solutions", "q": f"{prefix}_pressures", "t": f"{prefix}_t",
                                     "extra_fixed_mask": f"{prefix}_extra_fixed_mask", "vertices": "vertices",
                                     "dpdt": f"{prefix}_grads"}})
    np.savez(directory / "trajectories.npz", **arrays)
    (directory / "system_meta.json").write_text(json.dumps(
        {"system": system, "system_args": {}, "metadata": {"grid_resolution": 0.01, "viscosity": 0.001},
         "trajectories": metas}))


def write_sm_split(directory: Path, count: int, steps: int = 4, offset: int = 0) -> None:
    """An nn-benchmark spring-mesh split with p and q encoding (trajectory, step, component, x, y)."""
    directory.mkdir(parents=True)
    node_x, node_y = np.divmod(np.arange(100), 10)
    arrays, metas = {}, []
    for i in range(count):
        t = offset + i
        p = np.stack([np.stack([ns_value(t, k, c, node_x, node_y) for c in (0, 1)], -1) for k in range(steps)])
        q = np.stack([np.stack([ns_value(t, k, c, node_x, node_y) for c in (2, 3)], -1) for k in range(steps)])
        name = f"traj_{i:05d}"
        arrays.update({f"{name}_p": p, f"{name}_q": q, f"{name}_t": 0.00781 * np.arange(steps),
                       f"{name}_fixed_mask": node_y == 9, f"{name}_masses": np.ones(100)})
        metas.append({"name": name, "num_time_steps": steps, "time_step_size": 0.00781, "noise_sigma": 0,
                      "field_keys": {"p": f"{name}_p", "q": f"{name}_q", "t": f"{name}_t",
                                     "fixed_mask": f"{name}_fixed_mask", "masses": f"{name}_masses"}})
    np.savez(directory / "trajectories.npz", **arrays)
    (directory / "system_meta.json").write_text(json.dumps(
        {"system": "spring-mesh", "metadata": {"vel_decay": 0.1}, "trajectories": metas}))


@pytest.fixture
def ns_archive(tmp_path):
    base = tmp_path / "physical-nn-benchmark" / "navier-stokes-multi" / "run" / "data_gen"
    write_ns_split(base / NS_DIRS["train"], 3)
    write_ns_split(base / NS_DIRS["val"], 1, offset=10)
    write_ns_split(base / NS_DIRS["test"], 2, offset=20)
    # a coarser evaluation set and a smaller training set that must not be picked
    write_ns_split(base / "ns-runs_eval-cors4-navier-stokes-n5-t16-n0_tagcors4_00001", 1, offset=90)
    return tmp_path / "physical-nn-benchmark"


def test_navier_stokes_values_land_in_place(ns_archive, tmp_path):
    summary = ns.prepare_navier_stokes(tmp_path / "ns.zarr", source=ns_archive)
    assert summary["splits"] == {"train": 3, "val": 1, "test": 2}
    ds = open_store(tmp_path / "ns.zarr").ds
    assert ds["u"].shape == (6, 3, 42, 221)
    assert np.allclose(ds["time"].values, [0.08, 0.16, 0.24])
    assert np.allclose(ds["x"].values, np.arange(221) * 0.01) and np.allclose(ds["y"].values, np.arange(42) * 0.01)
    series_source = [0, 1, 2, 10, 20, 21]
    for series, source in enumerate(series_source):
        for name, channel in (("u", 0), ("v", 1), ("p", 2)):
            for step, y, x in ((0, 5, 3), (2, 41, 220), (1, 30, 150)):
                assert ds[name].values[series, step, y, x] == ns_value(source, step, channel, x, y)
    obstacle = ds["cond_obstacle"].values == 1
    assert obstacle[0, 20, 20] and obstacle[1, 20, 21] and not obstacle[0, 20, 30]   # trajectory 1 moved by one
    assert (ds["mask"].values == ~obstacle).all()
    assert np.isnan(ds["p"].values[0, :, 20, 20]).all()
    fixed = ds["cond_fixed"].values == 1
    assert fixed[:, 0].all() and fixed[:, -1].all() and fixed[:, :, 0].all() and not fixed[:, 1:-1, -1].any()
    assert ds.attrs["dyf_boundary"]["in_velocity"] == [1.0, 1.5, 2.0, 1.0, 1.0, 1.5]
    assert ds.attrs["dyf_splits"]["test"] == {"series": [4, 5]}
    train = ds["u"].isel(series=[0, 1, 2]).values.astype(np.float64)
    assert float(ds["stats_mean_u"]) == pytest.approx(np.nanmean(train), rel=1e-5)
    assert float(ds["stats_std_u"]) == pytest.approx(np.nanstd(train), rel=1e-4)


def test_trajectory_counts_keep_the_first_ones(ns_archive, tmp_path):
    ns.prepare_navier_stokes(tmp_path / "ns.zarr", source=ns_archive, counts={"train": 2, "val": 1, "test": 1})
    ds = open_store(tmp_path / "ns.zarr").ds
    assert ds.sizes["series"] == 4
    assert ds["u"].values[3, 0, 5, 3] == ns_value(20, 0, 0, 3, 5)
    with pytest.raises(UsageError, match="at most 3"):
        ns.prepare_navier_stokes(tmp_path / "more.zarr", source=ns_archive, counts={"train": 4, "val": 1, "test": 1})


def test_split_folders_matched_by_pattern_in_a_plain_folder(tmp_path):
    root = tmp_path / "splits"
    write_ns_split(root / "ns-runs_train-navier-stokes-n25-t3-n0_00001", 1)
    write_ns_split(root / "ns-runs_train-navier-stokes-n100-t3-n0_00001", 2)
    write_ns_split(root / "ns-runs_val-navier-stokes-n2-t3-n0_00001", 1, offset=10)
    write_ns_split(root / "ns-runs_eval-outdist-cors1-navier-stokes-n5-t3-n0_tagcors1_00001", 1, offset=80)
    write_ns_split(root / "ns-runs_eval-cors16-navier-stokes-n5-t3-n0_tagcors16_00001", 1, offset=90)
    write_ns_split(root / "ns-runs_eval-cors1-navier-stokes-n5-t3-n0_tagcors1_00001", 1, offset=20)
    dirs = nnbenchmark.find_split_dirs(root, nnbenchmark.NAVIER_STOKES)
    assert dirs["train"].name == "ns-runs_train-navier-stokes-n100-t3-n0_00001"
    assert dirs["test"].name == "ns-runs_eval-cors1-navier-stokes-n5-t3-n0_tagcors1_00001"


def test_spring_mesh_values_land_in_place_with_ood(tmp_path):
    base = tmp_path / "spring-mesh" / "run" / "data_gen"
    write_sm_split(base / SM_DIRS["train"], 2)
    write_sm_split(base / SM_DIRS["val"], 1, offset=10)
    write_sm_split(base / SM_DIRS["test"], 1, offset=20)
    write_sm_split(base / "springmesh-10-perturball-runs_eval-outdist-spring-mesh-n15-t4-n0_tagcors1_00001", 1,
                   offset=30)
    summary = sm.prepare_spring_mesh(tmp_path / "sm.zarr", source=tmp_path, ood=True)
    assert summary["splits"] == {"train": 2, "val": 1, "test": 1, "test_ood": 1}
    ds = open_store(tmp_path / "sm.zarr").ds
    for series, source in enumerate([0, 1, 10, 20, 30]):
        for c, name in enumerate(("px", "py", "qx", "qy")):
            for step, y, x in ((0, 9, 2), (3, 4, 7)):
                assert ds[name].values[series, step, y, x] == ns_value(source, step, c, x, y)
    pinned = ds["cond_fixed"].values == 1
    assert pinned[:, 9].all() and not pinned[:, :9].any()
    assert ds["mask"].values.all()
    assert np.allclose(ds["time"].values, 0.00781 * np.arange(4))


def test_bad_archives_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        nnbenchmark.find_split_dirs(tmp_path / "missing", nnbenchmark.NAVIER_STOKES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no nn-benchmark split folders"):
        nnbenchmark.find_split_dirs(tmp_path / "empty", nnbenchmark.NAVIER_STOKES)
    wrong = tmp_path / "wrong"
    write_ns_split(wrong / NS_DIRS["train"], 1, system="spring-mesh")
    with pytest.raises(DataError, match="holds system 'spring-mesh'"):
        nnbenchmark.open_split(wrong / NS_DIRS["train"], nnbenchmark.NAVIER_STOKES)
    small = tmp_path / "small"
    write_ns_split(small / NS_DIRS["train"], 1, nodes=100)
    split = nnbenchmark.open_split(small / NS_DIRS["train"], nnbenchmark.NAVIER_STOKES)
    with pytest.raises(DataError, match="9282 nodes"):
        nnbenchmark.read_navier_stokes(split, 0)
    (small / NS_DIRS["train"] / "trajectories.npz").unlink()
    with pytest.raises(DataError, match="trajectories.npz is missing"):
        nnbenchmark.open_split(small / NS_DIRS["train"], nnbenchmark.NAVIER_STOKES)
    only_train = tmp_path / "only-train"
    write_ns_split(only_train / NS_DIRS["train"], 1)
    with pytest.raises(DataError, match="no val split"):
        nnbenchmark.find_split_dirs(only_train, nnbenchmark.NAVIER_STOKES)


def test_cli_from_archive(dyf, ns_archive, tmp_path):
    out = tmp_path / "ns.zarr"
    doc = json.loads(dyf("--json", "prepare", "navier-stokes", "--from", str(ns_archive), "--out", str(out)).stdout)
    assert doc["ok"] and doc["splits"] == {"train": 3, "val": 1, "test": 2}
    assert open_store(out).ds["u"].values[0, 0, 5, 3] == ns_value(0, 0, 0, 3, 5)


def test_cli_missing_or_broken_from_is_exit_4(capsys, tmp_path):
    from test_simulators import run_in_process

    for name in NS_DIRS.values():
        (tmp_path / "garbage" / name).mkdir(parents=True)
        (tmp_path / "garbage" / name / "system_meta.json").write_text("{not json")
    for source, message in ((tmp_path / "nope", "--from"), (tmp_path / "garbage", "not readable JSON")):
        code, err = run_in_process(capsys, "prepare", "navier-stokes", "--from", str(source),
                                   "--out", str(tmp_path / "x.zarr"))
        assert code == 4 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.zarr").exists()
