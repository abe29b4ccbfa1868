"""The data store (DESIGN §3): the one module that knows its schema.

A data store is a Zarr group written through xarray. Fields are float32 `(series, time, y, x)` in
physical units, `mask(series, y, x)` marks valid points, `cond_<name>(series, y, x)` holds static
conditioning, `stats_mean_<field>` / `stats_std_<field>` hold training-split statistics, and attributes
record fields, splits, normalisation mode and provenance.

Writers build an `xr.Dataset` (eagerly or lazily with Dask), then call `write_store`, which writes into a
staging directory next to the output and renames it into place only when complete, so an interrupted job
never leaves a store that looks finished. Readers call `open_store`, which validates and names the fix.

Integrity: every chunk of every array carries a crc32c checksum and every chunk is written (also those
holding only fill values), so `open_store` refuses a store with a missing chunk file and readers refuse a
chunk whose bytes changed (`read_errors`): damage is exit 4, never data. `verify` reads every chunk.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dyfcli import __version__, outputs
from dyfcli.errors import DataError, DyfError, UsageError

log = logging.getLogger("dyf.store")

# We write consolidated metadata on purpose: one read instead of one per array on parallel file systems.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")

FORMAT = "dyf-data-store"
FORMAT_VERSION = 1
NORMALIZATION_MODES = ("global", "pixel", "pixel-dayofyear")
FIELD_DIMS = ("series", "time", "y", "x")
STATIC_DIMS = ("series", "y", "x")
STATS_DIMS = {"global": (), "pixel": ("series", "y", "x"), "pixel-dayofyear": ("dayofyear", "series", "y", "x")}


# ----------------------------------------------------------------------------------------------- writing

def check_output(out: Path, overwrite: bool, inputs=()) -> None:
    """Refuse a bad --out, an existing output without `overwrite`, and anything dyf did not write
    (`outputs.check_existing`). `prepare` commands hold `outputs.claim_output` around the whole job."""
    out = Path(out)
    outputs.check_path(out, folder=True)
    outputs.check_distinct(out, inputs)
    outputs.check_existing(out, outputs.DATA_STORE, overwrite=overwrite)


def claim_output(out: Path, overwrite: bool, inputs=()):
    """`outputs.claim_output` for a data store: checks, then the output's lock for the `with` block."""
    return outputs.claim_output(out, outputs.DATA_STORE, overwrite=overwrite, inputs=inputs)


def staging_path(out: Path) -> Path:
    """Where an output is built before it is renamed into place."""
    return outputs.staging_path(out)


def new_staging(out: Path) -> Path:
    """A fresh, dyf-marked staging folder for `out` (an older dyf staging folder is removed; anything
    else there is refused). Write into it with Zarr mode "a"."""
    return outputs.new_staging(staging_path(out))


def finalize(staging: Path, out: Path) -> None:
    """Move a finished staging directory into place, replacing an older dyf data store only."""
    outputs.unmark_staging(staging)
    outputs.move_into_place(Path(staging), Path(out), outputs.DATA_STORE)


def provenance_attrs(source: str, recipe: dict) -> dict:
    """Attributes every store carries about how it was made."""
    return {
        "dyf_format": FORMAT,
        "dyf_format_version": FORMAT_VERSION,
        "dyf_version": __version__,
        "dyf_source": source,
        "dyf_recipe": json.loads(json.dumps(recipe, default=str)),
        "dyf_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # Tells this store from another of the same schema (another seed, a re-run): forecasts record it
        # and `dyf evaluate` refuses to score them against a different store.
        "dyf_store_id": uuid.uuid4().hex,
    }


