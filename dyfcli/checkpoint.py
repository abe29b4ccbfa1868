"""Self-describing checkpoints (docs/design.md §4): the only module that knows the checkpoint keys.

A checkpoint file is `torch.save` of a plain dict (tensors, numbers, strings, lists, dicts), loadable with
`torch.load(path, weights_only=True)`:

    format          "dyf-checkpoint"
    format_version  FORMAT_VERSION (an older dyf refuses a newer file)
    kind            "interpolator" | "forecaster" | a baseline name ("dropout", "perturbation", "ddpm", "mcvd")
    method          the training method that made it ("dyffusion" for both DYffusion stages, else the baseline)
    config          the full resolved RunConfig as a nested dict
    fields          channel order of the networks (the store's dyf_fields)
    grid            [Y, X] of the training store
    cond_names      the store's static conditioning variables, in channel order
    normalizer      data.Normalizer.get_state(): the statistics the network was trained with
    store           identity of the training store: path, normalisation mode, series count, stats hash
    training        a summary of the run that made it (steps, best validation CRPS, ...)
    dyf_version, torch_version
    state_dict      the network weights (EMA weights when EMA was on)
    interpolator    (forecaster only) the whole interpolator checkpoint dict, so model.pt alone forecasts
    checksums       sha256 of every `state_dict` tensor (`tensors`) and of everything else in the dict
                    (`payload`: config, statistics, numbers, strings, the embedded interpolator with its own
                    checksums), verified at load: a flipped byte is exit 5, not a silently changed forecast.
                    Files written before checksums existed load with a logged note.

Training state for resuming (optimizer, step, RNG states, current weights) lives in `<out>.state.pt`
(`save_training_state` / `load_training_state`), never in the inference checkpoint. Every save is atomic:
a temporary file next to the target, then `os.replace`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dyfcli import __version__, outputs
from dyfcli.errors import CheckpointError

log = logging.getLogger("dyf")

FORMAT = "dyf-checkpoint"
FORMAT_VERSION = 1
STATE_FORMAT = "dyf-training-state"
CHECKSUMS = "checksums"
DYFFUSION_KINDS = ("interpolator", "forecaster")
BASELINE_KINDS = ("dropout", "perturbation", "ddpm", "mcvd")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded (or about to be saved) checkpoint. `state_dict` maps parameter names to tensors."""

    kind: str
    method: str
    config: dict[str, Any]
    fields: list[str]
    grid: tuple[int, int]
    cond_names: list[str]
    normalizer: dict[str, Any]
    store: dict[str, Any]
    state_dict: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    interpolator: Checkpoint | None = None
    dyf_version: str = __version__
    torch_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_payload(self) -> dict[str, Any]:
        """The plain dict that goes to `torch.save`, with its `checksums`."""
        import torch

        payload = _plain({
            "format": FORMAT,
            "format_version": self.format_version,
            "kind": self.kind,
            "method": self.method,
            "config": self.config,
            "fields": list(self.fields),
            "grid": [int(n) for n in self.grid],
            "cond_names": list(self.cond_names),
            "normalizer": self.normalizer,
            "store": self.store,
            "training": self.training,
            "dyf_version": self.dyf_version,
            "torch_version": self.torch_version or torch.__version__,
            "state_dict": self.state_dict,
            "interpolator": self.interpolator.to_payload() if self.interpolator is not None else None,
        })
        return {**payload, CHECKSUMS: checksums(payload)}

    @staticmethod
    def from_payload(payload: dict[str, Any], source: str) -> Checkpoint:
        """Validate a loaded dict; CheckpointError naming `source` when it is not a dyf checkpoint."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{source} is not a dyf checkpoint; give a file written by "
                                  "`dyf train-interpolator` or `dyf train-forecaster`")
        version = payload.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{source} has checkpoint format version {version!r}, this dyf reads up to "
                                  f"{FORMAT_VERSION}; upgrade dyf")
        missing = [key for key in ("kind", "method", "config", "fields", "grid", "cond_names", "normalizer",
                                   "store", "state_dict") if key not in payload]
        if missing:
            raise CheckpointError(f"{source} lacks {', '.join(missing)}; it is damaged, re-train it")
        verify_checksums(payload, source)
        inner = payload.get("interpolator")
        return Checkpoint(
            kind=payload["kind"], method=payload["method"], config=payload["config"],
            fields=list(payload["fields"]), grid=tuple(payload["grid"]), cond_names=list(payload["cond_names"]),
            normalizer=payload["normalizer"], store=payload["store"], state_dict=payload["state_dict"],
            training=payload.get("training") or {},
            interpolator=Checkpoint.from_payload(inner, f"the interpolator inside {source}") if inner else None,
            dyf_version=payload.get("dyf_version", "?"), torch_version=payload.get("torch_version", "?"),
            format_version=version,
        )

    @property
    def parameter_count(self) -> int:
        return int(sum(t.numel() for name, t in self.state_dict.items() if _is_parameter(name, t)))

    @property
    def calendar(self) -> list[str]:
        """The calendar conditioning channels the networks take (`data.calendar` of the config)."""
        return list(self.config.get("data", {}).get("calendar") or [])

    @property
    def condition_channels(self) -> int:
        """C_cond of the networks: the static `cond_names` plus sin and cos per calendar feature."""
        return len(self.cond_names) + 2 * len(self.calendar)

    @property
    def periodic_x(self) -> bool:
        """Whether the trained network pads x circularly (`network.hyper.periodic_x` of its config section)."""
        section = "interpolator" if self.kind == "interpolator" else "forecaster"
        return bool(self.config.get(section, {}).get("network", {}).get("hyper", {}).get("periodic_x", False))


def _plain(value: Any) -> Any:
    """Only what `torch.load(weights_only=True)` accepts: str subclasses (torch.__version__) and numpy
    scalars become plain Python values; tensors stay tensors."""
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, bool) or value is None:
        return value
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    if hasattr(value, "item") and not hasattr(value, "is_floating_point"):  # a numpy scalar
        return value.item()
    return value


# ------------------------------------------------------------------------------------------------ checksums

def checksums(payload: dict[str, Any]) -> dict[str, Any]:
    """sha256 of each `state_dict` tensor and of the rest of `payload` (tensors, numbers and strings alike).

    torch does not check the bytes it reads back (a flipped bit in a tensor's storage loads as another
    weight), so the file carries its own digests; `verify_checksums` recomputes them at load. The tensor
    names go into the `payload` digest: pickle stores each name once for both dicts, so a flip in one
    renames the tensor and its checksum entry alike.
    """
    rest = {key: value for key, value in payload.items() if key not in ("state_dict", CHECKSUMS)}
    return {"algorithm": "sha256",
            "tensors": {name: _digest(tensor) for name, tensor in payload["state_dict"].items()},
            "payload": _digest([list(payload["state_dict"]), rest])}


def verify_checksums(payload: dict[str, Any], source: str) -> None:
    """CheckpointError (exit 5) naming `source` when a digest differs; a logged note when there are none."""
    recorded = payload.get(CHECKSUMS)
    if recorded is None:
        log.info("%s has no checksums (written by dyf before they were recorded); its contents are not verified",
                 source)
        return
    damaged = _mismatches(payload, recorded)
    if damaged:
        raise CheckpointError(f"{source} is damaged: its contents do not match the checksums recorded at save "
                              f"({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}); re-train it "
                              "or restore a copy")


def _mismatches(payload: dict[str, Any], recorded: Any) -> list[str]:
    """The names of the parts whose digest differs from `recorded` (the checksums themselves included)."""
    if not (isinstance(recorded, dict) and recorded.get("algorithm") == "sha256"
            and isinstance(recorded.get("tensors"), dict) and isinstance(payload.get("state_dict"), dict)):
        return ["the checksum record"]
    expected, actual = recorded["tensors"], checksums(payload)
    damaged = [f"state_dict.{name}" for name in sorted(set(expected) | set(actual["tensors"]))
               if expected.get(name) != actual["tensors"].get(name)]
    if recorded.get("payload") != actual["payload"]:
        damaged.append("config, statistics or metadata")
    return damaged


def _digest(value: Any) -> str:
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Feed a canonical byte form of a plain value to `digest`: a type tag, then sizes and contents, so
    that no two different values (a list and a tuple aside, which `_plain` unifies) give the same bytes."""
    if isinstance(value, dict):
        digest.update(b"d%d:" % len(value))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(b"l%d:" % len(value))
        for item in value:
            _feed(digest, item)
    elif hasattr(value, "is_floating_point"):  # a tensor: dtype, shape, raw bytes
        import torch

        digest.update(f"t{value.dtype}{tuple(value.shape)}:".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        digest.update(b"s%d:" % len(encoded) + encoded)
    elif isinstance(value, float):
        digest.update(b"f" + value.hex().encode())
    else:  # None, bool, int
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def _is_parameter(name: str, tensor: Any) -> bool:
    # BatchNorm statistics are buffers, not parameters; count floating tensors that are not running stats.
    return hasattr(tensor, "is_floating_point") and tensor.is_floating_point() and "running_" not in name


# ------------------------------------------------------------------------------------------------ files

def atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, then rename: a crash never leaves a partial file."""
    import torch

    path = Path(path)
    tmp = outputs.temporary_path(path)  # the name outputs.remove_strays clears after a kill
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    atomic_torch_save(checkpoint.to_payload(), path)


_CHECKPOINT_FIX = "give the .pt file written by `dyf train-interpolator` or `dyf train-forecaster`"
_DAMAGED_FIX = "re-train it or restore a copy"


def _torch_load(path: Path, what: str, fix: str = _DAMAGED_FIX, other: str = _CHECKPOINT_FIX) -> Any:
    """`torch.load(weights_only=True)`; CheckpointError saying what the file is and why it is refused.

    `fix` ends the message for a damaged torch file, `other` the one for a file of another type.
    """
    import warnings

    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist; check the path or train it first")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a checkpoint file; give the .pt file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - on damaged bytes torch's unpickler raises any type (IndexError, ...)
        raise CheckpointError(f"{what} {path} cannot be read: {_refusal(path, err, fix, other)}") from None


# What the first bytes of a file say it is (the formats users hand to --ckpt by mistake).
_NETCDF_MAGIC = (b"CDF\x01", b"CDF\x02", b"\x89HDF\r\n\x1a\n")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80


def _refusal(path: Path, err: Exception, fix: str, other: str) -> str:
    """One sentence: what the file is (sniffed from its first bytes), why torch refused it, and the fix."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    code = _unsafe_global(err)
    if not head:
        return f"the file is empty (0 bytes), e.g. left by an interrupted copy; {fix}"
    if head.startswith(_NETCDF_MAGIC):
        return f"it is a NetCDF/HDF5 data file, not a checkpoint (data files go to `dyf prepare netcdf`); {other}"
    if code is not None:
        return (f"it holds a pickle that asks to call {code}, which a checkpoint never does; refused without "
                f"running it (use checkpoints from trusted sources only); {other}")
    if head.startswith(_ZIP_MAGIC):
        return f"it is a torch zip file with damaged contents ({_reason(err)}); {fix}"
    if head[0] == _PICKLE_PROTOCOL:
        return (f"it is a plain pickle, not the torch zip format dyf writes, and torch's safe loader refused it "
                f"({_reason(err)}) without running it; {other}")
    if _looks_like_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()[0][:40] if head.strip() else ""
        return f"it is a text file (starting {first!r}), not a checkpoint; {other}"
    return f"it is neither a torch file nor a known data format (first bytes {head[:4].hex()}); {other}"


def _unsafe_global(err: Exception) -> str | None:
    """The global a refused pickle asked for (`posix.system`), when torch's weights-only unpickler names one."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else None


def _reason(err: Exception) -> str:
    """torch's error in a few words: its first informative line, never a cut sentence of its advice."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue",
                                                             "Check the documentation", "In PyTorch"))]
    text = (useful[0] if useful else type(err).__name__).rstrip(".")
    return text if len(text) <= 80 else f"{type(err).__name__}"


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 without control characters (the 512 bytes read may end inside a character)."""
    text = head.decode("utf-8", "replace")
    return text.count("\ufffd") <= 3 and all(char.isprintable() or char in "\t\r\n\ufffd" for char in text)


def load_checkpoint(path: Path, expect_kind: str | tuple[str, ...] | None = None) -> Checkpoint:
    """Load and validate a checkpoint; CheckpointError (exit 5) when missing, damaged or of the wrong kind."""
    checkpoint = Checkpoint.from_payload(_torch_load(path, "checkpoint"), str(path))
    expected = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
    if expected is not None and checkpoint.kind not in expected:
        raise CheckpointError(f"{path} is a {checkpoint.kind} checkpoint, expected {' or '.join(expected)}"
                              f"{_kind_hint(checkpoint.kind, expected)}")
    return checkpoint


def require_complete(checkpoint: Checkpoint, path: Path) -> None:
    """Refuse the best-so-far checkpoint of a run that was stopped or killed (`training.complete` False).

    Files without the flag (made outside `dyf train-*`, e.g. untrained test models) are not judged.
    """
    if checkpoint.training.get("complete", True) is not False:
        return
    command = "dyf train-interpolator" if checkpoint.kind == "interpolator" else "dyf train-forecaster"
    raise CheckpointError(f"{path} is from an unfinished `{command}` run (stopped at step "
                          f"{checkpoint.training.get('step', '?')}); re-run the same `{command} ... --out {path}` "
                          f"command to finish it (it resumes from {state_path(Path(path))})")


def _kind_hint(found: str, expected: tuple[str, ...]) -> str:
    if found == "interpolator":
        return "; give the model.pt written by `dyf train-forecaster` (it embeds the interpolator)"
    if "interpolator" in expected:
        return "; give the file written by `dyf train-interpolator`"
    return ""


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Save the resumable training state (optimizer, step, RNG, current weights) atomically."""
    atomic_torch_save({"format": STATE_FORMAT, "format_version": FORMAT_VERSION, **state}, path)


