"""CUDA paths: per-member randomness across devices, compiled networks under MC dropout, the simulators on
the GPU, and the tiny pipeline with bf16 + torch.compile through the real `dyf` command.

Run them on a machine with a GPU: `pytest -m gpu`. The default test command deselects them (CI has no
GPU). `DYF_GPU_TEST_DEVICE=cpu pytest -m gpu` runs the same code paths on the CPU, as a dry run of the
tests themselves (bf16 and compile are then ignored by dyf, and device comparisons are CPU against CPU).
"""

import json
import os

import numpy as np
import pytest
import torch
import xarray as xr

from dyfcli.networks import build_network, mc_dropout
from dyfcli.noise import MemberNoise
from storefactory import make_store

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("DYF_GPU_TEST_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 matmuls and convolutions, so CPU and GPU results can be compared closely."""
    if not ON_GPU:
        yield
        return
    if not torch.cuda.is_available():
        pytest.fail("no CUDA device is visible; run `pytest -m gpu` on a GPU machine or set DYF_GPU_TEST_DEVICE=cpu")
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _network():
    torch.manual_seed(0)
    net = build_network("unet", in_channels=2, cond_channels=0, out_channels=1, dim=16, dim_mults=(1, 2),
                        block_dropout=0.3, attn_dropout=0.1)
    return net.eval()


def _mc_call(net, x, time, noise):
    with torch.no_grad(), mc_dropout(net, noise):
        return net(x, time, None)


def test_member_noise_is_bitwise_the_same_on_the_gpu():
    on_cpu = MemberNoise.for_members(7, list(range(5))).fold(3)
    on_gpu = MemberNoise.for_members(7, list(range(5)), device=DEVICE).fold(3)
    assert torch.equal(on_cpu.keys, on_gpu.keys.cpu())
    assert torch.equal(on_cpu.bernoulli_keep((3, 17, 19), 0.3), on_gpu.bernoulli_keep((3, 17, 19), 0.3).cpu())
    torch.testing.assert_close(on_cpu.normal((4, 8)), on_gpu.normal((4, 8)).cpu(), atol=1e-6, rtol=1e-5)


def test_mc_dropout_members_match_across_devices_and_batching():
    net = _network()
    x = torch.randn(5, 2, 16, 16)
    time = torch.full((5,), 2.0)
    noise = MemberNoise.for_members(1, list(range(5)))
    on_cpu = _mc_call(net, x, time, noise)
    gpu_net = _network().to(DEVICE)
    on_gpu = _mc_call(gpu_net, x.to(DEVICE), time.to(DEVICE), MemberNoise(noise.keys.to(DEVICE)))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
    alone = _mc_call(gpu_net, x[3:4].to(DEVICE), time[3:4].to(DEVICE), MemberNoise(noise.keys[3:4].to(DEVICE)))
    torch.testing.assert_close(alone, on_gpu[3:4], atol=1e-5, rtol=1e-5)
    assert (on_cpu[0] - on_cpu[1]).abs().max() > 1e-3  # the members' masks differ


def test_compiled_network_matches_eager_under_mc_dropout():
    net = _network().to(DEVICE)
    x = torch.randn(4, 2, 16, 16, device=DEVICE)
    time = torch.full((4,), 1.0, device=DEVICE)
    eager = [_mc_call(net, x, time, MemberNoise.for_members(seed, list(range(4)), device=DEVICE)) for seed in (0, 1)]
    net.compile()
    compiled = [_mc_call(net, x, time, MemberNoise.for_members(seed, list(range(4)), device=DEVICE))
                for seed in (0, 1)]
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert (compiled[0] - compiled[1]).abs().max() > 1e-3  # new noise, new masks: no stale graph constants


def test_simulators_on_the_gpu_match_the_cpu(dyf, tmp_path):
    for label, device in (("cpu", "cpu"), ("gpu", DEVICE)):
        dyf("prepare", "spring-mesh", "--out", str(tmp_path / f"mesh-{label}.zarr"), "--trajectories", "2,1,1",
            "--snapshots", "40", "--device", device)
        dyf("prepare", "navier-stokes", "--out", str(tmp_path / f"ns-{label}.zarr"), "--trajectories", "1,1,1",
            "--snapshots", "3", "--device", device)
    for name in ("mesh", "ns"):
        cpu = xr.open_zarr(tmp_path / f"{name}-cpu.zarr")
        gpu = xr.open_zarr(tmp_path / f"{name}-gpu.zarr")
        for field in cpu.attrs["dyf_fields"]:
            a, b = cpu[field].values, gpu[field].values
            scale = np.nanmax(np.abs(a))
            assert np.isfinite(b[np.isfinite(a)]).all()
            np.testing.assert_allclose(b, a, atol=1e-3 * scale, rtol=0)


def test_tiny_pipeline_with_bf16_and_compile(dyf, tmp_path):
    data = make_store(tmp_path / "data.zarr", series=6, steps=40, grid=(16, 16), land=True)
    fast = ["--set", "training.bf16=true", "--set", "training.compile=true", "--device", DEVICE]
    dyf("train-interpolator", "--data", str(data), "--preset", "tiny", "--out", str(tmp_path / "i.pt"), *fast)
    dyf("train-forecaster", "--data", str(data), "--interpolator", str(tmp_path / "i.pt"), "--preset", "tiny",
        "--out", str(tmp_path / "m.pt"), *fast)
    out = tmp_path / "f.zarr"
    summary = json.loads(dyf("--json", "forecast", "--ckpt", str(tmp_path / "m.pt"), "--horizon", "8",
                             "--ensemble", "6", "--out", str(out), "--device", DEVICE, "--bf16", "--compile").stdout)
    assert summary["ok"] and summary["device"].startswith(DEVICE)
    ds = xr.open_zarr(out)
    assert ds.attrs["dyf_precision"] == ("bfloat16" if ON_GPU else "float32")
    values = ds["u"].values
    land = ~ds["mask"].values[:, None, None, None]
    assert np.isfinite(values[~np.broadcast_to(land, values.shape)]).all()
    assert np.nanmean(values.std(axis=2)) > 0  # members differ under MC dropout
    scores = json.loads(dyf("--json", "evaluate", str(out), "--out", str(tmp_path / "scores.nc")).stdout)
    assert scores["ok"]


def test_forecast_with_cuda_graphs_and_packing_matches_eager(tmp_path):
    """`--compile --compile-mode reduce-overhead --pack 2` (CUDA graphs; their outputs are copied before the
    next replay) gives the eager forecast up to float rounding (TF32 on in both, as dyf sets it)."""
    from dyfcli import forecast
    from dyfcli.forecast_store import open_forecast
    from dyfcli.store import open_store
    from storefactory import make_untrained_checkpoint

    store = open_store(make_store(tmp_path / "data.zarr", dated=True, steps=24, land=True))
    checkpoint = make_untrained_checkpoint(store, tmp_path / "model.pt")
    values = {}
    for name, options in (("eager", {}), ("graphs", {"compile": True, "compile_mode": "reduce-overhead", "pack": 2})):
        forecast.run_forecast(forecast.ForecastRequest(checkpoint=checkpoint, out=tmp_path / f"{name}.zarr",
                                                       horizon=6, ensemble=5, data=store.path, seed=1,
                                                       device=DEVICE, **options))
        values[name] = open_forecast(tmp_path / f"{name}.zarr").ds["u"].values
    valid = np.isfinite(values["eager"])
    assert valid.any() and np.array_equal(valid, np.isfinite(values["graphs"]))
    np.testing.assert_allclose(values["graphs"][valid], values["eager"][valid], atol=2e-3, rtol=2e-3)


def test_gpu_checks_script_dry_run_on_cpu(tmp_path):
    """`scripts/gpu_checks.sh --cpu-smoke`: every benchmark part of the GPU check runs (tiny sizes, CPU)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", "scripts/gpu_checks.sh", "--cpu-smoke", str(tmp_path)], cwd=repo,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = {name: [r["part"] for r in json.loads((tmp_path / f"{name}.json").read_text())["results"]]
             for name in ("forecast", "train", "loader", "modes")}
    assert parts == {"forecast": ["forecast", "profile"], "train": ["train", "train"], "loader": ["loader"],
                     "modes": ["forecast", "forecast", "forecast"]}
    loader = json.loads((tmp_path / "loader.json").read_text())["results"][0]
    assert loader["loader_over_step"] > 0  # compared with the train part's fastest step
