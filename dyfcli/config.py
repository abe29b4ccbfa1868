"""Run configuration: typed, frozen, validated at load (config is a leaf and builds nothing).

A configuration is a complete YAML document (a *preset*) plus `--set section.key=value` overrides. Loading
is strict: an unknown key, a value of the wrong type or an out-of-range setting raises `ConfigError`
(exit 3) naming the key and what is allowed. Presets are looked up by name in the installed package
(`dyfcli.presets`, package data of a wheel) and then in the source checkout's `presets/` folder; a path to
a YAML file works too. A preset is not tied to a grid: channel counts come from the data store.

A preset either gives every key (the keys marked `OPTIONAL` may be left out) or names a base with
`extends: NAME` (a preset name) or `extends: ./base.yaml` (a file relative to the extending one); the base
chain is deep-merged, the extending file winning key by key, and the result must then be complete. A
partial file without `extends` once trained silently with the dataclass defaults (no dropout, 1 epoch), so
it is refused naming the missing keys.

Sections (each dataclass documents its fields):
  data          windows and batches (`DataConfig`)
  interpolator  stage 1: network, dropout, optimiser, length (`InterpolatorConfig`)
  forecaster    stage 2: the same plus DYffusion's own settings (`ForecasterConfig`)
  training      what both stages share: accumulation, clipping, AdamW betas, EMA, LR schedule,
                precision, seed, validation (`TrainingConfig`)
  sampling      the sampling schedule used by validation and `dyf forecast` (`SamplingConfig`)
  baseline      settings only the baselines read (`BaselineConfig`)
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dyfcli.errors import ConfigError

FORWARD_CONDITIONING = ("data", "none", "data+noise")
CALENDAR_FEATURES = ("dayofyear", "hourofday")
LR_SCHEDULES = ("none", "cosine")
PERTURBATION_NOISE = ("per-lead", "per-member")
NETWORK_KINDS = ("unet", "unet-ns", "cnn")
OPTIONAL = {"optional": True}  # field metadata: a key a complete preset may leave out


# ------------------------------------------------------------------------------------------------ sections

@dataclass(frozen=True)
class DataConfig:
    """Windows and batches.

    horizon: h, the number of data time steps one forecaster window covers.
    window: input frames; DYffusion (like the reference code) supports only 1.
    batch_size: training windows per micro-batch (per process under DDP).
    eval_batch_size: initial conditions per validation batch; each is repeated `training.val_ensemble` times.
    num_workers: DataLoader worker processes (0 = load in the main process).
    calendar: calendar conditioning channels (optional key, default none): `dayofyear` adds
      sin/cos(2 pi dayofyear / 365.25), `hourofday` sin/cos(2 pi hour / 24), constant over the grid, from the
      valid time of each window's input state (`data.calendar_features`); needs a dated store.
    """

    horizon: int = 4
    window: int = 1
    batch_size: int = 32
    eval_batch_size: int = 4
    num_workers: int = 0
    calendar: tuple[str, ...] = field(default=(), metadata=OPTIONAL)

    def __post_init__(self) -> None:
        _require(self.horizon >= 2, "data.horizon", self.horizon, "at least 2 (the interpolator needs 1..h-1)")
        _require(self.window == 1, "data.window", self.window, "1 (the only window DYffusion supports)")
        _require(self.batch_size >= 1, "data.batch_size", self.batch_size, "at least 1")
        _require(self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, "at least 1")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "0 or more")
        distinct = len(set(self.calendar)) == len(self.calendar)
        _require(distinct and all(name in CALENDAR_FEATURES for name in self.calendar), "data.calendar",
                 list(self.calendar), f"a list of distinct names from {', '.join(CALENDAR_FEATURES)}")


@dataclass(frozen=True)
class NetworkConfig:
    """A backbone from `networks.build_network`.

    kind: `unet` (SST Unet), `unet-ns` (Navier-Stokes UNet), `cnn` (spring-mesh SimpleConvNet).
    hyper: keyword arguments for that backbone (e.g. `dim`, `dim_mults`); channels come from the store.
    dropout: dropout rates by the backbone's argument name (e.g. `block_dropout: 0.6`), merged into `hyper`.
    """

    kind: str = "unet"
    hyper: dict[str, Any] = field(default_factory=dict)
    dropout: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.kind in NETWORK_KINDS, "network.kind", self.kind, f"one of {', '.join(NETWORK_KINDS)}")
        for name, rate in self.dropout.items():
            _require(0.0 <= rate < 1.0, f"network.dropout.{name}", rate, "a rate in [0, 1)")
        clash = sorted(set(self.hyper) & set(self.dropout))
        _require(not clash, "network.hyper", clash, "free of the keys given under network.dropout")

    def build_arguments(self) -> dict[str, Any]:
        """`hyper` and `dropout` merged: the keyword arguments for `build_network(kind, ...)`."""
        return {**self.hyper, **self.dropout}


@dataclass(frozen=True)
class InterpolatorConfig:
    """Stage 1: the stochastic interpolator I(x0, xh, i).

    network: the backbone (`NetworkConfig`).
    lr, weight_decay: AdamW settings.
    epochs: passes over the training windows.
    max_steps: optimiser steps at most (stops earlier than `epochs` when set; the tiny preset uses it).
    allow_zero_dropout: train an interpolator whose dropout rates are all 0 (optional key, default false;
      see `require_stochastic_interpolator`).
    """

    network: NetworkConfig = field(default_factory=NetworkConfig)
    lr: float = 3e-4
    weight_decay: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None
    allow_zero_dropout: bool = field(default=False, metadata=OPTIONAL)

    def __post_init__(self) -> None:
        _check_optimiser(self, "interpolator")

    def dropout_rates(self) -> dict[str, float]:
        """The interpolator network's dropout arguments (wherever given); absent ones default to 0."""
        return {name: rate for name, rate in self.network.build_arguments().items() if "dropout" in name}


