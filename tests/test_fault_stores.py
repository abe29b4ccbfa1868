"""Fault suite: damaged, unfinished and foreign stores are refused (exit 4), never read as data.

Damage is done the way a disk or a careless hand does it: a chunk file deleted, one byte flipped, a chunk
truncated, a `zarr.json` garbled. Every reader must notice: `dyf inspect [--verify]`, `dyf
train-interpolator` (also with DataLoader workers), `dyf forecast` and `dyf evaluate` exit 4 with one
line naming the store and the fix, never 0 with changed numbers and never 1 with a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from dyfcli import forecast_store
from dyfcli.data import ChunkFileReader, WindowDataset, chunk_reader
from dyfcli.errors import DataError
from dyfcli.store import open_store, provenance_attrs, store_id, write_store
from storefactory import make_store, make_untrained_checkpoint

pytestmark = pytest.mark.fault

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TRAIN = ("--preset", "tiny", "--set", "interpolator.max_steps=2")


# ----------------------------------------------------------------------------------------------- damage

def delete(path: Path) -> None:
    path.unlink()


def flip_byte(path: Path) -> None:
    """Flip one bit in the middle of a file (inside the data, not the checksum)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def garble(path: Path) -> None:
    path.write_text(path.read_text()[:40])


DAMAGE = {"delete": delete, "flip": flip_byte, "truncate": truncate, "garble": garble}


