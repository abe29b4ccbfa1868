"""The fast evaluate path: numpy kernels (CPU) equal the torch ones (GPU), worker threads change nothing,
and the benchmark's plain numpy pass runs and agrees with `dyf evaluate`."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dyfcli.evaluate import evaluate
from dyfcli.metrics import ScoreAccumulator, numpy_point_values, torch_point_values
from storefactory import make_store
from test_evaluate import make_forecast

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_and_torch_kernels_agree_including_ties(dtype):
    rng = np.random.default_rng(0)
    ens = rng.standard_normal((7, 3, 40)).astype(dtype)
    truth = rng.standard_normal((3, 40)).astype(dtype)
    ens[:3, 0, :5] = truth[0, :5]  # three members equal to the truth
    ens[:, 1, 5] = truth[1, 5]  # all members equal to it
    ens[:, 2, 6] = np.nan  # a point with NaN (an invalid point)
    fast = numpy_point_values(ens, truth)
    reference = torch_point_values(torch.from_numpy(ens), torch.from_numpy(truth))
    for name in ("skill", "pair", "mean_error", "variance"):
        np.testing.assert_allclose(getattr(fast, name), getattr(reference, name), rtol=1e-5, atol=1e-6,
                                   equal_nan=True)
    finite = np.isfinite(ens).all(axis=0)
    for name in ("below", "ties"):
        np.testing.assert_array_equal(getattr(fast, name)[finite], getattr(reference, name)[finite])
    assert fast.ties[0, :5].tolist() == [3] * 5 and fast.ties[1, 5] == 7


def test_accumulator_ranks_do_not_depend_on_the_kernel():
    """The same ties, the same random draws: the rank histogram of a constant ensemble is the same."""
    ens, truth, mask = torch.zeros(4, 2, 300), torch.zeros(2, 300), torch.ones(300, dtype=torch.bool)
    on_numpy, on_torch = ScoreAccumulator(2, 4, seed=3), ScoreAccumulator(2, 4, seed=3)
    on_numpy.update(ens, truth, mask)
    on_torch.add(torch_point_values(ens, truth), (2, 300), mask)
    assert torch.equal(on_numpy.result()["rank_histogram"], on_torch.result()["rank_histogram"])
    assert on_numpy.result()["rank_histogram"].sum() == 600


def test_worker_threads_do_not_change_the_scores(tmp_path, monkeypatch):
    store = make_store(tmp_path / "truth.zarr", land=True, normalization="pixel", steps=16)
    forecast = make_forecast(tmp_path / "f.zarr", store, members=5, inits=(1, 4, 7))
    monkeypatch.setattr("dyfcli.evaluate.SLICE_ELEMENTS", 1000)
    summaries = []
    for workers in (1, 3):
        monkeypatch.setattr("dyfcli.evaluate.SCORE_WORKERS", workers)
        summary = evaluate(forecast, device="cpu")
        summaries.append({key: summary[key] for key in ("scores", "baselines", "rank_histogram", "all")})
    assert summaries[0] == summaries[1]  # bit for bit: the sums are added in block order


def test_benchmark_runs_and_its_numpy_pass_agrees(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "evaluate.py"), "--gb", "0.0005",
                           "--members", "4", "--leads", "2", "--grid", "16x16", "--series", "2", "--dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ratio dyf / numpy:" in proc.stdout and "GB/s" in proc.stdout
    numbers = {}
    for line in proc.stdout.splitlines():
        if line.startswith("u ") and "dyf" in line:
            name = line.split()[1]
            numbers[name] = [float(part.split()[-1]) for part in line.split(":", 1)[1].split(",")]
    assert set(numbers) == {"crps", "mse", "spread"}
    for dyf_value, numpy_value in numbers.values():
        assert dyf_value == pytest.approx(numpy_value, rel=1e-4)


def test_device_flag_is_checked(dyf, tmp_path):
    store = make_store(tmp_path / "truth.zarr", steps=12)
    forecast = make_forecast(tmp_path / "f.zarr", store, inits=(1,), horizon=2)
    proc = dyf("--json", "evaluate", str(forecast), "--device", "tpu", check=2)
    assert json.loads(proc.stdout)["error"]["exit_code"] == 2 and "--device" in proc.stderr