@dataclass(frozen=True)
class ForecasterConfig:
    """Stage 2: the forecaster F(x_tilde, i) and DYffusion's settings.

    network, lr, weight_decay, epochs, max_steps: as for the interpolator.
    extra_steps: k, artificial diffusion steps inside (0, 1); T = horizon + k.
    forward_conditioning: `data` (concatenate x0), `none`, or `data+noise` (blend of x0 and fresh noise).
    lambda_reconstruction, lambda_reconstruction2: weights of the two L1 terms of the forecaster loss.
    refine: replace intermediate lead times by one fresh interpolation from the final forecast.
    cold_last_step: cold-sample the last step too (the paper's Algorithm 2) instead of returning x_h directly.
    """

    network: NetworkConfig = field(default_factory=NetworkConfig)
    lr: float = 3e-4
    weight_decay: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None
    extra_steps: int = 0
    forward_conditioning: str = "data"
    lambda_reconstruction: float = 0.5
    lambda_reconstruction2: float = 0.5
    refine: bool = False
    cold_last_step: bool = False

    def __post_init__(self) -> None:
        _check_optimiser(self, "forecaster")
        _require(self.extra_steps >= 0, "forecaster.extra_steps", self.extra_steps, "0 or more")
        _require(self.forward_conditioning in FORWARD_CONDITIONING, "forecaster.forward_conditioning",
                 self.forward_conditioning, f"one of {', '.join(FORWARD_CONDITIONING)}")
        for name in ("lambda_reconstruction", "lambda_reconstruction2"):
            _require(getattr(self, name) >= 0, f"forecaster.{name}", getattr(self, name), "0 or more")


@dataclass(frozen=True)
class EmaConfig:
    """Exponential moving average of the weights (off in the paper).

    enabled: keep an EMA copy and save its weights in the checkpoint.
    decay: the EMA decay, warmed up as min(decay, (1 + n) / (10 + n)) after n updates.
    """

    enabled: bool = False
    decay: float = 0.9999

    def __post_init__(self) -> None:
        _require(0.0 < self.decay < 1.0, "training.ema.decay", self.decay, "a number in (0, 1)")