def encoding_for(ds, time_chunk: int = 1) -> dict:
    """Chunks of DESIGN §3: one series, `time_chunk` steps, the whole spatial field; every array checksummed."""
    encoding = {}
    for name, var in ds.data_vars.items():
        chunks = []
        for dim in var.dims:
            size = var.sizes[dim]
            if dim == "series":
                chunks.append(1)
            elif dim == "time":
                chunks.append(min(time_chunk, size))
            elif dim == "dayofyear":
                chunks.append(size)  # statistics are read whole; one file per day would mean 366 reads
            else:
                chunks.append(size)
        encoding[name] = {"chunks": tuple(chunks)} if chunks else {}
        if tuple(var.dims) == FIELD_DIMS:
            # Fields are float noise that compresses little (~1.1x) while decoding halves how many
            # training windows a loader worker serves per second (benchmarks/windows.py): store them raw
            # (with only the 4-byte checksum).
            encoding[name]["compressors"] = checksum_codecs(compressed=False)
    return checksummed(ds, encoding)


def write_store(ds, out: Path, overwrite: bool = False, time_chunk: int = 1) -> Path:
    """Validate `ds` and write it atomically to `out` (staging directory, then rename)."""
    validate_dataset(ds)
    check_output(out, overwrite)
    staging = new_staging(out)
    ds.to_zarr(staging, mode="a", encoding=encoding_for(ds, time_chunk), consolidated=True)
    finalize(staging, out)
    return Path(out)


# ----------------------------------------------------------------------------------------------- integrity
#
# Every array dyf writes ends its codec chain with a crc32c checksum, and every chunk is written, even one
# that holds only the fill value (zarr skips those by default). So a chunk file that is missing was
# deleted, and one whose bytes changed fails its checksum when read: readers refuse damage (exit 4)
# instead of reading it as fill values.

DATA_FIX = "re-create it with the same `dyf prepare` command (with --overwrite)"
VERIFY_READ_BYTES = 32 * 2**20  # decoded bytes per zarr call of `dyf inspect --verify`


def _write_every_chunk() -> None:
    """Make zarr write chunks that equal the fill value, here and in worker processes.

    Writers outside xarray (prepare's reading processes, forecast blocks) open arrays with zarr's
    defaults: the environment variable reaches worker processes and a zarr imported after this module.
    """
    os.environ["ZARR_ARRAY__WRITE_EMPTY_CHUNKS"] = "True"
    if "zarr" in sys.modules:
        sys.modules["zarr"].config.set({"array.write_empty_chunks": True})


_write_every_chunk()


def checksum_codecs(compressed: bool = True) -> list:
    """Bytes-to-bytes codecs of an array: zarr's default compressor (if `compressed`), then crc32c.

    The checksum comes last so it covers the bytes as stored: a flipped or truncated byte fails it
    before a decompressor sees the chunk.
    """
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0), Crc32cCodec()] if compressed else [Crc32cCodec()]


def checksummed(ds, encoding: dict) -> dict:
    """`encoding` for `ds.to_zarr` with every variable (coordinates too) checksummed and every chunk written."""
    out = {}
    for name in ds.variables:
        entry = dict(encoding.get(name, {}))
        entry.setdefault("compressors", checksum_codecs())
        entry["write_empty_chunks"] = True
        out[name] = entry
    return out


def has_checksums(array) -> bool:
    """Whether a zarr array's chunks carry a crc32c checksum (stores written by an older dyf do not)."""
    return any(type(codec).__name__ == "Crc32cCodec" for codec in getattr(array.metadata, "codecs", ()))


def read_errors(path: Path | str, what: str, fix: str = DATA_FIX) -> ReadErrors:
    """A `with` block in which a failed read of a store becomes a DataError (exit 4) naming the store,
    what was read and the fix.

    A checksum mismatch, a truncated chunk (`cannot reshape`), an undecodable one (`Zstd decompression
    error`), a garbled `zarr.json` or a missing chunk file all mean the store is damaged, and zarr and its
    codecs raise many exception types for them; every reader of store data goes through here.
    """
    return ReadErrors(path, what, fix)


