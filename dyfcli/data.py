"""Training windows from a data store, and the normalisation that goes with them.

`Normalizer` holds the store's training-split statistics in memory (float32) and standardises arrays or
tensors shaped `(T, C, Y, X)`; it travels inside checkpoints through `get_state` / `from_state`.

`WindowDataset` serves windows of `length` consecutive time steps of one series within one split, the
DYffusion example `(x_0, x_1, ..., x_h)` with `length = h + 1`. It never materialises the store (the
reference code holds 9-17 GB in RAM for SST): each DataLoader worker opens the Zarr arrays itself on its
first item, without Dask, and reads one slice per field per window.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dyfcli.errors import ConfigError, DataError, DyfError, UsageError
from dyfcli.chunks import check_crc32c, chunk_file_folder, read_errors
from dyfcli.store import DataStore, open_store

DAYS_IN_LEAP_YEAR = 366
CHUNK_CACHE_BYTES = 32 * 2**20  # decoded chunks kept per field and process


# ----------------------------------------------------------------------------------------- normalisation

@dataclass(frozen=True, eq=False)
class Normalizer:
    """Standardise with training-split statistics: `(x - mean) / std`, per field (channel).

    Statistics are float32, laid out so that indexing gives `(C, Y, X)` or `(T, C, Y, X)` directly:
    `global`: `(C,)`; `pixel`: `(S, C, Y, X)`; `pixel-dayofyear`: `(366, S, C, Y, X)` (row d-1 is day d).
    `time_dayofyear` `(T,)` is the day of year (1..366, xarray's `time.dt.dayofyear`) of each store time
    index; it is only needed by `normalize`/`denormalize` in `pixel-dayofyear` mode.
    `none`: the identity (raw units, as the official code trains the simulated systems); its state holds
    mean 0 and std 1 `(C,)`, and the store's own statistics are not used.
    """

    mode: str
    fields: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    time_dayofyear: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "std", _safe_std(np.asarray(self.std, dtype=np.float32)))
        object.__setattr__(self, "mean", np.asarray(self.mean, dtype=np.float32))

    @classmethod
    def from_store(cls, store: DataStore) -> Normalizer:
        """Stack the `stats_mean_<field>` / `stats_std_<field>` arrays of an opened store (`open_store`
        read them into memory, checksums checked)."""
        mode = store.normalization
        if mode == "none":
            count = len(store.fields)
            return cls(mode, tuple(store.fields), np.zeros(count, np.float32), np.ones(count, np.float32))
        channel_axis = {"global": 0, "pixel": 1, "pixel-dayofyear": 2}[mode]

        def stacked(stat: str) -> np.ndarray:
            arrays = [np.asarray(store.ds[f"stats_{stat}_{name}"].values, dtype=np.float32)
                      for name in store.fields]
            return np.stack(arrays, axis=channel_axis)

        mean, std = stacked("mean"), stacked("std")
        if mode == "pixel-dayofyear" and mean.shape[0] != DAYS_IN_LEAP_YEAR:
            raise DataError(f"{store.path}: the dayofyear statistics have {mean.shape[0]} rows, expected "
                            f"{DAYS_IN_LEAP_YEAR}; re-run `dyf prepare`")
        time_dayofyear = store_dayofyear(store) if mode == "pixel-dayofyear" else None
        return cls(mode, tuple(store.fields), mean, std, time_dayofyear)

    def get_state(self) -> dict:
        """Plain tensors and strings for a checkpoint (loadable with `torch.load(weights_only=True)`)."""
        return {"mode": self.mode, "fields": list(self.fields),
                "mean": torch.from_numpy(self.mean.copy()), "std": torch.from_numpy(self.std.copy())}

    @classmethod
    def from_state(cls, state: dict, time_dayofyear: np.ndarray | None = None) -> Normalizer:
        """Rebuild from `get_state()`; pass `time_dayofyear` to use `normalize` with store time indices."""
        mean, std = (state[key].cpu().numpy() if torch.is_tensor(state[key]) else state[key] for key in ("mean", "std"))
        return cls(str(state["mode"]), tuple(state["fields"]), mean, std, time_dayofyear)

    # --- using store time indices

    def normalize(self, x, series_index, time_index):
        """`x` `(T, C, Y, X)` array or tensor in physical units -> standardised, same type and shape.

        `series_index`: int or int array `(T,)`; `time_index`: int array `(T,)` of store time indices.
        """
        return self.normalize_at(x, series_index, self._dayofyear(time_index))

    def denormalize(self, x, series_index, time_index):
        """Inverse of `normalize`."""
        return self.denormalize_at(x, series_index, self._dayofyear(time_index))

    # --- using explicit days of year (valid times beyond the store)

    def normalize_at(self, x, series_index, dayofyear=None):
        """Like `normalize`, with `dayofyear` `(T,)` (1..366) given; ignored unless `pixel-dayofyear`."""
        mean, std = self._stats(x, series_index, dayofyear)
        return (x - mean) / std

    def denormalize_at(self, x, series_index, dayofyear=None):
        """Inverse of `normalize_at`."""
        mean, std = self._stats(x, series_index, dayofyear)
        return x * std + mean

    # --- internals

    def _dayofyear(self, time_index) -> np.ndarray | None:
        if self.mode != "pixel-dayofyear":
            return None
        if self.time_dayofyear is None:
            raise DataError("this day-of-year normaliser was restored without the store's time axis; "
                            "pass time_dayofyear to Normalizer.from_state or use normalize_at")
        return self.time_dayofyear[np.asarray(time_index)]

    def _stats(self, x, series_index, dayofyear) -> tuple:
        """Mean and std broadcastable against `x` `(T, C, Y, X)`, as the type of `x`."""
        if self.mode in ("global", "none"):  # none: mean 0, std 1, so x comes back exactly (a new array)
            mean, std = self.mean[None, :, None, None], self.std[None, :, None, None]
        elif self.mode == "pixel":
            mean, std = self.mean[series_index], self.std[series_index]
        else:
            if dayofyear is None:
                raise DataError("pixel-dayofyear normalisation needs the day of year of every time step")
            row = np.asarray(dayofyear, dtype=np.int64) - 1
            if row.size and (row.min() < 0 or row.max() >= DAYS_IN_LEAP_YEAR):
                raise DataError(f"day of year must lie in 1..{DAYS_IN_LEAP_YEAR}, got {row.min() + 1}..{row.max() + 1}")
            mean, std = self.mean[row, series_index], self.std[row, series_index]
        if torch.is_tensor(x):
            return (torch.as_tensor(mean, dtype=x.dtype, device=x.device),
                    torch.as_tensor(std, dtype=x.dtype, device=x.device))
        return mean, std


def _safe_std(std: np.ndarray) -> np.ndarray:
    # A point that never varied in training would divide by zero; leave it unscaled instead.
    # NaN (no training data there, e.g. land) stays NaN: such points are filled after normalisation.
    return np.where(std == 0, np.float32(1), std).astype(np.float32)


def store_dayofyear(store: DataStore) -> np.ndarray:
    """Day of year (1..366) of every store time step, int16 `(T,)`."""
    if not store.is_dated:
        raise DataError(f"{store.path} uses pixel-dayofyear normalisation but its time axis is not dated; "
                        "re-run `dyf prepare` with another normalisation")
    return store.ds["time"].dt.dayofyear.values.astype(np.int16)


# ----------------------------------------------------------------------------------------------- calendar

CALENDAR_PERIODS = {"dayofyear": 365.25, "hourofday": 24.0}  # the `data.calendar` features and their periods


def calendar_features(times: np.ndarray, names: tuple[str, ...] | list[str]) -> np.ndarray:
    """`(N, 2 * len(names))` float32: `[sin, cos](2 pi value / period)` per name, in `names` order.

    `times` `(N,)` datetime64. `dayofyear` is 1..366 (xarray's `time.dt.dayofyear`) over 365.25 days;
    `hourofday` is the fractional hour (hour + minutes / 60 + seconds / 3600) over 24 hours.
    """
    import pandas as pd

    index = pd.DatetimeIndex(np.asarray(times).ravel())
    values = {"dayofyear": index.day_of_year.to_numpy(np.float64),
              "hourofday": index.hour + index.minute / 60.0 + index.second / 3600.0}
    columns = []
    for name in names:
        angle = 2.0 * np.pi * np.asarray(values[name], dtype=np.float64) / CALENDAR_PERIODS[name]
        columns += [np.sin(angle), np.cos(angle)]
    return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((len(index), 0), np.float32)


def calendar_problem(store: DataStore, names: tuple[str, ...] | list[str], *, training: bool) -> str | None:
    """Why `store` cannot give the calendar channels `names` (None when it can); callers raise their error.

    Calendar channels come from dates: an undated store (simulation times) cannot give them. When
    `training`, `hourofday` is also refused on a store whose steps all fall at the same time of day
    (daily or coarser data): the channels would be constant, a model input that carries nothing.
    """
    if not names:
        return None
    if not store.is_dated:
        return (f"data.calendar {list(names)} needs dated time steps, and {store.path} has simulation times; "
                "remove data.calendar or use a dated store")
    times = np.asarray(store.ds["time"].values)
    time_of_day = times - times.astype("datetime64[D]")
    if training and "hourofday" in names and len(np.unique(time_of_day)) == 1:
        return (f"data.calendar has hourofday, but every time step of {store.path} falls at the same time of "
                "day (daily or coarser data), so those channels would be constant; remove hourofday")
    return None


# ----------------------------------------------------------------------------------------------- windows

def window_starts(ranges: list[tuple[int, int, int]], length: int, stride: int = 1) -> np.ndarray:
    """`(series_index, start)` int64 `(N, 2)` of every window of `length` steps inside each half-open range.

    A range `[start, stop)` of n steps holds `(n - length) // stride + 1` windows (none if n < length),
    so windows never cross a series or split boundary.
    """
    blocks = [np.stack([np.full(len(firsts), series), firsts], axis=1)
              for series, start, stop in ranges
              if len(firsts := np.arange(start, stop - length + 1, stride, dtype=np.int64))]
    return np.concatenate(blocks).astype(np.int64) if blocks else np.zeros((0, 2), dtype=np.int64)


class WindowDataset(torch.utils.data.Dataset):
    """Windows of `length` consecutive, normalised time steps of one series within one split.

    Item `i` -> `{"dynamics": float32 (length, C, Y, X), "condition": float32 (C_cond, Y, X),
    "series": int, "start": int}` with fields in the store's `dyf_fields` order, NaN (invalid points)
    set to 0 after normalisation, and the condition = the static `cond_*` fields in sorted-name order,
    then the `calendar` channels (`calendar_features`, constant over the grid) of the window's first
    time step: the input state x0, as in forecasting, where each window starts from a known time.
    `windows[i]` is `(series_index, start)` with `start` a store time index.
    """

    def __init__(self, store_path: Path | str, split: str, length: int, stride: int = 1,
                 calendar: tuple[str, ...] = ()):
        if length < 1 or stride < 1:
            raise UsageError(f"window length ({length}) and stride ({stride}) must be at least 1")
        store = open_store(store_path)
        self.store_path = Path(store_path)
        self.split, self.length, self.stride = split, int(length), int(stride)
        self.fields = store.fields
        self.cond_names = store.cond_names
        self.grid = store.grid
        self.normalizer = Normalizer.from_store(store)
        ranges = store.split_ranges(split)
        self.windows = window_starts(ranges, self.length, self.stride)
        if len(self.windows) == 0:
            longest = max((stop - start for _, start, stop in ranges), default=0)
            raise DataError(f"the {split!r} split of {self.store_path} has no window of {length} consecutive "
                            f"steps (its longest series there has {longest}); use a shorter horizon or "
                            "re-run `dyf prepare` with a longer split")
        self.condition = _load_condition(store)
        self.calendar = tuple(calendar)
        problem = calendar_problem(store, self.calendar, training=True)
        if problem:
            raise ConfigError(problem)
        self._calendar = calendar_features(store.ds["time"].values, self.calendar) if self.calendar else None
        self._arrays: list | None = None
        self._opened_by: int | None = None

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def condition_channels(self) -> int:
        """C_cond of an item's condition: static fields plus calendar channels."""
        return len(self.cond_names) + (0 if self._calendar is None else self._calendar.shape[1])

    def __getitem__(self, index: int) -> dict:
        series, start = (int(v) for v in self.windows[index])
        stop = start + self.length
        dynamics = np.empty((self.length, len(self.fields), *self.grid), dtype=np.float32)
        with read_errors(self.store_path, f"the fields of series {series}, time steps {start}-{stop - 1}"):
            for channel, array in enumerate(self._open()):
                dynamics[:, channel] = array[series, start:stop]
        dynamics = self.normalizer.normalize(dynamics, series, np.arange(start, stop))
        dynamics[np.isnan(dynamics)] = 0.0
        return {"dynamics": torch.from_numpy(dynamics), "condition": torch.from_numpy(self._condition(series, start)),
                "series": series, "start": start}

    def _condition(self, series: int, start: int) -> np.ndarray:
        if self._calendar is None:
            return self.condition[series]
        calendar = np.broadcast_to(self._calendar[start][:, None, None], (self._calendar.shape[1], *self.grid))
        return np.concatenate([self.condition[series], calendar])

    def _open(self) -> list:
        """The Zarr arrays of the fields, opened once per process (DataLoader workers open their own)."""
        if self._arrays is None or self._opened_by != os.getpid():
            import zarr

            group = zarr.open_group(str(self.store_path), mode="r")
            self._arrays = [chunk_reader(group[name]) for name in self.fields]
            self._opened_by = os.getpid()
        return self._arrays

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"], state["_opened_by"] = None, None
        return state


def loader_batches(loader: torch.utils.data.DataLoader) -> Iterator:
    """Iterate `loader`; when a batch fails, stop its worker processes and re-raise a dyf error as sent.

    Torch re-raises a worker's exception with the worker's traceback folded into the message, which
    would reach the user as a traceback: the one-line message is taken back out. The workers ignore
    SIGTERM (`runtime.ignore_stop_signals`), so workers left running would keep the process from ever
    exiting; they are shut down before the error leaves.
    """
    iterator = iter(loader)
    try:
        yield from iterator
    except DyfError as err:
        message = _worker_message(err.message)
        if message == err.message:
            raise  # raised here, not in a worker
        raise type(err)(message) from None
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()


def _worker_message(message: str) -> str:
    """The original one-line message of "Caught X in DataLoader worker N. Original Traceback ... X: msg"."""
    if not message.startswith("Caught ") or "Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _load_condition(store: DataStore) -> np.ndarray:
    """Static conditioning `(S, C_cond, Y, X)` float32 with NaN -> 0 (small: no time axis)."""
    series = int(store.ds.sizes["series"])
    if not store.cond_names:
        return np.zeros((series, 0, *store.grid), dtype=np.float32)
    condition = np.stack([np.asarray(store.ds[name].values, dtype=np.float32) for name in store.cond_names], axis=1)
    return np.nan_to_num(condition, nan=0.0)


# ------------------------------------------------------------------------------------------ chunk reads

class ChunkFileReader:
    """`reader[series, start:stop]` for a local, unsharded Zarr v3 array chunked `(1, k, Y, X)`.

    zarr-python 3 costs about 0.8 ms per indexing call plus 0.4 ms per chunk (event-loop hop and async
    codec pipeline), i.e. ~3.5 ms for an 8-step window at one step per chunk. Reading the chunk files
    and decoding them here costs ~0.1 ms. dyf writes every chunk, so a missing chunk file is damage
    (FileNotFoundError, as a failed checksum is a ValueError; readers map both with `chunks.read_errors`),
    never fill values. The most recent chunks (up to `cache_bytes`) are kept decoded; the store is
    read-only while training. `chunk_reader` falls back to the zarr array for any other layout.
    """

    def __init__(self, array, root: Path, decode, cache_bytes: int = CHUNK_CACHE_BYTES):
        self.shape, self.chunks = tuple(array.shape), tuple(array.chunks)
        self.dtype = np.dtype(array.dtype).newbyteorder("<" if decode.little_endian else ">")
        self.encode_key = array.metadata.encode_chunk_key
        self.root = root
        self.decode = decode
        # Long chunks (a whole 805-step spring-mesh trajectory) serve many windows: keep recent ones.
        chunk_bytes = self.dtype.itemsize * math.prod(self.chunks)
        self.cache_size = cache_bytes // chunk_bytes
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __getitem__(self, key: tuple) -> np.ndarray:
        series, steps = key
        start, stop = steps.start, min(steps.stop, self.shape[1])
        k = self.chunks[1]
        out = np.empty((stop - start, *self.shape[2:]), dtype=self.dtype.newbyteorder("="))
        for chunk in range(start // k, (stop - 1) // k + 1):
            block = self._chunk(series, chunk)
            lo, hi = max(start, chunk * k), min(stop, (chunk + 1) * k)
            out[lo - start:hi - start] = block[lo - chunk * k:hi - chunk * k]
        return out

    def _chunk(self, series: int, chunk: int) -> np.ndarray:
        key = (series, chunk)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        block = self._read(series, chunk)
        if self.cache_size:
            self.cache[key] = block
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return block

    def _read(self, series: int, chunk: int) -> np.ndarray:
        raw = (self.root / self.encode_key((series, chunk, 0, 0))).read_bytes()
        return np.frombuffer(self.decode(raw), dtype=self.dtype).reshape(self.chunks[1:])


class _Crc32cCheck:
    """Zarr's `crc32c` codec, decoding only: check (`chunks.check_crc32c`) and strip the chunk's trailing
    4-byte checksum."""

    def decode(self, raw: bytes) -> memoryview:
        check_crc32c(raw)
        return memoryview(raw)[:-4]


class _BytesDecoder:
    """Undo the bytes-to-bytes codecs of a Zarr v3 array, last first."""

    def __init__(self, codecs: list, little_endian: bool):
        self.codecs, self.little_endian = codecs, little_endian

    def __call__(self, raw: bytes) -> bytes:
        for codec in reversed(self.codecs):
            raw = codec.decode(raw)
        return raw


def chunk_reader(array):
    """A `ChunkFileReader` when the array's layout allows it, else the zarr array itself."""
    folder = chunk_file_folder(array)
    decode = _decoder_for(array) if folder is not None else None
    if decode is None:
        return array
    return ChunkFileReader(array, folder, decode)


def _decoder_for(array) -> _BytesDecoder | None:
    """The decoder of the codecs after `bytes` of an array `chunks.chunk_file_folder` accepts, or None for a
    codec dyf does not decode itself (zarr reads it)."""
    import numcodecs
    from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

    codecs = list(array.metadata.codecs)
    byte_codecs = []
    for codec in codecs[1:]:
        if isinstance(codec, ZstdCodec):
            byte_codecs.append(numcodecs.Zstd())
        elif isinstance(codec, GzipCodec):
            byte_codecs.append(numcodecs.GZip())
        elif isinstance(codec, BloscCodec):
            byte_codecs.append(numcodecs.Blosc())
        elif isinstance(codec, Crc32cCodec):
            byte_codecs.append(_Crc32cCheck())
        else:
            return None
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    return _BytesDecoder(byte_codecs, little_endian=endian != "big")
