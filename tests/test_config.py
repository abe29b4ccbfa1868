"""Run configuration: strict loading, overrides, preset lookup (installed package and source checkout)."""

import importlib.machinery
import sys
import types

import pytest
import yaml

from dyfcli import config as config_module
from dyfcli.config import (ConfigError, RunConfig, apply_overrides, config_from_dict, find_preset, load_config,
                           parse_yaml, preset_names, to_yaml)


def test_shipped_presets_carry_the_papers_settings():
    sst = load_config("sst")
    assert (sst.data.horizon, sst.forecaster.extra_steps, sst.forecaster.forward_conditioning) == (7, 25, "data+noise")
    assert (sst.interpolator.lr, sst.forecaster.lr, sst.interpolator.weight_decay) == (3e-4, 1e-4, 1e-5)
    assert sst.interpolator.network.dropout == {"block_dropout": 0.6, "block_dropout1": 0.2, "attn_dropout": 0.6}
    assert sst.forecaster.network.dropout == {"block_dropout": 0.3, "block_dropout1": 0.0, "attn_dropout": 0.1}
    assert (sst.data.batch_size, sst.training.accumulation, sst.interpolator.epochs, sst.training.seed) == (64, 4, 50, 8)
    assert not sst.forecaster.refine and sst.training.betas == (0.9, 0.99) and sst.training.grad_clip == 1.0
    ns = load_config("navier-stokes")
    assert (ns.data.horizon, ns.forecaster.extra_steps, ns.forecaster.forward_conditioning, ns.forecaster.refine) == \
        (16, 0, "none", True)
    assert (ns.data.batch_size, ns.training.accumulation, ns.forecaster.epochs, ns.training.seed) == (32, 2, 200, 11)
    assert ns.interpolator.network.dropout == ns.forecaster.network.dropout == {"dropout": 0.15}
    mesh = load_config("spring-mesh")
    assert (mesh.data.horizon, mesh.forecaster.forward_conditioning, mesh.forecaster.refine) == (134, "data", True)
    assert (mesh.interpolator.network.dropout["dropout"], mesh.forecaster.network.dropout["dropout"]) == (0.05, 0.0)
    assert (mesh.interpolator.lr, mesh.training.accumulation, mesh.forecaster.epochs) == (4e-4, 1, 300)
    assert {"tiny", "sst", "navier-stokes", "spring-mesh"} <= set(preset_names())


def test_unknown_key_names_it_and_the_valid_keys():
    document = yaml.safe_load(to_yaml(load_config("tiny")))
    document["training"]["acumulation"] = 2
    with pytest.raises(ConfigError) as raised:
        config_from_dict(document)
    assert "training.acumulation" in raised.value.message and "accumulation" in raised.value.message
    assert raised.value.exit_code == 3
    with pytest.raises(ConfigError, match="valid keys at training"):
        load_config("tiny", ["training.sed=1"])


@pytest.mark.parametrize("override,pattern", [
    ("training.seed=abc", "expected an integer"),
    ("training.bf16=1", "expected true or false"),
    ("data.horizon=1", "at least 2"),
    ("interpolator.lr=-1", "positive"),
    ("training.betas=[0.9]", "list of 2"),
    ("forecaster.forward_conditioning=noise", "data, none, data\\+noise"),
    ("interpolator.network.dropout.dropout=1.5", "in \\[0, 1\\)"),
    ("data=3", "single value|must be a mapping"),
    ("data.horizon", "KEY=VALUE"),
])
def test_wrong_values_fail_with_config_error(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("tiny", [override])


def test_overrides_are_parsed_as_yaml_and_typed():
    config = load_config("tiny", ["interpolator.lr=2e-4", "training.betas=[0.8, 0.95]", "training.validate_every=null",
                                  "interpolator.network.hyper.dim=8", "training.ema.enabled=true"])
    assert config.interpolator.lr == 2e-4 and isinstance(config.interpolator.lr, float)
    assert config.training.betas == (0.8, 0.95)
    assert config.training.validate_every is None
    assert config.interpolator.network.build_arguments()["dim"] == 8
    assert config.training.ema.enabled
    assert load_config("tiny").interpolator.lr == 1e-3  # the preset itself is untouched


def test_yaml_reads_exponents_without_a_dot_as_floats():
    assert parse_yaml("lr: 3e-4", "test") == {"lr": 3e-4}
    assert parse_yaml("name: 1e", "test") == {"name": "1e"}


def test_resolved_config_round_trips_through_yaml():
    config = load_config("sst", ["training.seed=5"])
    again = config_from_dict(yaml.safe_load(to_yaml(config)))
    assert again == config and isinstance(again, RunConfig)
    with pytest.raises(Exception):
        config.training.seed = 1  # frozen


def test_overrides_do_not_mutate_their_input():
    document = {"training": {"seed": 1}}
    result = apply_overrides(document, ["training.seed=2"])
    assert document == {"training": {"seed": 1}} and result == {"training": {"seed": 2}}


def test_preset_found_in_source_checkout_when_package_has_none(monkeypatch):
    monkeypatch.setattr(config_module, "package_preset_dir", lambda: None)
    path = find_preset("tiny")
    assert path == config_module.checkout_preset_dir() / "tiny.yaml"
    assert load_config("tiny").data.horizon == 4


def test_preset_found_in_installed_package_first(monkeypatch, tmp_path):
    # What a wheel installs: presets/ as the (namespace) package dyfcli.presets.
    package_dir = tmp_path / "site-packages" / "dyfcli" / "presets"
    package_dir.mkdir(parents=True)
    tiny = (config_module.checkout_preset_dir() / "tiny.yaml").read_text()
    (package_dir / "tiny.yaml").write_text(tiny.replace("horizon: 4", "horizon: 3"))
    (package_dir / "packaged-only.yaml").write_text("extends: tiny\ntraining: {seed: 42}\n")
    spec = importlib.machinery.ModuleSpec("dyfcli.presets", None, is_package=True)
    spec.submodule_search_locations = [str(package_dir)]
    module = types.ModuleType("dyfcli.presets")
    module.__spec__, module.__path__ = spec, [str(package_dir)]
    monkeypatch.setitem(sys.modules, "dyfcli.presets", module)
    assert config_module.package_preset_dir() == package_dir
    assert load_config("packaged-only").training.seed == 42
    assert load_config("tiny").data.horizon == 3  # the installed copy wins over the checkout
    assert load_config("sst").data.horizon == 7  # still found in the checkout
    assert "packaged-only" in preset_names()


def test_preset_by_file_path_and_unknown_names(tmp_path):
    custom = tmp_path / "mine.yaml"
    custom.write_text("description: mine\nextends: tiny\ndata: {horizon: 5}\n")
    assert load_config(str(custom)).data.horizon == 5
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(tmp_path / "list.yaml"))


def test_cli_unknown_key_exits_3_naming_the_key(dyf, tmp_path):
    proc = dyf("--json", "train-interpolator", "--data", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "i.pt"),
               "--set", "training.sed=1", check=3)
    assert "training.sed" in proc.stderr and "seed" in proc.stderr and "Traceback" not in proc.stderr
    assert '"exit_code": 3' in proc.stdout