def load_training_state(path: Path) -> dict[str, Any]:
    fix = "delete it or pass --overwrite to start over"
    state = _torch_load(path, "training state", fix, fix)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a dyf training state; delete it or pass --overwrite to start over")
    return {key: value for key, value in state.items() if key not in ("format", "format_version")}


def state_path(out: Path) -> Path:
    """Where the training state of the run writing `out` lives: `<out>.state.pt`."""
    out = Path(out)
    return out.with_name(out.name + ".state.pt")


# ------------------------------------------------------------------------------------------------ stores

def store_identity(store) -> dict[str, Any]:
    """Identity of a data store (a `store.DataStore`): path, normalisation mode, sizes, hash of its stats."""
    from dyfcli.store import stats_sha256

    return {"path": str(Path(store.path).resolve()), "normalization": store.normalization,
            "series": int(store.ds.sizes["series"]), "stats_sha256": stats_sha256(store)}


def check_compatible(checkpoint: Checkpoint, store) -> None:
    """Refuse a store whose fields, conditioning or (for per-pixel statistics) grid differ from training."""
    if list(store.fields) != list(checkpoint.fields):
        raise CheckpointError(f"the checkpoint was trained on fields {checkpoint.fields}, the store {store.path} "
                              f"has {store.fields}; use a checkpoint trained on this kind of data")
    if list(store.cond_names) != list(checkpoint.cond_names):
        raise CheckpointError(f"the checkpoint expects conditioning {checkpoint.cond_names or 'none'}, the store "
                              f"{store.path} has {store.cond_names or 'none'}; use a matching store")
    if checkpoint.store.get("normalization", "global") not in ("global", "none"):  # per-pixel statistics
        same_grid = tuple(store.grid) == tuple(checkpoint.grid)
        same_series = int(store.ds.sizes["series"]) == int(checkpoint.store.get("series", -1))
        if not (same_grid and same_series):
            raise CheckpointError(
                f"the checkpoint's per-pixel statistics cover {checkpoint.store.get('series')} series on a "
                f"{tuple(checkpoint.grid)} grid, the store {store.path} has {int(store.ds.sizes['series'])} series "
                f"on {tuple(store.grid)}; use the store it was trained on (or one prepared the same way)")
    _check_geography(checkpoint, store)
    identity = store_identity(store)
    if identity["stats_sha256"] != checkpoint.store.get("stats_sha256"):
        log.warning("the store %s has other normalisation statistics than the training store %s; the "
                    "checkpoint's own statistics are used", store.path, checkpoint.store.get("path"))


