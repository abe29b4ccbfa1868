"""Which paths dyf may write, replace or delete: the one module that decides.

Rules every writing command follows (through `claim_output`):

- `--out` names a new path: not `.`, `..`, a symbolic link, an input of the same command, a path inside
  an input, nor a folder holding an input. Missing folders above it are created when it is claimed and
  removed again (while empty) when the command fails, so a refused command leaves nothing behind.
- An existing output is replaced only with `--overwrite` (or continued with `--resume`), and only when it
  is an artefact of the same kind that dyf wrote, recognised by its own metadata (`kind_at`): a data
  store, forecast store or WeatherBench-2 export by the `dyf_format` attribute of its `zarr.json`, a scores file by its
  `dyf_format = "dyf-scores"` attribute (NetCDF, Zarr) or dyf's exact CSV header, a checkpoint or
  training state by the `format` key `torch.load(weights_only=True)` returns, a run folder by holding
  nothing but dyf's `config.yaml` and `metrics.jsonl`. Anything else is a UsageError naming it.
- Companions dyf writes beside an output (`OUT.partial` staging folders, `OUT.run/`, `OUT.state.pt`) obey
  the same rule; a staging folder is dyf's when it carries the marker file `STAGING_MARKER` (written
  before anything else), dyf's metadata, or nothing at all.
- One writer per output: an exclusive `flock` on `.OUT.lock` beside the output, held for the whole job
  (by rank 0 under torchrun/srun). The kernel releases it when the process dies, even by SIGKILL, so a
  stale lock never blocks; the file holds JSON {pid, host, command, started} so a second writer can name
  the first. The lock is taken before anything is deleted.
- Files that a killed dyf left beside the output (`.OUT.<8 hex>.tmp` from atomic saves, `.OUT.<8 hex>.old`
  backups of a replaced store) are removed when the output is claimed: only those exact patterns.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from dyfcli.errors import UsageError
from dyfcli.runtime import fault_point

DATA_STORE = "data-store"
FORECAST = "forecast"
SCORES = "scores"
CHECKPOINT = "checkpoint"
TRAINING_STATE = "training-state"
RUN_FOLDER = "run-folder"
STAGING = "staging"
EXPORT = "wb2-export"

# dyf_format attribute (Zarr, NetCDF) or checkpoint `format` key -> kind
_FORMATS = {"dyf-data-store": DATA_STORE, "dyf-forecast": FORECAST, "dyf-scores": SCORES,
            "dyf-checkpoint": CHECKPOINT, "dyf-training-state": TRAINING_STATE, "dyf-wb2-export": EXPORT}
SCORES_FORMAT = "dyf-scores"
SCORES_CSV_HEADER = "source,field,lead,lead_time,metric,value"
STAGING_MARKER = ".dyf-staging"
RUN_FILES = frozenset({"config.yaml", "metrics.jsonl"})
FOLDER_KINDS = (DATA_STORE, FORECAST, RUN_FOLDER, STAGING, EXPORT)
_DESCRIPTIONS = {DATA_STORE: "dyf data store", FORECAST: "dyf forecast store", SCORES: "dyf scores file",
                 CHECKPOINT: "dyf checkpoint", TRAINING_STATE: "dyf training state",
                 RUN_FOLDER: "dyf run folder (config.yaml, metrics.jsonl)", STAGING: "dyf staging folder",
                 EXPORT: "dyf WeatherBench-2 export"}
_HEX8 = "[0-9a-f]{8}"
_SIGNATURE_BYTES = 1 << 20  # the pickle holding `format` comes first in a torch file

# Zarr lists the staging marker while a store is written into a staging folder; it is ours, not a stray.
warnings.filterwarnings("ignore", message=r"Object at \.dyf-staging is not recognized")


# ----------------------------------------------------------------------------------------------- recognising

def kind_at(path: Path | str) -> str | None:
    """The kind of dyf artefact at `path` (one of the constants above), or None when dyf did not write it.

    Recognition reads only dyf's own metadata; a symbolic link is never dyf's.
    """
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return None
    if path.is_dir():
        return _folder_kind(path)
    if path.suffix == ".csv":
        return SCORES if _first_line(path).startswith(SCORES_CSV_HEADER) else None  # + weights,units,unit
    if path.suffix == ".nc":
        return _netcdf_kind(path)
    return _torch_kind(path)


def _folder_kind(path: Path) -> str | None:
    if (path / STAGING_MARKER).is_file():
        return STAGING
    kind = _zarr_kind(path)
    if kind is not None:
        return kind
    names = {entry.name for entry in path.iterdir()}
    if names and names <= RUN_FILES and all((path / name).is_file() for name in names):
        return RUN_FOLDER
    return None


def _zarr_kind(path: Path) -> str | None:
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        try:
            document = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        attrs = document.get(key, {}) if key else document
        if isinstance(attrs, dict):
            return _FORMATS.get(attrs.get("dyf_format"))
    return None


def _first_line(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return handle.readline(200).rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return None


def _netcdf_kind(path: Path) -> str | None:
    try:
        import netCDF4

        with netCDF4.Dataset(path, "r") as dataset:
            found = getattr(dataset, "dyf_format", None)
    except Exception:  # noqa: BLE001 - anything unreadable is not recognisably dyf's
        return None
    return SCORES if found == SCORES_FORMAT else None


def _torch_kind(path: Path) -> str | None:
    """Checkpoint or training state: `torch.load(weights_only=True)` (which never runs code) gives the
    format; a damaged file is recognised by the format string in its pickle, never unpickled."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: reads no weights
    except Exception:  # noqa: BLE001 - damaged or foreign bytes: try the signature
        return _torch_signature(path)
    return _FORMATS.get(payload.get("format")) if isinstance(payload, dict) else None


