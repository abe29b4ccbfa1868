"""Fault suite, training (issue 14, items 7, 11b and 13): non-finite settings and divergence, kill -9 at
every save point then the same command, and signals (a second SIGTERM, SIGTERM at start-up, Ctrl-C)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_dyf
from dyfcli import checkpoint as ckpt
from dyfcli.config import load_config
from dyfcli.errors import ConfigError
from storefactory import make_store

pytestmark = pytest.mark.fault

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SHORT = ["--set", "interpolator.max_steps=4", "--set", "training.validate_every=2"]
KILL_POINTS = ["train.started", "train.run_files_written", "train.initial_state_saved", "train.checkpoint_saved",
               "train.state_saved", "train.finished_checkpoint"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("faulttrain") / "s.zarr")


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory):
    """The short interpolator run, uninterrupted: what every recovered run must equal."""
    out = tmp_path_factory.mktemp("straight") / "i.pt"
    run_dyf("train-interpolator", "--data", str(store), "--out", str(out), *SHORT, env=ONE_THREAD)
    return ckpt.load_checkpoint(out)


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _records(out: Path) -> list[dict]:
    path = Path(str(out) + ".run") / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(out: Path, predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(predicate(record) for record in _records(out)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no matching record in {out}.run/metrics.jsonl in time")


def _start_long_run(store, out: Path) -> subprocess.Popen:
    """A training run that would go on for a long time; Ctrl-C behaves as in a terminal (default SIGINT)."""
    exe = Path(sys.executable).with_name("dyf")
    command = [str(exe), "--json", "train-interpolator", "--data", str(store), "--out", str(out),
               "--set", "training.log_every=1", "--set", "training.validate_every=1000",
               "--set", "interpolator.max_steps=100000"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# ------------------------------------------------------------------------------------------------ item 7

@pytest.mark.parametrize("setting", ["interpolator.lr=.inf", "interpolator.lr=.nan", "interpolator.lr=-1e-3",
                                     "forecaster.lr=0", "interpolator.weight_decay=.inf",
                                     "interpolator.network.dropout.dropout=1.0",
                                     "interpolator.network.dropout.dropout=.nan", "data.batch_size=0",
                                     "training.grad_clip=.inf", "training.betas=[.nan, 0.99]", "training.eps=0",
                                     "training.ema.decay=.inf", "forecaster.lambda_reconstruction=.nan",
                                     "baseline.perturbation_sigma=-.inf", "interpolator.network.hyper.dim=.inf"])
def test_non_finite_or_out_of_range_settings_are_config_errors(setting):
    with pytest.raises(ConfigError, match="is invalid|wrong type") as raised:
        load_config("tiny", [setting])
    assert raised.value.exit_code == 3 and setting.split("=")[0].split(".")[-1] in raised.value.message


def test_an_infinite_learning_rate_is_exit_3_before_training(dyf, store, tmp_path):
    result = dyf("--json", "train-interpolator", "--data", str(store), "--out", str(tmp_path / "i.pt"),
                 "--set", "interpolator.lr=.inf", check=3)
    assert "expected a finite number" in _strict(result.stdout)["error"]["message"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("caught_by", ["loss", "validation"])
def test_divergence_stops_with_exit_4_and_keeps_the_last_finite_state(caught_by, dyf, store, tmp_path):
    """lr 1e30 (finite, so valid) turns the weights non-finite after the first step; before the fix the run
    exited 0 with NaN weights marked complete."""
    out = tmp_path / "i.pt"
    log_every = "1" if caught_by == "loss" else "1000"
    result = dyf("--json", "train-interpolator", "--data", str(store), "--out", str(out),
                 "--set", "interpolator.lr=1e30", "--set", "interpolator.max_steps=6",
                 "--set", "training.validate_every=2", "--set", f"training.log_every={log_every}",
                 env=ONE_THREAD, check=4)
    message = _strict(result.stdout)["error"]["message"]
    what = "the training loss" if caught_by == "loss" else "the validation CRPS"
    assert f"training diverged: {what} is nan" in message and "--overwrite" in message
    assert not out.exists()  # nothing non-finite saved, nothing marked complete
    state = ckpt.load_training_state(ckpt.state_path(out))
    assert all(torch.isfinite(value).all() for value in state["network"].values())
    assert [r["event"] for r in _records(out) if "event" in r][-1] == "diverged"
    # Other settings and --overwrite start again from the state the failed run left.
    dyf("train-interpolator", "--data", str(store), "--out", str(out), *SHORT, "--overwrite", env=ONE_THREAD)
    assert ckpt.load_checkpoint(out).training["complete"] and not ckpt.state_path(out).exists()


# ------------------------------------------------------------------------------------------------ item 11b

@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_at_every_save_point_then_the_same_command_finishes(point, dyf, store, straight, tmp_path):
    out = tmp_path / "i.pt"
    command = ["train-interpolator", "--data", str(store), "--out", str(out), *SHORT]
    killed = dyf(*command, env={**ONE_THREAD, "DYF_FAULT_KILL_AT": point}, check=None)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # the hook fired
    dyf(*command, env=ONE_THREAD)
    finished = ckpt.load_checkpoint(out)
    assert finished.training["complete"] and not ckpt.state_path(out).exists()
    assert finished.training["val_crps"] == straight.training["val_crps"]
    assert all(torch.equal(finished.state_dict[name], straight.state_dict[name]) for name in straight.state_dict)


# ------------------------------------------------------------------------------------------------ item 13

def test_sigterm_during_start_up_prints_the_json_error_and_exits_143(dyf, store, tmp_path):
    out = tmp_path / "i.pt"
    command = ["--json", "train-interpolator", "--data", str(store), "--out", str(out), *SHORT]
    result = dyf(*command, env={**ONE_THREAD, "DYF_FAULT_SIGTERM_AT": "train.started"}, check=143)
    error = _strict(result.stdout)["error"]
    assert error == {"kind": "interrupted", "exit_code": 143, "message": error["message"]}
    assert "SIGTERM" in error["message"] and "re-run the same command" in error["message"]
    assert _strict(dyf(*command, env=ONE_THREAD).stdout)["ok"]


def test_a_second_sigterm_while_stopping_still_exits_75(store, tmp_path):
    out = tmp_path / "i.pt"
    process = _start_long_run(store, out)
    try:
        _wait_for(out, lambda record: "loss" in record)
        process.send_signal(signal.SIGTERM)
        _wait_for(out, lambda record: record.get("event") == "interrupted")  # the state is saved
        while process.poll() is None:  # more SIGTERMs all the way to the exit
            process.send_signal(signal.SIGTERM)
            time.sleep(0.005)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 75, stderr
    assert _strict(stdout)["error"]["exit_code"] == 75
    assert ckpt.load_training_state(ckpt.state_path(out))["progress"]["step"] >= 1


def test_ctrl_c_in_training_saves_the_state_exits_130_and_the_same_command_resumes(dyf, store, tmp_path):
    out = tmp_path / "i.pt"
    process = _start_long_run(store, out)
    try:
        _wait_for(out, lambda record: "loss" in record)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    error = _strict(stdout)["error"]
    assert "SIGINT" in error["message"] and "re-run the same command to resume" in error["message"]
    saved = ckpt.load_training_state(ckpt.state_path(out))["progress"]["step"]
    assert saved >= 1 and [r["event"] for r in _records(out) if "event" in r][-1] == "interrupted"
    resumed = _strict(dyf("--json", "train-interpolator", "--data", str(store), "--out", str(out),
                          "--set", "training.log_every=1", "--set", "training.validate_every=1000",
                          "--set", f"interpolator.max_steps={saved + 2}", env=ONE_THREAD).stdout)
    assert resumed["resumed_from_step"] == saved and resumed["steps"] == saved + 2
