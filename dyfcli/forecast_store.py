"""The forecast store (docs/design.md §5): the one module that knows its schema.

A forecast store is a Zarr group readable with `xr.open_zarr`. Each field is float32
`(series, init, member, lead, y, x)` in physical units with NaN on invalid points; `mask(series, y, x)` is
copied from the data store; `done(series, init)` records which blocks are written. Coordinates:
`series` (labels), `init_time(init)`, `member`, `lead` (in data time steps), `lead_time(lead)`,
`valid_time(init, lead)`, `y`, `x` (and `lat`/`lon` when the data store has them).

The whole schema is created up front with empty arrays; the forecast then region-writes one
`(series, init)` block at a time (chunks never straddle blocks, so ranks write independently) and sets
`done[series, init]` after each. Only when every block is written does the attribute `dyf_complete`
become true, so readers (`open_forecast`) refuse a store that an interrupted job left behind.

Integrity (as for data stores, `store.py`): every chunk carries a crc32c checksum; readers refuse a store
missing a field chunk of a block marked done or any chunk of the other arrays, and a resume rewrites a
done block whose chunk is gone.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dyfcli import __version__, outputs
from dyfcli.attrs import decode, decoded, encode, for_writing
from dyfcli.errors import DataError
from dyfcli.runtime import fault_point
from dyfcli.chunks import (check_chunks, checksummed, load_small_arrays, missing_chunks, open_array, read_errors,
                           verify_chunks, whole_chunk_files)

# Consolidated metadata on purpose (one read instead of one per array), as the data store does.
_CONSOLIDATED_WARNING = "Consolidated metadata is currently not part"

FORMAT = "dyf-forecast"
FORMAT_VERSION = 1
FIELD_DIMS = ("series", "init", "member", "lead", "y", "x")
FIX = "re-run the same `dyf forecast` command with --overwrite"


@dataclass(frozen=True)
class ForecastLayout:
    """Everything the schema needs to know about a forecast before any block is computed.

    `mask` is an xr.DataArray `(series, y, x)` taken from the data store (its `y`, `x`, `lat`, `lon`
    coordinates are copied); `lead` is in data time steps `(L,)`; `lead_time` is `(L,)` (timedelta64 or
    float); `valid_time` is `(I, L)`; `identity` holds the options a resume must repeat exactly;
    `time_units` are the data store's time units when its times are numbers (simulations: `s`).
    """

    fields: list[str]
    field_attrs: dict[str, dict]
    series: np.ndarray
    init_time: np.ndarray
    members: int
    lead: np.ndarray
    lead_time: np.ndarray
    valid_time: np.ndarray
    mask: object  # xr.DataArray (series, y, x)
    identity: dict
    attrs: dict
    time_units: str | None = None


# ----------------------------------------------------------------------------------------------- writing

def _dataset(layout: ForecastLayout):
    """The lazy xr.Dataset of the whole store: coordinates and mask eager, fields as empty Dask arrays."""
    import dask.array as dsa
    import xarray as xr

    mask = layout.mask
    n_series, n_init, n_lead = len(layout.series), len(layout.init_time), len(layout.lead)
    ny, nx = mask.sizes["y"], mask.sizes["x"]
    coords = {
        "series": ("series", np.asarray(layout.series)),
        "init_time": ("init", np.asarray(layout.init_time)),
        "member": ("member", np.arange(layout.members, dtype=np.int64)),
        "lead": ("lead", np.asarray(layout.lead, dtype=np.float64)),
        "lead_time": ("lead", np.asarray(layout.lead_time)),
        "valid_time": (("init", "lead"), np.asarray(layout.valid_time)),
    }
    for name in ("y", "x", "lat", "lon"):
        if name in mask.coords:
            coords[name] = (mask[name].dims, mask[name].values, dict(mask[name].attrs))
    ds = xr.Dataset(coords=coords)
    _coordinate_attrs(ds, layout)
    shape = (n_series, n_init, layout.members, n_lead, ny, nx)
    chunks = (1, 1, layout.members, n_lead, ny, nx)
    for name in layout.fields:
        ds[name] = (FIELD_DIMS, dsa.full(shape, np.nan, dtype=np.float32, chunks=chunks),
                    dict(layout.field_attrs.get(name, {})))
    ds["mask"] = (("series", "y", "x"), np.asarray(mask.values, dtype=bool))
    # Written now, every chunk: a `done` chunk missing later was deleted (store.py, integrity).
    ds["done"] = (("series", "init"), np.zeros((n_series, n_init), dtype=bool))
    ds.attrs.update(jsonable(layout.attrs))
    ds.attrs.update({
        "dyf_format": FORMAT,
        "dyf_format_version": FORMAT_VERSION,
        "dyf_fields": list(layout.fields),
        "dyf_identity": jsonable(layout.identity),
        "dyf_complete": False,
        "dyf_version": __version__,
        "dyf_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return ds, chunks


def _coordinate_attrs(ds, layout: ForecastLayout) -> None:
    """CF attributes of the coordinates only this module knows the meaning of (`attrs.for_writing` adds
    the generic ones when the store is written): numeric times take the data store's time units."""
    ds["member"].attrs.update(long_name="ensemble member")
    ds["lead"].attrs.update(long_name="lead time in data time steps", units="1")
    ds["init_time"].attrs.update(long_name="time of the initial condition")
    ds["valid_time"].attrs.update(long_name="time the forecast is valid for")
    lead_time = ds["lead_time"]
    if np.issubdtype(lead_time.dtype, np.timedelta64):
        return
    if np.issubdtype(ds["init_time"].dtype, np.datetime64):  # calendar steps (months): counts of steps
        step = layout.attrs.get("dyf_time_step")
        lead_time.attrs.update(units="1", long_name=f"forecast lead time in steps of {step}")
        return
    units = layout.time_units or "1"
    for name in ("init_time", "valid_time"):
        ds[name].attrs["units"] = units
    lead_time.attrs["units"] = units.split(" since ")[0]