@dataclass(frozen=True)
class TrainingConfig:
    """What both stages share.

    accumulation: micro-batches per optimiser step (gradient accumulation).
    grad_clip: clip the global gradient norm to this value (null: no clipping).
    betas, eps: AdamW's.
    ema: `EmaConfig`.
    lr_schedule: `none` (the paper) or `cosine` (decay to 0 over the run, after `warmup_steps`).
    warmup_steps: linear warm-up of the learning rate (0: none).
    bf16: bfloat16 autocast (CUDA only; ignored on CPU).
    compile: torch.compile the trained network (CUDA only; ignored on CPU).
    seed: seeds the data order, weight initialisation and dropout masks.
    validate_every: optimiser steps between validations (null: once per epoch).
    val_ensemble: ensemble members for validation CRPS (20 in the paper).
    val_max_batches: validation batches at most per validation (null: the whole validation split).
    patience: stop after this many validations without a better CRPS (null: never stop early).
    log_every: optimiser steps between lines in metrics.jsonl.
    """

    accumulation: int = 1
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    ema: EmaConfig = field(default_factory=EmaConfig)
    lr_schedule: str = "none"
    warmup_steps: int = 0
    bf16: bool = False
    compile: bool = False
    seed: int = 0
    validate_every: int | None = None
    val_ensemble: int = 20
    val_max_batches: int | None = None
    patience: int | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        _require(self.accumulation >= 1, "training.accumulation", self.accumulation, "at least 1")
        _require(self.grad_clip is None or self.grad_clip > 0, "training.grad_clip", self.grad_clip,
                 "a positive number or null")
        _require(all(0.0 <= b < 1.0 for b in self.betas), "training.betas", list(self.betas), "two numbers in [0, 1)")
        _require(self.eps > 0, "training.eps", self.eps, "a positive number")
        _require(self.lr_schedule in LR_SCHEDULES, "training.lr_schedule", self.lr_schedule,
                 f"one of {', '.join(LR_SCHEDULES)}")
        _require(self.warmup_steps >= 0, "training.warmup_steps", self.warmup_steps, "0 or more")
        for name in ("validate_every", "val_max_batches", "patience"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"training.{name}", value, "at least 1 or null")
        _require(self.val_ensemble >= 2, "training.val_ensemble", self.val_ensemble, "at least 2 members")
        _require(self.log_every >= 1, "training.log_every", self.log_every, "at least 1")


@dataclass(frozen=True)
class SamplingConfig:
    """DYffusion sampling.

    schedule: which diffusion steps to visit: `full`, `only_dynamics`, `everyN`/`every2nd`, `firstN`,
      `only_dynamics_plusN` (dyffusion.make_schedule is the one judge; training checks it at start).
    """

    schedule: str = "full"


@dataclass(frozen=True)
class BaselineConfig:
    """Settings read only by the baselines (`train-forecaster --method dropout|perturbation|ddpm|mcvd`).

    perturbation_sigma: standard deviation of the noise added to x0 (Perturbation baseline), in the units
      the network sees (standardised, or raw units for a `--normalization none` store).
    perturbation_noise: how the Perturbation baseline draws it (optional key): `per-lead` (the official
      mechanism: in the first autoregressive window every lead time j = 1..h is forecast from its own
      x0 + sigma eps_j; later windows start from the member's own x_h, unperturbed) or `per-member` (dyf's
      earlier mechanism: one eps per member and window, shared by its leads, in every window).
    perturbation_sigma_grid: candidate sigmas (optional key); when given, training ends by scoring each on
      the validation split (ensemble CRPS) and records the best as `perturbation_sigma` in the checkpoint.
    diffusion_steps: DDPM's and MCVD's number of noise levels (1000 in the paper).
    sampling_steps: DDPM/MCVD sampling steps (null: all of them; fewer: DDIM with eta 1 for DDPM, every
      (T // S)-th level for MCVD as its official sampler).
    """

    perturbation_sigma: float = 0.05
    perturbation_noise: str = field(default="per-lead", metadata=OPTIONAL)
    perturbation_sigma_grid: tuple[float, ...] = field(default=(), metadata=OPTIONAL)
    diffusion_steps: int = 1000
    sampling_steps: int | None = None

    def __post_init__(self) -> None:
        _require(self.perturbation_sigma >= 0, "baseline.perturbation_sigma", self.perturbation_sigma, "0 or more")
        _require(self.perturbation_noise in PERTURBATION_NOISE, "baseline.perturbation_noise",
                 self.perturbation_noise, f"one of {', '.join(PERTURBATION_NOISE)}")
        _require(all(sigma >= 0 for sigma in self.perturbation_sigma_grid), "baseline.perturbation_sigma_grid",
                 list(self.perturbation_sigma_grid), "a list of numbers >= 0")
        _require(self.diffusion_steps >= 1, "baseline.diffusion_steps", self.diffusion_steps, "at least 1")
        _require(self.sampling_steps is None or 1 <= self.sampling_steps <= self.diffusion_steps,
                 "baseline.sampling_steps", self.sampling_steps, "between 1 and baseline.diffusion_steps, or null")


