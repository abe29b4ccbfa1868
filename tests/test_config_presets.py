"""Config a user can see (issue 13, items 1, 2, 11): complete presets or `extends:`, no silent zero-dropout
interpolator, `train-* --dry-run`, `dyf presets`, and no citations of files outside the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dyfcli import config as config_module
from dyfcli.config import (ConfigError, load_config, missing_keys, preset_names, read_preset,
                           require_stochastic_interpolator)

REPO = Path(__file__).resolve().parents[1]
TINY = load_config("tiny").to_dict()


def _train_interpolator(dyf, data: Path, out: Path, *options: str, check: int = 0):
    return dyf("--json", "train-interpolator", "--data", str(data), "--out", str(out), *options, check=check)


def _error(proc) -> str:
    return json.loads(proc.stdout)["error"]["message"]


def _files(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


# ------------------------------------------------------------------------------------ 1. complete or extends

def test_partial_preset_without_extends_exits_3_naming_missing_keys(dyf, tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("data: {horizon: 8}\n")
    proc = _train_interpolator(dyf, tmp_path / "none.zarr", tmp_path / "i.pt", "--preset", str(partial), check=3)
    message = _error(proc)
    assert "incomplete" in message and "extends" in message
    for key in ("data.window", "data.batch_size", "interpolator", "forecaster", "training", "sampling"):
        assert re.search(rf"\b{re.escape(key)}\b", message), key
    assert "data.horizon" not in message
    assert not (tmp_path / "i.pt").exists()


def test_partial_section_names_each_missing_key(tmp_path):
    document = yaml.safe_load((REPO / "presets" / "tiny.yaml").read_text())
    del document["training"]["seed"], document["interpolator"]["network"]["dropout"]
    path = tmp_path / "almost.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=r"incomplete: missing interpolator\.network\.dropout, training\.seed; "):
        load_config(str(path))
    assert missing_keys(document) == ["interpolator.network.dropout", "training.seed"]


def test_extends_a_name_deep_merges_then_checks(dyf, tiny_store, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: tiny\ndata: {horizon: 6}\ninterpolator: {network: {hyper: {dim: 8}}}\n")
    config = load_config(str(mine))
    assert config.data.horizon == 6 and config.data.batch_size == TINY["data"]["batch_size"]
    hyper = config.interpolator.network.hyper
    assert hyper["dim"] == 8 and list(hyper["kernel_sizes"]) == TINY["interpolator"]["network"]["hyper"]["kernel_sizes"]
    assert config.interpolator.network.dropout == TINY["interpolator"]["network"]["dropout"]
    proc = _train_interpolator(dyf, tiny_store, tmp_path / "i.pt", "--preset", str(mine), "--dry-run")
    assert json.loads(proc.stdout)["config"]["data"]["horizon"] == 6


def test_extends_a_file_relative_to_the_extending_file_in_a_chain(tmp_path):
    folder = tmp_path / "presets" / "nested"
    folder.mkdir(parents=True)
    (tmp_path / "presets" / "base.yaml").write_text("extends: tiny\ntraining: {seed: 5}\ndata: {horizon: 5}\n")
    (folder / "middle.yaml").write_text("extends: ../base.yaml\ntraining: {seed: 6, log_every: 7}\n")
    (folder / "top.yaml").write_text("extends: ./middle.yaml\ntraining: {seed: 9}\n")
    config = load_config(str(folder / "top.yaml"))  # the test's working directory is not the files' folder
    assert (config.training.seed, config.training.log_every, config.data.horizon) == (9, 7, 5)
    assert "extends" not in read_preset(str(folder / "top.yaml"))


@pytest.mark.parametrize("files, expected", [
    ({"a.yaml": "extends: ./a.yaml\n"}, "extends itself"),
    ({"a.yaml": "extends: ./b.yaml\n", "b.yaml": "extends: a.yaml\n"}, "extends itself"),
    ({"a.yaml": "extends: ./gone.yaml\n"}, "does not exist"),
    ({"a.yaml": "extends: no-such-preset\n"}, "unknown preset 'no-such-preset'"),
    ({"a.yaml": "extends: [tiny]\n"}, "extends = \\['tiny'\\] is invalid"),
])
def test_bad_extends_is_a_config_error(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(str(tmp_path / "a.yaml"))


def test_extends_cycle_exits_3_through_the_cli(dyf, tmp_path):
    (tmp_path / "a.yaml").write_text("extends: ./b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: ./a.yaml\n")
    proc = _train_interpolator(dyf, tmp_path / "none.zarr", tmp_path / "i.pt", "--preset", str(tmp_path / "a.yaml"),
                               check=3)
    assert "extends itself" in _error(proc)


@pytest.mark.parametrize("name", sorted(preset_names()))
def test_shipped_presets_are_complete_files_that_load(name):
    path = config_module.named_preset(name)
    document = yaml.safe_load(path.read_text())
    # complete, or a variant naming a shipped base (the baselines' official settings: `sst-dropout` ...)
    assert document.get("extends", name) in preset_names() and missing_keys(read_preset(name)) == []
    config = load_config(name)
    require_stochastic_interpolator(config)  # every shipped preset has an MC-dropout interpolator
    assert config.description


def test_zero_dropout_interpolator_is_refused_unless_asked_for(dyf, tiny_store, tmp_path):
    zero = ("--set", "interpolator.network.dropout.dropout=0")
    before = _files(tmp_path)
    proc = _train_interpolator(dyf, tiny_store, tmp_path / "i.pt", *zero, check=3)
    assert "interpolator.allow_zero_dropout: true" in _error(proc)
    assert "interpolator.network.dropout.dropout=0.1" in _error(proc)  # the fix, for this network kind
    assert _files(tmp_path) == before
    proc = _train_interpolator(dyf, tiny_store, tmp_path / "i.pt", *zero, "--set",
                               "interpolator.allow_zero_dropout=true", "--dry-run")
    assert json.loads(proc.stdout)["config"]["interpolator"]["allow_zero_dropout"] is True


def test_zero_dropout_refused_by_the_python_api_and_for_every_place_a_rate_can_be(tmp_path, tiny_store):
    from dyfcli.train import train_interpolator

    with pytest.raises(ConfigError, match="allow_zero_dropout"):
        train_interpolator(tiny_store, tmp_path / "i.pt", load_config("tiny", ["interpolator.network.dropout={}"]),
                           device="cpu")
    assert not (tmp_path / "i.pt").exists() and not list(tmp_path.glob("i.pt*"))
    unet = ["interpolator.network.kind=unet", "interpolator.network.hyper={}"]
    with pytest.raises(ConfigError, match="block_dropout"):
        require_stochastic_interpolator(load_config("tiny", [*unet, "interpolator.network.dropout={block_dropout: 0}"]))
    require_stochastic_interpolator(load_config("tiny", [*unet, "interpolator.network.dropout={}",
                                                         "interpolator.network.hyper.attn_dropout=0.2"]))


def test_baselines_still_resolve_and_ignore_the_interpolator_section(dyf, tiny_store, tmp_path):
    for method in ("dropout", "perturbation", "ddpm"):
        proc = dyf("--json", "train-forecaster", "--data", str(tiny_store), "--out", str(tmp_path / "b.pt"),
                   "--method", method, "--preset", "tiny", "--set", "interpolator.network.dropout={}", "--dry-run")
        summary = json.loads(proc.stdout)
        assert summary["method"] == method and summary["config"]["forecaster"] == TINY["forecaster"]


# ------------------------------------------------------------------------------------------------ 2. --dry-run

def test_train_interpolator_dry_run_prints_the_resolved_yaml_and_touches_nothing(dyf, tiny_store, tmp_path):
    before = _files(tmp_path)
    stamps = {path: path.stat().st_mtime_ns for path in tiny_store.rglob("*")}
    out = tmp_path / "runs" / "i.pt"
    proc = dyf("train-interpolator", "--data", str(tiny_store), "--out", str(out), "--preset", "tiny",
               "--set", "training.seed=3", "--set", "data.horizon=5", "--dry-run")
    resolved = yaml.safe_load(proc.stdout)
    expected = load_config("tiny", ["training.seed=3", "data.horizon=5"]).to_dict()
    assert resolved == json.loads(json.dumps(expected))  # tuples become lists either way
    comments = [line for line in proc.stdout.splitlines() if line.startswith("#")]
    assert any("fields u, v" in line and "grid 8 x 12" in line for line in comments)
    assert _files(tmp_path) == before  # no checkpoint, state, run folder, lock or parent folder
    assert {path: path.stat().st_mtime_ns for path in tiny_store.rglob("*")} == stamps
    saved = tmp_path.parent / f"{tmp_path.name}-resolved.yaml"
    saved.write_text(proc.stdout)  # what --dry-run prints is itself a complete preset
    assert load_config(str(saved)).to_dict() == expected


def test_dry_run_json_carries_config_and_store_values(dyf, tiny_store, tmp_path):
    proc = _train_interpolator(dyf, tiny_store, tmp_path / "i.pt", "--dry-run")
    summary = json.loads(proc.stdout)  # exactly one JSON document on stdout
    assert summary["ok"] and summary["dry_run"] and summary["command"] == "train-interpolator"
    assert summary["config"] == json.loads(json.dumps(TINY))
    assert summary["store"] == {"fields": ["u", "v"], "grid": [8, 12], "conditioning": [], "series": 4,
                                "train_windows": 2 * (24 - 4)}  # two training series of 24 steps, windows of 5
    assert not (tmp_path / "i.pt").exists()


def test_dry_run_refuses_a_missing_store(dyf, tmp_path):
    proc = _train_interpolator(dyf, tmp_path / "none.zarr", tmp_path / "i.pt", "--dry-run", check=4)
    assert "does not exist" in _error(proc)


def _interpolator_checkpoint(store_path: Path, path: Path, overrides: tuple[str, ...] = ()) -> Path:
    """An untrained interpolator checkpoint, as `train-interpolator` would save one (enough for a dry run)."""
    from dyfcli.checkpoint import Checkpoint, save_checkpoint, store_identity
    from dyfcli.data import Normalizer
    from dyfcli.model import build_interpolator
    from dyfcli.store import open_store

    store = open_store(store_path)
    config = load_config("tiny", list(overrides))
    network = build_interpolator(config, len(store.fields), len(store.cond_names))
    save_checkpoint(path, Checkpoint(kind="interpolator", method="dyffusion", config=config.to_dict(),
                                     fields=store.fields, grid=store.grid, cond_names=store.cond_names,
                                     normalizer=Normalizer.from_store(store).get_state(),
                                     store=store_identity(store), state_dict=network.state_dict()))
    return path


def test_train_forecaster_dry_run_resolves_preset_sets_and_interpolator(dyf, tiny_store, tmp_path):
    interpolator = _interpolator_checkpoint(tiny_store, tmp_path / "i.pt", ("training.seed=4",))
    mine = tmp_path / "stage2.yaml"
    mine.write_text("extends: tiny\nforecaster: {extra_steps: 1}\n")
    before = _files(tmp_path)
    proc = dyf("train-forecaster", "--data", str(tiny_store), "--interpolator", str(interpolator),
               "--out", str(tmp_path / "model.pt"), "--preset", str(mine), "--set", "forecaster.lr=2e-4", "--dry-run")
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["forecaster"]["extra_steps"] == 1 and resolved["forecaster"]["lr"] == 2e-4
    assert resolved["interpolator"] == json.loads(json.dumps(TINY["interpolator"]))  # the checkpoint's section
    assert _files(tmp_path) == before
    proc = dyf("--json", "train-forecaster", "--data", str(tiny_store), "--interpolator", str(interpolator),
               "--out", str(tmp_path / "model.pt"), "--set", "data.horizon=6", "--dry-run", check=3)
    assert "horizon" in _error(proc)


# ------------------------------------------------------------------------------------------------ dyf presets

def test_presets_lists_every_shipped_preset_with_its_description(dyf):
    proc = dyf("presets")
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == sorted(preset_names())
    tiny = next(line for line in lines if line.startswith("tiny "))
    assert tiny.split(None, 1)[1] == load_config("tiny").description
    listed = json.loads(dyf("--json", "presets").stdout)["presets"]
    assert [p["name"] for p in listed] == sorted(preset_names())
    assert all(p["description"] and Path(p["path"]).is_file() for p in listed)


def test_preset_description_falls_back_to_the_leading_comment(tmp_path):
    from dyfcli.cli.presets import describe_preset

    path = tmp_path / "p.yaml"
    path.write_text("#\n# For my cluster: h=12.\n# second line\nextends: tiny\n")
    assert describe_preset(path) == "For my cluster: h=12."
    path.write_text("# a comment\ndescription: |\n  First line.\n  Second line.\n")
    assert describe_preset(path) == "First line."
    path.write_text("data: [unclosed\n")
    assert describe_preset(path) == ""


# ------------------------------------------------------------------------------------------------ 11. citations

CITATION = re.compile(r"reference/|shared/|\b(?:dyffusion|data-formats|paper-results|style-anchors|ecosystem)\.md"
                      r"|\bDESIGN(?:\.md| §)|\bSTYLE(?:\.md| §)")


def test_the_product_cites_only_files_in_the_repository():
    roots = [REPO / name for name in ("dyfcli", "presets", "docs", "benchmarks", "scripts")] + [REPO / "README.md"]
    files = [path for root in roots if root.exists()
             for path in ([root] if root.is_file() else root.rglob("*"))
             if path.is_file() and path.suffix in (".py", ".md", ".yaml", ".yml", ".sh", ".txt", ".toml", "")]
    assert len(files) > 20
    hits = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in files
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if CITATION.search(line)]
    assert hits == []
    cited = {match for path in files for match in re.findall(r"docs/[\w.-]+\.md", path.read_text(errors="replace"))}
    assert "docs/paper-notes.md" in cited and all((REPO / name).is_file() for name in cited)
