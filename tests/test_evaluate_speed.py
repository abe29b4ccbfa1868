"""The fast evaluate path: numpy kernels (CPU) equal the torch ones (GPU), the cache-blocked kernel gives the
bits of the one-pass one, forecast blocks read from their chunk files equal zarr's reads, worker threads
change nothing, and the benchmark's plain numpy pass runs and agrees with `dyf evaluate`."""

import json
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
from numcodecs import Zstd

from dyfcli.evaluate import _block_files, evaluate, open_inputs
from dyfcli.metrics import POINT_VALUES, PointValues, ScoreAccumulator, numpy_point_values, torch_point_values
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


# ------------------------------------------------------------------------- the blocked kernel, chunk-file reads

def _one_pass_point_values(ens: np.ndarray, truth: np.ndarray) -> PointValues:
    """The kernel as it was before it went through the points in cache-sized blocks: one transposing
    subtraction and one sort of the whole slice. The blocked kernel must give the same bits."""
    m, leads, points = ens.shape
    dtype = ens.dtype if ens.dtype == np.float64 else np.float32
    error = np.subtract(ens.reshape(m, -1).T, truth.reshape(-1, 1), order="C", dtype=dtype)
    error.sort(axis=-1)

    def member_sum(values, weights):
        return np.einsum("ij,j->i", values, np.asarray(weights, dtype=dtype))

    work = np.abs(error)
    skill = member_sum(work, np.full(m, 1.0 / m))
    mean_error = member_sum(error, np.full(m, 1.0 / m))
    np.subtract(error, mean_error[:, None], out=work)
    variance = np.einsum("ij,ij->i", work, work) / m
    pair = member_sum(error, 2 * np.arange(1, m + 1) - m - 1)
    np.less(error, 0, out=work, casting="unsafe")
    below = member_sum(work, np.ones(m)).astype(np.int64)
    ties = np.count_nonzero(error == 0, axis=-1)
    shape = (leads, points)
    return PointValues(*(v.reshape(shape) for v in (skill, pair, mean_error, variance, below, ties)))


@pytest.mark.parametrize("members, leads, points, dtype", [
    (50, 3, 2000, np.float32), (7, 2, 1, np.float32), (1, 4, 999, np.float32), (16, 1, 70_001, np.float32),
    (3, 2, 4097, np.float64), (100, 2, 1500, np.float32)])
def test_blocked_kernel_gives_the_bits_of_the_one_pass_kernel(members, leads, points, dtype, monkeypatch):
    monkeypatch.setattr("dyfcli.metrics.KERNEL_BLOCK_BYTES", 4096)  # many blocks and a short last one
    rng = np.random.default_rng(members + points)
    ens = (300 + rng.standard_normal((members, leads, points))).astype(dtype)
    truth = (300 + rng.standard_normal((leads, points))).astype(dtype)
    ens[: (members + 1) // 2, 0, ::7] = truth[0, ::7]  # ties, at some points every member
    ens[:, -1, ::11] = np.nan
    ens[:, :, ::13] = -0.0
    truth[:, ::13] = 0.0
    ens = np.concatenate([ens, ens], axis=1)[:, ::2]  # a slice of leads: not contiguous, as evaluate's
    fast, reference = numpy_point_values(ens, truth), _one_pass_point_values(ens, truth)
    for name in POINT_VALUES:
        ours, theirs = getattr(fast, name), getattr(reference, name)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        assert np.array_equal(ours, theirs, equal_nan=True), name


def test_forecast_blocks_are_read_from_their_chunk_files_as_zarr_reads_them(tmp_path, monkeypatch):
    store = make_store(tmp_path / "truth.zarr", land=True, steps=16)
    forecast = make_forecast(tmp_path / "f.zarr", store, members=5, inits=(1, 4))
    inputs = open_inputs(forecast, None)
    assert set(inputs.block_files) == set(inputs.fields)  # dyf's own layout: the chunk-file path is taken
    for field in inputs.fields:
        for series in range(inputs.forecast.sizes["series"]):
            through_zarr = inputs.forecast[field][series, 1].values
            assert np.array_equal(inputs.block_files[field].read(series, 1), through_zarr, equal_nan=True)
    fast = evaluate(forecast, device="cpu")
    monkeypatch.setattr("dyfcli.evaluate._block_files", lambda path, fields: {})  # everything through zarr
    slow = evaluate(forecast, device="cpu")
    for key in ("scores", "baselines", "rank_histogram", "all"):
        assert fast[key] == slow[key]


def test_a_chunk_that_decodes_to_another_size_is_refused(dyf, tmp_path):
    """crc32c right, zstd frame valid, but fewer bytes than a block: damage, not a partly filled block."""
    store = make_store(tmp_path / "truth.zarr", steps=12)
    forecast = make_forecast(tmp_path / "f.zarr", store, inits=(1,), horizon=2)
    chunk = forecast / "u/c/0/0/0/0/0/0"
    data = Zstd().encode(np.zeros(10, np.float32).tobytes())
    chunk.write_bytes(data + google_crc32c.value(data).to_bytes(4, "little"))
    proc = dyf("evaluate", str(forecast), "--device", "cpu", check=4)
    assert "decodes to 40 bytes" in proc.stderr and "dyf forecast" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_zstd_frame_without_its_size_is_decoded_and_checked(tmp_path):
    """Frames that do not declare their decoded size (streaming writers; zarr's declare it) still read."""
    store = make_store(tmp_path / "truth.zarr", steps=12)
    forecast = make_forecast(tmp_path / "f.zarr", store, members=2, inits=(1,), horizon=2)
    files = open_inputs(forecast, None).block_files["u"]
    expected = files.read(0, 0)
    raw = expected.tobytes()
    assert len(raw) < 2**17  # one raw zstd block holds at most 128 KiB
    # magic, a header without the content size (window 1 MiB), one last raw block of len(raw) bytes
    frame = (0xFD2FB528).to_bytes(4, "little") + bytes([0x00, 0x50]) + (1 | len(raw) << 3).to_bytes(3, "little")
    data = frame + raw
    (forecast / "u/c/0/0/0/0/0/0").write_bytes(data + google_crc32c.value(data).to_bytes(4, "little"))
    assert np.array_equal(files.read(0, 0), expected, equal_nan=True)
    short = frame[:-3] + (1 | (len(raw) - 4) << 3).to_bytes(3, "little") + raw[:-4]
    (forecast / "u/c/0/0/0/0/0/0").write_bytes(short + google_crc32c.value(short).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="decodes to"):
        files.read(0, 0)


def test_other_layouts_are_read_through_zarr(tmp_path):
    """Blocks split over several chunks (not what dyf writes): no chunk-file reader, zarr reads them."""
    import zarr

    group = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    group.create_array("u", shape=(1, 1, 2, 4, 3, 3), chunks=(1, 1, 2, 2, 3, 3), dtype="float32")
    group.create_array("v", shape=(1, 1, 2, 4, 3, 3), chunks=(1, 1, 2, 4, 3, 3), dtype="float64")
    assert _block_files(tmp_path / "other.zarr", ["u", "v"]) == {}