@dataclass(frozen=True)
class RunConfig:
    """A complete run: every setting of both training stages and of sampling.

    description: one line saying what the preset is for (optional key).
    """

    description: str = field(default="", metadata=OPTIONAL)
    data: DataConfig = field(default_factory=DataConfig)
    interpolator: InterpolatorConfig = field(default_factory=InterpolatorConfig)
    forecaster: ForecasterConfig = field(default_factory=ForecasterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples): what checkpoints and run folders store."""
        return _plain(dataclasses.asdict(self))


def require_stochastic_interpolator(config: RunConfig) -> None:
    """Refuse an interpolator whose dropout rates are all 0 unless `interpolator.allow_zero_dropout` is true.

    DYffusion's ensemble spread comes from the interpolator's MC dropout, kept on at inference (arXiv
    2306.01984 §3; docs/paper-notes.md §4): without it every member of a `data`/`none`-conditioned forecast
    is the same, and nothing would say so. A user preset lacking dropout keys once did exactly that.
    """
    rates = config.interpolator.dropout_rates()
    if config.interpolator.allow_zero_dropout or any(_positive(rate) for rate in rates.values()):
        return
    given = ", ".join(f"{name}: {rate}" for name, rate in rates.items()) or "none given"
    key = _DROPOUT_KEY.get(config.interpolator.network.kind, "dropout")
    raise ConfigError(f"interpolator.network.dropout has no positive rate ({given}), so ensemble members would "
                      f"not differ; set one (e.g. --set interpolator.network.dropout.{key}=0.1) or, if you "
                      "mean it, set interpolator.allow_zero_dropout: true "
                      "(--set interpolator.allow_zero_dropout=true)")


_DROPOUT_KEY = {"unet": "block_dropout", "unet-ns": "dropout", "cnn": "dropout"}  # a rate each network takes


def _positive(rate: object) -> bool:
    return isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0


def _check_optimiser(stage: InterpolatorConfig | ForecasterConfig, name: str) -> None:
    _require(stage.lr > 0, f"{name}.lr", stage.lr, "a positive number")
    _require(stage.weight_decay >= 0, f"{name}.weight_decay", stage.weight_decay, "0 or more")
    _require(stage.epochs >= 1, f"{name}.epochs", stage.epochs, "at least 1")
    _require(stage.max_steps is None or stage.max_steps >= 1, f"{name}.max_steps", stage.max_steps,
             "at least 1 or null")


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key} = {value!r} is invalid: expected {allowed}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# ------------------------------------------------------------------------------------------------ loading

def _yaml_loader():
    """A safe YAML loader that also reads `3e-4` as a float (YAML 1.1 wants `3.0e-4`)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.[\d_]*)?(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.[\d_]*$"),
        list("-+0123456789."),
    )
    return Loader


def parse_yaml(text: str, source: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None


def package_preset_dir() -> Path | None:
    """The presets shipped as package data (`dyfcli.presets` in an installed wheel), if any."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("dyfcli.presets")
    except (ModuleNotFoundError, ValueError):
        return None
    # A wheel installs presets/ as dyfcli/presets/ without __init__.py (a namespace package): use its
    # search locations rather than importlib.resources, whose namespace readers are not plain paths.
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(location).is_dir():
            return Path(location)
    return None


def checkout_preset_dir() -> Path:
    """`presets/` of the source checkout (what an editable install sees)."""
    return Path(__file__).resolve().parents[1] / "presets"


def preset_dirs() -> list[Path]:
    """Where preset names are looked up, in order: the installed package, then the source checkout."""
    dirs = [d for d in (package_preset_dir(), checkout_preset_dir()) if d is not None and d.is_dir()]
    return list(dict.fromkeys(dirs))


def preset_names() -> list[str]:
    return sorted({path.stem for folder in preset_dirs() for path in folder.glob("*.yaml")})


def find_preset(name_or_path: str) -> Path:
    """A preset by name (`sst`) or a YAML file path; ConfigError naming the known presets otherwise."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise ConfigError(f"preset file {candidate} does not exist; give a preset name "
                              f"({', '.join(preset_names())}) or an existing YAML file")
        return candidate
    return named_preset(name_or_path)


