"""Training: the real `dyf` commands end to end on the tiny preset, resume after SIGTERM (exactly where the
uninterrupted run would be), refusal to overwrite, and a 2-process CPU DDP run under torchrun."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dyfcli import checkpoint as ckpt
from dyfcli.cli import main
from dyfcli.config import load_config
from dyfcli.errors import Interrupted, UsageError
from dyfcli.runtime import distributed, launch_environment, launch_rank, resolve_device, stop_signals
from dyfcli.train import Ema, _learning_rate, _SkipSampler, train_interpolator
from storefactory import make_store

# One thread per process: on a small shared machine torch's thread pool mostly waits for other processes.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("train") / "s.zarr", land=True, cond=("obstacle",))


def _records(out: Path) -> list[dict]:
    path = Path(str(out) + ".run") / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train(store, out, settings, **options) -> dict:
    return train_interpolator(store, out, load_config("tiny", settings), device="cpu", **options)


def _exit_code(*args: str) -> int:
    with pytest.raises(SystemExit) as raised:
        main(list(args))
    return raised.value.code


def _wait_for_step(out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("step" in record and "loss" in record for record in _records(out)):
            return
        time.sleep(0.05)
    raise AssertionError("training logged no step in time")


# ------------------------------------------------------------------------------------------- end to end

def test_tiny_pipeline_through_the_dyf_command(dyf, store, tmp_path):
    interpolator, model = tmp_path / "interpolator.pt", tmp_path / "model.pt"
    first = json.loads(dyf("--json", "train-interpolator", "--data", str(store), "--preset", "tiny",
                           "--set", "interpolator.max_steps=6", "--set", "training.validate_every=3",
                           "--out", str(interpolator), env=ONE_THREAD).stdout)
    assert first["ok"] and first["kind"] == "interpolator" and first["steps"] == 6
    assert [v["step"] for v in first["validations"]] == [3, 6] and first["best_val_crps"] > 0
    second = dyf("--json", "train-forecaster", "--data", str(store), "--interpolator", str(interpolator),
                 "--set", "forecaster.max_steps=4", "--set", "training.validate_every=2", "--out", str(model),
                 env=ONE_THREAD)
    summary = json.loads(second.stdout)
    assert summary["kind"] == "forecaster" and summary["method"] == "dyffusion" and summary["steps"] == 4
    assert "train forecaster" in second.stderr  # progress lines on stderr
    loaded = ckpt.load_checkpoint(model, expect_kind="forecaster")
    assert loaded.interpolator.kind == "interpolator" and loaded.training["complete"]
    assert loaded.config["interpolator"] == loaded.interpolator.config["interpolator"]
    assert loaded.cond_names == ["cond_obstacle"] and loaded.config["forecaster"]["max_steps"] == 4
    assert not ckpt.state_path(model).exists()
    run_dir = Path(str(model) + ".run")
    assert "forward_conditioning: data+noise" in (run_dir / "config.yaml").read_text()
    records = _records(model)
    assert {"loss_forward", "loss_lookahead"} <= set(next(r for r in records if "loss" in r))
    assert [r["step"] for r in records if "val_crps" in r] == [2, 4]
    # The wrong kind of checkpoint, or none, is exit 5; a finished --out needs --overwrite (exit 2).
    assert _exit_code("train-forecaster", "--data", str(store), "--interpolator", str(model),
                      "--out", str(tmp_path / "again.pt")) == 5
    assert _exit_code("train-forecaster", "--data", str(store), "--interpolator", str(tmp_path / "none.pt"),
                      "--out", str(tmp_path / "again.pt")) == 5
    assert _exit_code("train-interpolator", "--data", str(store), "--out", str(interpolator)) == 2


def test_existing_output_needs_overwrite(store, tmp_path):
    out = tmp_path / "i.pt"
    settings = ["interpolator.max_steps=2", "training.validate_every=2"]
    _train(store, out, settings)
    with pytest.raises(UsageError, match="--overwrite"):
        _train(store, out, settings)
    summary = _train(store, out, settings, overwrite=True)
    assert summary["steps"] == 2 and summary["resumed_from_step"] is None


def test_sigterm_saves_state_exits_75_and_the_same_command_resumes(store, tmp_path):
    out = tmp_path / "interpolator.pt"
    settings = ["training.log_every=1", "training.validate_every=1000"]
    exe = Path(sys.executable).with_name("dyf")
    command = ["train-interpolator", "--data", str(store), "--out", str(out)]
    command += [arg for setting in settings for arg in ("--set", setting)]
    process = subprocess.Popen([str(exe), *command, "--set", "interpolator.max_steps=100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **ONE_THREAD})
    try:
        _wait_for_step(out)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 75, stderr
    assert "re-run the same command" in stderr
    saved = ckpt.load_training_state(ckpt.state_path(out))["progress"]["step"]
    assert saved >= 1 and not out.exists()
    other = ["training.seed=1", *settings, f"interpolator.max_steps={saved + 3}"]
    with pytest.raises(UsageError, match="other settings"):
        _train(store, out, other)
    resumed = _train(store, out, [*settings, f"interpolator.max_steps={saved + 3}"])  # the same command, in-process
    assert resumed["resumed_from_step"] == saved and resumed["steps"] == saved + 3
    assert not ckpt.state_path(out).exists() and out.exists()
    events = [r.get("event") for r in _records(out) if "event" in r]
    assert events == ["started", "interrupted", "resumed", "finished"]


def test_resumed_run_ends_exactly_where_the_uninterrupted_run_does(store, tmp_path):
    common = ["training.log_every=1", "training.validate_every=1000", "training.val_max_batches=1"]
    interrupted = tmp_path / "interrupted.pt"
    timer = threading.Thread(target=lambda: (_wait_for_step(interrupted), os.kill(os.getpid(), signal.SIGTERM)))
    timer.start()
    with pytest.raises(Interrupted):
        _train(store, interrupted, [*common, "interpolator.max_steps=100000"])
    timer.join()
    stop = ckpt.load_training_state(ckpt.state_path(interrupted))["progress"]["step"] + 2
    resumed = _train(store, interrupted, [*common, f"interpolator.max_steps={stop}"])
    straight = _train(store, tmp_path / "straight.pt", [*common, f"interpolator.max_steps={stop}"])
    assert resumed["resumed_from_step"] == stop - 2 and straight["steps"] == resumed["steps"] == stop
    assert resumed["best_val_crps"] == straight["best_val_crps"]
    a = ckpt.load_checkpoint(interrupted).state_dict
    b = ckpt.load_checkpoint(tmp_path / "straight.pt").state_dict
    assert all(torch.equal(a[name], b[name]) for name in b)


def test_a_crash_resumes_from_the_last_validation(store, tmp_path, monkeypatch):
    import dyfcli.train

    out = tmp_path / "crashed.pt"
    settings = ["training.validate_every=2", "training.val_max_batches=1", "interpolator.max_steps=6"]
    original = dyfcli.train._learning_rate

    def crash_at_step_3(config, base, step, total):
        if step == 3:
            raise MemoryError("simulated out-of-memory")
        return original(config, base, step, total)

    monkeypatch.setattr(dyfcli.train, "_learning_rate", crash_at_step_3)
    with pytest.raises(MemoryError):
        _train(store, out, settings)
    assert ckpt.load_training_state(ckpt.state_path(out))["progress"]["step"] == 2
    assert not ckpt.load_checkpoint(out).training["complete"]
    monkeypatch.setattr(dyfcli.train, "_learning_rate", original)
    summary = _train(store, out, settings)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6
    assert [v["step"] for v in summary["validations"]] == [2, 4, 6]
    assert ckpt.load_checkpoint(out).training["complete"] and not ckpt.state_path(out).exists()


def test_two_process_ddp_on_cpu_with_torchrun(store, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp.pt"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "dyfcli", "--json",
                           "train-interpolator", "--data", str(store), "--out", str(out),
                           "--set", "interpolator.max_steps=3", "--set", "training.validate_every=3"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr
    documents = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(documents) == 1 and documents[0]["world_size"] == 2 and documents[0]["steps"] == 3
    assert ckpt.load_checkpoint(out).training["world_size"] == 2


# ------------------------------------------------------------------------------------------- pieces

def test_validation_crps_matches_properscoring_over_valid_points(tmp_path):
    import numpy as np
    import properscoring

    from dyfcli.runtime import Ranks
    from dyfcli.train import Progress, Run, _validate

    rng = np.random.default_rng(0)
    horizon, members, mask = 3, 4, torch.ones(2, 5, 6, dtype=torch.bool)
    mask[1, :2, :3] = False
    windows = [{"dynamics": torch.from_numpy(rng.normal(size=(horizon + 1, 2, 5, 6)).astype("float32")),
                "condition": torch.zeros(0, 5, 6), "series": s, "start": t} for s in (0, 1) for t in (0, 3)]
    offsets = torch.from_numpy(rng.normal(size=(members, horizon, 1, 2, 5, 6)).astype("float32"))

    class Stub:
        network = torch.nn.Linear(1, 1)

        def validation_ensemble(self, batch, noise, m):
            truth = batch["dynamics"][:, 1:].transpose(0, 1)  # (L, B, C, Y, X)
            land = ~mask[batch["series"]][None, :, None]
            return truth + offsets + 1e6 * land, truth  # land points would dominate if they were scored

    config = load_config("tiny", [f"data.horizon={horizon}", f"training.val_ensemble={members}",
                                  "data.eval_batch_size=3"])
    run = Run(kind="forecaster", method_name="dyffusion", config=config, stage=config.forecaster, data=tmp_path,
              out=tmp_path / "m.pt", device=torch.device("cpu"), ranks=Ranks(), template={}, run_dir=tmp_path,
              mask=mask)
    progress = Progress(best_crps=-math.inf)  # never "improves": nothing is saved
    _validate(run, Stub(), windows, progress, None)
    per_lead = []
    for lead in range(horizon):
        truth = np.stack([w["dynamics"][lead + 1].numpy() for w in windows])  # (B, C, Y, X)
        ensemble = truth[..., None] + offsets[:, lead, 0].numpy().transpose(1, 2, 3, 0)
        scores = properscoring.crps_ensemble(truth, ensemble)
        valid = np.stack([mask[w["series"]].numpy() for w in windows])[:, None].repeat(2, axis=1)
        per_lead.append(scores[valid].mean())
    assert progress.history[-1]["val_crps"] == pytest.approx(float(np.mean(per_lead)), rel=1e-5)


def test_launch_environment_reads_torchrun_then_srun_but_not_plain_sbatch():
    assert launch_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == \
        {"rank": 3, "world": 8, "local_rank": 1}
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}
    assert launch_environment(srun) == {"rank": 5, "world": 8, "local_rank": 1}
    assert launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None  # the batch script itself
    assert launch_environment({}) is None
    assert launch_rank({"RANK": "3", "WORLD_SIZE": "8"}) == 3 and launch_rank({}) == 0


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_stop_signals_set_the_flag_and_restore_the_previous_handlers(name, monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("dyf"), "propagate", True)  # the CLI's setup_logging turns it off
    number = getattr(signal, name)
    before = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGUSR1)}
    with caplog.at_level(logging.WARNING, logger="dyf"), stop_signals("finishing up") as stop_requested:
        assert not stop_requested()
        os.kill(os.getpid(), number)
        assert stop_requested()
    assert {n: signal.getsignal(n) for n in before} == before
    assert f"received {name}: finishing up" in caplog.text


def test_learning_rate_warmup_and_cosine():
    flat = load_config("tiny")
    assert _learning_rate(flat, 1e-3, 0, 100) == _learning_rate(flat, 1e-3, 99, 100) == 1e-3
    cosine = load_config("tiny", ["training.lr_schedule=cosine", "training.warmup_steps=10"])
    assert _learning_rate(cosine, 1.0, 0, 110) == pytest.approx(0.1)
    assert _learning_rate(cosine, 1.0, 10, 110) == pytest.approx(1.0)
    assert _learning_rate(cosine, 1.0, 60, 110) == pytest.approx(0.5)
    assert _learning_rate(cosine, 1.0, 110, 110) == pytest.approx(0.0)


def test_ema_follows_the_warmed_up_decay():
    network = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(network.weight)
    ema = Ema(network, decay=0.9)
    with torch.no_grad():
        network.weight.fill_(1.0)
    ema.update(network)  # decay min(0.9, 2/11)
    assert ema.shadow["weight"].item() == pytest.approx(1 - 2 / 11)
    with ema.swapped_in(network):
        assert network.weight.item() == pytest.approx(1 - 2 / 11)
    assert network.weight.item() == 1.0


def test_skip_sampler_resumes_mid_epoch():
    assert list(_SkipSampler(range(10), 4)) == [4, 5, 6, 7, 8, 9] and len(_SkipSampler(range(10), 4)) == 6


def test_resolve_device_gives_each_launched_rank_its_local_gpu(monkeypatch):
    """`auto` and `cuda` mean the rank's GPU under torchrun/srun (modulo the GPUs the task sees)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("auto") == torch.device("cuda")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)  # an explicit index is taken as given
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task: one visible GPU
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_nccl_process_group_selects_the_same_gpu_as_resolve_device(monkeypatch):
    """Joining with nccl makes the rank's GPU current: local rank 1 of a task that sees one GPU gets GPU 0."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name, value in srun.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    current, joined = [], []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: joined.append((backend, kw)))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    with distributed() as ranks:
        assert (ranks.rank, ranks.world, ranks.local_rank) == (1, 2, 1)
    assert joined == [("nccl", {"rank": 1, "world_size": 2})]
    assert current == [0] and resolve_device("auto") == torch.device("cuda", 0)