def create(path: Path, layout: ForecastLayout) -> None:
    """Create the full, empty schema at `path`, replacing an older dyf forecast store only.

    The schema is built in a dyf-marked staging folder and renamed into place, so a kill at any point
    leaves either no store (the staging folder is dyf's and the next run removes it) or a whole one that
    the same command continues.
    """
    path = Path(path)
    staging = outputs.new_staging(outputs.staging_path(path))
    _write_schema(staging, layout)
    fault_point("forecast.schema_staged")
    outputs.unmark_staging(staging)
    outputs.move_into_place(staging, path, outputs.FORECAST)


def _write_schema(path: Path, layout: ForecastLayout) -> None:
    """Coordinates, mask and empty arrays (mode "a": keeps the staging marker)."""
    ds, chunks = _dataset(layout)
    encoding = {name: {"chunks": chunks, "fill_value": np.nan} for name in layout.fields}
    encoding["done"] = {"chunks": (1, 1), "fill_value": False}
    encoding = checksummed(ds, encoding)  # crc32c on every chunk, every chunk written (store.py, integrity)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CONSOLIDATED_WARNING)
        for_writing(ds).to_zarr(path, mode="a", compute=False, encoding=encoding, consolidated=True)


class BlockWriter:
    """Region-writes `(series, init)` blocks into an existing forecast store."""

    def __init__(self, path: Path):
        import zarr

        self.path = Path(path)
        with read_errors(self.path, "its metadata", FIX):
            self._group = zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
            self.fields = list(decode(self._group.attrs.asdict())["dyf_fields"])
        self._targets = None  # [(array, chunk files or None)] of the fields and `done`, on the first write

    def done(self) -> np.ndarray:
        """`(series, init)` bool: which blocks are already written.

        A block marked done whose field chunk is missing (deleted) counts as not done, so that a resume
        writes it again instead of leaving fill values in a store marked complete.
        """
        with read_errors(self.path, "'done'", FIX):
            done = np.asarray(self._group["done"][...], dtype=bool)
        for name in self.fields:
            with read_errors(self.path, f"the metadata of {name!r}", FIX):
                array = self._group[name]
            for position in missing_chunks(array, _block_positions(done, array.ndim)):
                done[position[:2]] = False
        return done

    def write(self, series_position: int, init_position: int, block: np.ndarray) -> None:
        """Write one block `(member, lead, channel, y, x)` float32, physical units, then mark it done.

        A block is one chunk of every field (`_dataset`), so its chunk files are written directly where
        the store allows it (`chunks.whole_chunk_files`, the same bytes as zarr writes), else through zarr."""
        if self._targets is None:
            self._targets = [self._target(name) for name in (*self.fields, "done")]
        *fields, done = self._targets
        for channel, (array, files) in enumerate(fields):
            values = block[:, :, channel].astype(np.float32)
            if files is None:
                array[series_position, init_position] = values
            else:
                files.write((series_position, init_position, 0, 0, 0, 0), values[None, None])
        # Marked after the data so a crash between the two re-computes the block instead of losing it.
        array, files = done
        if files is None:
            array[series_position, init_position] = True
        else:
            files.write((series_position, init_position), np.ones((1, 1), dtype=bool))

    def _target(self, name: str) -> tuple:
        """(zarr array, its `WholeChunkFiles` or None), opened once per writer."""
        with read_errors(self.path, f"the metadata of {name!r}", FIX):
            array = self._group[name]
        return array, whole_chunk_files(array)