def named_preset(name: str) -> Path:
    """The shipped preset `name` (installed package first, then the source checkout)."""
    for folder in preset_dirs():
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names()) or '(none found)'} "
                      "or give a YAML file path")


def method_preset(system: str, method: str) -> str:
    """The shipped preset for `train-forecaster --method METHOD` on a store of `system` (`sst`,
    `navier-stokes`, `spring-mesh`): `<system>-<method>` (e.g. `sst-dropout`, the official baseline
    settings) where one is shipped, else `<system>` (the paper's DYffusion settings)."""
    specific = f"{system}-{method}"
    return specific if specific in preset_names() else system


def read_preset(name_or_path: str) -> dict[str, Any]:
    """The preset's YAML document as a nested dict, its `extends` chain merged in and checked complete
    (not validated yet: `config_from_dict` does that)."""
    path = find_preset(name_or_path)
    document = _resolve_extends(path, ())
    missing = missing_keys(document)
    if missing:
        raise ConfigError(f"preset {path} is incomplete: missing {', '.join(missing)}; add `extends: NAME` "
                          f"(one of {', '.join(preset_names())}) or `extends: ./base.yaml` to take the rest from "
                          "a base, or give every key (`dyf train-interpolator --dry-run` prints a complete config)")
    return document


def _read_document(path: Path) -> dict[str, Any]:
    document = parse_yaml(path.read_text(), str(path))
    if not isinstance(document, dict):
        raise ConfigError(f"preset {path} must be a mapping of sections (data, interpolator, ...); got "
                          f"{type(document).__name__}")
    return document


def _resolve_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """`path`'s document deep-merged over its base's (recursively); `chain` holds the files already on the
    way here, so a cycle is refused instead of recursing forever."""
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(str(p) for p in (*chain, here))
        raise ConfigError(f"preset {path} extends itself ({cycle}); remove one of these `extends:` keys")
    document = _read_document(path)
    base = document.pop("extends", None)
    if base is None:
        return document
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"preset {path}: extends = {base!r} is invalid: expected a preset name "
                          f"({', '.join(preset_names())}) or a YAML file path relative to {path.name}")
    return deep_merge(_resolve_extends(_base_path(base.strip(), path), (*chain, here)), document)


def _base_path(base: str, child: Path) -> Path:
    """`extends: NAME` names a shipped preset; a value with a `/` or a YAML suffix is a file, relative to the
    extending file (so a folder of presets can be moved as a whole)."""
    if "/" not in base and Path(base).suffix not in (".yaml", ".yml"):
        return named_preset(base)
    candidate = Path(base).expanduser()
    candidate = candidate if candidate.is_absolute() else child.parent / candidate
    if not candidate.is_file():
        raise ConfigError(f"preset {child}: extends {base!r}, but {candidate} does not exist; give a path "
                          f"relative to {child.parent} or a preset name ({', '.join(preset_names())})")
    return candidate


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings present in both are merged key by key, any other value replaces."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def missing_keys(document: dict[str, Any], cls: type | None = None, prefix: str = "") -> list[str]:
    """Keys a complete preset must give that `document` lacks; a wholly missing section is named once.

    Free-form mappings (`network.hyper`, `network.dropout`) count as one key; `OPTIONAL` fields may be absent.
    """
    cls = RunConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    missing = []
    for item in dataclasses.fields(cls):
        if item.metadata.get("optional"):
            continue
        if item.name not in document:
            missing.append(prefix + item.name)
        elif dataclasses.is_dataclass(hints[item.name]) and isinstance(document[item.name] or {}, dict):
            missing += missing_keys(document[item.name] or {}, hints[item.name], f"{prefix}{item.name}.")
    return missing


