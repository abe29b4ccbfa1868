"""Issue 13, item 10: the SLURM scripts of scripts/slurm/, run without SLURM.

Each script runs under bash with fake `srun`, `scontrol` and `sbatch` first on PATH (they record their
arguments; `srun` then runs the command it was given, `scontrol show hostnames` answers localhost) and
the SLURM_* variables a job would have, on a tiny store: the dyf commands must succeed, and a dyf that
stops with exit 75 must make the script requeue the job.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

from storefactory import make_store, make_untrained_checkpoint

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "scripts" / "slurm"
SCRIPTS = ("train.sbatch", "train_multinode.sbatch", "forecast_array.sbatch")
FEW_STEPS = ("--preset tiny --set interpolator.max_steps=2 --set forecaster.max_steps=2 "
             "--set training.validate_every=2 --device cpu")

FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [[ $1 == -* ]]; do shift; done   # srun's own options (all written --name=value)
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo localhost; fi
"""
FAKE_SBATCH = """#!/bin/bash
echo "sbatch $*" >> "$FAKE_SLURM_LOG"
echo "Submitted batch job 4243"
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from dyfcli.checkpoint import load_checkpoint, save_checkpoint
    from dyfcli.store import open_store

    root = tmp_path_factory.mktemp("hpc")
    store = make_store(root / "s.zarr", steps=12)
    model = make_untrained_checkpoint(open_store(store), root / "model.pt")
    inner = load_checkpoint(model).interpolator  # a finished interpolator for train-forecaster
    interpolator = root / "interpolator.pt"
    save_checkpoint(interpolator, type(inner)(**{**inner.__dict__, "training": {"complete": True}}))
    return {"store": store, "model": model, "interpolator": interpolator}


class Job:
    """A fake SLURM node: runs a script with fake commands on PATH; `calls()` are the fakes' records."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.bin = folder / "fakebin"
        self.bin.mkdir()
        for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        self.log = folder / "slurm.log"

    def run(self, script: str, **env: str) -> subprocess.CompletedProcess:
        self.log.unlink(missing_ok=True)
        slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NTASKS": "1",
                 "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(self.folder)}
        path = f"{self.bin}:{Path(sys.executable).parent}:{os.environ['PATH']}"
        full = {**os.environ, **slurm, "PATH": path, "FAKE_SLURM_LOG": str(self.log), "OMP_NUM_THREADS": "1",
                **env}
        return subprocess.run(["bash", str(SLURM / script)], capture_output=True, text=True, timeout=600,
                              cwd=self.folder, env=full)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def job(tmp_path) -> Job:
    return Job(tmp_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_batch_jobs_that_ask_for_a_warning_signal_and_requeue(script):
    text = (SLURM / script).read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert "--signal=USR1@120" in directives and "--requeue" in directives
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert subprocess.run(["bash", "-n", str(SLURM / script)]).returncode == 0


def test_train_job_requeues_on_exit_75_and_the_requeued_job_finishes(job, inputs):
    env = {"DATA": str(inputs["store"]), "RUN": "run", "DYF_ARGS": FEW_STEPS}
    stopped = job.run("train.sbatch", **env, DYF_FAULT_SIGTERM_AT="train.initial_state_saved")
    assert stopped.returncode == 0, stopped.stderr
    assert "exit 75" in stopped.stderr
    calls = job.calls()
    assert calls[0].startswith("srun --kill-on-bad-exit=1 dyf train-interpolator --data ")
    assert calls[-1] == "scontrol requeue 4242" and len(calls) == 2
    assert (job.folder / "run" / "interpolator.pt.state.pt").exists()

    requeued = job.run("train.sbatch", **env, SLURM_RESTART_COUNT="1")
    assert requeued.returncode == 0, requeued.stderr
    assert [call.split()[3] for call in job.calls()] == ["train-interpolator", "train-forecaster"]
    assert "resuming interpolator training from step" in requeued.stderr
    for name in ("interpolator.pt", "model.pt"):
        assert (job.folder / "run" / name).is_file() and not (job.folder / "run" / f"{name}.state.pt").exists()

    again = job.run("train.sbatch", **env)  # a finished run: nothing to train, no requeue
    assert again.returncode == 0 and job.calls() == [] and again.stderr.count("is finished; skipping") == 2


def test_train_job_gives_up_after_too_many_requeues(job):
    (job.bin / "dyf").write_text("#!/bin/bash\nexit 75\n")  # a dyf that is always stopped in time
    (job.bin / "dyf").chmod(0o755)
    stopped = job.run("train.sbatch", DATA="s.zarr", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert stopped.returncode == 75 and "giving up" in stopped.stderr
    assert not any(call.startswith("scontrol requeue") for call in job.calls())
    requeued = job.run("train.sbatch", DATA="s.zarr", SLURM_RESTART_COUNT="2", MAX_REQUEUES="3")
    assert requeued.returncode == 0 and job.calls()[-1] == "scontrol requeue 4242"


def test_multinode_torchrun_job_trains_and_requeues_when_interrupted(job, inputs):
    env = {"DATA": str(inputs["store"]), "INTERPOLATOR": str(inputs["interpolator"]), "OUT": "run/model.pt",
           "GPUS_PER_NODE": "1", "DYF_ARGS": FEW_STEPS}
    stopped = job.run("train_multinode.sbatch", **env, PORT=str(_free_port()),
                      DYF_FAULT_SIGTERM_AT="train.initial_state_saved")
    assert stopped.returncode == 0, stopped.stderr
    srun, *rest = [call for call in job.calls() if not call.startswith("scontrol show")]
    assert srun.startswith("srun --kill-on-bad-exit=1 torchrun --nnodes=1 --nproc-per-node=1 --rdzv-id=4242 ")
    assert "-m dyfcli train-forecaster" in srun and "--rdzv-endpoint=localhost:" in srun
    assert rest == ["scontrol requeue 4242"]

    finished = job.run("train_multinode.sbatch", **env, PORT=str(_free_port()))
    assert finished.returncode == 0, finished.stderr
    assert not any(call.startswith("scontrol requeue") for call in job.calls())
    assert (job.folder / "run" / "model.pt").is_file() and not (job.folder / "run" / "model.pt.state.pt").exists()


def test_forecast_array_tasks_split_the_initial_conditions(job, inputs):
    env = {"MODEL": str(inputs["model"]), "DATA": str(inputs["store"]), "INITS": "3", "HORIZON": "2",
           "ENSEMBLE": "2", "DYF_ARGS": "--device cpu", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"}
    selections = []
    for task in ("0", "1"):
        proc = job.run("forecast_array.sbatch", **env, SLURM_ARRAY_TASK_ID=task)
        assert proc.returncode == 0, proc.stderr
        (call,) = job.calls()
        selections.append(re.search(r"--init (\S+)", call).group(1))
    assert selections == ["0,1", "2"]
    counts = [xr.open_zarr(job.folder / "forecasts" / f"forecast_00{task}.zarr").sizes["init"] for task in (0, 1)]
    assert counts == [2, 1]
    again = job.run("forecast_array.sbatch", **env, SLURM_ARRAY_TASK_ID="1")  # a resubmitted task: kept
    assert again.returncode == 0, again.stderr
    empty = job.run("forecast_array.sbatch", **{**env, "INITS": "1"}, SLURM_ARRAY_TASK_ID="1")
    assert empty.returncode == 0 and job.calls() == [] and "no initial conditions left" in empty.stderr