@dataclass(frozen=True)
class ReadErrors:
    """The context manager of `read_errors` (a class: training enters one per window, ~0.3 us)."""

    path: Path | str
    what: str
    fix: str

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, traceback) -> bool:
        if isinstance(err, Exception) and not isinstance(err, DyfError):
            # zarr and its codecs raise many types for damaged data
            raise DataError(f"{self.path}: cannot read {self.what} ({reason(err)}); the store is damaged: "
                            f"{self.fix}") from None
        return False


def reason(err: Exception) -> str:
    """`Type: first line of the message`, short enough for a one-line error (checksum bytes left out)."""
    first = (str(err).splitlines() or [""])[0].split(". Stored:")[0]
    return f"{type(err).__name__}: {first[:160]}"


def file_grid(array) -> tuple[int, ...]:
    """How many chunk files (shards for a sharded array) the array has along each dimension."""
    file_shape = array.shards or array.chunks
    return tuple(math.ceil(size / chunk) for size, chunk in zip(array.shape, file_shape))


def missing_chunks(array, positions: Iterable[tuple[int, ...]] | None = None) -> list[tuple[int, ...]]:
    """Grid positions (of `positions`, default all) whose chunk file is absent from a local zarr array.

    One `stat` per chunk file: several times faster than listing the one-folder-per-chunk tree that zarr's
    default key encoding makes (80 000 chunks: ~0.3 s).
    """
    directory = Path(array.store.root) / array.path
    if positions is None:
        positions = itertools.product(*(range(n) for n in file_grid(array)))
    encode = array.metadata.encode_chunk_key
    return [tuple(p) for p in positions if not os.path.isfile(directory / encode(tuple(p)))]


RequiredChunks = Callable[[str, object], "Iterable[tuple[int, ...]] | None"]


def open_array(path: Path, name: str):
    """One array of a store, from its own `zarr.json` (not the consolidated copy, so a garbled one is seen)."""
    import zarr

    return zarr.open_array(store=str(path), path=name, mode="r")


def check_chunks(path: Path, names: Iterable[str], fix: str = DATA_FIX,
                 required: RequiredChunks = lambda name, array: None) -> None:
    """Refuse a store one of whose chunk files is missing (one `stat` per chunk file; none is read).

    `required(name, array)` gives the grid positions that must exist (None: every position).
    """
    for name in names:
        with read_errors(path, f"the metadata of {name!r}", fix):
            array = open_array(path, name)
        missing = missing_chunks(array, required(name, array))
        if missing:
            key = f"{name}/{array.metadata.encode_chunk_key(missing[0])}"
            older = "" if has_checksums(array) else (" (or it was written by a dyf that skipped chunks "
                                                     "holding only fill values)")
            raise DataError(f"{path}: {len(missing)} chunk file(s) of {name!r} are missing, e.g. {key}; the "
                            f"store is damaged{older}: {fix}")
        if not has_checksums(array):
            log.debug("%s: %r has no chunk checksums (written by an older dyf): changed bytes go unnoticed",
                      path, name)


def verify_chunks(path: Path, names: Iterable[str], fix: str = DATA_FIX,
                  required: RequiredChunks = lambda name, array: None) -> dict:
    """Read every chunk of the named arrays; DataError listing the damaged ones (missing or undecodable).

    Returns counts for the summary: arrays and chunks read.
    """
    damaged, chunks, names = [], 0, list(names)
    for name in names:
        try:
            array = open_array(path, name)
        except Exception as err:  # noqa: BLE001 - reported with the other damage
            damaged.append(f"{name}/zarr.json ({reason(err)})")
            continue
        wanted = required(name, array)
        positions = list(itertools.product(*(range(n) for n in file_grid(array))) if wanted is None else wanted)
        missing = set(missing_chunks(array, positions))
        damaged += [f"{name}/{array.metadata.encode_chunk_key(p)} (missing)" for p in sorted(missing)]
        for position, error in _read_chunks(array, [p for p in positions if p not in missing]):
            damaged.append(f"{name}/{array.metadata.encode_chunk_key(position)} ({error})")
        chunks += len(positions)
    for line in damaged:
        log.warning("%s: damaged chunk %s", path, line)
    if damaged:
        raise DataError(f"{path} is damaged: {len(damaged)} chunk(s): {'; '.join(damaged[:5])}"
                        f"{'; ...' if len(damaged) > 5 else ''}; {fix}")
    return {"ok": True, "arrays": len(names), "chunks": chunks}