class BackgroundWriter:
    """Writes blocks on one worker thread while the caller computes the next ones.

    `write(*args)` hands `args` to `writer.write` on the worker and returns at once unless `depth` blocks
    are already waiting (memory stays bounded to `depth` + 1 blocks). Blocks are written in order, each
    marked done by `writer` after its data. Leaving the `with` block (also by an exception or a stop
    signal) waits until every handed block is written; the first write error is raised by the next
    `write` or on leaving (unless another exception is already on its way out), and no block after it
    is written.
    """

    def __init__(self, writer, depth: int = 1):
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="dyf-block-writer", daemon=True)
        self._thread.start()

    def write(self, *args) -> None:
        self._raise_error()
        self._queue.put(args)

    def close(self) -> None:
        """Wait for every handed block; raise the first write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the exception already leaving the block is the one to report
            pass

    def _work(self) -> None:
        while (args := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write(*args)
                except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                    self._error = err

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def read_attrs(path: Path) -> dict | None:
    """The attributes of an existing forecast store (`dyf_identity`, `dyf_complete`, ...), or None when
    `path` is not one."""
    import zarr

    try:
        attrs = decode(zarr.open_group(str(path), mode="r").attrs.asdict())
    except Exception:  # noqa: BLE001 - anything unreadable is "not a forecast store"
        return None
    return attrs if attrs.get("dyf_format") == FORMAT else None


# ----------------------------------------------------------------------------------------------- the truth

def truth_attrs(truth: Path | str, out: Path | str) -> dict:
    """`dyf_truth` and `dyf_truth_absolute` for a forecast at `out` made from the data store `truth`.

    `dyf_truth` is relative to the forecast store's folder when the two share a folder below the
    filesystem root (`../data/s.zarr`), so a project folder copied or moved elsewhere as a whole still
    finds its data; `dyf_truth_absolute` is where the store was when the forecast was made (the fallback
    for a forecast copied alone, on the same machine).
    """
    truth = Path(truth).resolve()
    folder = Path(out).absolute().parent.resolve()
    shared = Path(os.path.commonpath([truth, folder]))
    recorded = os.path.relpath(truth, folder) if shared != Path(shared.anchor) else str(truth)
    return {"dyf_truth": recorded, "dyf_truth_absolute": str(truth)}


def truth_candidates(attrs: dict, path: Path | str) -> list[Path]:
    """Where the data store of the forecast at `path` may be, most likely first: `dyf_truth` (a relative
    one taken from the forecast store's folder), then `dyf_truth_absolute`. Empty when none is recorded."""
    candidates = []
    recorded = attrs.get("dyf_truth")
    if recorded:
        recorded = Path(recorded)
        candidates.append(recorded if recorded.is_absolute() else (Path(path).absolute().parent / recorded).resolve())
    absolute = attrs.get("dyf_truth_absolute")
    if absolute and Path(absolute) not in candidates:
        candidates.append(Path(absolute))
    return candidates


def truth_path(attrs: dict, path: Path | str) -> Path:
    """The data store the forecast at `path` was made from, found through `truth_candidates`.

    DataError (exit 4) when none of the recorded places holds it (a forecast copied to another machine):
    the message names them and the fix, `--truth STORE`.
    """
    candidates = truth_candidates(attrs, path)
    if not candidates:
        raise DataError(f"{path} does not record its data store (dyf_truth); pass --truth STORE")
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = " or ".join(str(candidate) for candidate in candidates)
    raise DataError(f"the data store of {path} is not at {tried} (recorded as dyf_truth); "
                    "pass --truth STORE")


def mark_complete(path: Path, extra_attrs: dict | None = None) -> None:
    """Set `dyf_complete` (after checking every block is done) and re-consolidate the metadata."""
    import zarr

    with read_errors(path, "'done'", FIX):
        group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        done = np.asarray(group["done"][...], dtype=bool)
    if not done.all():
        raise DataError(f"{path}: {int((~done).sum())} of {done.size} blocks are not written; "
                        "re-run the same `dyf forecast` command to write them")
    group.attrs.update(encode({**decode(group.attrs.asdict()), **(extra_attrs or {}), "dyf_complete": True,
                               "dyf_completed": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CONSOLIDATED_WARNING)
        zarr.consolidate_metadata(str(path))


# ----------------------------------------------------------------------------------------------- reading

@dataclass
class ForecastStore:
    """An opened, validated, complete forecast store. `ds` holds every array but the fields in memory;
    the fields are lazy (Dask-backed)."""

    path: Path
    ds: object  # xr.Dataset

    @property
    def fields(self) -> list[str]:
        return list(self.ds.attrs["dyf_fields"])

    @property
    def truth(self) -> Path:
        """The data store the forecast was started from (`truth_path`: relative to the store's folder, else
        the absolute fallback); DataError naming `--truth STORE` when it is not found."""
        return truth_path(self.ds.attrs, self.path)

    @property
    def members(self) -> int:
        return int(self.ds.sizes["member"])


def _open_dataset(path: Path, check: bool = True):
    """Open and check the format; with `check`, read every array but the fields (checksums checked) and
    refuse a missing chunk file: of any array but the fields, and of the fields in every block marked done."""
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise DataError(f"forecast store {path} does not exist; create one with `dyf forecast`")
    try:
        ds = xr.open_zarr(path, consolidated=None, chunks={})
    except Exception as err:  # noqa: BLE001 - zarr raises many types for a broken store
        raise DataError(f"{path} is not a readable Zarr store ({type(err).__name__}: {err}); "
                        "re-create it with `dyf forecast`") from None
    decoded(ds)  # JSON-encoded attributes back to values (stores before that: unchanged)
    if ds.attrs.get("dyf_format") != FORMAT:
        raise DataError(f"{path} is not a dyf forecast store (dyf_format={ds.attrs.get('dyf_format')!r}); "
                        "create one with `dyf forecast`")
    if int(ds.attrs.get("dyf_format_version", 0)) > FORMAT_VERSION:
        raise DataError(f"{path} was written by a newer dyf (format {ds.attrs['dyf_format_version']}); upgrade dyf")
    if not check:
        return ds
    load_small_arrays(ds, path, FIX)  # in place: later reads come from memory
    if "done" in ds.variables:
        done = np.asarray(ds["done"].values, dtype=bool)
        check_chunks(path, ds.variables, FIX, _required_chunks(done, ds.attrs))
    return ds


def _required_chunks(done: np.ndarray, attrs: dict):
    """`required(name, array)` for `chunks.check_chunks`: field chunks of the blocks marked done; every chunk
    of the other arrays (of `done` only once the store is complete: older dyf wrote it block by block)."""
    fields = set(attrs.get("dyf_fields", []))
    complete = bool(attrs.get("dyf_complete", False))

    def required(name: str, array) -> list[tuple[int, ...]] | None:
        if name in fields:
            return _block_positions(done, array.ndim)
        if name == "done" and not complete:
            return []
        return None

    return required


def _block_positions(done: np.ndarray, ndim: int) -> list[tuple[int, ...]]:
    """Chunk grid positions of the done blocks in a field array (one chunk per `(series, init)` block)."""
    return [(int(s), int(i)) + (0,) * (ndim - 2) for s, i in zip(*np.nonzero(done))]


def verify(path: Path | str) -> dict:
    """Read every chunk a forecast store must have (`dyf inspect --verify`); DataError listing damage."""
    path = Path(path)
    ds = _open_dataset(path, check=False)  # damage is listed by verify_chunks, not refused one by one
    try:
        done = np.asarray(open_array(path, "done")[...], dtype=bool)
    except Exception:  # noqa: BLE001 - `done` is damaged (listed below): check every block of a complete store
        done = np.full(ds["done"].shape, bool(ds.attrs.get("dyf_complete", False)))
    return verify_chunks(path, sorted(ds.variables), FIX, _required_chunks(done, ds.attrs))


def open_forecast(path: Path | str) -> ForecastStore:
    """Open a complete forecast store; DataError (exit 4) if it is not one or is unfinished."""
    path = Path(path)
    ds = _open_dataset(path)
    if not ds.attrs.get("dyf_complete", False):
        raise DataError(f"{path} is incomplete (a forecast was interrupted); re-run the same "
                        "`dyf forecast` command to finish it (it continues where it stopped)")
    for name in ds.attrs.get("dyf_fields", []):
        if name not in ds.data_vars or tuple(ds[name].dims) != FIELD_DIMS:
            raise DataError(f"{path}: field {name!r} is missing or not {FIELD_DIMS}; re-run `dyf forecast`")
    return ForecastStore(path, ds)


def describe(path: Path | str) -> dict:
    """A JSON-ready summary for `dyf inspect` (works on incomplete stores too)."""
    path = Path(path)
    ds = _open_dataset(path)
    done = np.asarray(ds["done"].values, dtype=bool)  # in memory (read by _open_dataset)
    init_time = ds["init_time"].values
    attrs = ds.attrs
    return {
        "kind": "forecast",
        "path": str(path),
        "complete": bool(attrs.get("dyf_complete", False)),
        "blocks": {"done": int(done.sum()), "total": int(done.size)},
        "fields": {name: {"units": ds[name].attrs.get("units")} for name in attrs.get("dyf_fields", [])},
        "sizes": {dim: int(size) for dim, size in ds.sizes.items()},
        "init_time": {"first": str(init_time[0]), "last": str(init_time[-1]), "count": int(len(init_time))}
        if len(init_time) else None,
        "lead": [float(v) for v in ds["lead"].values[:1000]],
        "truth": attrs.get("dyf_truth"),
        "truth_absolute": attrs.get("dyf_truth_absolute"),
        "checkpoint": attrs.get("dyf_checkpoint"),
        "checkpoint_sha256": attrs.get("dyf_checkpoint_sha256"),
        "method": attrs.get("dyf_method"),
        "seed": attrs.get("dyf_seed"),
        "schedule": attrs.get("dyf_schedule"),
        "network_calls": attrs.get("dyf_network_calls"),
        "created": attrs.get("dyf_created"),
        "dyf_version": attrs.get("dyf_version"),
    }


def jsonable(value):
    """Zarr attributes must be JSON: turn numpy scalars, paths and tuples into plain values."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
