"""The data store (docs/design.md §3): the one module that knows its schema.

A data store is a Zarr group written through xarray. Fields are float32 `(series, time, y, x)` in
physical units, `mask(series, y, x)` marks valid points, `cond_<name>(series, y, x)` holds static
conditioning, `stats_mean_<field>` / `stats_std_<field>` hold training-split statistics, and attributes
record fields, splits, normalisation mode and provenance.

Writers build an `xr.Dataset` (eagerly or lazily with Dask), then call `write_store`, which writes into a
staging directory next to the output and renames it into place only when complete, so an interrupted job
never leaves a store that looks finished. Readers call `open_store`, which validates and names the fix.

Integrity: every chunk of every array carries a crc32c checksum and every chunk is written (also those
holding only fill values), so `open_store` refuses a store with a missing chunk file and readers refuse a
chunk whose bytes changed (`dyfcli.chunks`): damage is exit 4, never data. `verify` reads every chunk.
"""

from __future__ import annotations

import json
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dyfcli import __version__, outputs
from dyfcli.attrs import decode, decoded, for_writing
from dyfcli.chunks import (check_chunks, checksum_codecs, checksummed, load_small_arrays, read_errors, reason,
                           verify_chunks)
from dyfcli.errors import DataError


# We write consolidated metadata on purpose: one read instead of one per array on parallel file systems.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")

FORMAT = "dyf-data-store"
FORMAT_VERSION = 1
# "none": the fields are used in raw units (as the official code trains the simulated systems); the store
# still holds global training statistics (climatology, `dyf inspect`), which the loaders do not apply.
NORMALIZATION_MODES = ("global", "pixel", "pixel-dayofyear", "none")
FIELD_DIMS = ("series", "time", "y", "x")
# Attribute of a store whose x axis is periodic (longitudes spanning 360 degrees, untiled): the networks
# then pad x circularly (`networks.wrap_x_padding`).
PERIODIC_X = "dyf_periodic_x"
STATIC_DIMS = ("series", "y", "x")
STATS_DIMS = {"global": (), "pixel": ("series", "y", "x"), "pixel-dayofyear": ("dayofyear", "series", "y", "x"),
              "none": ()}
# The systems whose shipped presets fit a store, and how a store says it holds one (`DataStore.system`).
SYSTEMS = ("sst", "navier-stokes", "spring-mesh")


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
    """Attributes every store carries about how it was made (plain values in memory; nested ones such as
    `dyf_recipe` are written as JSON strings by `attrs.for_writing`)."""
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
    """Chunks of docs/design.md §3: one series, `time_chunk` steps, the whole spatial field; every array
    checksummed."""
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
    """Validate `ds` and write it atomically to `out` (staging directory, then rename); attributes go
    through `attrs.for_writing` (JSON strings for nested values, CF coordinate attributes)."""
    validate_dataset(ds)
    check_output(out, overwrite)
    staging = new_staging(out)
    for_writing(ds).to_zarr(staging, mode="a", encoding=encoding_for(ds, time_chunk), consolidated=True)
    finalize(staging, out)
    return Path(out)


# ----------------------------------------------------------------------------------------------- schema