def apply_overrides(document: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a copy of `document`.

    Paths must name existing settings of `RunConfig` (free-form mappings such as `network.hyper` accept new
    keys); the type of the value is checked when the result is validated.
    """
    import copy

    result = copy.deepcopy(document)
    for override in overrides:
        path, sep, text = override.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set training.seed=3")
        keys = path.strip().split(".")
        _check_path(keys, override)
        value = parse_yaml(text, f"--set {override!r}") if text.strip() else None
        node = result
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return result


def _check_path(keys: list[str], override: str) -> None:
    """Every key of an override path must exist in the dataclasses (free-form dicts end the check)."""
    cls: Any = RunConfig
    for depth, key in enumerate(keys):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return  # inside a free-form mapping such as network.hyper
        hints = typing.get_type_hints(cls)
        if key not in hints:
            where = ".".join(keys[:depth]) or "the top level"
            raise ConfigError(f"--set {override!r}: unknown key {'.'.join(keys[:depth + 1])!r}; valid keys at "
                              f"{where}: {', '.join(hints)}")
        cls = hints[key]
        if depth < len(keys) - 1 and typing.get_origin(cls) is not dict and not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {override!r}: {'.'.join(keys[:depth + 1])} is a single value, not a section")


def config_from_dict(document: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict strictly into a `RunConfig` (ConfigError names the offending key)."""
    return _build(RunConfig, document, "", source)


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """Resolve a run configuration: `base` (e.g. a checkpoint's config) or a preset, then overrides.

    Exactly one of `preset` and `base` is used; `preset` wins when both are given.
    """
    if preset is not None:
        document, source = read_preset(preset), f"preset {preset}"
    elif base is not None:
        document, source = base, "the checkpoint's config"
    else:
        document, source = read_preset("tiny"), "preset tiny"
    return config_from_dict(apply_overrides(document, overrides), source)


def to_yaml(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------------------------ strict build

def _build(cls: type, value: Any, prefix: str, source: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the document'} must be a mapping of keys, "
                          f"got {value!r}")
    hints = typing.get_type_hints(cls)
    unknown = [key for key in value if key not in hints]
    if unknown:
        raise ConfigError(f"{source}: unknown config key '{prefix}{unknown[0]}'; valid keys"
                          f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(hints)}")
    kwargs = {key: _convert(hints[key], item, f"{prefix}{key}", source) for key, item in value.items()}
    return cls(**kwargs)


def _convert(annotation: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key + ".", source)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [option for option in options if option is not type(None)]
        return _convert(inner[0], value, key, source)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            _wrong(key, value, " or ".join(map(repr, typing.get_args(annotation))), source)
        return value
    if origin is tuple and typing.get_args(annotation)[-1] is Ellipsis:  # tuple[T, ...]: a list of any length
        if not isinstance(value, (list, tuple)):
            _wrong(key, value, "a list", source)
        item_type = typing.get_args(annotation)[0]
        return tuple(_convert(item_type, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            _wrong(key, value, f"a list of {len(item_types)} values", source)
        return tuple(_convert(t, v, f"{key}[{i}]", source) for i, (t, v) in enumerate(zip(item_types, value)))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            _wrong(key, value, "a mapping", source)
        _, item_type = typing.get_args(annotation)
        return {str(k): _convert(item_type, v, f"{key}.{k}", source) for k, v in value.items()}
    return _scalar(annotation, value, key, source)


def _scalar(annotation: Any, value: Any, key: str, source: str) -> Any:
    if annotation is Any:
        _require_finite(value, key, source)
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            _wrong(key, value, "true or false", source)
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _wrong(key, value, "an integer", source)
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _wrong(key, value, "a number", source)
        _require_finite(value, key, source)
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            _wrong(key, value, "a string", source)
        return value
    raise TypeError(f"config.py cannot convert {annotation!r} (key {key})")  # an internal invariant


def _require_finite(value: Any, key: str, source: str) -> None:
    """No setting is infinite or NaN (`--set interpolator.lr=.inf` once trained to NaN and exited 0); YAML's
    `.inf`/`.nan` also hide in free-form mappings such as `network.hyper`."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: config key {key} = {value!r} is invalid: expected a finite number")
    if isinstance(value, dict):
        for name, item in value.items():
            _require_finite(item, f"{key}.{name}", source)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _require_finite(item, f"{key}[{index}]", source)


def _wrong(key: str, value: Any, expected: str, source: str) -> None:
    raise ConfigError(f"{source}: config key {key} = {value!r} has the wrong type: expected {expected}")