def _check_geography(checkpoint: Checkpoint, store) -> None:
    """Calendar channels need dated times; a network that wraps x around needs a periodic store.

    A periodic network on a store that is not (a regional grid) would join its west and east edges:
    refused. A non-periodic network on a periodic store (trained before dyf recorded periodicity, or with
    `periodic_x: false`) runs as trained, with a logged note.
    """
    from dyfcli.data import calendar_problem

    problem = calendar_problem(store, checkpoint.calendar, training=False)
    if problem:
        raise CheckpointError(f"the checkpoint was trained with calendar channels: {problem}")
    networks = [checkpoint] + ([checkpoint.interpolator] if checkpoint.interpolator is not None else [])
    wrapping = [c.kind for c in networks if c.periodic_x]
    if wrapping and not store.periodic_x:
        raise CheckpointError(f"the checkpoint's {' and '.join(wrapping)} network pads x circularly (trained on a "
                              f"store whose longitudes span 360 degrees), but {store.path} is not periodic in x; "
                              "use a whole-globe store or a checkpoint trained on this kind of grid")
    if store.periodic_x and len(wrapping) < len(networks):
        log.warning("%s is periodic in x but the checkpoint's networks were trained without periodic padding: "
                    "the 0/360 seam stays an edge (re-train on this store to wrap it)", store.path)


