"""Fault suite, checkpoints (issue 14, items 4, 6b and 15): flipped bytes never load as another model,
unfinished checkpoints are refused, files that are not checkpoints are named, `--json` is strict JSON."""

import dataclasses
import json
import logging
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from dyfcli import checkpoint as ckpt
from dyfcli.cli.app import OPTIONS, run_command, strict_json
from dyfcli.errors import CheckpointError
from dyfcli.store import open_store
from storefactory import make_store, make_untrained_checkpoint

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("faultckpt") / "s.zarr")


@pytest.fixture(scope="module")
def model(store_path, tmp_path_factory):
    """An untrained tiny `model.pt` (a forecaster embedding its interpolator), saved as training saves one."""
    return make_untrained_checkpoint(open_store(store_path), tmp_path_factory.mktemp("model") / "model.pt")


def _strict(text: str):
    """json.loads that refuses NaN/Infinity, as every JSON parser outside Python does."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _same(a, b) -> bool:
    """Bit-identical plain payloads (tensors compared by dtype, shape and bytes)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return (torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def _flip(source: Path, target: Path, position: int, mask: int = 0xFF) -> None:
    data = bytearray(source.read_bytes())
    data[position] ^= mask
    target.write_bytes(bytes(data))


def _storage_span(path: Path, member: str = "/data/") -> tuple[int, int]:
    """(first byte, length) of the largest zip entry whose name contains `member` (default: a tensor storage)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if member in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


# ------------------------------------------------------------------------------------------------ item 4

def test_every_byte_flip_is_refused_or_provably_changes_nothing(model, tmp_path):
    """40 byte flips spread over model.pt, 8 inside a tensor storage and 24 single-bit flips in the pickle
    (names, numbers, strings): each one is exit 5, or torch ignored the byte and the loaded payload is
    bit-identical (no silent change; 11 of 23 flips loaded as another model before)."""
    original = torch.load(model, weights_only=True)
    size = model.stat().st_size
    start, length = _storage_span(model)
    pickle_start, pickle_length = _storage_span(model, "data.pkl")
    flips = sorted({(round(i * (size - 1) / 39), 0xFF) for i in range(40)} |
                   {(start + round(i * (length - 1) / 7), 0xFF) for i in range(8)} |
                   {(pickle_start + round(i * (pickle_length - 1) / 23), 0x01) for i in range(24)})
    refused = by_checksum = identical = 0
    for position, mask in flips:
        flipped = tmp_path / f"flip{position}.pt"
        _flip(model, flipped, position, mask)
        try:
            ckpt.load_checkpoint(flipped)
        except CheckpointError as err:
            assert err.exit_code == 5 and str(flipped) in err.message and "\n" not in err.message
            refused += 1
            by_checksum += "checksums recorded at save" in err.message
        else:
            reloaded = torch.load(flipped, map_location="cpu", weights_only=True)
            assert _same(reloaded, original), f"the flip at byte {position} changed the model"
            identical += 1
        flipped.unlink()
    assert refused + identical == len(flips) >= 70
    assert by_checksum >= 8  # every storage flip loads in torch: only the checksums catch them


def test_forecast_with_a_flipped_weight_exits_5(dyf, model, store_path, tmp_path):
    start, length = _storage_span(model)
    flipped = tmp_path / "model.pt"
    _flip(model, flipped, start + length // 2)
    result = dyf("--json", "forecast", "--ckpt", str(flipped), "--data", str(store_path), "--horizon", "2",
                 "--ensemble", "2", "--out", str(tmp_path / "f.zarr"), "--device", "cpu", check=5)
    error = _strict(result.stdout)["error"]
    assert error["exit_code"] == 5 and "re-train it or restore a copy" in error["message"]
    assert "state_dict." in error["message"] and not (tmp_path / "f.zarr").exists()


def test_checksums_cover_config_statistics_and_the_embedded_interpolator(model, tmp_path):
    payload = torch.load(model, weights_only=True)
    assert set(payload["checksums"]["tensors"]) == set(payload["state_dict"])
    assert "checksums" in payload["interpolator"]
    for change in ("config", "normalizer", "interpolator_weight", "interpolator_config"):
        damaged = torch.load(model, weights_only=True)
        if change == "config":
            damaged["config"]["interpolator"]["lr"] *= 2
        elif change == "normalizer":
            damaged["normalizer"]["mean"] += 1
        elif change == "interpolator_weight":
            name = next(iter(damaged["interpolator"]["state_dict"]))
            damaged["interpolator"]["state_dict"][name] += 1
        else:
            damaged["interpolator"]["config"]["data"]["horizon"] += 1
        torch.save(damaged, tmp_path / f"{change}.pt")
        with pytest.raises(CheckpointError, match="do not match the checksums"):
            ckpt.load_checkpoint(tmp_path / f"{change}.pt")


def test_checkpoints_without_checksums_still_load_with_a_note(model, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("dyf"), "propagate", True)
    payload = torch.load(model, weights_only=True)
    old = {key: value for key, value in payload.items() if key != "checksums"}
    old["interpolator"] = {key: value for key, value in old["interpolator"].items() if key != "checksums"}
    torch.save(old, tmp_path / "old.pt")
    with caplog.at_level(logging.INFO, logger="dyf"):
        loaded = ckpt.load_checkpoint(tmp_path / "old.pt")
    assert loaded.interpolator is not None and "no checksums" in caplog.text


# ------------------------------------------------------------------------------------------------ item 6b

def _unfinished(model: Path, target: Path, kind: str) -> Path:
    loaded = ckpt.load_checkpoint(model)
    if kind == "interpolator":
        loaded = loaded.interpolator
    ckpt.save_checkpoint(target, dataclasses.replace(loaded, training={"step": 3, "complete": False}))
    return target


def test_an_unfinished_interpolator_is_refused_by_train_forecaster(dyf, model, store_path, tmp_path):
    interpolator = _unfinished(model, tmp_path / "interpolator.pt", "interpolator")
    result = dyf("train-forecaster", "--data", str(store_path), "--interpolator", str(interpolator),
                 "--out", str(tmp_path / "m.pt"), check=5)
    assert "unfinished `dyf train-interpolator` run" in result.stderr
    assert f"--out {interpolator}` command to finish it" in result.stderr and not (tmp_path / "m.pt").exists()


def test_an_unfinished_forecaster_is_refused_by_forecast(dyf, model, store_path, tmp_path):
    forecaster = _unfinished(model, tmp_path / "model.pt", "forecaster")
    result = dyf("forecast", "--ckpt", str(forecaster), "--data", str(store_path), "--horizon", "2",
                 "--ensemble", "2", "--out", str(tmp_path / "f.zarr"), check=5)
    assert "unfinished `dyf train-forecaster` run" in result.stderr and not (tmp_path / "f.zarr").exists()


# ------------------------------------------------------------------------------------------------ item 15

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["text", "netcdf", "hdf5", "empty", "zip-pickle", "plain-pickle", "random"])
def test_files_that_are_not_checkpoints_are_named_in_one_line(kind, tmp_path):
    path, marker = tmp_path / "model.pt", tmp_path / "ran"
    if kind == "text":
        path.write_text("fields: [u, v]\nthis is a YAML file\n")
    elif kind == "netcdf":
        path.write_bytes(b"CDF\x01" + bytes(200))
    elif kind == "hdf5":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip-pickle":
        torch.save({"state_dict": _Payload(marker)}, path)
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    else:
        path.write_bytes(bytes(range(256)) * 2)
    with pytest.raises(CheckpointError) as raised:
        ckpt.load_checkpoint(path)
    message = raised.value.message
    expected = {"text": "a text file", "netcdf": "NetCDF/HDF5 data file", "hdf5": "NetCDF/HDF5 data file",
                "empty": "empty (0 bytes)", "zip-pickle": "asks to call posix.system",
                "plain-pickle": "asks to call posix.system", "random": "neither a torch file"}[kind]
    assert expected in message and "cannot be read" in message and str(path) in message
    assert "\n" not in message and "torch.load" not in message and "Re-running" not in message
    assert message.rstrip().endswith(("restore a copy", "`dyf train-forecaster`"))
    assert not marker.exists()  # nothing in the file ran


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_a_damaged_training_state_names_overwrite(damage, model, tmp_path):
    state = ckpt.state_path(tmp_path / "i.pt")
    if damage == "text":
        state.write_text("not a state\n")
    else:
        ckpt.save_training_state(state, {"progress": {"step": 1}, "network": {"w": torch.ones(1000)}})
        state.write_bytes(state.read_bytes()[:300])
    with pytest.raises(CheckpointError) as raised:
        ckpt.load_training_state(state)
    assert "delete it or pass --overwrite to start over" in raised.value.message
    assert str(state) in raised.value.message and "\n" not in raised.value.message


def test_a_refused_checkpoint_is_a_strict_json_error_document(dyf, store_path, tmp_path):
    (tmp_path / "x.nc").write_bytes(b"CDF\x01" + bytes(100))
    result = dyf("--json", "forecast", "--ckpt", str(tmp_path / "x.nc"), "--data", str(store_path), "--horizon",
                 "2", "--ensemble", "2", "--out", str(tmp_path / "f.zarr"), check=5)
    document = _strict(result.stdout)
    assert document["ok"] is False and "NetCDF" in document["error"]["message"]
    assert len(result.stdout.strip().splitlines()) == 1


def test_json_output_is_strict_nan_and_infinity_become_null(capsys, monkeypatch):
    monkeypatch.setattr(OPTIONS, "json", True)
    run_command("probe", lambda: {"crps": float("nan"), "nested": {"spread": [1.0, float("inf")]}})
    document = _strict(capsys.readouterr().out)
    assert document == {"ok": True, "command": "probe", "crps": None, "nested": {"spread": [1.0, None]}}
    assert strict_json({"x": -math.inf}) == '{"x": null}'


@pytest.mark.parametrize("args", [["--json", "prepare"], ["--json"], ["--json", "prepare", "sst"],
                                  ["--json", "train-interpolator", "--bogus"]])
def test_usage_errors_print_one_strict_json_document(dyf, args):
    result = dyf(*args, check=2)
    document = _strict(result.stdout)
    assert document["ok"] is False and document["error"]["exit_code"] == 2 and document["error"]["kind"] == "usage"
