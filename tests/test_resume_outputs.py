"""Issue 13, items 3-6: resume messages that hold and outputs that travel.

3. a resumed training run does not repeat metrics.jsonl rows; 4. an interrupted `dyf forecast` continues
with the same command (a finished or different store still needs --overwrite); 5. a forecast store records
its data store relative to itself, so a copied project evaluates, and a missing one says `--truth`;
6. `dyf inspect` prints readable text on stdout and reads scores files, run folders and training states.
"""

import json
import re
import shutil
import signal
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dyfcli import forecast
from dyfcli.cli.inspect import inspect_path, render_text
from dyfcli.config import load_config
from dyfcli.errors import DataError, Interrupted, UsageError
from dyfcli.evaluate import evaluate
from dyfcli.forecast import ForecastRequest, run_forecast
from dyfcli.forecast_store import open_forecast, truth_attrs
from dyfcli.store import open_store
from dyfcli.train import train_interpolator
from storefactory import make_store, make_untrained_checkpoint

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FORECAST_ARGS = ("--init", "0,1,2", "--horizon", "2", "--ensemble", "2", "--seed", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """A project folder as a user lays it out: data/ (store), models/ (checkpoint), runs/ (a forecast)."""
    root = tmp_path_factory.mktemp("project")
    for folder in ("data", "models", "runs"):
        (root / folder).mkdir()
    store = make_store(root / "data" / "s.zarr", steps=12)
    model = make_untrained_checkpoint(open_store(store), root / "models" / "model.pt")
    out = root / "runs" / "f.zarr"
    run_forecast(_request(root, out))
    return {"root": root, "store": store, "model": model, "forecast": out}


def _request(root: Path, out: Path, **changes) -> ForecastRequest:
    request = ForecastRequest(checkpoint=root / "models" / "model.pt", out=out, horizon=2, ensemble=2,
                              data=root / "data" / "s.zarr", init="0,1,2", seed=1, device="cpu")
    return replace(request, **changes)


def _forecast_args(project, out: Path, *extra: str) -> list[str]:
    return ["forecast", "--ckpt", str(project["model"]), "--data", str(project["store"]), *FORECAST_ARGS,
            "--out", str(out), *extra]


# ----------------------------------------------------------------------------------------------- item 3

def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(str(out) + ".run") / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_keeps_one_metrics_row_per_step(dyf, tmp_path):
    """Killed after logging steps 1-2 (state saved at step 0): the resume repeats them. Before the fix
    metrics.jsonl held steps 1, 2, 1, 2, 3, 4 (and a line cut by the kill glued to the next record)."""
    store = make_store(tmp_path / "s.zarr")
    out = tmp_path / "i.pt"
    command = ["train-interpolator", "--data", str(store), "--out", str(out), "--set", "interpolator.max_steps=4",
               "--set", "training.validate_every=2", "--set", "training.log_every=1"]
    killed = dyf(*command, env={**ONE_THREAD, "DYF_FAULT_KILL_AT": "train.checkpoint_saved"}, check=None)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2]
    state = inspect_path(Path(str(out) + ".state.pt"))  # item 6: a training state is described too
    assert state["kind"] == "training-state" and state["step"] == 0 and state["training_kind"] == "interpolator"
    metrics = Path(str(out) + ".run") / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"time": 1.0, "step": 3, "epo')  # a record a kill cut short

    dyf(*command, env=ONE_THREAD)
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_crps" in r] == [2, 4]
    assert [r["event"] for r in records if "event" in r] == ["started", "resumed", "finished"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.pt", "i.pt.run", "s.zarr"]  # no temporary left


# ----------------------------------------------------------------------------------------------- item 4

@contextmanager
def _ctrl_c_after_blocks(monkeypatch, blocks: int):
    """Ctrl-C while the forecast computes block `blocks + 1` (the earlier ones are written)."""
    real = forecast.forecast_blocks  # one call per pack: per block with --pack 1
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > blocks:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(forecast, "forecast_blocks", interrupted)
        yield


def test_after_ctrl_c_the_same_forecast_command_continues(dyf, project, tmp_path, monkeypatch):
    """Before the fix the same command exited 2 ("already exists; pass --resume"), although the Ctrl-C
    message said "re-run the same command"."""
    out = tmp_path / "f.zarr"
    with _ctrl_c_after_blocks(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        run_forecast(_request(project["root"], out))
    assert int(forecast.forecast_store.BlockWriter(out).done().sum()) == 1

    resumed = dyf("--json", *_forecast_args(project, out), env=ONE_THREAD)
    summary = json.loads(resumed.stdout)
    assert summary["blocks_resumed"] == 1 and summary["blocks_written"] == 2
    assert f"resuming {out}: 1 of 3 blocks written" in resumed.stderr
    reference = open_forecast(project["forecast"]).ds
    np.testing.assert_array_equal(open_forecast(out).ds["u"].values, reference["u"].values)


def test_a_stopped_forecast_says_re_run_the_same_command_and_that_holds(project, tmp_path, monkeypatch):
    """SIGTERM (exit 75): the message no longer asks for --resume, and the same request continues."""
    @contextmanager
    def stop_at_once(action):
        yield lambda: True

    out = tmp_path / "f.zarr"
    with monkeypatch.context() as patch:
        patch.setattr(forecast, "stop_signals", stop_at_once)
        with pytest.raises(Interrupted) as raised:
            run_forecast(_request(project["root"], out))
    assert "re-run the same `dyf forecast` command to continue" in raised.value.message
    assert "--resume" not in raised.value.message
    finished = run_forecast(_request(project["root"], out))
    assert finished["blocks_resumed"] == 1 and open_forecast(out).ds.attrs["dyf_complete"] is True


def test_a_finished_or_different_forecast_still_needs_overwrite(dyf, project, tmp_path, monkeypatch):
    out = tmp_path / "f.zarr"
    with _ctrl_c_after_blocks(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        run_forecast(_request(project["root"], out))
    with pytest.raises(UsageError, match=r"made with other ensemble, seed; .*--overwrite"):
        run_forecast(_request(project["root"], out, seed=2, ensemble=3))
    assert int(forecast.forecast_store.BlockWriter(out).done().sum()) == 1  # untouched

    run_forecast(_request(project["root"], out))  # the same options: finishes it
    again = dyf(*_forecast_args(project, out), check=2, env=ONE_THREAD)
    assert "already exists (a finished forecast); pass --overwrite to replace it" in again.stderr
    assert run_forecast(_request(project["root"], out, resume=True))["blocks_written"] == 0  # still accepted
    assert run_forecast(_request(project["root"], out, overwrite=True))["blocks_written"] == 3


def test_no_message_asks_for_resume_where_the_same_command_resumes():
    """Every "re-run" hint must hold: none may still say that `dyf forecast` needs --resume."""
    package = Path(forecast.__file__).parent
    offending = [f"{path.relative_to(package)}: {line.strip()}" for path in package.rglob("*.py")
                 for line in path.read_text().splitlines() if re.search(r"re-?run.*with --resume", line)]
    assert not offending


# ----------------------------------------------------------------------------------------------- item 5

def test_truth_is_recorded_relative_to_the_forecast_when_they_share_a_folder(project):
    attrs = xr.open_zarr(project["forecast"]).attrs
    assert attrs["dyf_truth"] == "../data/s.zarr"
    assert attrs["dyf_truth_absolute"] == str(project["store"].resolve())
    assert open_forecast(project["forecast"]).truth.resolve() == project["store"].resolve()
    assert truth_attrs("/data/s.zarr", "/scratch/f.zarr")["dyf_truth"] == "/data/s.zarr"  # only / shared


def test_a_copied_project_evaluates_against_its_own_copy_of_the_data(project, tmp_path):
    """Before the fix the copy was scored against the original's absolute path (here: moved away)."""
    copy = tmp_path / "copy"
    shutil.copytree(project["root"], copy)
    moved = tmp_path / "elsewhere.zarr"
    project["store"].rename(moved)  # the original data store is gone from its recorded place
    try:
        summary = evaluate(copy / "runs" / "f.zarr")
    finally:
        moved.rename(project["store"])
    assert Path(summary["truth"]).resolve() == (copy / "data" / "s.zarr").resolve()


def test_a_forecast_copied_alone_falls_back_to_the_absolute_path_or_asks_for_truth(dyf, project, tmp_path):
    alone = tmp_path / "alone" / "f.zarr"
    shutil.copytree(project["forecast"], alone)
    summary = evaluate(alone)  # ../data/s.zarr is not beside it: the absolute path still holds the store
    assert Path(summary["truth"]) == project["store"].resolve()

    attrs_file = alone / "zarr.json"
    document = json.loads(attrs_file.read_text())
    document["attributes"]["dyf_truth_absolute"] = str(tmp_path / "gone" / "s.zarr")  # another machine
    attrs_file.write_text(json.dumps(document))
    proc = dyf("--json", "evaluate", str(alone), check=4, env=ONE_THREAD)
    error = json.loads(proc.stdout)["error"]
    assert "pass --truth STORE" in error["message"] and str(tmp_path / "gone" / "s.zarr") in error["message"]
    dyf("evaluate", str(alone), "--truth", str(project["store"]), env=ONE_THREAD)


# ----------------------------------------------------------------------------------------------- item 6

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished two-step interpolator run (its OUT.run/ folder is inspected)."""
    root = tmp_path_factory.mktemp("trained")
    store = make_store(root / "s.zarr")
    out = root / "i.pt"
    config = load_config("tiny", ["interpolator.max_steps=2", "training.validate_every=2", "training.log_every=1"])
    train_interpolator(store, out, config, device="cpu")
    return out


def _aligned(text: str) -> bool:
    """Top-level `key: value` lines start their values in one column."""
    columns = {match.start(2) for line in text.splitlines()[1:]
               if (match := re.match(r"^  ([^ ].*?:) +(\S)", line))}
    return len(columns) == 1


def test_inspect_prints_readable_text_on_stdout(dyf, project):
    """Before the fix the text went to stderr, with Python dict reprs for nested values."""
    proc = dyf("inspect", str(project["forecast"]), env=ONE_THREAD)
    assert proc.stdout.startswith(f"forecast: {project['forecast']}\n") and "forecast:" not in proc.stderr
    assert "{'" not in proc.stdout and _aligned(proc.stdout)
    assert re.search(r"^  blocks:\n    done: +3\n    total: +3$", proc.stdout, re.M)
    store = dyf("inspect", str(project["store"]), env=ONE_THREAD).stdout
    assert re.search(r"^    train:\n      rule:\n        series: +\[0, 1\]$", store, re.M)
    assert "{'" not in store and _aligned(store)


def test_inspect_json_keeps_stdout_to_one_document(dyf, project):
    proc = dyf("--json", "inspect", str(project["model"]), env=ONE_THREAD)
    document = json.loads(proc.stdout)
    assert document["ok"] and document["kind"] == "checkpoint"
    assert proc.stderr.startswith("checkpoint: ")


def test_long_lists_are_shortened():
    text = render_text({"kind": "k", "path": "p", "lead": [float(i) for i in range(1, 41)], "grid": [8, 12]})
    assert "  lead: [1, 2, 3, ..., 39, 40] (40 items)" in text and "  grid: [8, 12]" in text


@pytest.mark.parametrize("suffix", [".nc", ".zarr", ".csv"])
def test_inspect_reads_scores_files(dyf, project, tmp_path, suffix):
    """Before the fix a .nc was read as a checkpoint (exit 5, an unpickling error)."""
    out = tmp_path / f"scores{suffix}"
    scores = evaluate(project["forecast"], out=out)
    summary = inspect_path(out)
    assert summary["kind"] == "scores" and summary["leads"] == [1.0, 2.0]
    assert summary["lead_mean"]["forecast"]["u"]["crps"] == pytest.approx(scores["scores"]["u"]["crps"]["mean"])
    if suffix == ".nc":
        proc = dyf("inspect", str(out), env=ONE_THREAD)
        assert proc.stdout.startswith("scores: ") and re.search(r"^        crps: +\d", proc.stdout, re.M)


def test_inspect_reads_run_folders(dyf, trained):
    """Before the fix a run folder was opened as a Zarr store (exit 4)."""
    run_dir = Path(str(trained) + ".run")
    summary = inspect_path(run_dir)
    assert summary["kind"] == "run-folder" and summary["events"] == ["started", "finished"]
    assert summary["last_step"]["step"] == 2 and summary["last_validation"]["step"] == 2
    assert summary["config"]["interpolator"]["max_steps"] == 2
    proc = dyf("inspect", str(run_dir), env=ONE_THREAD)
    assert proc.stdout.startswith(f"run-folder: {run_dir}\n") and "  last_step:\n" in proc.stdout


def test_inspect_names_what_it_reads_when_given_something_else(dyf, tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a dyf scores file"):
        inspect_path(tmp_path / "notes.csv")
    proc = dyf("inspect", str(tmp_path / "missing.nc"), check=4)
    assert "scores file" in proc.stderr and "run folder" in proc.stderr


def test_inspect_into_a_closed_pipe_exits_quietly(project):
    """`dyf inspect X | head -1`: the reader may leave before dyf writes; no traceback, exit 0."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before dyf prints
    exe = Path(sys.executable).with_name("dyf")
    proc = subprocess.run([str(exe), "inspect", str(project["model"])], stdout=write_end, stderr=subprocess.PIPE,
                          text=True, timeout=120, env={**os.environ, **ONE_THREAD})
    os.close(write_end)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