# ------------------------------------------------------------------------------------------------ inspect

def describe(path: Path) -> dict[str, Any]:
    """A JSON-ready summary of a checkpoint file for `dyf inspect`."""
    checkpoint = load_checkpoint(Path(path))
    summary = _summary(checkpoint)
    summary = {"kind": "checkpoint", "path": str(path), "checkpoint_kind": checkpoint.kind, **summary}
    if checkpoint.interpolator is not None:
        summary["interpolator"] = {"kind": checkpoint.interpolator.kind, **_summary(checkpoint.interpolator)}
    return summary


def describe_training_state(path: Path) -> dict[str, Any]:
    """A JSON-ready summary of a resumable training state (`OUT.state.pt`) for `dyf inspect`."""
    state = load_training_state(Path(path))
    progress = state.get("progress", {})
    best = progress.get("best_crps")
    return {"kind": "training-state", "path": str(path), "training_kind": state.get("kind"),
            "data": state.get("data"), "step": progress.get("step"), "epoch": progress.get("epoch"),
            "best_val_crps": best if isinstance(best, float) and math.isfinite(best) else None,
            "best_step": progress.get("best_step"), "validations": len(progress.get("history", []))}


def _summary(checkpoint: Checkpoint) -> dict[str, Any]:
    config = checkpoint.config
    stage = config.get("interpolator" if checkpoint.kind == "interpolator" else "forecaster", {})
    return {
        "method": checkpoint.method,
        "fields": checkpoint.fields,
        "grid": list(checkpoint.grid),
        "conditioning": checkpoint.cond_names,
        "horizon": config.get("data", {}).get("horizon"),
        "network": stage.get("network", {}).get("kind"),
        "periodic_x": checkpoint.periodic_x,
        "calendar": checkpoint.calendar,
        "parameters": checkpoint.parameter_count,
        "training": checkpoint.training,
        "store": checkpoint.store,
        "format_version": checkpoint.format_version,
        "dyf_version": checkpoint.dyf_version,
        "torch_version": checkpoint.torch_version,
    }
