"""The shared foundation: CLI conventions, store schema and validation, splits, per-member noise."""

import json

import numpy as np
import pytest
import torch

from dyfcli.errors import DataError, UsageError
from dyfcli.noise import MemberNoise
from dyfcli.splits import parse_selection, time_splits
from dyfcli.store import open_store
from storefactory import make_store


def test_help_lists_commands(dyf):
    proc = dyf("--help")
    for command in ("prepare", "inspect"):
        assert command in proc.stdout


def test_bad_flag_is_usage_error_without_traceback(dyf):
    proc = dyf("inspect", "--no-such-flag", "x", check=2)
    assert "Traceback" not in proc.stderr
    assert "--no-such-flag" in proc.stderr


def test_inspect_store_json(dyf, tmp_path):
    store = make_store(tmp_path / "s.zarr", dated=True, land=True, cond=("obstacle",))
    doc = json.loads(dyf("--json", "inspect", str(store)).stdout)
    assert doc["ok"] and doc["command"] == "inspect"
    assert doc["kind"] == "data-store"
    assert list(doc["fields"]) == ["u", "v"]
    assert doc["conditioning"] == ["cond_obstacle"]
    assert doc["splits"]["train"]["steps"] == 4 * 8
    assert 0 < doc["valid_fraction"] < 1


def test_inspect_missing_path_exit_4_json_error(dyf, tmp_path):
    proc = dyf("--json", "inspect", str(tmp_path / "nope.zarr"), check=4)
    doc = json.loads(proc.stdout)
    assert doc == {"ok": False, "command": "inspect",
                   "error": {"kind": "data", "message": doc["error"]["message"], "exit_code": 4}}
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_open_store_rejects_non_store_and_incomplete(tmp_path):
    import xarray as xr

    xr.Dataset({"a": ("x", np.arange(3.0))}).to_zarr(tmp_path / "plain.zarr")
    with pytest.raises(DataError, match="not a dyf data store"):
        open_store(tmp_path / "plain.zarr")
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable Zarr store"):
        open_store(tmp_path / "broken.zarr")


def test_write_store_refuses_existing_output(tmp_path):
    make_store(tmp_path / "s.zarr")
    with pytest.raises(UsageError, match="--overwrite"):
        make_store(tmp_path / "s.zarr")


def test_split_ranges_series_and_dates(tmp_path):
    sim = open_store(make_store(tmp_path / "sim.zarr", series=8, steps=10))
    assert sim.split_ranges("train") == [(s, 0, 10) for s in range(4)]
    assert sim.split_ranges("test") == [(s, 0, 10) for s in (6, 7)]
    dated = open_store(make_store(tmp_path / "dated.zarr", dated=True, series=2, steps=30))
    assert dated.split_ranges("val") == [(0, 10, 20), (1, 10, 20)]
    with pytest.raises(DataError, match="no 'predict' split"):
        dated.split_ranges("predict")


@pytest.mark.parametrize("text,expected", [
    ("2019", ("2019-01-01", "2019-12-31")),
    ("2020-02", ("2020-02-01", "2020-02-29")),
    ("2019-07-14", ("2019-07-14", "2019-07-14")),
    ("2015:2017-06", ("2015-01-01", "2017-06-30")),
    (":2018", (None, "2018-12-31")),
])
def test_parse_selection(text, expected):
    assert parse_selection(text, "--val") == expected


def test_time_splits_reject_overlap_and_garbage():
    assert time_splits("2018", "2019", "2020")["train"] == {"time": [None, "2018-12-31"]}
    with pytest.raises(UsageError, match="overlap"):
        time_splits("2019", "2019-06", "2020")
    with pytest.raises(UsageError, match="--test"):
        time_splits("2018", "2019", "twenty")


def test_member_noise_is_batch_invariant():
    ids = torch.arange(10)
    batch = MemberNoise.for_members(7, ids).fold(3)
    alone = MemberNoise.for_members(7, ids[4:5]).fold(3)
    assert torch.equal(batch.normal((2, 5))[4], alone.normal((2, 5))[0])
    assert not torch.equal(batch.uniform((50,))[0], batch.uniform((50,))[1])
    assert not torch.equal(batch.uniform((50,)), batch.fold(1).uniform((50,)))


def test_member_noise_distribution():
    noise = MemberNoise.for_members(1, torch.arange(4))
    u = noise.uniform((200_000,))
    z = noise.normal((200_000,))
    assert u.min() >= 0 and u.max() < 1
    assert torch.allclose(u.mean(1), torch.full((4,), 0.5), atol=5e-3)
    assert torch.allclose(z.mean(1), torch.zeros(4), atol=1e-2)
    assert torch.allclose(z.std(1), torch.ones(4), atol=1e-2)