def _torch_signature(path: Path) -> str | None:
    """A torch file (a zip archive) whose pickle, stored uncompressed and first, names dyf's format; read
    as raw bytes so a truncated file (no zip directory at its end) is still recognised."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SIGNATURE_BYTES)
    except OSError:
        return None
    if not head.startswith(b"PK\x03\x04"):
        return None
    for text, kind in (("dyf-training-state", TRAINING_STATE), ("dyf-checkpoint", CHECKPOINT)):
        if text.encode() in head:
            return kind
    return None


def describe_kind(kind: str | None) -> str:
    return _DESCRIPTIONS.get(kind, "something dyf did not write")


def _found(path: Path) -> str:
    """What is at `path`, in words, for error messages."""
    if path.is_symlink():
        return "a symbolic link"
    kind = kind_at(path)
    if kind is not None:
        return f"a {describe_kind(kind)}"
    return "a folder dyf did not write" if path.is_dir() else "a file dyf did not write"


# ----------------------------------------------------------------------------------------------- checking

def check_path(out: Path, *, folder: bool) -> None:
    """`--out` must name an entry, not through a symbolic link, in a folder that exists or that dyf can
    create (`claim_output` creates missing parents, as `--plots` does; no file may stand in their way)."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        example = "forecast.zarr" if folder else "model.pt"
        raise UsageError(f"--out {out} names a folder, not an output; give a new name inside it such as "
                         f"{out / example}")
    if out.is_symlink():
        raise UsageError(f"--out {out} is a symbolic link; dyf does not write through links: give the real "
                         "path or another name")
    blocking = next((parent for parent in out.parents if parent.exists() or parent.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise UsageError(f"--out {out} lies under {blocking}, which is not a folder; choose another --out")
    if out.exists() and out.is_dir() != folder:
        if folder:
            raise UsageError(f"--out {out} is a file but the output is a folder (a Zarr store); choose another --out")
        raise UsageError(f"--out {out} is a folder; give a file name such as {out / 'output'}")


def check_distinct(out: Path, inputs: Iterable[Path | str | None], flag: str = "--out") -> None:
    """The output must not be an input, hold one (replacing it would destroy the input), or lie inside an
    input store (writing there would change the store). A folder of raw files may hold the output."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            raise UsageError(f"{flag} {out} is also an input of this command ({given}); choose another {flag}")
        if source in target.parents and _is_store(source):
            raise UsageError(f"{flag} {out} lies inside the input {given}; choose a path outside it")
        if target in source.parents:
            raise UsageError(f"{flag} {out} holds the input {given}; choose another {flag}")


def _is_store(folder: Path) -> bool:
    """A Zarr store (dyf's or not), as opposed to a plain folder of raw files."""
    return any((folder / name).exists() for name in ("zarr.json", ".zgroup", ".zarray"))


def companions(out: Path, kind: str) -> dict[Path, str]:
    """What dyf writes beside an output of `kind`, with the kind each must be when it exists."""
    out = Path(out)
    if kind == CHECKPOINT:
        return {out.with_name(out.name + ".state.pt"): TRAINING_STATE, out.with_name(out.name + ".run"): RUN_FOLDER}
    if kind in (DATA_STORE, FORECAST, EXPORT) or out.suffix == ".zarr":
        return {staging_path(out): STAGING}
    return {}


def check_existing(out: Path, kind: str, *, overwrite: bool, resume: bool = False, hint: str = "") -> None:
    """An existing output may be replaced (`overwrite`) or continued (`resume`) only when it is dyf's `kind`;
    an existing companion only when it is dyf's own. Raise UsageError naming anything else."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not (overwrite or resume):
            raise UsageError(f"{out} already exists; {hint or 'pass --overwrite to replace it'} "
                             "or choose another --out")
        if kind_at(out) != kind:
            raise UsageError(f"--out {out} is {_found(out)}, not a {describe_kind(kind)}: dyf replaces only its "
                             "own outputs; move it away or choose another --out")
    for path, expected in companions(out, kind).items():
        if (path.exists() or path.is_symlink()) and not _is_own(path, expected):
            raise UsageError(f"{path} is {_found(path)}, in the way of dyf's {describe_kind(expected)}; "
                             "move it away or choose another --out")


def _is_own(path: Path, kind: str) -> bool:
    found = kind_at(path)
    if kind == STAGING:  # an interrupted job's staging: marked, finished but not renamed, or empty
        return found in (STAGING, DATA_STORE, FORECAST, SCORES, EXPORT) or _empty_folder(path)
    return found == kind or (kind == RUN_FOLDER and _empty_folder(path))


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


# ----------------------------------------------------------------------------------------------- claiming

@contextmanager
def claim_output(out: Path | str, kind: str, *, overwrite: bool = False, resume: bool = False,
                 inputs: Iterable[Path | str | None] = (), hint: str = "") -> Iterator[Path]:
    """Check `out` for a command that writes a `kind` and hold its lock for the `with` block.

    `resume`: an existing output is continued by the caller (it must still be dyf's `kind`); `inputs`:
    the paths the command reads; `hint`: how to go on when the output exists (default: --overwrite).
    Under torchrun/srun only rank 0 locks and looks at existing files; every rank checks the path.
    """
    from dyfcli.runtime import launch_rank

    out = Path(out)
    check_path(out, folder=kind in FOLDER_KINDS or (kind == SCORES and out.suffix == ".zarr"))
    check_distinct(out, inputs)
    if launch_rank() != 0:
        yield out
        return
    created = make_parents(out)
    try:
        with output_lock(out):
            remove_strays(out, kind)
            check_existing(out, kind, overwrite=overwrite, resume=resume, hint=hint)
            yield out
    except BaseException:
        remove_empty_folders(created)  # a refused or failed command leaves nothing behind
        raise


def make_parents(out: Path) -> list[Path]:
    """Create the missing folders above `out`; returns them, deepest first."""
    missing = [parent for parent in Path(out).parents if not parent.exists()]
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        remove_empty_folders(missing)
        raise UsageError(f"cannot create {Path(out).parent}, the folder of --out {out} ({err.strerror}); "
                         "choose a folder you can write to") from None
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove the folders `make_parents` created (deepest first) while they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something was written there (a saved state): keep it and every folder above
            return


_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    """A forked child (a DataLoader worker) must not keep the parent's lock alive after the parent dies."""
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def lock_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Exclusive lock on `out` for the `with` block; UsageError naming the holder when another has it."""
    path = lock_path(out)
    fd = _acquire(path, out)
    _HELD_LOCKS.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        try:
            path.unlink(missing_ok=True)  # unlink while still locked: a waiting writer then starts afresh
        finally:
            os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    """Open and flock the lock file; retry when it was replaced between open and flock."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise UsageError(f"cannot write in the folder of --out {out} ({err.strerror}); "
                             "choose a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UsageError(_busy_message(path, out)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder finished and removed the file: lock the new one


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join(["dyf", *sys.argv[1:]])[:500],
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _busy_message(path: Path, out: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        who = (f"dyf pid {holder['pid']} on host {holder['host']} since {holder['started']} "
               f"({holder['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        who = "another dyf process"
    return f"{out} is being written by {who}; wait for it to finish or choose another --out"


# ----------------------------------------------------------------------------------------------- writing

def staging_path(out: Path) -> Path:
    """Where a folder output is built before it is renamed into place."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def new_staging(staging: Path) -> Path:
    """An empty staging folder carrying dyf's marker (written first, so a kill leaves a recognisable folder).

    A staging folder an earlier dyf job left is removed first; writers then use Zarr mode "a" (mode "w"
    would clear the folder, marker included).
    """
    staging = Path(staging)
    if staging.exists() or staging.is_symlink():
        remove(staging, STAGING)
    staging.mkdir()
    (staging / STAGING_MARKER).write_text(json.dumps(_holder()))
    return staging


def unmark_staging(staging: Path) -> None:
    """Drop the marker from a finished staging folder (its dyf metadata now says what it is)."""
    (Path(staging) / STAGING_MARKER).unlink(missing_ok=True)


def remove(path: Path, kind: str) -> None:
    """Delete dyf's `kind` at `path` after checking again that dyf wrote it; UsageError otherwise."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not _is_own(path, kind):
        raise UsageError(f"{path} is {_found(path)}, not a {describe_kind(kind)}: dyf does not delete it; "
                         "move it away or choose another --out")
    if kind == RUN_FOLDER:  # only dyf's files; rmdir fails rather than delete anything that appeared since
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
        path.rmdir()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def move_into_place(staging: Path, out: Path, kind: str) -> None:
    """Rename a finished `staging` to `out`, replacing an older dyf `kind` there (checked again first).

    A file is replaced atomically; a folder is first renamed to a unique hidden backup that only this
    call creates and deletes, so no path dyf did not create is ever removed.
    """
    staging, out = Path(staging), Path(out)
    if not (out.exists() or out.is_symlink()):
        staging.rename(out)
        return
    if kind_at(out) != kind:
        raise UsageError(f"{out} is {_found(out)}, not a {describe_kind(kind)}: dyf does not replace it; "
                         "move it away or choose another --out")
    if not out.is_dir():
        os.replace(staging, out)
        return
    backup = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    out.rename(backup)
    fault_point("outputs.old_moved_aside")  # a kill here: the next run removes backup and staging
    staging.rename(out)
    shutil.rmtree(backup)


def temporary_path(out: Path) -> Path:
    """A unique hidden name beside `out` (the pattern `remove_strays` knows)."""
    out = Path(out)
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")


def remove_strays(out: Path, kind: str) -> list[Path]:
    """Remove what a killed dyf left beside `out`: `.NAME.<8 hex>.tmp` files of the output and its
    companions, and `.NAME.<8 hex>.old` backups that are still dyf's `kind`. Returns what was removed."""
    out = Path(out)
    names = [out.name, *(path.name for path in companions(out, kind))]
    temporary = re.compile("|".join(rf"\.{re.escape(name)}\.{_HEX8}\.tmp" for name in names))
    backup = re.compile(rf"\.{re.escape(out.name)}\.{_HEX8}\.old")
    removed = []
    for entry in out.parent.iterdir():
        if entry.is_symlink():
            continue
        if temporary.fullmatch(entry.name) and entry.is_file():
            entry.unlink()
        elif backup.fullmatch(entry.name) and kind_at(entry) == kind:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        else:
            continue
        removed.append(entry)
    return removed
