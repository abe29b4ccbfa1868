"""Chunk integrity of every Zarr store dyf writes (data stores and forecast stores).

Every array ends its codec chain with a crc32c checksum, and every chunk is written, even one that holds only
the fill value (zarr skips those by default). So a chunk file that is missing was deleted, and one whose
bytes changed fails its checksum when read: readers refuse damage (exit 4) instead of reading it as fill
values. `check_chunks` finds missing chunk files when a store is opened (one `stat` each), `read_errors`
maps every failed read to a DataError in one place, and `verify_chunks` reads every chunk
(`dyf inspect --verify`). `chunk_writer` writes the chunk files of a field directly (prepare's bulk writes).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyfcli.errors import DataError, DyfError

log = logging.getLogger("dyf.chunks")

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


def load_small_arrays(ds, path: Path, fix: str = DATA_FIX) -> None:
    """Read every variable of an opened store but its fields (`dyf_fields`) into memory, in place, so later
    reads come from memory; their checksums are checked on the way.

    Read from a Dask-free view of the store: through Dask each chunk is one task, and a forecast store's
    `done` has one chunk per block (18 250 blocks: 15.4 s through Dask, 6.5 s here).
    """
    import xarray as xr

    fields = set(ds.attrs.get("dyf_fields", []))
    plain = None
    for name, variable in ds.variables.items():
        if name in fields or name in ds.indexes:  # dimension coordinates are in memory already
            continue
        with read_errors(path, repr(name), fix):
            if plain is None:
                plain = xr.open_zarr(path, consolidated=None, chunks=None)
            variable.data = plain[name].variable.values


# ------------------------------------------------------------------------------------------ chunk writes

class ChunkFileWriter:
    """`writer[:, start:stop] = values` for a local, unsharded Zarr v3 array chunked `(1, k, Y, X)` whose
    codecs are `bytes` (little-endian) then `crc32c`: each chunk file is the raw values followed by their
    CRC-32C, byte for byte as zarr writes it (`read_errors` readers and zarr verify it), for ~60 % of
    zarr-python's CPU time (its async codec pipeline): 14 600 chunks of 64 KB, a decade of 8 fields in
    benchmarks/prepare_netcdf.py, took 3.5 CPU s instead of 5.7 (the files are written by `WholeChunkFiles`).
    `start` must fall on a chunk boundary, `stop` too unless it is the end of the array: the last chunk is
    padded with the fill value, as zarr stores edge chunks.

    Not atomic per file: callers mark a block done only after its writes return (prepare's progress
    markers), so a chunk cut short by a kill is rewritten when the job resumes."""

    def __init__(self, array, files: WholeChunkFiles):
        self.shape, self.steps = tuple(array.shape), int(array.chunks[1])
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill = array.fill_value
        self.files = files  # the array's uncompressed `whole_chunk_files`

    def __setitem__(self, key: tuple[slice, slice], values: np.ndarray) -> None:
        series, steps = key
        start, stop = steps.start, steps.stop
        assert series == slice(None) and values.shape == (self.shape[0], stop - start, *self.shape[2:])
        assert start % self.steps == 0 and (stop % self.steps == 0 or stop == self.shape[1]), (start, stop)
        for index in range(self.shape[0]):
            for chunk in range(start // self.steps, -(-stop // self.steps)):
                first = chunk * self.steps - start
                self._write(index, chunk, values[index, first:first + self.steps])

    def _write(self, series: int, chunk: int, values: np.ndarray) -> None:
        if len(values) < self.steps:  # the last chunk of the array: full size, padded as zarr pads it
            padded = np.full((self.steps, *values.shape[1:]), self.fill, dtype=self.dtype)
            padded[:len(values)] = values
            values = padded
        self.files.write((series, chunk, 0, 0), values[None])


def chunk_file_folder(array) -> Path | None:
    """The folder of a field's chunk files when dyf may read or write them directly, else None: a Zarr v3
    array in a local store, 4-D, chunked `(1, k, Y, X)`, whose codecs start with `bytes` (so neither sharded
    nor transposed). Its codecs after `bytes` are the caller's to check (`data.chunk_reader`, `chunk_writer`)."""
    from zarr.codecs import BytesCodec

    metadata = array.metadata
    codecs = list(getattr(metadata, "codecs", None) or [])
    root = getattr(array.store, "root", None)
    if (getattr(metadata, "zarr_format", None) != 3 or not codecs or not isinstance(codecs[0], BytesCodec)
            or root is None or array.ndim != 4 or array.chunks[0] != 1
            or tuple(array.chunks[2:]) != tuple(array.shape[2:])):
        return None
    return Path(root) / array.path