def validate_dataset(ds) -> None:
    """Check the schema of docs/design.md §3; raise DataError naming what is wrong. `ds` may come
    straight from disk (attributes still JSON-encoded) or from memory."""
    attrs = decode(ds.attrs)
    fields = attrs.get("dyf_fields")
    if not fields:
        raise DataError("not a dyf data store: the attribute 'dyf_fields' is missing; create it with `dyf prepare`")
    for name in fields:
        if name not in ds.data_vars:
            raise DataError(f"the store lists field {name!r} in dyf_fields but has no such variable; re-run `dyf prepare`")
        if tuple(ds[name].dims) != FIELD_DIMS:
            raise DataError(f"field {name!r} has dims {ds[name].dims}, expected {FIELD_DIMS}; re-run `dyf prepare`")
    if "mask" not in ds.data_vars or tuple(ds["mask"].dims) != STATIC_DIMS:
        raise DataError("the store has no mask(series, y, x); re-run `dyf prepare`")
    mode = attrs.get("dyf_normalization")
    if mode not in NORMALIZATION_MODES:
        raise DataError(f"the store's dyf_normalization is {mode!r}, expected one of {NORMALIZATION_MODES}")
    for name in fields:
        for stat in ("mean", "std"):
            var = f"stats_{stat}_{name}"
            if var not in ds.data_vars:
                raise DataError(f"the store has no {var}; re-run `dyf prepare` to compute statistics")
            if tuple(ds[var].dims) != STATS_DIMS[mode]:
                raise DataError(f"{var} has dims {ds[var].dims}, expected {STATS_DIMS[mode]} for {mode!r}")
    periodic = attrs.get(PERIODIC_X, False)
    if not isinstance(periodic, (bool, np.bool_)) and periodic not in (0, 1):
        raise DataError(f"the store's {PERIODIC_X} attribute is {periodic!r}, expected true or false; "
                        "re-run `dyf prepare`")
    splits = attrs.get("dyf_splits")
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

    @property
    def periodic_x(self) -> bool:
        """Whether the x axis wraps around (longitudes spanning 360 degrees, untiled): `dyf_periodic_x`."""
        return bool(self.ds.attrs.get(PERIODIC_X, False))

    @property
    def system(self) -> str | None:
        """`sst`, `navier-stokes` or `spring-mesh` when the store was made by that `dyf prepare` command
        (the simulated systems record `dyf_system`; SST stores are told by `dyf_values`, which only
        `prepare sst` writes), else None (`prepare netcdf`, foreign stores)."""
        attrs = self.ds.attrs
        if attrs.get("dyf_system") in SYSTEMS:
            return attrs["dyf_system"]
        if "dyf_values" in attrs and self.fields == ["sst"]:
            return "sst"
        return None

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
            start = 0 if lo is None else int(np.searchsorted(times, lo, side="left"))
            if last is None:
                stop = len(times)
            elif "T" in str(last):  # an inclusive end date-time (sub-daily data) is that instant
                stop = int(np.searchsorted(times, np.datetime64(last), side="right"))
            else:  # an inclusive end date covers the whole day
                stop = int(np.searchsorted(times, np.datetime64(last) + np.timedelta64(1, "D"), side="left"))
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
    decoded(ds)  # JSON-encoded attributes back to values (stores before that: unchanged)
    if ds.attrs.get("dyf_format") != FORMAT:
        raise DataError(f"{path} is not a dyf data store (dyf_format={ds.attrs.get('dyf_format')!r}); "
                        "create one with `dyf prepare`")
    if int(ds.attrs.get("dyf_format_version", 0)) > FORMAT_VERSION:
        raise DataError(f"{path} was written by a newer dyf (format {ds.attrs['dyf_format_version']}); upgrade dyf")
    validate_dataset(ds)
    check_chunks(path, ds.variables)
    load_small_arrays(ds, path)
    return DataStore(path, ds)


# Left inside a staging store by its writer (every one; prepare sst's progress folder too) and removed just
# before the store is renamed into place: a folder holding one is unfinished, whatever its name.
STAGING_MARKERS = (outputs.STAGING_MARKER, ".dyf-progress")


def is_unfinished(path: Path) -> bool:
    """A staging store: named `OUT.partial`, or holding a writer's progress folder."""
    path = Path(path)
    return path.name.endswith(".partial") or any((path / marker).exists() for marker in STAGING_MARKERS)


def store_id(store: DataStore) -> str:
    """What tells this data store from another of the same schema (another seed, another region).

    Its `dyf_store_id`, or for a store written before there was one, a hash of its statistics.
    """
    recorded = store.ds.attrs.get("dyf_store_id")
    if recorded:
        return str(recorded)
    return f"stats-{stats_sha256(store)}"


def stats_sha256(store: DataStore) -> str:
    """A short hash of the store's normalisation statistics (what a checkpoint's normaliser must match)."""
    import hashlib

    digest = hashlib.sha256()
    for name in store.fields:
        for stat in ("mean", "std"):
            values = np.ascontiguousarray(store.ds[f"stats_{stat}_{name}"].values, dtype=np.float32)
            digest.update(f"{stat}_{name}{values.shape}".encode())
            digest.update(values.tobytes())
    return digest.hexdigest()[:16]


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
        "periodic_x": store.periodic_x,
        "splits": splits,
        "valid_fraction": float(ds["mask"].mean().compute()),
        "source": ds.attrs.get("dyf_source"),
        "recipe": ds.attrs.get("dyf_recipe"),
        "created": ds.attrs.get("dyf_created"),
        "dyf_version": ds.attrs.get("dyf_version"),
        "chunks": {name: list(ds[name].encoding.get("chunks") or []) for name in store.fields},
    }
