"""Fault suite (issue 14, items 8, 10, 12): non-finite inputs, member-batch exactness, kill -9 of prepare sst.

Each test reproduces one reported fault on a tiny input written here and fails on the code before the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from oisst_files import days, write_psl


def _dyf_command(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("dyf")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "dyfcli", *args]


# ------------------------------------------------------------------------- item 12: workers die with dyf

def _forkserver_with_workers(parent, count: int, timeout: float) -> list:
    """All descendants of `parent` once one child (the forkserver) has `count` children (the pool's
    workers); [] after `timeout` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in parent.children():
            try:
                if len(child.children()) >= count:
                    return parent.children(recursive=True)
            except psutil.NoSuchProcess:  # a child may exit while we look
                continue
        time.sleep(0.02)
    return []


@pytest.mark.fault
def test_kill_9_of_prepare_sst_takes_its_reading_processes_with_it(tmp_path):
    """Forkserver workers used to outlive a kill -9 of dyf for minutes (with the forkserver and the resource
    tracker), holding its pipes: they now watch dyf and exit with it, and the others follow."""
    import psutil

    raw = tmp_path / "raw"
    write_psl(raw, days("2003-01-01", "2004-12-31"))
    proc = subprocess.Popen(_dyf_command("prepare", "sst", str(raw), "--out", str(tmp_path / "sst.zarr"),
                                         "--boxes", "84-85", "--workers", "2", "--train-until", "2003",
                                         "--val", "2004-01:2004-06", "--test", "2004-07:2004-12"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    descendants = []
    try:
        descendants = _forkserver_with_workers(psutil.Process(proc.pid), 2, timeout=60)
        assert descendants, f"no forkserver with two workers appeared (dyf exited {proc.poll()})"
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(descendants, timeout=5)
        assert not alive, f"still alive 5 s after kill -9 of dyf: {[(p.pid, p.cmdline()[-2:]) for p in alive]}"
    finally:
        for process in descendants:  # started by this test: end them whatever happened
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()


@pytest.mark.fault
def test_reading_processes_poll_for_dyf_where_they_cannot_wait_on_it(tmp_path):
    """The fallback without pidfd (not Linux): a process that runs the initializer ends when `pid` ends."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    code = ("import os, sys, time\n"
            "del os.pidfd_open\n"
            "from dyfcli.sources import oisst\n"
            f"oisst.exit_with_process({sleeper.pid})\n"
            "print('watching', flush=True)\n"
            "time.sleep(60)\n")
    watcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().strip() == "watching"
        sleeper.kill()
        sleeper.wait()
        assert watcher.wait(timeout=5) == 1
    finally:
        for process in (sleeper, watcher):
            if process.poll() is None:
                process.kill()


# ------------------------------------------------------------------ item 8: infinite values in the inputs

def _netcdf_days(path: Path, first_day: int, values: np.ndarray) -> Path:
    """A daily CF file of `tas(time, lat, lon)` starting `first_day` days after 2000-01-01."""
    import xarray as xr

    ds = xr.Dataset({"tas": (("time", "lat", "lon"), values, {"units": "K"})},
                    coords={"time": ("time", first_day + np.arange(len(values), dtype=np.float64),
                                     {"units": "days since 2000-01-01"}),
                            "lat": ("lat", np.linspace(-10, 10, values.shape[1]), {"units": "degrees_north"}),
                            "lon": ("lon", np.linspace(0, 30, values.shape[2]), {"units": "degrees_east"})})
    ds.to_netcdf(path)
    return path


def _tas(steps: int, seed: int) -> np.ndarray:
    return (280 + np.random.default_rng(seed).normal(size=(steps, 5, 7))).astype(np.float32)


@pytest.mark.fault
def test_prepare_netcdf_refuses_infinite_values_naming_variable_file_count_and_place(capsys, tmp_path):
    from test_simulators import run_in_process

    _netcdf_days(tmp_path / "a.nc", 0, _tas(10, 0))
    damaged = _tas(10, 1)
    damaged[3, 2, 4] = np.inf   # 2000-01-14 in b.nc
    damaged[6, 0, 0] = -np.inf
    _netcdf_days(tmp_path / "b.nc", 10, damaged)
    out = tmp_path / "tas.zarr"
    code, err = run_in_process(capsys, "prepare", "netcdf", str(tmp_path / "a.nc"), str(tmp_path / "b.nc"),
                               "--var", "tas", "--out", str(out))
    assert code == 4 and "Traceback" not in err
    for part in ("'tas'", "2 infinite values", "b.nc", "2000-01-14", "y 2, x 4", "lat 0", "lon 20",
                 "ds.where(np.isfinite(ds))"):
        assert part in err, (part, err)
    assert not out.exists()


@pytest.mark.fault
def test_prepare_netcdf_refuses_valid_points_without_training_data(capsys, tmp_path):
    """A point valid at the first time step (in the validation split here) but missing all through the
    training split would get NaN statistics: refused, not written."""
    from test_simulators import run_in_process

    values = _tas(40, 2)
    values[10:30, 1, 1] = np.nan  # missing exactly in the training span
    _netcdf_days(tmp_path / "a.nc", 0, values)
    out = tmp_path / "tas.zarr"
    code, err = run_in_process(capsys, "prepare", "netcdf", str(tmp_path / "a.nc"), "--var", "tas",
                               "--val", "2000-01-01:2000-01-10", "--train-until", "2000-01-11:2000-01-30",
                               "--test", "2000-01-31:", "--out", str(out))
    assert code == 4 and "Traceback" not in err
    assert "'tas': 1 valid point (" in err and "y 1, x 1" in err and "--train-until" in err
    assert not out.exists()
    # the same file with the point present in training is fine and its statistics are finite
    values[15, 1, 1] = 281.0
    _netcdf_days(tmp_path / "ok.nc", 0, values)
    code, err = run_in_process(capsys, "prepare", "netcdf", str(tmp_path / "ok.nc"), "--var", "tas",
                               "--val", "2000-01-01:2000-01-10", "--train-until", "2000-01-11:2000-01-30",
                               "--test", "2000-01-31:", "--out", str(tmp_path / "ok.zarr"))
    assert code == 0, err


def _spring_mesh_archive(root: Path, damage: dict[str, tuple[int, float]]) -> Path:
    """A tiny nn-benchmark spring-mesh archive; `damage` maps a split to (frame, value) put into its first
    trajectory's momentum at node 37 (y 7, x 3), component x."""
    from test_nnbenchmark import SM_DIRS, write_sm_split

    base = root / "spring-mesh" / "run" / "data_gen"
    for offset, split in enumerate(("train", "val", "test")):
        write_sm_split(base / SM_DIRS[split], 2 if split == "train" else 1, offset=10 * offset)
        if split in damage:
            npz = base / SM_DIRS[split] / "trajectories.npz"
            with np.load(npz) as opened:
                arrays = dict(opened)
            frame, value = damage[split]
            momentum = arrays["traj_00000_p"].astype(np.float64)
            momentum[frame, 37, 0] = value
            arrays["traj_00000_p"] = momentum
            np.savez(npz, **arrays)
    return root


@pytest.mark.fault
@pytest.mark.parametrize("split, value", [("train", np.nan), ("test", np.inf), ("val", 1e39)])
def test_prepare_from_nn_benchmark_refuses_non_finite_values(capsys, tmp_path, split, value):
    """NaN or ±inf at a valid node (1e39 overflows float32 to inf) would make the global statistics NaN or
    inf; in the test split they would be stored as data. Both the statistics pass and the write refuse."""
    from test_simulators import run_in_process

    archive = _spring_mesh_archive(tmp_path / "archive", {split: (2, value)})
    out = tmp_path / "sm.zarr"
    code, err = run_in_process(capsys, "prepare", "spring-mesh", "--from", str(archive), "--out", str(out))
    assert code == 4 and "Traceback" not in err
    assert "1 non-finite value" in err and "'px' at frame 2, node y 7, x 3" in err, err
    assert "trajectory 0 of" in err and "re-download" in err
    assert not out.exists()


@pytest.mark.fault
@pytest.mark.parametrize("workers", ["1", "2"])
def test_prepare_sst_refuses_infinite_values_in_raw_files(capsys, tmp_path, workers):
    """decode_sst used to take ±inf for land (NaN): an ocean pixel silently lost a day. Now it is refused,
    also when raised in a reading process; an infinity declared as the fill value stays missing."""
    from test_simulators import run_in_process

    from dyfcli.sources import oisst
    from oisst_files import synthetic_sst

    dates = days("2003-12-01", "2004-01-10")
    values = synthetic_sst(dates)
    values[35, 30, 40] = -np.inf   # 2004-01-05, inside box 84
    write_psl(tmp_path / "raw", dates, values=values)
    out = tmp_path / "sst.zarr"
    code, err = run_in_process(capsys, "prepare", "sst", str(tmp_path / "raw"), "--out", str(out), "--boxes", "84-85",
                               "--workers", workers, "--train-until", "2003-12-20", "--val", "2003-12-21:2003-12-31",
                               "--test", "2004")
    assert code == 4 and "Traceback" not in err
    assert "sst.day.mean.2004.nc, time index 4: sst holds 1 infinite value (±inf)" in err, err
    assert not out.exists()
    declared = oisst.decode_sst(np.array([np.inf, 1.5], dtype=np.float32), {"missing_value": np.float32(np.inf)})
    np.testing.assert_array_equal(np.isnan(declared), [True, False])


# ------------------------------------------------------------- item 10: --member-batch and bit-exactness

@pytest.mark.fault
def test_member_batch_does_not_change_a_single_bit_of_the_forecast(tmp_path):
    """CPU kernels round differently by batch size: members computed 1, 7 or 24 at a time used to differ
    by ~1e-6. Every network call now has the same rows whatever --member-batch."""
    from dyfcli import forecast
    from dyfcli.forecast_store import open_forecast
    from dyfcli.store import open_store
    from storefactory import make_store, make_untrained_checkpoint

    store = open_store(make_store(tmp_path / "data.zarr", dated=True, land=True))
    ckpt = make_untrained_checkpoint(store, tmp_path / "model.pt")
    forecasts = {}
    for member_batch in (1, 7, None):
        out = tmp_path / f"f{member_batch}.zarr"
        forecast.run_forecast(forecast.ForecastRequest(checkpoint=ckpt, out=out, horizon=6, ensemble=24,
                                                       data=store.path, init="0", seed=3,
                                                       member_batch=member_batch, device="cpu"))
        forecasts[member_batch] = open_forecast(out).ds["u"].values
    assert np.isfinite(forecasts[None][..., 5:, 5:]).all() and np.nanmean(forecasts[None].std(axis=2)) > 0
    for member_batch in (1, 7):
        np.testing.assert_array_equal(forecasts[member_batch], forecasts[None])


@pytest.mark.fault
def test_member_groups_fix_the_rows_of_every_network_call_on_cpu():
    import torch

    from dyfcli.forecast import member_groups

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for members in (1, 3, 8, 9, 24, 50, 200):
        for member_batch in (1, 7, members):
            groups, rows = member_groups(members, member_batch, cpu)
            assert [m for g in groups for m in g] == list(range(members))
            assert rows <= 8 and all(len(g) <= rows for g in groups) and len(groups) * rows - members < len(groups)
            assert (groups, rows) == member_groups(members, members, cpu)
    assert member_groups(50, 20, cuda) == ([range(0, 20), range(20, 40), range(40, 50)], None)
