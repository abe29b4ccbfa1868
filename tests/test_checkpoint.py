"""Checkpoints: round trip under weights_only=True, atomic saves, and every way a checkpoint can be wrong."""

import os

import pytest
import torch

from dyfcli import checkpoint as ckpt
from dyfcli.checkpoint import Checkpoint, check_compatible, load_checkpoint, save_checkpoint
from dyfcli.config import load_config
from dyfcli.data import Normalizer
from dyfcli.errors import CheckpointError
from dyfcli.networks import build_network
from dyfcli.store import open_store
from storefactory import make_store


def _checkpoint(store_path, kind="interpolator", interpolator=None) -> Checkpoint:
    store = open_store(store_path)
    network = build_network("cnn", in_channels=4, cond_channels=0, out_channels=2, dim=4, kernel_sizes=(3,))
    return Checkpoint(kind=kind, method="dyffusion", config=load_config("tiny").to_dict(), fields=store.fields,
                      grid=store.grid, cond_names=store.cond_names, normalizer=Normalizer.from_store(store).get_state(),
                      store=ckpt.store_identity(store), state_dict=network.state_dict(),
                      training={"step": 3, "val_crps": 0.5}, interpolator=interpolator)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("ckpt") / "s.zarr", normalization="pixel")


def test_round_trip_loads_with_weights_only_and_embeds_the_interpolator(store_path, tmp_path):
    interpolator = _checkpoint(store_path)
    forecaster = _checkpoint(store_path, "forecaster", interpolator=interpolator)
    save_checkpoint(tmp_path / "model.pt", forecaster)
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert raw["format"] == "dyf-checkpoint" and raw["kind"] == "forecaster"
    assert raw["interpolator"]["kind"] == "interpolator" and isinstance(raw["torch_version"], str)
    loaded = load_checkpoint(tmp_path / "model.pt", expect_kind="forecaster")
    assert loaded.fields == ["u", "v"] and loaded.grid == (8, 12) and loaded.config == interpolator.config
    assert loaded.interpolator.kind == "interpolator" and loaded.training["step"] == 3
    for name, tensor in forecaster.state_dict.items():
        assert torch.equal(loaded.state_dict[name], tensor)
        assert torch.equal(loaded.interpolator.state_dict[name], interpolator.state_dict[name])
    restored = Normalizer.from_state(loaded.normalizer)
    assert restored.mode == "pixel" and restored.mean.shape == (4, 2, 8, 12)
    assert loaded.store["stats_sha256"] == ckpt.store_identity(open_store(store_path))["stats_sha256"]


def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(store_path, tmp_path, monkeypatch):
    target = tmp_path / "interpolator.pt"
    save_checkpoint(target, _checkpoint(store_path))
    before = target.read_bytes()

    def broken_save(payload, path):
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, _checkpoint(store_path))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "new.pt", _checkpoint(store_path))
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["interpolator.pt"]


def test_missing_corrupt_foreign_and_newer_files_are_checkpoint_errors(store_path, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as raised:
        load_checkpoint(tmp_path / "missing.pt")
    assert raised.value.exit_code == 5
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "corrupt.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x86" + bytes(299))  # a pickle TUPLE2 on an empty stack: IndexError
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "garbage.pt")
    save_checkpoint(tmp_path / "good.pt", _checkpoint(store_path))
    truncated = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(truncated[: len(truncated) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a dyf checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    payload = _checkpoint(store_path).to_payload()
    torch.save({**payload, "format_version": ckpt.FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="upgrade dyf"):
        load_checkpoint(tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


def test_wrong_kind_names_the_right_file(store_path, tmp_path):
    save_checkpoint(tmp_path / "interpolator.pt", _checkpoint(store_path))
    with pytest.raises(CheckpointError, match="model.pt written by `dyf train-forecaster`"):
        load_checkpoint(tmp_path / "interpolator.pt", expect_kind="forecaster")
    save_checkpoint(tmp_path / "model.pt", _checkpoint(store_path, "forecaster", _checkpoint(store_path)))
    with pytest.raises(CheckpointError, match="dyf train-interpolator"):
        load_checkpoint(tmp_path / "model.pt", expect_kind="interpolator")
    assert load_checkpoint(tmp_path / "model.pt", expect_kind=("forecaster", "ddpm")).kind == "forecaster"


def test_incompatible_stores_are_refused(store_path, tmp_path):
    checkpoint = _checkpoint(store_path)
    check_compatible(checkpoint, open_store(store_path))
    other_fields = make_store(tmp_path / "fields.zarr", fields=("u", "w"), normalization="pixel")
    with pytest.raises(CheckpointError, match="fields"):
        check_compatible(checkpoint, open_store(other_fields))
    other_grid = make_store(tmp_path / "grid.zarr", grid=(8, 10), normalization="pixel")
    with pytest.raises(CheckpointError, match="grid"):
        check_compatible(checkpoint, open_store(other_grid))
    with_cond = make_store(tmp_path / "cond.zarr", cond=("obstacle",), normalization="pixel")
    with pytest.raises(CheckpointError, match="conditioning"):
        check_compatible(checkpoint, open_store(with_cond))
    global_store = make_store(tmp_path / "global.zarr")
    global_checkpoint = _checkpoint(global_store)
    check_compatible(global_checkpoint, open_store(make_store(tmp_path / "g2.zarr", grid=(6, 9))))  # any grid


def test_describe_and_training_state(store_path, tmp_path):
    save_checkpoint(tmp_path / "model.pt", _checkpoint(store_path, "forecaster", _checkpoint(store_path)))
    summary = ckpt.describe(tmp_path / "model.pt")
    assert summary["kind"] == "checkpoint" and summary["checkpoint_kind"] == "forecaster"
    assert summary["horizon"] == 4 and summary["network"] == "cnn" and summary["parameters"] > 0
    assert summary["interpolator"]["kind"] == "interpolator"
    state_file = ckpt.state_path(tmp_path / "model.pt")
    assert state_file.name == "model.pt.state.pt"
    ckpt.save_training_state(state_file, {"step": 7, "optimizer": {"state": {}, "param_groups": []}})
    assert ckpt.load_training_state(state_file)["step"] == 7
    with pytest.raises(CheckpointError, match="not a dyf training state"):
        ckpt.load_training_state(tmp_path / "model.pt")