def _read_chunks(array, positions: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], str]]:
    """(position, error) for every chunk file among `positions` that fails to read.

    Runs of chunks along the second axis (a series' time steps) are read in one zarr call, which is far
    cheaper per chunk; only a run that fails is read again chunk by chunk to name the damaged ones.
    """
    from concurrent.futures import ThreadPoolExecutor

    def read_run(run: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], str]]:
        try:
            array[_region(array, run[0], run[-1])]
            return []
        except Exception as err:  # noqa: BLE001 - reported per chunk, as read_errors would
            if len(run) == 1:
                return [(run[0], reason(err))]
        return [failure for position in run for failure in read_run([position])]

    chunk_bytes = array.dtype.itemsize * math.prod(array.shards or array.chunks)
    runs = _runs(positions, max(1, VERIFY_READ_BYTES // max(chunk_bytes, 1)))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return [failure for failures in pool.map(read_run, runs) for failure in failures]


def _runs(positions: list[tuple[int, ...]], limit: int) -> list[list[tuple[int, ...]]]:
    """Split grid positions into runs of at most `limit` consecutive ones along the second axis."""
    runs: list[list[tuple[int, ...]]] = []
    for position in positions:
        last = runs[-1][-1] if runs else None
        if (last is not None and len(position) >= 2 and len(runs[-1]) < limit and position[1] == last[1] + 1
                and position[:1] == last[:1] and position[2:] == last[2:]):
            runs[-1].append(position)
        else:
            runs.append([position])
    return runs


def _region(array, first: tuple[int, ...], last: tuple[int, ...]) -> tuple[slice, ...]:
    """The array region covered by the chunk files from grid position `first` to `last` (inclusive)."""
    file_shape = array.shards or array.chunks
    return tuple(slice(start * chunk, min((stop + 1) * chunk, size))
                 for start, stop, chunk, size in zip(first, last, file_shape, array.shape))


# ----------------------------------------------------------------------------------------------- schema

def validate_dataset(ds) -> None:
    """Check the schema of DESIGN §3; raise DataError naming what is wrong."""
    fields = ds.attrs.get("dyf_fields")
    if not fields:
        raise DataError("not a dyf data store: the attribute 'dyf_fields' is missing; create it with `dyf prepare`")
    for name in fields:
        if name not in ds.data_vars:
            raise DataError(f"the store lists field {name!r} in dyf_fields but has no such variable; re-run `dyf prepare`")
        if tuple(ds[name].dims) != FIELD_DIMS:
            raise DataError(f"field {name!r} has dims {ds[name].dims}, expected {FIELD_DIMS}; re-run `dyf prepare`")
    if "mask" not in ds.data_vars or tuple(ds["mask"].dims) != STATIC_DIMS:
        raise DataError("the store has no mask(series, y, x); re-run `dyf prepare`")
    mode = ds.attrs.get("dyf_normalization")
    if mode not in NORMALIZATION_MODES:
        raise DataError(f"the store's dyf_normalization is {mode!r}, expected one of {NORMALIZATION_MODES}")
    for name in fields:
        for stat in ("mean", "std"):
            var = f"stats_{stat}_{name}"
            if var not in ds.data_vars:
                raise DataError(f"the store has no {var}; re-run `dyf prepare` to compute statistics")
            if tuple(ds[var].dims) != STATS_DIMS[mode]:
                raise DataError(f"{var} has dims {ds[var].dims}, expected {STATS_DIMS[mode]} for {mode!r}")
    splits = ds.attrs.get("dyf_splits")
    if not isinstance(splits, dict) or not splits:
        raise DataError("the store has no dyf_splits attribute; re-run `dyf prepare`")
    for split, rule in splits.items():
        if not isinstance(rule, dict) or not ({"time", "series"} & set(rule)):
            raise DataError(f"split {split!r} must select by 'time' or 'series', got {rule!r}")


# ----------------------------------------------------------------------------------------------- reading

@dataclass
class DataStore:
    """An opened, validated data store. `ds` is lazy (Dask-backed)."""

    path: Path
    ds: object  # xr.Dataset

    @property
    def fields(self) -> list[str]:
        return list(self.ds.attrs["dyf_fields"])

    @property
    def cond_names(self) -> list[str]:
        return sorted(name for name in self.ds.data_vars if name.startswith("cond_"))

    @property
    def splits(self) -> dict:
        return dict(self.ds.attrs["dyf_splits"])

    @property
    def normalization(self) -> str:
        return self.ds.attrs["dyf_normalization"]

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.ds.sizes["y"]), int(self.ds.sizes["x"])

    @property
    def is_dated(self) -> bool:
        return np.issubdtype(self.ds["time"].dtype, np.datetime64)

    def split_ranges(self, split: str) -> list[tuple[int, int, int]]:
        """`(series_index, start, stop)` half-open time-index ranges that make up `split`."""
        splits = self.splits
        if split not in splits:
            raise DataError(f"the store has no {split!r} split (it has {', '.join(splits)}); "
                            "choose one of those or re-run `dyf prepare` with that split")
        rule = splits[split]
        series_labels = [_plain(v) for v in self.ds["series"].values]
        if "series" in rule:
            wanted = [_plain(v) for v in rule["series"]]
            series_indices = [i for i, label in enumerate(series_labels) if label in wanted]
        else:
            series_indices = list(range(len(series_labels)))
        start, stop = 0, int(self.ds.sizes["time"])
        if "time" in rule:
            start, stop = self._time_index_range(*rule["time"])
        return [(s, start, stop) for s in series_indices if stop > start]

    def _time_index_range(self, first, last) -> tuple[int, int]:
        times = self.ds["time"].values
        if self.is_dated:
            lo = np.datetime64(first) if first is not None else None
            # an inclusive end date covers the whole day
            hi = np.datetime64(last) + np.timedelta64(1, "D") if last is not None else None
            start = 0 if lo is None else int(np.searchsorted(times, lo, side="left"))
            stop = len(times) if hi is None else int(np.searchsorted(times, hi, side="left"))
        else:
            start = 0 if first is None else int(np.searchsorted(times, float(first), side="left"))
            stop = len(times) if last is None else int(np.searchsorted(times, float(last), side="right"))
        return start, stop


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def open_store(path: Path | str) -> DataStore:
    """Open and validate a data store; every failure is a DataError that names the fix.

    Also refuses an unfinished (staging) store and a damaged one: a missing chunk file of any array, or
    an unreadable array other than the fields. Those small arrays (mask, statistics, conditioning,
    coordinates) are read here, checksums and all, so later reads of them come from memory.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise DataError(f"data store {path} does not exist; create one with `dyf prepare`")
    if is_unfinished(path) or (staging_path(path).exists() and not (path / "zarr.json").exists()):
        raise DataError(f"{path} is an unfinished store (a `dyf prepare` was interrupted or is still running); "
                        "re-run the same `dyf prepare` command to finish it and use the store it names")
    try:
        ds = xr.open_zarr(path, consolidated=None, chunks={})
    except Exception as err:  # zarr raises many types for a broken store
        raise DataError(f"{path} is not a readable Zarr store ({reason(err)}); "
                        "re-create it with `dyf prepare`") from None
    if ds.attrs.get("dyf_format") != FORMAT:
        raise DataError(f"{path} is not a dyf data store (dyf_format={ds.attrs.get('dyf_format')!r}); "
                        "create one with `dyf prepare`")
    if int(ds.attrs.get("dyf_format_version", 0)) > FORMAT_VERSION:
        raise DataError(f"{path} was written by a newer dyf (format {ds.attrs['dyf_format_version']}); upgrade dyf")
    validate_dataset(ds)
    check_chunks(path, ds.variables)
    _load_small_arrays(ds, path)
    return DataStore(path, ds)


# Left inside a staging store by its writer (every one; prepare sst's progress folder too) and removed just
# before the store is renamed into place: a folder holding one is unfinished, whatever its name.
STAGING_MARKERS = (outputs.STAGING_MARKER, ".dyf-progress")


def is_unfinished(path: Path) -> bool:
    """A staging store: named `OUT.partial`, or holding a writer's progress folder."""
    path = Path(path)
    return path.name.endswith(".partial") or any((path / marker).exists() for marker in STAGING_MARKERS)


def _load_small_arrays(ds, path: Path) -> None:
    """Read every variable but the fields into memory, in place (their checksums are checked on the way)."""
    fields = set(ds.attrs["dyf_fields"])
    for name, variable in ds.variables.items():
        if name not in fields:
            with read_errors(path, repr(name)):
                variable.load()


def store_id(store: DataStore) -> str:
    """What tells this data store from another of the same schema (another seed, another region).

    Its `dyf_store_id`, or for a store written before there was one, a hash of its statistics.
    """
    recorded = store.ds.attrs.get("dyf_store_id")
    if recorded:
        return str(recorded)
    import hashlib

    digest = hashlib.sha256()
    for name in store.fields:
        for stat in ("mean", "std"):
            values = np.ascontiguousarray(store.ds[f"stats_{stat}_{name}"].values, dtype=np.float32)
            digest.update(f"{stat}_{name}{values.shape}".encode())
            digest.update(values.tobytes())
    return f"stats-{digest.hexdigest()[:16]}"


def verify(path: Path | str) -> dict:
    """Read every chunk of a data store (`dyf inspect --verify`); DataError listing the damaged chunks."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise DataError(f"data store {path} does not exist; create one with `dyf prepare`")
    with read_errors(path, "its metadata"):
        names = sorted(zarr.open_group(str(path), mode="r").array_keys())
    return verify_chunks(path, names)


def describe(store: DataStore) -> dict:
    """A JSON-ready summary for `dyf inspect`."""
    ds = store.ds
    times = ds["time"].values
    time_range = [str(times[0]), str(times[-1])] if len(times) else [None, None]
    splits = {}
    for split in store.splits:
        ranges = store.split_ranges(split)
        splits[split] = {"rule": store.splits[split], "series": len(ranges),
                         "steps": int(sum(stop - start for _, start, stop in ranges))}
    return {
        "kind": "data-store",
        "path": str(store.path),
        "fields": {name: {"units": ds[name].attrs.get("units"), "standard_name": ds[name].attrs.get("standard_name")}
                   for name in store.fields},
        "conditioning": store.cond_names,
        "sizes": {dim: int(size) for dim, size in ds.sizes.items()},
        "series": [_plain(v) for v in ds["series"].values][:1000],
        "time": {"first": time_range[0], "last": time_range[1], "steps": int(len(times)),
                 "step": ds.attrs.get("dyf_time_step")},
        "normalization": store.normalization,
        "splits": splits,
        "valid_fraction": float(ds["mask"].mean().compute()),
        "source": ds.attrs.get("dyf_source"),
        "recipe": ds.attrs.get("dyf_recipe"),
        "created": ds.attrs.get("dyf_created"),
        "dyf_version": ds.attrs.get("dyf_version"),
        "chunks": {name: list(ds[name].encoding.get("chunks") or []) for name in store.fields},
    }