def chunk_writer(array):
    """A `ChunkFileWriter` when the array is chunked `(1, k, Y, X)` (`chunk_file_folder`) and its chunks are
    written as files without compression (`whole_chunk_files`: codecs `bytes` little-endian, then `crc32c`),
    else the zarr array itself (same indexing)."""
    files = whole_chunk_files(array)
    if chunk_file_folder(array) is None or files is None or files.compressor is not None:
        return array
    return ChunkFileWriter(array, files)


CRC32C_RESIDUE = 0x48674BC7  # the CRC-32C of any bytes followed by their own little-endian CRC-32C


def check_crc32c(raw) -> None:
    """Raise ValueError unless `raw` (bytes or a uint8 array) ends with the little-endian CRC-32C of what
    precedes it, zarr's `crc32c` codec: the CRC of the whole chunk is then always `CRC32C_RESIDUE`, so it
    is checked in place, without copying the data out first (a third of the check's cost)."""
    import google_crc32c

    if len(raw) < 4 or google_crc32c.value(raw) != CRC32C_RESIDUE:
        raise ValueError("stored and computed crc32c checksums do not match")


class WholeChunkFiles:
    """`files.write(position, values)`: one whole chunk of a local Zarr v3 array written as its file, byte
    for byte as zarr writes it (`bytes`, then an optional `zstd`, then `crc32c`), without zarr's async codec
    pipeline: a forecast block's three chunk writes (two fields and `done`) took 30 ms through zarr on a
    loaded machine, most of a zero-cost forecast's time per block (benchmarks/sampler_overhead.py).

    `whole_chunk_files(array)` gives one, or None where the array's layout is any other (a remote or
    sharded store, other codecs): callers then write through zarr. Not atomic per file, as zarr's own
    writes: callers mark a block done only after its chunks are written."""

    def __init__(self, array, compressor):
        import google_crc32c

        self.chunk_shape = tuple(int(n) for n in array.chunks)
        self.dtype = np.dtype(array.dtype).newbyteorder("<") if np.dtype(array.dtype).itemsize > 1 \
            else np.dtype(array.dtype)
        self.root = os.path.join(str(array.store.root), array.path) if array.path else str(array.store.root)
        self.encode_key = array.metadata.encode_chunk_key
        self.compressor = compressor
        self.checksum = google_crc32c.value
        self.folders = {self.root}  # folders known to exist: each made once, with one mkdir

    def write(self, position: tuple[int, ...], values: np.ndarray) -> None:
        """Write the chunk at chunk-grid `position`; `values` must have the chunk's full shape."""
        if tuple(values.shape) != self.chunk_shape:
            raise ValueError(f"a whole chunk is {self.chunk_shape}, got {tuple(values.shape)}")
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        if self.compressor is not None:
            data = self.compressor.encode(data)
        path = os.path.join(self.root, self.encode_key(tuple(position)))
        self._make_folder(os.path.dirname(path))
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:  # os-level calls: a decade of 8 fields is 14 600 files, and Python's buffered files cost more
            checksum = self.checksum(data).to_bytes(4, "little")
            done = os.writev(handle, [data, checksum])
            rest = (data + checksum)[done:] if done < len(data) + 4 else b""
            while rest:  # a short write (a full disk): finish it, so that the error is raised
                rest = rest[os.write(handle, rest):]
        finally:
            os.close(handle)

    def _make_folder(self, folder: str) -> None:
        """Make `folder` and its missing parents (zarr's keys nest a folder per chunk index), remembering
        those made: two `mkdir` calls per chunk of a fresh store instead of a `stat` or failed `mkdir` for
        every level of every chunk."""
        parent = os.path.dirname(folder)
        if folder in self.folders or parent == folder:
            return
        self._make_folder(parent)
        try:
            os.mkdir(folder)
        except FileExistsError:  # written by an interrupted run that this one resumes
            pass
        self.folders.add(folder)


def whole_chunk_files(array) -> WholeChunkFiles | None:
    """A `WholeChunkFiles` for `array` when its chunks can be written as files (a local, unsharded Zarr v3
    array with codecs `bytes` (little-endian or none), optionally `zstd`, then `crc32c`), else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

    metadata = array.metadata
    codecs = list(getattr(metadata, "codecs", None) or [])
    root = getattr(array.store, "root", None)
    if getattr(metadata, "zarr_format", None) != 3 or root is None or len(codecs) not in (2, 3):
        return None
    first, *middle, last = codecs
    endian = getattr(getattr(first, "endian", None), "value", getattr(first, "endian", None))
    if not isinstance(first, BytesCodec) or endian == "big" or not isinstance(last, Crc32cCodec):
        return None
    compressor = None
    if middle:
        if not isinstance(middle[0], ZstdCodec):
            return None
        from numcodecs import Zstd

        compressor = Zstd(level=middle[0].level, checksum=middle[0].checksum)
    return WholeChunkFiles(array, compressor)
