"""`dyf forecast --pack N`: several (series, init) blocks share network batches, and the same --seed gives
the same forecast, bit for bit on CPU, whatever the packing, member batch or number of ranks."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dyfcli import forecast
from dyfcli.errors import UsageError
from dyfcli.forecast_store import BlockWriter, open_forecast
from dyfcli.runtime import Ranks
from dyfcli.store import open_store
from storefactory import make_store, make_untrained_baseline, make_untrained_checkpoint

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# 9 members: on CPU every call has 5 rows (member_groups), so packed calls hold rows of two blocks
MEMBERS = 9


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Dated, per-pixel statistics (units differ per series), land, a static condition: 4 series x 2 inits."""
    path = make_store(tmp_path_factory.mktemp("packing") / "data.zarr", dated=True, steps=24, land=True,
                      normalization="pixel", cond=("fixed",))
    return open_store(path)


@pytest.fixture(autouse=True)
def one_thread():
    """CPU kernels round by thread count too: every forecast of a test runs with the same one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _baseline_checkpoint(store, path, kind: str):
    return make_untrained_baseline(store, path, kind, ("baseline.diffusion_steps=8", "baseline.perturbation_sigma=0.2"))


def _forecast(checkpoint, store, out, **options):
    request = forecast.ForecastRequest(checkpoint=checkpoint, out=out, horizon=6, ensemble=MEMBERS,
                                       data=store.path, seed=5, device="cpu", **options)
    summary = forecast.run_forecast(request)
    return open_forecast(out).ds, summary


# ----------------------------------------------------------------------------------------------- row layout

@pytest.mark.parametrize("blocks,members,rows,padded", [(1, 9, 5, True), (3, 9, 5, True), (4, 8, 8, True),
                                                        (5, 3, 3, True), (4, 50, 200, False), (3, 50, 40, False),
                                                        (2, 7, 4, False)])
def test_pack_rows_cover_every_member_once_in_order(blocks, members, rows, padded):
    batches = forecast.pack_rows(blocks, members, rows, padded)
    real = [(segment.block, m) for batch in batches for segment in batch for m in segment.members]
    assert real == [(b, m) for b in range(blocks) for m in range(members)]
    sizes = [sum(segment.rows for segment in batch) for batch in batches]
    assert all(size == rows for size in sizes[:-1]) and 0 < sizes[-1] <= rows
    assert (sizes[-1] == rows) if padded else all(segment.padding == 0 for batch in batches for segment in batch)


def test_one_block_per_pack_keeps_the_member_groups_of_before():
    """--pack 1 makes exactly the network batches dyf made before packing existed (existing forecasts stay)."""
    for members in (1, 3, 8, 9, 20, 50):
        for device, member_batch in ((CPU, members), (CPU, 3), (CUDA, members), (CUDA, 7)):
            groups, rows = forecast.member_groups(members, member_batch, device)
            batches = forecast.pack_rows(1, members, *forecast.call_rows(members, member_batch, 1, device))
            assert [batch[0].members for batch in batches] == groups and all(len(b) == 1 for b in batches)
            assert [batch[0].rows for batch in batches] == [rows or len(g) for g in groups]


def test_call_rows_fixed_on_cpu_and_scaled_by_the_pack_elsewhere():
    assert forecast.call_rows(9, 9, 4, CPU) == forecast.call_rows(9, 2, 1, CPU) == (5, True)
    assert forecast.call_rows(50, 50, 4, CUDA) == (200, False)
    assert forecast.call_rows(50, 25, 3, CUDA) == (75, False)
    assert forecast.call_rows(10, 64, 2, CUDA) == (20, False)


def test_pack_below_one_is_a_usage_error(store, tmp_path):
    request = forecast.ForecastRequest(checkpoint=tmp_path / "m.pt", out=tmp_path / "f.zarr", horizon=6,
                                       ensemble=3, pack=0)
    with pytest.raises(UsageError, match="--pack 0"):
        forecast.check_request(request)


# ----------------------------------------------------------------------------------------------- same forecast

def test_dyffusion_packed_equals_unpacked_bit_for_bit(store, tmp_path):
    checkpoint = make_untrained_checkpoint(store, tmp_path / "model.pt")
    reference, unpacked = _forecast(checkpoint, store, tmp_path / "one.zarr")
    assert unpacked["pack"] == 1 and unpacked["rows_per_call"] == 5 and unpacked["windows"] == 2
    values = reference["u"].values
    assert values.shape[:3] == (4, 2, MEMBERS) and np.isfinite(values[..., 5:, 5:]).all()
    assert np.nanmean(np.nanstd(values, axis=2)) > 0  # members differ
    calls = {}
    for pack, member_batch in ((3, None), (8, 2), (2, 4)):
        ds, summary = _forecast(checkpoint, store, tmp_path / f"p{pack}.zarr", pack=pack, member_batch=member_batch)
        assert summary["pack"] == pack and summary["rows_per_call"] == 5
        calls[pack] = summary["batched_network_calls"]
        for field in ("u", "v"):
            np.testing.assert_array_equal(ds[field].values, reference[field].values)
    # per window: unpacked 8 blocks x 2 calls (5 rows + 4 padded to 5); one pack of 72 rows: 15 calls of 5
    per_batch = unpacked["batched_network_calls"] // (8 * 2 * 2)
    assert unpacked["batched_network_calls"] == 8 * 2 * 2 * per_batch and calls[8] == 15 * 2 * per_batch


@pytest.mark.parametrize("kind", ["dropout", "perturbation", "ddpm"])
def test_baselines_packed_equal_unpacked_bit_for_bit(store, tmp_path, kind):
    checkpoint = _baseline_checkpoint(store, tmp_path / f"{kind}.pt", kind)
    reference, _ = _forecast(checkpoint, store, tmp_path / "one.zarr")
    packed, summary = _forecast(checkpoint, store, tmp_path / "packed.zarr", pack=3)
    assert summary["pack"] == 3
    values = reference["u"].values
    assert np.isfinite(values[..., 5:, 5:]).all() and np.nanmean(np.nanstd(values, axis=2)) > 0
    for field in ("u", "v"):
        np.testing.assert_array_equal(packed[field].values, reference[field].values)


def test_a_stopped_packed_forecast_resumes_per_block_with_another_pack(store, tmp_path):
    """Blocks are marked done one by one: a stop after the first pack of 3 leaves 3 blocks done, and the same
    forecast continued with --pack 2 equals the one made without packing."""
    checkpoint = make_untrained_checkpoint(store, tmp_path / "model.pt")
    reference, _ = _forecast(checkpoint, store, tmp_path / "one.zarr")
    out = tmp_path / "stopped.zarr"
    request = forecast.ForecastRequest(checkpoint=checkpoint, out=out, horizon=6, ensemble=MEMBERS,
                                       data=store.path, seed=5, device="cpu", pack=3)
    job = forecast.prepare_job(request)
    done = forecast.prepare_output(job.out, job.layout, overwrite=False, resume=False, ranks=Ranks())
    blocks = [(s, i) for s in range(done.shape[0]) for i in range(done.shape[1])]
    with pytest.raises(forecast.Interrupted, match="after writing 3 blocks"):
        forecast.run_blocks(job.collaborators, BlockWriter(out), blocks, job.init, job.plan, job.window_valid_time,
                            seed=5, members=MEMBERS, member_batch=MEMBERS, pack=3, stop_requested=lambda: True)
    assert BlockWriter(out).done().ravel().tolist() == [True] * 3 + [False] * 5
    summary = forecast.run_forecast(replace(request, pack=2))
    assert summary["blocks_resumed"] == 3 and summary["blocks_written"] == 5
    np.testing.assert_array_equal(open_forecast(out).ds["u"].values, reference["u"].values)


def test_ranks_share_packed_blocks_and_give_the_same_forecast(store, tmp_path):
    """Each rank packs its own round-robin share: what rank r writes equals the forecast of one process."""
    checkpoint = make_untrained_checkpoint(store, tmp_path / "model.pt")
    reference, _ = _forecast(checkpoint, store, tmp_path / "one.zarr")
    request = forecast.ForecastRequest(checkpoint=checkpoint, out=tmp_path / "ranks.zarr", horizon=6,
                                       ensemble=MEMBERS, data=store.path, seed=5, device="cpu", pack=3)
    job = forecast.prepare_job(request)
    done = forecast.prepare_output(job.out, job.layout, overwrite=False, resume=False, ranks=Ranks())
    pending = [(s, i) for s in range(done.shape[0]) for i in range(done.shape[1])]
    for rank in range(3):
        mine = forecast.blocks_for_rank(pending, Ranks(rank=rank, world=3))
        forecast.run_blocks(job.collaborators, BlockWriter(job.out), mine, job.init, job.plan,
                            job.window_valid_time, seed=5, members=MEMBERS, member_batch=MEMBERS, pack=3)
    forecast.forecast_store.mark_complete(job.out)
    np.testing.assert_array_equal(open_forecast(job.out).ds["u"].values, reference["u"].values)


def test_pack_through_the_dyf_command(dyf, store, tmp_path):
    checkpoint = make_untrained_checkpoint(store, tmp_path / "model.pt")
    common = ["forecast", "--ckpt", str(checkpoint), "--data", str(store.path), "--horizon", "6", "--ensemble",
              str(MEMBERS), "--seed", "5", "--device", "cpu"]
    one = json.loads(dyf("--json", *common, "--out", str(tmp_path / "one.zarr"), env=ONE_THREAD).stdout)
    packed = dyf("--json", *common, "--pack", "4", "--out", str(tmp_path / "four.zarr"), "--verbose", env=ONE_THREAD)
    summary = json.loads(packed.stdout)
    assert (one["pack"], summary["pack"], summary["rows_per_call"]) == (1, 4, 5)
    assert "--pack 4 on CPU: network calls keep 5 rows" in packed.stderr
    np.testing.assert_array_equal(open_forecast(tmp_path / "four.zarr").ds["u"].values,
                                  open_forecast(tmp_path / "one.zarr").ds["u"].values)
    assert "4 blocks per pack, 5 rows per network call" in packed.stderr  # the text summary
    bad = dyf(*common, "--pack", "0", "--out", str(tmp_path / "zero.zarr"), check=2)
    assert "--pack 0" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------------------- compile modes

def test_compile_mode_is_checked_and_a_no_op_on_cpu(store, tmp_path, caplog):
    """`--compile-mode` (CUDA graphs on a GPU, tests/test_gpu.py) leaves a CPU forecast as it is."""
    base = forecast.ForecastRequest(checkpoint=tmp_path / "m.pt", out=tmp_path / "f.zarr", horizon=6, ensemble=3)
    with pytest.raises(UsageError, match="--compile-mode 'fast': choose one of default, reduce-overhead"):
        forecast.check_request(replace(base, compile=True, compile_mode="fast"))
    with pytest.raises(UsageError, match="--compile-mode reduce-overhead needs --compile"):
        forecast.check_request(replace(base, compile_mode="reduce-overhead"))
    checkpoint = make_untrained_checkpoint(store, tmp_path / "model.pt")
    reference, _ = _forecast(checkpoint, store, tmp_path / "one.zarr", init="0")
    with caplog.at_level("INFO", logger="dyf"):
        graphs, _ = _forecast(checkpoint, store, tmp_path / "graphs.zarr", init="0", compile=True,
                              compile_mode="reduce-overhead", pack=2)
    assert "apply on CUDA only" in caplog.text
    np.testing.assert_array_equal(graphs["u"].values, reference["u"].values)
