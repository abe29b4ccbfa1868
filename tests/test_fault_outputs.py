"""Fault suite, outputs (issue 14 items 1, 2, 3, 11a, 14b): dyf never deletes what it did not write, one
writer per output, `--out` paths that are not new names are refused with nothing left behind, and a
forecast store killed while being created is recovered by re-running the same command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from dyfcli import outputs
from dyfcli.attrs import decode
from dyfcli.checkpoint import load_checkpoint, save_checkpoint, save_training_state
from dyfcli.config import load_config
from dyfcli.errors import UsageError
from dyfcli.evaluate import evaluate
from dyfcli.forecast import ForecastRequest, run_forecast
from dyfcli.sources.netcdf import prepare_netcdf
from dyfcli.store import open_store, write_store
from dyfcli.train import train_forecaster, train_interpolator
from storefactory import make_store, make_untrained_checkpoint

pytestmark = pytest.mark.fault

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SCORES_HEADER = "source,field,lead,lead_time,metric,value"
FORECAST_ARGS = ("--init", "0", "--horizon", "2", "--ensemble", "2", "--seed", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Read-only inputs shared by the module: a data store, a checkpoint, a forecast, a NetCDF file."""
    root = tmp_path_factory.mktemp("world")
    store = make_store(root / "s.zarr", steps=12)
    model = make_untrained_checkpoint(open_store(store), root / "model.pt")
    forecast = root / "f.zarr"
    run_forecast(ForecastRequest(checkpoint=model, out=forecast, horizon=2, ensemble=2, data=store, init="0",
                                 seed=1, device="cpu"))
    interpolator = root / "interpolator.pt"
    inner = load_checkpoint(model).interpolator
    save_checkpoint(interpolator, type(inner)(**{**inner.__dict__, "training": {"complete": True}}))
    raw = root / "uv.nc"
    xr.Dataset({"u": (("time", "lat", "lon"), np.random.default_rng(0).normal(size=(6, 3, 4)), {"units": "1"})},
               coords={"time": ("time", np.arange(6.0) * 24, {"units": "hours since 2000-01-01"}),
                       "lat": [0.0, 1.0, 2.0], "lon": [0.0, 1.0, 2.0, 3.0]}).to_netcdf(raw)
    return {"root": root, "store": store, "model": model, "forecast": forecast, "interpolator": interpolator,
            "raw": raw}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry below `folder`, files with size and modification time: equal snapshots, nothing changed
    (a folder's own time is left out: a lock file that came and went changes it)."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        stat = path.lstat()
        found[str(path.relative_to(folder))] = ("folder",) if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return found


def user_folder(path: Path) -> Path:
    """A folder a user made: what dyf must never delete."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "data.txt").write_text("more")
    return path


def forecast_args(world, out: Path, *extra: str) -> list[str]:
    return ["forecast", "--ckpt", str(world["model"]), "--data", str(world["store"]), *FORECAST_ARGS,
            "--out", str(out), *extra]


# ----------------------------------------------------------------------------------------------- recognising

def test_kind_at_recognises_dyf_artefacts_by_their_own_metadata(world, tmp_path):
    kinds = {world["store"]: outputs.DATA_STORE, world["forecast"]: outputs.FORECAST,
             world["model"]: outputs.CHECKPOINT, world["interpolator"]: outputs.CHECKPOINT}
    for suffix in (".nc", ".csv", ".zarr"):
        kinds[evaluate(world["forecast"], out=tmp_path / f"scores{suffix}")["out"]] = outputs.SCORES
    save_training_state(tmp_path / "model.pt.state.pt", {"progress": {}})
    kinds[tmp_path / "model.pt.state.pt"] = outputs.TRAINING_STATE
    run = tmp_path / "model.pt.run"
    run.mkdir()
    (run / "config.yaml").write_text("a: 1\n")
    (run / "metrics.jsonl").write_text("{}\n")
    kinds[run] = outputs.RUN_FOLDER
    for path, kind in kinds.items():
        assert outputs.kind_at(path) == kind, path
    # what dyf did not write: a user's folder, CSV, torch file, a link to a dyf store, a run folder with notes
    (tmp_path / "mine.csv").write_text("a,b\n1,2\n")
    torch.save({"format": "mine", "w": torch.zeros(2)}, tmp_path / "mine.pt")
    (tmp_path / "link.zarr").symlink_to(world["store"])
    (run / "notes.txt").write_text("mine")
    for path in (user_folder(tmp_path / "notes.zarr"), tmp_path / "mine.csv", tmp_path / "mine.pt",
                 tmp_path / "link.zarr", run):
        assert outputs.kind_at(path) is None, path
    # a dyf checkpoint with a flipped byte or cut short is still recognised; a user's zip naming it is not
    damaged = tmp_path / "damaged.pt"
    data = bytearray(world["model"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert outputs.kind_at(damaged) == outputs.CHECKPOINT
    damaged.write_bytes(bytes(data[: len(data) // 3]))
    assert outputs.kind_at(damaged) == outputs.CHECKPOINT
    damaged.write_bytes(b"dyf-checkpoint, a text that names it\n")
    assert outputs.kind_at(damaged) is None


# ----------------------------------------------------------------------------------------------- item 14b

def _bad_outs(work: Path) -> dict[str, Path]:
    (work / "file.txt").write_text("mine")
    (work / "link.zarr").symlink_to(work / "file.txt")
    return {"dot": Path("."), "dotdot": Path(".."), "symlink": work / "link.zarr",
            "under a file": work / "file.txt" / "out.zarr"}


@pytest.mark.parametrize("command", ["prepare", "forecast", "evaluate", "train"])
def test_out_that_is_not_a_new_name_is_refused_with_nothing_left_behind(world, tmp_path, monkeypatch, command):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    bad = _bad_outs(work)
    if command in ("evaluate", "train"):
        (work / "link.nc").symlink_to(work / "file.txt")
        bad["symlink"] = work / "link.nc"
    before = snapshot(tmp_path)
    for name, out in bad.items():
        with pytest.raises(UsageError) as raised:
            _write(command, world, out, overwrite=True)
        assert str(out) in raised.value.message, name
    assert snapshot(tmp_path) == before
    # a regular file where a store folder is expected, or a folder where a file is expected
    wrong = work / "file.txt" if command in ("prepare", "forecast") else user_folder(work / "folder.nc")
    before = snapshot(tmp_path)
    with pytest.raises(UsageError):
        _write(command, world, wrong, overwrite=True)
    assert snapshot(tmp_path) == before


def _write(command: str, world, out: Path, *, overwrite: bool):
    """One writing workflow, called the way its CLI command calls it."""
    if command == "prepare":
        return prepare_netcdf([str(world["raw"])], ["u"], out, overwrite=overwrite)
    if command == "forecast":
        return run_forecast(ForecastRequest(checkpoint=world["model"], out=out, horizon=2, ensemble=2,
                                            data=world["store"], init="0", seed=1, device="cpu",
                                            overwrite=overwrite))
    if command == "evaluate":
        return evaluate(world["forecast"], out=out, overwrite=overwrite)
    return train_interpolator(world["store"], out, load_config("tiny"), device="cpu", overwrite=overwrite)


def test_cli_dot_and_symlink_outs_exit_2_without_traceback(dyf, world, tmp_path):
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "link.zarr").symlink_to(tmp_path / "file.txt")
    before = snapshot(tmp_path)
    for out in (".", str(tmp_path / "link.zarr"), str(tmp_path / "file.txt")):
        proc = dyf("prepare", "netcdf", str(world["raw"]), "--var", "u", "--out", out, "--overwrite", check=2)
        assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------- item 1

def test_evaluate_never_deletes_an_input_or_a_user_folder(dyf, world, tmp_path):
    before = snapshot(world["root"])
    for out, extra in ((world["store"], ["--truth", str(world["store"])]), (world["store"], []),
                       (world["forecast"], []), (world["store"] / "scores.nc", [])):
        for flags in ([], ["--overwrite"]):
            proc = dyf("evaluate", str(world["forecast"]), *extra, "--out", str(out), *flags, check=2,
                       env=ONE_THREAD)
            assert "Traceback" not in proc.stderr
    notes = user_folder(tmp_path / "notes.zarr")
    for flags in ([], ["--overwrite"]):
        proc = dyf("evaluate", str(world["forecast"]), "--out", str(notes), *flags, check=2, env=ONE_THREAD)
        assert str(notes) in proc.stderr
    assert (notes / "notes.txt").read_text() == "my notes" and (notes / "sub" / "data.txt").exists()
    assert snapshot(world["root"]) == before


def test_evaluate_overwrite_replaces_only_dyf_scores(dyf, world, tmp_path):
    out = tmp_path / "scores.csv"
    evaluate(world["forecast"], out=out)
    assert outputs.kind_at(out) == outputs.SCORES
    dyf("evaluate", str(world["forecast"]), "--out", str(out), check=2, env=ONE_THREAD)
    out.write_text(SCORES_HEADER + "\n")  # dyf's header: still dyf's scores, replaced below
    dyf("evaluate", str(world["forecast"]), "--out", str(out), "--overwrite", env=ONE_THREAD)
    assert len(out.read_text().splitlines()) > 1
    mine = tmp_path / "mine.csv"
    mine.write_text("my,table\n1,2\n")
    proc = dyf("evaluate", str(world["forecast"]), "--out", str(mine), "--overwrite", check=2, env=ONE_THREAD)
    assert "not a dyf scores file" in proc.stderr and mine.read_text() == "my,table\n1,2\n"
    for suffix in (".nc", ".zarr"):  # a data store (or a NetCDF file claiming to be one) where scores go
        with pytest.raises(UsageError, match="not a dyf scores file"):
            evaluate(world["forecast"], out=_not_scores(world["store"], tmp_path / f"data{suffix}"), overwrite=True)


def _not_scores(store: Path, path: Path) -> Path:
    """A dyf data store at `path` (.zarr), or a NetCDF file that is not scores (.nc)."""
    if path.suffix == ".zarr":
        return write_store(xr.open_zarr(store).load(), path)
    xr.Dataset({"a": ("x", np.zeros(3))}, attrs={"dyf_format": "dyf-data-store"}).to_netcdf(path)
    return path


# ----------------------------------------------------------------------------------------------- item 2

def test_prepare_overwrite_refuses_a_user_folder_and_its_partial(dyf, world, tmp_path):
    out = user_folder(tmp_path / "x.zarr")
    before = snapshot(tmp_path)
    proc = dyf("prepare", "netcdf", str(world["raw"]), "--var", "u", "--out", str(out), "--overwrite", check=2)
    assert "x.zarr is a folder dyf did not write" in proc.stderr
    assert snapshot(tmp_path) == before
    fresh = tmp_path / "y.zarr"
    user_folder(tmp_path / "y.zarr.partial")
    before = snapshot(tmp_path)
    for flags in ([], ["--overwrite"]):
        with pytest.raises(UsageError, match="y.zarr.partial is a folder dyf did not write"):
            prepare_netcdf([str(world["raw"])], ["u"], fresh, overwrite=bool(flags))
    assert snapshot(tmp_path) == before


def test_prepare_overwrite_replaces_a_dyf_store_and_keeps_a_users_old_folder(world, tmp_path):
    out = tmp_path / "x.zarr"
    prepare_netcdf([str(world["raw"])], ["u"], out)
    old = user_folder(tmp_path / "x.zarr.old")
    created = open_store(out).ds.attrs["dyf_created"]
    time.sleep(1.1)  # dyf_created has one-second resolution
    prepare_netcdf([str(world["raw"])], ["u"], out, overwrite=True)
    assert open_store(out).ds.attrs["dyf_created"] != created
    assert (old / "notes.txt").read_text() == "my notes" and (old / "sub" / "data.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.zarr", "x.zarr.old"]  # no lock, staging, backup


def test_prepare_refuses_to_write_over_its_input(world, tmp_path):
    raw = tmp_path / "sim.zarr"
    xr.Dataset({"w": (("time", "y", "x"), np.ones((8, 3, 4)))},
               coords={"time": ("time", np.arange(8) * 0.25, {"axis": "T"})}).to_zarr(raw)
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="is also an input"):
            prepare_netcdf([str(raw)], ["w"], raw, overwrite=overwrite)
        with pytest.raises(UsageError, match="holds the input"):
            prepare_netcdf([str(raw / "w")], ["w"], raw, overwrite=overwrite)
    assert snapshot(tmp_path) == before


def test_train_overwrite_refuses_user_run_folder_and_inputs(world, tmp_path):
    out = tmp_path / "model.pt"
    run = user_folder(tmp_path / "model.pt.run")
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="model.pt.run is a folder dyf did not write"):
        _write("train", world, out, overwrite=True)
    with pytest.raises(UsageError, match="model.pt.run is a folder dyf did not write"):
        _write("train", world, out, overwrite=False)  # a fresh run would write into it
    out.write_text("my model")
    (run / "sub" / "data.txt").unlink()
    (run / "sub").rmdir()
    (run / "notes.txt").unlink()
    with pytest.raises(UsageError, match="model.pt is a file dyf did not write"):
        _write("train", world, out, overwrite=True)
    assert out.read_text() == "my model" and run.is_dir()
    interpolator = world["interpolator"]
    before = snapshot(world["root"])
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="is also an input"):
            train_forecaster(world["store"], interpolator, interpolator=interpolator, overwrite=overwrite,
                             device="cpu")
        with pytest.raises(UsageError, match="lies inside the input"):
            train_interpolator(world["store"], world["store"] / "model.pt", load_config("tiny"), device="cpu",
                               overwrite=overwrite)
    assert snapshot(world["root"]) == before


def test_train_overwrite_removes_dyf_run_files_only(world, tmp_path):
    from dyfcli.runtime import Ranks
    from dyfcli.train import _prepare_output

    out = tmp_path / "model.pt"
    save_checkpoint(out, load_checkpoint(world["model"]))
    save_training_state(tmp_path / "model.pt.state.pt", {"progress": {}})
    run = tmp_path / "model.pt.run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "model.pt.notes").write_text("mine")
    with outputs.claim_output(out, outputs.CHECKPOINT, overwrite=True):
        assert _prepare_output(out, True, Ranks()) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt.notes"]


def test_remove_deletes_only_dyf_files_of_a_run_folder(tmp_path):
    run = tmp_path / "m.pt.run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    outputs.remove(run, outputs.RUN_FOLDER)
    assert not run.exists()
    user_folder(run)
    with pytest.raises(UsageError, match="dyf does not delete it"):
        outputs.remove(run, outputs.RUN_FOLDER)
    with pytest.raises(UsageError, match="dyf does not replace it"):
        outputs.move_into_place(tmp_path / "anything", run, outputs.DATA_STORE)
    assert (run / "notes.txt").exists()


# ----------------------------------------------------------------------------------------------- forecast

def test_forecast_never_writes_over_its_data_store(dyf, world, tmp_path):
    before = snapshot(world["root"])
    for flags in ([], ["--overwrite"], ["--resume"]):
        proc = dyf(*forecast_args(world, world["store"], *flags), check=2, env=ONE_THREAD)
        assert "is also an input" in proc.stderr or "not a dyf forecast store" in proc.stderr
    # the data store the checkpoint names (no --data) is an input too
    with pytest.raises(UsageError, match="lies inside the input"):
        run_forecast(ForecastRequest(checkpoint=world["model"], out=world["store"] / "f.zarr", horizon=2,
                                     ensemble=2, init="0", device="cpu", overwrite=True))
    partial = user_folder(tmp_path / "g.zarr.partial")
    with pytest.raises(UsageError, match="g.zarr.partial is a folder dyf did not write"):
        _write("forecast", world, tmp_path / "g.zarr", overwrite=False)
    assert (partial / "notes.txt").exists()
    assert snapshot(world["root"]) == before


# ----------------------------------------------------------------------------------------------- item 11a

@pytest.mark.parametrize("rerun", [["--resume"], [], ["--overwrite"]])
def test_kill_during_forecast_store_creation_is_recovered_by_rerunning(dyf, world, tmp_path, rerun):
    out = tmp_path / "f.zarr"
    kill = {**ONE_THREAD, "DYF_FAULT_KILL_AT": "forecast.schema_staged"}  # the schema written, not yet in place
    proc = dyf(*forecast_args(world, out), check=None, env=kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert outputs.kind_at(outputs.staging_path(out)) == outputs.STAGING  # half-created: recognisably dyf's
    assert outputs.lock_path(out).exists()  # the killed process's lock file: stale, must not block
    dyf(*forecast_args(world, out, *rerun), env=ONE_THREAD)
    reference = xr.open_zarr(world["forecast"])
    result = xr.open_zarr(out)
    assert decode(result.attrs)["dyf_complete"] is True  # a JSON string on disk (dyfcli.attrs)
    np.testing.assert_array_equal(result["u"].values, reference["u"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.zarr"]


def test_kill_while_replacing_a_store_is_recovered_by_rerunning(dyf, world, tmp_path):
    out = tmp_path / "x.zarr"
    prepare_netcdf([str(world["raw"])], ["u"], out)
    args = ["prepare", "netcdf", str(world["raw"]), "--var", "u", "--out", str(out), "--overwrite"]
    proc = dyf(*args, check=None, env={"DYF_FAULT_KILL_AT": "outputs.old_moved_aside"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 3 and left[0].startswith(".x.zarr.") and left[0].endswith(".old") and not out.exists()
    dyf(*args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.zarr"] and open_store(out).fields == ["u"]


# ----------------------------------------------------------------------------------------------- item 3

@pytest.mark.parametrize("command", ["prepare", "forecast", "evaluate", "train-interpolator"])
def test_second_writer_exits_2_at_once_naming_the_first(dyf, world, tmp_path, command):
    out = tmp_path / ("model.pt" if command == "train-interpolator" else
                      "scores.nc" if command == "evaluate" else "out.zarr")
    args = {"prepare": ["prepare", "netcdf", str(world["raw"]), "--var", "u"],
            "forecast": forecast_args(world, out)[:-2],
            "evaluate": ["evaluate", str(world["forecast"])],
            "train-interpolator": ["train-interpolator", "--data", str(world["store"]), "--preset", "tiny",
                                   "--device", "cpu"]}[command]
    with outputs.output_lock(out):
        started = time.monotonic()
        proc = dyf(*args, "--out", str(out), "--overwrite", check=2, env=ONE_THREAD)
        assert time.monotonic() - started < 30
        assert f"is being written by dyf pid {os.getpid()}" in proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == [outputs.lock_path(out).name]
    assert not outputs.lock_path(out).exists()


def test_stale_lock_file_does_not_block(dyf, world, tmp_path):
    """A killed dyf leaves its lock file and temporary files: the next run is not blocked and removes them."""
    out = tmp_path / "scores.nc"
    outputs.lock_path(out).write_text(json.dumps({"pid": 999999, "host": "gone", "command": "dyf", "started": "-"}))
    stray, mine = tmp_path / ".scores.nc.0123abcd.tmp", tmp_path / ".scores.nc.mine.tmp"
    stray.write_text("half a file")
    mine.write_text("mine")
    dyf("evaluate", str(world["forecast"]), "--out", str(out), env=ONE_THREAD)
    assert outputs.kind_at(out) == outputs.SCORES and not outputs.lock_path(out).exists()
    assert not stray.exists() and mine.exists()


def test_lock_dies_with_its_process_even_when_a_forked_child_lives_on(tmp_path):
    out = tmp_path / "x.zarr"
    script = f"""
import os, signal, time
from dyfcli import outputs
with outputs.output_lock({str(out)!r}):
    child = os.fork()
    if child == 0:  # a DataLoader worker outliving its parent, away from the test's pipes
        for fd in (0, 1, 2):
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    child = int(proc.stdout.strip())
    try:
        assert proc.returncode == -signal.SIGKILL
        os.kill(child, 0)  # still alive
        with outputs.output_lock(out):  # but it holds no lock
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_claim_removes_only_dyf_stray_temporary_files(world, tmp_path):
    out = tmp_path / "model.pt"
    strays = [tmp_path / ".model.pt.1a2b3c4d.tmp", tmp_path / ".model.pt.state.pt.deadbeef.tmp"]
    kept = [tmp_path / ".model.pt.notes.tmp", tmp_path / ".other.pt.1a2b3c4d.tmp", tmp_path / "model.pt.1a2b3c4d.tmp"]
    for path in strays + kept:
        path.write_text("x")
    with outputs.claim_output(out, outputs.CHECKPOINT, overwrite=False):
        assert outputs.lock_path(out).exists()
    assert not any(path.exists() for path in strays) and all(path.exists() for path in kept)
    # the backup of a replaced store that a kill left behind goes; a user's folder of that name stays
    backup = write_store(xr.open_zarr(world["store"]).load(), tmp_path / ".x.zarr.0a1b2c3d.old")
    mine = user_folder(tmp_path / ".x.zarr.4e5f6a7b.old")
    with outputs.claim_output(tmp_path / "x.zarr", outputs.DATA_STORE, overwrite=False):
        pass
    assert not backup.exists() and (mine / "notes.txt").exists()


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_overwrite_takes_a_damaged_dyf_training_state_but_not_a_users_file(world, tmp_path, damage):
    """A state file a kill or a disk fault damaged is still dyf's (its pickle, first in the archive, names
    the format): --overwrite replaces it; a user's file of that name is refused."""
    out = tmp_path / "model.pt"
    state = tmp_path / "model.pt.state.pt"
    save_training_state(state, {"progress": {"step": 1}, "network": {"w": torch.ones(5000)}})
    data = bytearray(state.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with outputs.claim_output(out, outputs.CHECKPOINT, overwrite=True):
        pass
    state.write_text("my own notes\n")
    with pytest.raises(UsageError, match="dyf did not write"):
        with outputs.claim_output(out, outputs.CHECKPOINT, overwrite=True):
            pass