def _check_refused(proc, *words: str) -> None:
    """Exit 4 with one `error:` line naming `words`, and no traceback."""
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr and "Caught" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, proc.stderr
    for word in words:
        assert word in error[0], error[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One tiny data store (land, conditioning) copied by every test that damages it."""
    return make_store(tmp_path_factory.mktemp("pristine") / "store.zarr", land=True, cond=("obstacle",),
                      normalization="pixel")


@pytest.fixture
def store(pristine, tmp_path):
    copy = tmp_path / "store.zarr"
    shutil.copytree(pristine, copy)
    return copy


# ----------------------------------------------------------------------------------------------- data stores

DATA_STORE_DAMAGE = [
    ("delete", "u/c/0/3/0/0"),
    ("delete", "time/c/0"),
    ("delete", "stats_mean_u/c/0/0/0"),
    ("delete", "mask/c/1/0/0"),
    ("delete", "cond_obstacle/c/2/0/0"),
    ("flip", "u/c/0/3/0/0"),
    ("truncate", "v/c/1/2/0/0"),
    ("flip", "stats_std_v/c/0/0/0"),
    ("garble", "u/zarr.json"),
]


@pytest.mark.parametrize("kind, target", DATA_STORE_DAMAGE)
def test_inspect_verify_refuses_a_damaged_data_store(dyf, store, kind, target):
    DAMAGE[kind](store / target)
    _check_refused(dyf("inspect", "--verify", str(store), check=None), str(store), target, "dyf prepare")


def test_inspect_verify_passes_an_intact_store_and_lists_every_damaged_chunk(dyf, store):
    doc = json.loads(dyf("--json", "inspect", "--verify", str(store)).stdout)
    assert doc["verify"] == {"ok": True, "arrays": doc["verify"]["arrays"], "chunks": doc["verify"]["chunks"]}
    assert doc["verify"]["chunks"] > 4 * 24 * 2  # every field chunk at least
    delete(store / "u/c/0/3/0/0")
    flip_byte(store / "v/c/2/5/0/0")
    proc = dyf("inspect", "--verify", str(store), check=4)
    assert "u/c/0/3/0/0 (missing)" in proc.stderr and "v/c/2/5/0/0 (ValueError" in proc.stderr


@pytest.mark.parametrize("kind, target", [("delete", "u/c/0/3/0/0"), ("delete", "time/c/0"),
                                          ("delete", "stats_mean_u/c/0/0/0"), ("delete", "mask/c/1/0/0"),
                                          ("flip", "stats_mean_v/c/1/0/0"), ("garble", "mask/zarr.json")])
def test_opening_a_data_store_checks_chunk_files_and_small_arrays(dyf, store, kind, target):
    """Plain `dyf inspect` (no --verify) refuses deleted chunks of any array and damaged small arrays."""
    DAMAGE[kind](store / target)
    _check_refused(dyf("inspect", str(store), check=None), str(store), target.split("/")[0])


@pytest.mark.parametrize("kind", ["flip", "truncate", "delete"])
def test_training_refuses_a_damaged_field_chunk(dyf, store, tmp_path, kind):
    for series in range(4):  # every series: whichever window the sampler draws first hits one
        DAMAGE[kind](store / f"u/c/{series}/3/0/0")
    proc = dyf("train-interpolator", "--data", str(store), *TRAIN, "--out", str(tmp_path / "i.pt"),
               check=None, env=ONE_THREAD)
    _check_refused(proc, str(store), "dyf prepare")


def test_training_with_loader_workers_exits_4_with_one_line(dyf, store, tmp_path):
    """A worker process's read error comes back as the same one-line DataError, and the workers stop."""
    for path in (store / "u/c").rglob("0"):
        if path.is_file():
            flip_byte(path)
    proc = dyf("train-interpolator", "--data", str(store), *TRAIN, "--set", "data.num_workers=2",
               "--out", str(tmp_path / "i.pt"), check=None, env=ONE_THREAD, timeout=120)
    _check_refused(proc, str(store), "checksum", "dyf prepare")


@pytest.mark.parametrize("kind, target", [("flip", "u/c/3/16/0/0"), ("truncate", "v/c/3/16/0/0"),
                                          ("delete", "u/c/3/16/0/0")])
def test_forecast_refuses_a_damaged_initial_condition(dyf, store, tmp_path, kind, target):
    checkpoint = make_untrained_checkpoint(open_store(store), tmp_path / "model.pt")
    DAMAGE[kind](store / target)  # series 3 is the test split; time 16 its first initial condition
    proc = dyf("forecast", "--ckpt", str(checkpoint), "--data", str(store), "--init", "16", "--horizon", "2",
               "--ensemble", "1", "--device", "cpu", "--out", str(tmp_path / "f.zarr"), check=None, env=ONE_THREAD)
    _check_refused(proc, str(store))


def test_window_reads_check_the_checksum_on_the_fast_path(store):
    """The training reader decodes chunk files itself (no zarr per window): it must check the crc32c."""
    array = zarr.open_group(str(store), mode="r")["u"]
    assert isinstance(chunk_reader(array), ChunkFileReader)
    windows = WindowDataset(store, "train", 3)
    flip_byte(store / "u/c/0/1/0/0")
    with pytest.raises(DataError, match="checksum"):
        windows[0]


# ----------------------------------------------------------------------------------------------- written

def test_every_array_is_checksummed_and_empty_chunks_are_written(pristine, tmp_path):
    ds = xr.open_zarr(pristine, chunks=None).load()
    ds["u"][0, 0] = np.nan  # an all-NaN (all-fill) chunk: zarr skips those unless told otherwise
    ds["mask"][1] = False
    for var in ds.variables.values():
        var.encoding = {}
    out = write_store(ds, tmp_path / "empty.zarr")
    assert (out / "u/c/0/0/0/0").is_file() and (out / "mask/c/1/0/0").is_file()
    group = zarr.open_group(str(out), mode="r")
    for name in group.array_keys():
        assert "crc32c" in [codec.to_dict()["name"] for codec in group[name].metadata.codecs], name
    assert np.isnan(open_store(out).ds["u"][0, 0].values).all()  # opens: nothing is missing


def _write_forecast(path: Path, store_path: Path, *, all_nan_block: bool = False) -> Path:
    """A small complete forecast store written with the real forecast_store writer (truth + noise)."""
    store = open_store(store_path)
    truth = xr.open_zarr(store_path, chunks=None)
    times, inits, leads = truth["time"].values, (2, 5), np.arange(1, 4)
    layout = forecast_store.ForecastLayout(
        fields=store.fields, field_attrs={}, series=truth["series"].values, init_time=times[list(inits)],
        members=3, lead=leads.astype(float), lead_time=leads * 0.5,
        valid_time=np.stack([times[i] + leads * 0.5 for i in inits]), mask=store.ds["mask"], identity={},
        attrs={"dyf_truth": str(store_path), "dyf_truth_id": store_id(store)})
    forecast_store.create(path, layout)
    writer = forecast_store.BlockWriter(path)
    rng = np.random.default_rng(0)
    for s in range(truth.sizes["series"]):
        for position, i in enumerate(inits):
            target = np.stack([truth[f].values[s, i + leads] for f in store.fields], axis=1)
            block = (target[None] + 0.1 * rng.standard_normal((3, *target.shape))).astype(np.float32)
            writer.write(s, position, np.full_like(block, np.nan) if all_nan_block else block)
    forecast_store.mark_complete(path)
    return path


@pytest.fixture
def forecast(store, tmp_path):
    return _write_forecast(tmp_path / "forecast.zarr", store)


def test_all_nan_forecast_blocks_are_written_and_done_exists_everywhere(store, tmp_path):
    path = _write_forecast(tmp_path / "nan.zarr", store, all_nan_block=True)
    assert (path / "u/c/0/0/0/0/0/0").is_file() and (path / "done/c/3/1").is_file()
    forecast_store.open_forecast(path)  # every required chunk is there


# ----------------------------------------------------------------------------------------------- forecast stores

FORECAST_DAMAGE = [
    ("delete", "u/c/1/1/0/0/0/0", "'u'"),
    ("delete", "done/c/2/0", "'done'"),
    ("delete", "mask/c/0/0/0", "'mask'"),
    ("delete", "init_time/c/0", "'init_time'"),
    ("flip", "v/c/0/1/0/0/0/0", "v"),
    ("truncate", "u/c/3/0/0/0/0/0", "u"),
    ("flip", "mask/c/0/0/0", "mask"),
    ("garble", "u/zarr.json", "u"),
]


@pytest.mark.parametrize("kind, target, named", FORECAST_DAMAGE)
def test_evaluate_refuses_a_damaged_forecast_store(dyf, forecast, store, kind, target, named):
    DAMAGE[kind](forecast / target)
    proc = dyf("evaluate", str(forecast), "--truth", str(store), check=None, env=ONE_THREAD)
    _check_refused(proc, str(forecast), named, "dyf forecast")


@pytest.mark.parametrize("kind, target", [("flip", "u/c/1/8/0/0"), ("truncate", "v/c/0/3/0/0"),
                                          ("delete", "u/c/2/7/0/0")])
def test_evaluate_refuses_a_damaged_truth(dyf, forecast, store, kind, target):
    DAMAGE[kind](store / target)  # valid or initial times of the forecast
    proc = dyf("evaluate", str(forecast), "--truth", str(store), check=None, env=ONE_THREAD)
    _check_refused(proc, str(store), "dyf prepare")


@pytest.mark.parametrize("kind, target", [("delete", "u/c/1/1/0/0/0/0"), ("flip", "v/c/0/1/0/0/0/0"),
                                          ("delete", "done/c/0/0")])
def test_inspect_verify_refuses_a_damaged_forecast_store(dyf, forecast, kind, target):
    dyf("inspect", "--verify", str(forecast))
    DAMAGE[kind](forecast / target)
    _check_refused(dyf("inspect", "--verify", str(forecast), check=None), str(forecast), target)


def test_forecast_resume_refuses_garbled_array_metadata(dyf, store, tmp_path):
    """The block writer reads each array's own zarr.json (not the consolidated copy): exit 4, not 1."""
    checkpoint = make_untrained_checkpoint(open_store(store), tmp_path / "model.pt")
    args = ["forecast", "--ckpt", str(checkpoint), "--data", str(store), "--init", "16", "--horizon", "2",
            "--ensemble", "1", "--device", "cpu", "--out", str(tmp_path / "f.zarr")]
    dyf(*args, env=ONE_THREAD)
    garble(tmp_path / "f.zarr/u/zarr.json")
    _check_refused(dyf(*args, "--resume", check=None, env=ONE_THREAD), "f.zarr", "'u'", "dyf forecast")


def test_resume_rewrites_a_done_block_whose_chunk_was_deleted(forecast):
    delete(forecast / "u/c/1/1/0/0/0/0")
    done = forecast_store.BlockWriter(forecast).done()
    assert not done[1, 1] and done.sum() == done.size - 1


# ----------------------------------------------------------------------------------------------- older stores

def test_stores_without_checksums_still_open_but_deleted_chunks_are_refused(dyf, pristine, tmp_path):
    """A store written before checksums (raw fields, zarr's defaults) opens; a deleted chunk is still seen."""
    old = tmp_path / "old.zarr"
    ds = xr.open_zarr(pristine, chunks=None).load()
    del ds.attrs["dyf_store_id"]
    for var in ds.variables.values():
        var.encoding = {}
    ds.to_zarr(old, encoding={name: {"chunks": (1, 1, 8, 12), "compressors": None} for name in ("u", "v")},
               consolidated=True)
    assert "crc32c" not in (old / "u/zarr.json").read_text()
    dyf("inspect", "--verify", str(old))
    assert store_id(open_store(old)).startswith("stats-")  # identity of an older store: its statistics
    delete(old / "u/c/2/4/0/0")
    _check_refused(dyf("inspect", str(old), check=None), str(old), "'u'")


# ----------------------------------------------------------------------------------------------- unfinished

def test_partial_stores_are_refused_naming_prepare(dyf, pristine, tmp_path):
    partial = tmp_path / "x.zarr.partial"
    shutil.copytree(pristine, partial)
    _check_refused(dyf("inspect", str(partial), check=None), "unfinished", "dyf prepare")
    proc = dyf("train-interpolator", "--data", str(partial), *TRAIN, "--out", str(tmp_path / "i.pt"),
               check=None, env=ONE_THREAD)
    _check_refused(proc, "unfinished", "dyf prepare")
    marked = tmp_path / "renamed.zarr"  # a staging folder under another name: its writer's marker tells
    partial.rename(marked)
    (marked / ".dyf-staging").write_text("")
    _check_refused(dyf("inspect", str(marked), check=None), "unfinished", "dyf prepare")


# ----------------------------------------------------------------------------------------------- identity

def test_evaluate_refuses_another_data_store_of_the_same_schema(dyf, pristine, tmp_path):
    """A real `dyf forecast` records its data store's identity; another seed's store is refused."""
    store = tmp_path / "a.zarr"
    shutil.copytree(pristine, store)
    other = make_store(tmp_path / "b.zarr", land=True, cond=("obstacle",), normalization="pixel", seed=1)
    checkpoint = make_untrained_checkpoint(open_store(store), tmp_path / "model.pt")
    out = tmp_path / "f.zarr"
    dyf("forecast", "--ckpt", str(checkpoint), "--data", str(store), "--init", "16", "--horizon", "2",
        "--ensemble", "1", "--device", "cpu", "--out", str(out), env=ONE_THREAD)
    assert xr.open_zarr(out).attrs["dyf_truth_id"] == store_id(open_store(store))
    dyf("evaluate", str(out), env=ONE_THREAD)  # its own store (dyf_truth)
    _check_refused(dyf("evaluate", str(out), "--truth", str(other), check=None, env=ONE_THREAD),
                   str(other), "--allow-other-truth")
    dyf("evaluate", str(out), "--truth", str(other), "--allow-other-truth", env=ONE_THREAD)


def test_store_ids_differ_between_prepares_of_the_same_data(tmp_path):
    first = provenance_attrs("x", {})["dyf_store_id"]
    assert first != provenance_attrs("x", {})["dyf_store_id"] and len(first) == 32
