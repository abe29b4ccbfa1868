"""The data store (DESIGN §3): the one module that knows its schema.

A data store is a Zarr group written through xarray. Fields are float32 `(series, time, y, x)` in
physical units, `mask(series, y, x)` marks valid points, `cond_<name>(series, y, x)` holds static
conditioning, `stats_mean_<field>` / `stats_std_<field>` hold training-split statistics, and attributes
record fields, splits, normalisation mode and provenance.

Writers build an `xr.Dataset` (eagerly or lazily with Dask), then call `write_store`, which writes into a
staging directory next to the output and renames it into place only when complete, so an interrupted job
never leaves a store that looks finished. Readers call `open_store`, which validates and names the fix.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dyfcli import __version__
from dyfcli.errors import DataError, UsageError

# We write consolidated metadata on purpose: one read instead of one per array on parallel file systems.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")

FORMAT = "dyf-data-store"
FORMAT_VERSION = 1
NORMALIZATION_MODES = ("global", "pixel", "pixel-dayofyear")
FIELD_DIMS = ("series", "time", "y", "x")
STATIC_DIMS = ("series", "y", "x")
STATS_DIMS = {"global": (), "pixel": ("series", "y", "x"), "pixel-dayofyear": ("dayofyear", "series", "y", "x")}


# ----------------------------------------------------------------------------------------------- writing

def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if not out.parent.exists():
        raise UsageError(f"the folder of --out {out} does not exist; create {out.parent} first")


def staging_path(out: Path) -> Path:
    """Where an output is built before it is renamed into place."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def finalize(staging: Path, out: Path) -> None:
    """Move a finished staging directory into place, replacing an older output."""
    out = Path(out)
    if out.exists():
        backup = out.with_name(out.name + ".old")
        if backup.exists():
            shutil.rmtree(backup)
        out.rename(backup)
        Path(staging).rename(out)
        shutil.rmtree(backup)
    else:
        Path(staging).rename(out)


def provenance_attrs(source: str, recipe: dict) -> dict:
    """Attributes every store carries about how it was made."""
    return {
        "dyf_format": FORMAT,
        "dyf_format_version": FORMAT_VERSION,
        "dyf_version": __version__,
        "dyf_source": source,
        "dyf_recipe": json.loads(json.dumps(recipe, default=str)),
        "dyf_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def encoding_for(ds, time_chunk: int = 1) -> dict:
    """Chunks of DESIGN §3: one series, `time_chunk` steps, the whole spatial field."""
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
            # training windows a loader worker serves per second (benchmarks/windows.py): store them raw.
            encoding[name]["compressors"] = None
    return encoding


def write_store(ds, out: Path, overwrite: bool = False, time_chunk: int = 1) -> Path:
    """Validate `ds` and write it atomically to `out` (staging directory, then rename)."""
    validate_dataset(ds)
    check_output(out, overwrite)
    staging = staging_path(out)
    if staging.exists():
        shutil.rmtree(staging)
    ds.to_zarr(staging, mode="w", encoding=encoding_for(ds, time_chunk), consolidated=True)
    finalize(staging, out)
    return Path(out)


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
    """Open and validate a data store; every failure is a DataError that names the fix."""
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise DataError(f"data store {path} does not exist; create one with `dyf prepare`")
    if staging_path(path).exists() and not (path / "zarr.json").exists():
        raise DataError(f"{path} is incomplete (a prepare was interrupted); re-run the same `dyf prepare` command")
    try:
        ds = xr.open_zarr(path, consolidated=None, chunks={})
    except Exception as err:  # zarr raises many types for a broken store
        raise DataError(f"{path} is not a readable Zarr store ({type(err).__name__}: {err}); "
                        "re-create it with `dyf prepare`") from None
    if ds.attrs.get("dyf_format") != FORMAT:
        raise DataError(f"{path} is not a dyf data store (dyf_format={ds.attrs.get('dyf_format')!r}); "
                        "create one with `dyf prepare`")
    if int(ds.attrs.get("dyf_format_version", 0)) > FORMAT_VERSION:
        raise DataError(f"{path} was written by a newer dyf (format {ds.attrs['dyf_format_version']}); upgrade dyf")
    validate_dataset(ds)
    return DataStore(path, ds)


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
