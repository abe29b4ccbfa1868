"""`dyf evaluate`: score a forecast store against the truth in a data store (docs/design.md §6).

The workflow streams the forecast one `(series, init)` block at a time (and each block in slices of lead
times), so memory stays bounded however large the forecast store is. For every block it looks the truth
up at the valid times in the data store, builds the two reference forecasts, and feeds
`metrics.ScoreAccumulator`s:

- `persistence`: the truth at the initial time, repeated for every lead (a 1-member ensemble);
- `climatology`: the data store's training mean `stats_mean_<field>` (for day-of-year statistics the mean
  of the valid time's day of year), also a 1-member ensemble, so its CRPS is its MAE.

Options (`ScoreOptions`), each recorded in every output:

- weights: `coslat` (area weights, `area_weights`; the default where the data store has latitudes) or
  `none` (every valid point counts the same);
- units: `physical` (the store's units) or `standardized` (the errors divided by the store's training
  standard deviation at each point and valid time, i.e. the scores of the normalised fields the networks
  see, as the paper reports SST);
- ssr: `pooled` (the spread-skill ratio over all points of a lead) or `per-series`, which adds
  `ssr_per_series` (per series, then the plain mean over series: the paper's protocol for trajectories)
  next to the pooled `ssr`.

Besides every field, the row `all` pools the points of all fields per lead (the official code scores all
channels at once: the paper's single number per data set). For CRPS, MSE and the rank histogram that is
the mean over fields when the fields share their valid points; it is meaningful across fields of different
units only with `--units standardized`.

Outputs: a summary dict (JSON-ready, for `--json`), an xarray Dataset written as NetCDF, Zarr or CSV by
the extension of `--out`, and optional plots (`dyfcli.plots`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyfcli.errors import DataError, UsageError

log = logging.getLogger("dyf.evaluate")

REFERENCES = ("persistence", "climatology")
ALL_FIELDS = "all"  # the row that pools every field
WEIGHTS = ("coslat", "none")
UNITS = ("physical", "standardized")
SSR_MODES = ("pooled", "per-series")
# Float64 elements per slice of one block (members x leads x points): bounds the working memory.
SLICE_ELEMENTS = int(os.environ.get("DYF_EVALUATE_SLICE_ELEMENTS", 4_000_000))
OUTPUT_SUFFIXES = (".nc", ".zarr", ".csv")
# Intra-op torch threads for scoring on a GPU host. OpenMP threads that spin-wait on a busy machine made
# the kernels ten times slower; one thread per process is the safe default.
SCORE_THREADS = int(os.environ.get("DYF_EVALUATE_THREADS", 1))
# Worker threads that read blocks and compute their point-wise values (zarr's decompression and numpy's
# kernels release the GIL); the main thread adds them up in block order, so the scores do not depend on
# this number. Memory: about workers + 2 blocks.
SCORE_WORKERS = int(os.environ.get("DYF_EVALUATE_WORKERS", min(8, len(os.sched_getaffinity(0)))))


# ----------------------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class ScoreOptions:
    """How to score: `weights` None = `coslat` where the data store has latitudes, else `none`."""

    weights: str | None = None
    units: str = "physical"
    ssr: str = "pooled"

    def check(self) -> None:
        for flag, value, choices in (("--weights", self.weights, WEIGHTS), ("--units", self.units, UNITS),
                                     ("--ssr", self.ssr, SSR_MODES)):
            if value is not None and value not in choices:
                raise UsageError(f"{flag} {value}: choose one of {', '.join(choices)}")


# ----------------------------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """The opened forecast and truth, checked against each other."""

    forecast: object  # lazy xr.Dataset without Dask: reads only what is indexed
    truth: object  # xr.Dataset without Dask
    truth_path: Path
    fields: list[str]
    normalization: str
    series_index: list[int]  # truth series index of each forecast series
    time_index: np.ndarray  # (init, lead) truth time index of each valid time, -1 where there is none
    init_index: np.ndarray  # (init,) truth time index of each initial time
    leads: np.ndarray  # indices of the forecast leads that have truth everywhere
    mask: np.ndarray  # (series, y, x) bool
    forecast_path: Path | None = None
    weights: np.ndarray | None = None  # (series, y, x) float64 area weights, None for `none`
    block_files: dict | None = None  # {field: BlockFiles} where its blocks are read from the chunk files


def open_inputs(forecast_path: Path, truth_path: Path | None, allow_other_truth: bool = False) -> Inputs:
    """Open both stores and check that they describe the same fields, grid, series and times, and that the
    truth is the data store the forecast was made from (unless `allow_other_truth`)."""
    from dyfcli.forecast_store import open_forecast
    from dyfcli.store import open_store

    opened = open_forecast(forecast_path)  # validates: a complete, undamaged dyf forecast store
    forecast = _fields_without_dask(opened.ds, opened.path, opened.fields)
    truth_path = _truth_path(forecast, Path(forecast_path), truth_path)
    store = open_store(truth_path)  # validates: a finished, undamaged dyf data store
    _check_same_truth(forecast, Path(forecast_path), store, allow_other_truth)
    _check_fields_and_grid(opened.fields, forecast, store)
    truth = _fields_without_dask(store.ds, truth_path, store.fields)
    series_index = _match_series(forecast, truth, truth_path)
    mask = truth["mask"].values[series_index].astype(bool)
    if "mask" in forecast.variables and not np.array_equal(forecast["mask"].values.astype(bool), mask):
        raise DataError(f"the forecast's mask differs from the data store {truth_path}'s; "
                        "pass the --truth store the forecast was made from")
    time_index, init_index, leads = _match_valid_times(forecast, truth["time"].values, truth_path)
    return Inputs(forecast, truth, truth_path, opened.fields, store.normalization, series_index,
                  time_index, init_index, leads, mask, Path(forecast_path),
                  block_files=_block_files(Path(forecast_path), opened.fields))


def _fields_without_dask(ds, path: Path, fields: list[str]):
    """`ds` (its small arrays in memory, read and checked when opened) with the fields re-opened without
    Dask: a read of one `(series, init)` block is one chunk, with no task graph per read."""
    import xarray as xr

    lazy = xr.open_zarr(path, consolidated=None, chunks=None)
    return ds.assign({name: lazy[name] for name in fields})


def _check_same_truth(forecast, forecast_path: Path, store, allow_other_truth: bool) -> None:
    """Refuse a data store other than the one the forecast started from (another seed, another region of
    the same schema would score without a word), unless told to."""
    from dyfcli.store import store_id

    recorded = forecast.attrs.get("dyf_truth_id")
    if recorded is None:
        log.debug("%s records no identity of its data store (an older dyf): not checked", forecast_path)
        return
    if recorded == store_id(store):
        return
    if allow_other_truth:
        log.warning("scoring %s against %s, which is not the data store it was made from (%s)",
                    forecast_path, store.path, forecast.attrs.get("dyf_truth"))
        return
    raise DataError(f"{store.path} is not the data store {forecast_path} was made from "
                    f"({forecast.attrs.get('dyf_truth')}, id {recorded}; this one has id {store_id(store)}); "
                    "pass that store as --truth, or add --allow-other-truth to score against this one")


def _truth_path(forecast, forecast_path: Path, given: Path | None) -> Path:
    """--truth, else the store the forecast records (`forecast_store.truth_path`: `dyf_truth` relative to
    the forecast's folder, then `dyf_truth_absolute`); DataError naming --truth when neither exists."""
    from dyfcli.forecast_store import truth_path

    if given is not None:
        return Path(given)
    return truth_path(forecast.attrs, forecast_path)


def _check_fields_and_grid(fields: list[str], forecast, store) -> None:
    missing = [name for name in fields if name not in store.fields]
    if missing:
        raise DataError(f"the forecast has fields {missing} that the data store {store.path} lacks "
                        f"(it has {store.fields}); pass the --truth store the forecast was made from")
    if (int(forecast.sizes["y"]), int(forecast.sizes["x"])) != store.grid:
        raise DataError(f"the forecast grid {forecast.sizes['y']}x{forecast.sizes['x']} differs from the data "
                        f"store's {store.grid[0]}x{store.grid[1]}; pass the --truth store the forecast was made from")


def _match_valid_times(forecast, truth_times: np.ndarray, truth_path: Path):
    """(time_index (init, lead), init_index (init,), scored lead indices): leads with truth for every init."""
    time_index = _match_times(np.asarray(forecast["valid_time"].values), truth_times)
    init_index = _match_times(np.asarray(forecast["init_time"].values), truth_times)
    if (init_index < 0).any():
        raise DataError(f"initial times of the forecast are not in the data store {truth_path}; "
                        "pass the --truth store the forecast was made from")
    leads = np.flatnonzero((time_index >= 0).all(axis=0))
    if leads.size == 0:
        raise DataError(f"no valid time of the forecast is in the data store {truth_path}; "
                        "pass a --truth store that covers the forecast period")
    if leads.size < time_index.shape[1]:
        log.warning("%d of %d lead times have no truth in %s and are not scored",
                    time_index.shape[1] - leads.size, time_index.shape[1], truth_path)
    return time_index, init_index, leads


def _match_series(forecast, truth, truth_path: Path) -> list[int]:
    labels = [_plain(v) for v in truth["series"].values]
    position = {label: i for i, label in enumerate(labels)}
    wanted = [_plain(v) for v in forecast["series"].values]
    missing = [label for label in wanted if label not in position]
    if missing:
        raise DataError(f"forecast series {missing[:5]} are not in the data store {truth_path}; "
                        "pass the --truth store the forecast was made from")
    return [position[label] for label in wanted]


def _match_times(wanted: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of each wanted time in the sorted `times`, or -1 where there is none (floats: to 1e-6 steps)."""
    wanted_flat = wanted.reshape(-1)
    if np.issubdtype(times.dtype, np.datetime64) != np.issubdtype(wanted.dtype, np.datetime64):
        raise DataError("the forecast's times and the data store's times are of different kinds (dates vs "
                        "simulation time); pass the --truth store the forecast was made from")
    if np.issubdtype(times.dtype, np.datetime64):
        times_n = times.astype("datetime64[ns]").astype(np.int64)
        wanted_n = wanted_flat.astype("datetime64[ns]").astype(np.int64)
        tolerance = 0
    else:
        times_n, wanted_n = times.astype(np.float64), wanted_flat.astype(np.float64)
        step = float(np.min(np.diff(times_n))) if times_n.size > 1 else 1.0
        tolerance = 1e-6 * abs(step)
    position = np.clip(np.searchsorted(times_n, wanted_n), 0, len(times_n) - 1)
    candidates = np.stack([position, np.clip(position - 1, 0, len(times_n) - 1)])
    distance = np.abs(times_n[candidates] - wanted_n[None])
    best = candidates[np.argmin(distance, axis=0), np.arange(wanted_n.size)]
    found = np.abs(times_n[best] - wanted_n) <= tolerance
    return np.where(found, best, -1).reshape(wanted.shape)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def resolve_options(inputs: Inputs, options: ScoreOptions) -> ScoreOptions:
    """The options with `weights` decided, and `inputs.weights` set; UsageError for a choice this data
    store cannot give (coslat without latitudes, standardized without normalisation statistics)."""
    lat = _latitudes(inputs)
    weights = options.weights or ("coslat" if lat is not None else "none")
    if options.weights is None:
        log.info("weights: %s (%s)", weights, "the data store has latitudes" if lat is not None
                 else "the data store has no latitudes")
    if weights == "coslat":
        if lat is None:
            raise UsageError(f"--weights coslat: the data store {inputs.truth_path} has no latitudes (lat); "
                             "use --weights none")
        inputs.weights = area_weights(lat, inputs.mask, inputs.truth_path)
    if options.units == "standardized":
        _check_statistics(inputs)
    return ScoreOptions(weights, options.units, options.ssr)


def _latitudes(inputs: Inputs) -> np.ndarray | None:
    """Latitudes in degrees of every point of the forecast's series, (series, y, x), or None. The store
    holds `lat(series, y)` (regular grids, tiles) or `lat(series, y, x)` (curvilinear grids)."""
    if "lat" not in inputs.truth.variables:
        return None
    lat = inputs.truth["lat"]
    values = np.asarray(lat.values, dtype=np.float64)[inputs.series_index]
    shape = inputs.mask.shape
    if lat.dims == ("series", "y"):
        return np.broadcast_to(values[:, :, None], shape)
    if lat.dims == ("series", "y", "x"):
        return values
    raise DataError(f"the data store {inputs.truth_path} has lat{lat.dims}, expected (series, y) or (series, y, x); "
                    "re-run `dyf prepare`, or use --weights none")


def area_weights(lat: np.ndarray, mask: np.ndarray, where: Path) -> np.ndarray:
    """cos(latitude) at every point, normalised to mean 1 over the valid points (`mask`) of all scored
    series together (one constant, so tiles near the poles weigh less than tiles near the equator).

    WeatherBench-2 weights by cell area (`get_lat_weights`: the sine of the cell edges' latitudes), which
    on an equiangular grid is cos(latitude) times a constant except in the half cells at the poles; this
    is cos(latitude) at the point itself, like earth2studio's `lat_weight`, and works on any grid (tiles,
    curvilinear). A pole point weighs 0. Scores divide by the sum of the weights of the points they
    average, so the normalisation matters only for the rank histogram: its weighted counts add up to the
    number of valid points."""
    weights = np.clip(np.cos(np.deg2rad(lat)), 0.0, None)
    valid = mask.astype(bool)
    if not np.isfinite(weights[valid]).all():
        raise DataError(f"the data store {where} has valid points without a latitude; use --weights none")
    total = weights[valid].mean() if valid.any() else 0.0
    if not total > 0:
        raise DataError(f"the valid points of {where} all lie on the poles (cos(lat) = 0); use --weights none")
    return np.where(valid, weights / total, 0.0)


def _check_statistics(inputs: Inputs) -> None:
    if inputs.normalization not in ("global", "pixel", "pixel-dayofyear"):
        raise UsageError(f"--units standardized: the data store {inputs.truth_path} has normalisation "
                         f"{inputs.normalization!r}: its networks see the fields in physical units; use --units "
                         "physical")
    missing = [f for f in inputs.fields if f"stats_std_{f}" not in inputs.truth.variables]
    if missing:
        raise DataError(f"the data store {inputs.truth_path} lacks stats_std_ of {missing}; re-run `dyf prepare`, "
                        "or use --units physical")


# ----------------------------------------------------------------------------------------------- blocks

@dataclass
class Block:
    """One (series, init) block of one field, restricted to the scored leads."""

    field: str
    series: int
    init: int
    ensemble: np.ndarray  # (M, L, Y, X) float32
    truth: np.ndarray  # (L, Y, X)
    persistence: np.ndarray  # (1, L, Y, X)
    climatology: np.ndarray  # (1, L, Y, X)
    mask: np.ndarray  # (Y, X) bool
    scale: np.ndarray | None = None  # 1 / std, broadcastable to (L, Y, X), for standardized units


def read_block(inputs: Inputs, field: str, series: int, init: int, standardized: bool = False) -> Block:
    """One block of the forecast and the truth it is scored against (damaged chunks: DataError, exit 4)."""
    from dyfcli.forecast_store import FIX
    from dyfcli.chunks import read_errors

    leads = inputs.leads
    truth_series = inputs.series_index[series]
    files = (inputs.block_files or {}).get(field)
    with read_errors(inputs.forecast_path, f"{field!r} of series {series}, init {init}", FIX):
        if files is not None:
            ensemble = files.read(series, init)
        else:
            ensemble = np.asarray(inputs.forecast[field][series, init].values, dtype=np.float32)
    if leads.size < ensemble.shape[1]:  # a copy only where leads beyond the truth are dropped
        ensemble = ensemble[:, leads]
    mask = inputs.mask[series]
    truth_var = inputs.truth[field]
    times = inputs.time_index[init, leads]
    with read_errors(inputs.truth_path, f"{field!r} of series {truth_series} at the forecast's times"):
        truth = np.asarray(truth_var[truth_series, times].values, dtype=np.float32)
        x0 = np.asarray(truth_var[truth_series, int(inputs.init_index[init])].values, dtype=np.float32)
    persistence = np.broadcast_to(x0, truth.shape)[None]
    climatology = _climatology(inputs, field, truth_series, times, truth.shape)[None]
    scale = _inverse_std(inputs, field, truth_series, times) if standardized else None
    return Block(field, series, init, ensemble, truth, persistence, climatology, mask, scale)


def _climatology(inputs: Inputs, field: str, truth_series: int, times: np.ndarray, shape) -> np.ndarray:
    mean = _statistic(inputs, "mean", field, truth_series, times)
    return np.array(np.broadcast_to(mean, shape), dtype=np.float32)


def _statistic(inputs: Inputs, name: str, field: str, truth_series: int, times: np.ndarray) -> np.ndarray:
    """`stats_<name>_<field>` at the series and valid times, broadcastable to (L, Y, X), float32: a scalar
    (`global`), (Y, X) (`pixel`) or (L, Y, X) (`pixel-dayofyear`, the valid time's day of year)."""
    stat = inputs.truth[f"stats_{name}_{field}"]
    if inputs.normalization in ("global", "none"):  # none: raw-unit stores keep global statistics
        return np.asarray(stat.values, dtype=np.float32)
    if inputs.normalization == "pixel":
        return np.asarray(stat.values[truth_series], dtype=np.float32)
    dayofyear = inputs.truth["time"][times].dt.dayofyear.values  # 1..366
    return np.asarray(stat.values[dayofyear - 1, truth_series], dtype=np.float32)


def _inverse_std(inputs: Inputs, field: str, truth_series: int, times: np.ndarray) -> np.ndarray:
    """1 / std of the store's normalisation at the valid times (a zero std counts as 1, as the
    normaliser the networks see does)."""
    std = _statistic(inputs, "std", field, truth_series, times)
    return (1.0 / np.where(std == 0, np.float32(1), std)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- block files

_THREAD = threading.local()  # each reading thread's buffer for the bytes of a chunk file
ZSTD_MAGIC = 0xFD2FB528


@dataclass(frozen=True)
class BlockFiles:
    """`files.read(series, init)`: one `(series, init)` block of a forecast field, read straight from its
    chunk file. The file's bytes go into a buffer the reading thread reuses, are checked against their
    crc32c and zstd-decoded into the block's array: through zarr (async codec pipeline, fresh buffers
    page-faulted in for every block) a 52 MB block cost 114 ms of CPU instead of 67 (benchmarks/evaluate.py
    --breakdown; zstd decoding is most of the 67).
    `_block_files` makes one where the layout allows it, else evaluate reads through xarray. Plain values,
    so it pickles (Dask tasks)."""

    folder: Path
    shape: tuple[int, ...]  # one block: (member, lead, y, x)
    keys: object  # the array's chunk key encoding: chunk grid position -> file path in `folder`
    compressed: bool

    def read(self, series: int, init: int) -> np.ndarray:
        """The block as float32 (M, L, Y, X); ValueError/OSError for a damaged or missing chunk file."""
        from dyfcli.chunks import check_crc32c

        raw = _file_bytes(self.folder / self.keys.encode_chunk_key((series, init, 0, 0, 0, 0)))
        check_crc32c(raw)
        block = np.empty(self.shape, np.float32)
        _decode_into(raw[:-4], block, self.compressed)
        return block


def _decode_into(payload: np.ndarray, block: np.ndarray, compressed: bool) -> None:
    """Fill `block` with a chunk's bytes after its checksum (zstd-compressed or raw); ValueError where they
    do not make exactly one block (decoding into a block checks only that the data fits)."""
    from numcodecs import Zstd

    size = _zstd_content_size(payload) if compressed else payload.size
    if compressed and size < 0:  # a frame that does not declare its size (zarr's do): decode, then check
        payload, compressed = np.frombuffer(Zstd().decode(payload), np.uint8), False
        size = payload.size
    if size != block.nbytes:
        raise ValueError(f"the chunk decodes to {size} bytes, a block is {block.nbytes}")
    if compressed:
        Zstd().decode(payload, out=block)  # releases the GIL: worker threads decode side by side
    else:
        block.reshape(-1).view(np.uint8)[:] = payload


def _block_files(forecast_path: Path, fields: list[str]) -> dict[str, BlockFiles]:
    """{field: BlockFiles} for the fields whose blocks can be read from their files: float32, one chunk per
    block, in the layout dyf writes as files (`chunks.whole_chunk_files`: a local, unsharded Zarr v3 array
    with codecs `bytes` little-endian, optionally `zstd`, then `crc32c`; what `forecast_store` writes). Each
    array's own zarr.json is read (damage: DataError)."""
    from dyfcli.chunks import open_array, read_errors, whole_chunk_files
    from dyfcli.forecast_store import FIX

    files = {}
    for name in fields:
        with read_errors(forecast_path, repr(name), FIX):
            array = open_array(forecast_path, name)
        chunk_files = whole_chunk_files(array)
        if (chunk_files is None or np.dtype(array.dtype) != np.float32
                or tuple(array.chunks) != (1, 1, *array.shape[2:])):
            log.debug("%s: %r is read through zarr (layout %s, codecs %s)", forecast_path, name, array.chunks,
                      [type(codec).__name__ for codec in getattr(array.metadata, "codecs", None) or []])
            continue
        files[name] = BlockFiles(Path(chunk_files.root), tuple(array.shape[2:]), array.metadata.chunk_key_encoding,
                                 chunk_files.compressor is not None)
    return files


def _file_bytes(path: Path) -> np.ndarray:
    """The bytes of the file at `path` as uint8, in this thread's buffer (valid until its next call here):
    reused, so a 50 MB chunk is not page-faulted into fresh memory every time (a third of its read)."""
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = getattr(_THREAD, "buffer", None)
        if buffer is None or buffer.size < size:
            buffer = _THREAD.buffer = np.empty(size, np.uint8)
        done = 0
        while done < size:
            count = handle.readinto(buffer[done:size])
            if not count:
                raise ValueError(f"the file ended after {done} of {size} bytes")
            done += count
    return buffer[:size]


def _zstd_content_size(frame: np.ndarray) -> int:
    """The decompressed size a zstd frame header declares (RFC 8878, 3.1.1.1), -1 where it declares none:
    decoding into a block checks only that the data fits, so a smaller chunk must be refused first."""
    if frame.size < 6 or int.from_bytes(frame[:4].tobytes(), "little") != ZSTD_MAGIC:
        return -1
    descriptor = int(frame[4])
    single_segment = descriptor >> 5 & 1
    start = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]  # window descriptor, dictionary id
    width = (single_segment, 2, 4, 8)[descriptor >> 6]
    if width == 0:
        return -1
    value = int.from_bytes(frame[start:start + width].tobytes(), "little")
    return value + 256 if width == 2 else value


def lead_slices(members: int, leads: int, points: int) -> list[slice]:
    """Slices of the lead axis whose float64 working set stays under SLICE_ELEMENTS."""
    per_lead = max(1, members * points)
    step = max(1, min(leads, SLICE_ELEMENTS // per_lead))
    return [slice(start, min(start + step, leads)) for start in range(0, leads, step)]


# ----------------------------------------------------------------------------------------------- scoring

SOURCES = ("forecast", *REFERENCES)


def score(inputs: Inputs, seed: int = 0, keep_example: bool = False,
          options: ScoreOptions = ScoreOptions(), device: str = "cpu", ranks=None,
          cluster=None) -> tuple[dict, dict | None, dict]:
    """Stream every block into accumulators. Returns (results[source][field or `all`], example block, stats).

    `inputs.weights` (set by `resolve_options`) weights the points; `options.units` and `options.ssr` as in
    the module docstring. `SCORE_WORKERS` threads read blocks and compute their point values ahead of the
    main thread, which adds them to the accumulators in block order. `device` "cpu": numpy kernels; a CUDA
    device: torch kernels there (torch.sort is fast on a GPU, 17x slower than np.sort on a CPU).

    `ranks` (`runtime.Ranks`, under torchrun or srun): rank r scores blocks r, r + world, ...; rank 0
    gathers every block's sums and adds them in block order, so its scores equal one process's bit for
    bit; the other ranks return empty results (their summary is not printed).

    `cluster` (`evaluate_cluster.Cluster`, `dyf evaluate --scheduler`): Dask tasks score the blocks and
    this process adds their sums in block order, as one process does."""
    import time

    import torch

    from dyfcli.metrics import ScoreAccumulator
    from dyfcli.runtime import Ranks, progress, tune_cpu_allocator

    ranks = ranks or Ranks()
    torch.set_num_threads(SCORE_THREADS)
    tune_cpu_allocator()  # the slices' working arrays are reused, not page-faulted in again per slice
    n_series, n_init = int(inputs.forecast.sizes["series"]), int(inputs.forecast.sizes["init"])
    members, n_leads = int(inputs.forecast.sizes["member"]), int(inputs.leads.size)
    per_series = n_series if options.ssr == "per-series" else 0
    accumulators = {source: {field: ScoreAccumulator(n_leads, members if source == "forecast" else 1, seed=seed,
                                                     weighted=inputs.weights is not None, series=per_series)
                             for field in inputs.fields} for source in SOURCES}
    example = {} if keep_example else None
    n_bytes, start, cpu_start = 0, time.perf_counter(), time.process_time()
    keys = [(field, series, init) for series in range(n_series) for init in range(n_init) for field in inputs.fields]
    standardized = options.units == "standardized"
    if cluster is not None:  # the example blocks are read below
        for number, parts, block_bytes in cluster.scored(inputs, keys, options, device):
            n_bytes += block_bytes
            _accumulate(accumulators, keys[number][0], keys[number][1], parts)
    else:
        with progress("evaluate", len(keys[ranks.rank::ranks.world]) // len(inputs.fields), "blocks") as bar:
            mine = {}  # several ranks: {key number: sums} kept for rank 0; one process adds them at once
            work = lambda key: _scored_block(inputs, *key, standardized, device)  # noqa: E731
            for number, (block, parts) in zip(range(ranks.rank, len(keys), ranks.world),
                                              _in_order(work, keys[ranks.rank::ranks.world], SCORE_WORKERS)):
                n_bytes += block.ensemble.nbytes
                if ranks.world == 1:
                    _accumulate(accumulators, block.field, block.series, parts)
                else:
                    mine[number] = parts
                if example is not None and block.series == 0 and block.init == 0:
                    example[block.field] = block
                if block.field == inputs.fields[-1]:
                    bar.advance(1)
    if ranks.world > 1:
        every, n_bytes = _gather_on_first(ranks, mine, n_bytes)  # {key number: sums} of every rank, on rank 0
        for number in sorted(every):  # block order, whichever rank scored it: the same sums in the same order
            field, series, _ = keys[number]
            _accumulate(accumulators, field, series, every[number])
    if example is not None:  # rank 0 of several scored only some of the first blocks
        example.update({field: read_block(inputs, field, 0, 0, standardized) for field in inputs.fields
                        if field not in example})
    results = {source: {field: acc.result() for field, acc in per_field.items()}
               for source, per_field in accumulators.items()}
    for source, per_field in accumulators.items():
        results[source][ALL_FIELDS] = _pooled(per_field.values()).result()
    elapsed = time.perf_counter() - start
    stats = {"blocks": n_series * n_init, "bytes_read": n_bytes, "seconds": elapsed, "members": members,
             "cpu_seconds": time.process_time() - cpu_start}  # all threads of this process
    return results, example, stats


def scored_sums(inputs: Inputs, keys: list[tuple[str, int, int]], standardized: bool,
                device: str = "cpu") -> list[tuple[list, int]]:
    """For each `(field, series, init)` key, in order: the sums it adds to the accumulators (`_scored_block`'s
    parts) and the bytes of forecast it read. A task of `dyf evaluate --scheduler` returns these: sums, not
    data; the caller adds them in block order (`_accumulate`)."""
    sums = []
    for key in keys:
        block, parts = _scored_block(inputs, *key, standardized, device)
        sums.append((parts, block.ensemble.nbytes))
    return sums


def _gather_on_first(ranks, mine: dict, n_bytes: int) -> tuple[dict, int]:
    """Every rank's {key number: sums} and the bytes they read, merged on rank 0 (other ranks get ({}, 0))."""
    import torch.distributed as dist

    gathered = [None] * ranks.world if ranks.rank == 0 else None
    dist.gather_object((mine, n_bytes), gathered, dst=0)
    if ranks.rank != 0:
        return {}, 0
    return {number: parts for part, _ in gathered for number, parts in part.items()}, sum(b for _, b in gathered)


def _in_order(work, keys: list, workers: int):
    """`work(key)` for every key, yielded in the order of `keys`, computed by `workers` threads at most
    `workers + 1` keys ahead (bounded memory). One worker or fewer: in this thread."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if workers <= 1:
        yield from map(work, keys)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dyf-evaluate") as pool:
        pending = deque()
        for key in keys:
            pending.append(pool.submit(work, key))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _pooled(accumulators):
    """One accumulator holding the sums of all fields' (the `all` row)."""
    from copy import deepcopy

    accumulators = list(accumulators)
    total = deepcopy(accumulators[0])
    for other in accumulators[1:]:
        total.merge(other)
    return total


def _scored_block(inputs: Inputs, field: str, series: int, init: int, standardized: bool,
                  device: str = "cpu") -> tuple[Block, list[tuple[int, dict]]]:
    """Read one block and compute what it adds to every source's accumulator: `(block, [(lead_start,
    {source: metrics.SliceSums})])`, a slice of leads at a time. Runs in worker threads or on another rank:
    it only reads and computes; the caller adds the sums in block order.

    Valid points: the store's mask and a finite truth (a day missing from the raw files is NaN there).
    """
    from dyfcli.metrics import point_values, slice_sums

    block = read_block(inputs, field, series, init, standardized)
    members, leads = block.ensemble.shape[:2]
    weight = None if inputs.weights is None else inputs.weights[series]
    sources = {"forecast": block.ensemble, "persistence": block.persistence, "climatology": block.climatology}
    parts, finite = [], True
    for part in lead_slices(members, leads, int(block.mask.size)):
        truth = block.truth[part]
        mask = block.mask[None] & np.isfinite(truth)
        scale = None if block.scale is None else _lead_part(block.scale, part, truth.shape)
        sums = {}
        for source, array in sources.items():
            values = point_values(*_on(device, array[:, part], truth))
            if source == "forecast":
                finite &= bool(np.isfinite(values.skill.reshape(mask.shape)[mask]).all())
            sums[source] = slice_sums(values, truth.shape, mask, array.shape[0], weight=weight, scale=scale)
        parts.append((part.start, sums))
    if not finite:
        log.warning("the forecast has non-finite values at valid points of %r, series %d, init %d: "
                    "its scores will be NaN", field, series, init)
    return block, parts


def _on(device: str, *arrays: np.ndarray) -> tuple:
    """The arrays as they are for the CPU (numpy kernels), else as tensors on `device`."""
    if device == "cpu":
        return arrays
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True) for array in arrays)


def _accumulate(accumulators: dict, field: str, series: int, parts: list[tuple[int, dict]]) -> None:
    """Add one block's sums to every source's accumulator."""
    for lead_start, sums in parts:
        for source, part_sums in sums.items():
            accumulators[source][field].add_sums(part_sums, lead_start, series=series)


def _lead_part(scale: np.ndarray, part: slice, shape: tuple[int, ...]) -> np.ndarray:
    """The leads `part` of a scale that is a scalar, (Y, X) or (L, Y, X), as (l, Y, X)."""
    if scale.ndim == 3:
        return scale[part]
    return np.broadcast_to(scale, shape)


# ----------------------------------------------------------------------------------------------- outputs

def scores_json(results: dict, fields: list[str]) -> dict:
    """{FIELD: {METRIC: {"per_lead": [...], "mean": x}}} for one source; NaN becomes None."""
    from dyfcli.metrics import lead_mean

    return {field: {metric: {"per_lead": [_number(v) for v in results[field][metric].tolist()],
                             "mean": _number(lead_mean(results[field][metric]))}
                    for metric in scored_metrics(results[field])}
            for field in fields}


def scored_metrics(result: dict) -> list[str]:
    """METRICS, then `ssr_per_series` where it was asked for."""
    from dyfcli.metrics import METRICS, SERIES_METRICS

    return [*METRICS, *(metric for metric in SERIES_METRICS if metric in result)]


def rank_histogram_json(result: dict) -> dict:
    histogram = result["rank_histogram"]
    return {"per_lead": histogram.tolist(), "total": histogram.sum(0).tolist()}


def field_units(inputs: Inputs, options: ScoreOptions) -> dict[str, str]:
    """The units the scores of each field (and `all`) are in: the field's `units`, "1" standardized; `all`
    has the fields' common unit, "" when they differ."""
    units = {field: "1" if options.units == "standardized" else str(inputs.truth[field].attrs.get("units", ""))
             for field in inputs.fields}
    distinct = set(units.values())
    units[ALL_FIELDS] = distinct.pop() if len(distinct) == 1 else ""
    return units


def metric_units(metric: str, unit: str) -> str:
    """CF units of a score of a field in `unit`: ratios "1", MSE the square (udunits syntax)."""
    if metric.startswith("ssr") or unit in ("", "1"):
        return "1" if metric.startswith("ssr") or unit == "1" else ""
    if metric == "mse":
        return f"({unit})^2" if " " in unit else f"{unit}^2"
    return unit


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def lead_axis(inputs: Inputs) -> tuple[list[float], list, str]:
    """The scored leads: (lead numbers, lead times as plain values, a unit label for the lead time)."""
    forecast = inputs.forecast
    leads = [float(v) for v in np.asarray(forecast["lead"].values)[inputs.leads]]
    if "lead_time" not in forecast.variables:
        return leads, leads, "steps"
    lead_time = np.asarray(forecast["lead_time"].values)[inputs.leads]
    if np.issubdtype(lead_time.dtype, np.timedelta64):
        hours = lead_time / np.timedelta64(1, "h")
        if np.all(np.mod(hours, 24) == 0):
            return leads, [float(h / 24) for h in hours], "days"
        return leads, [float(h) for h in hours], "hours"
    return leads, [float(v) for v in lead_time], ""


def scores_dataset(results: dict, inputs: Inputs, attrs: dict, options: ScoreOptions):
    """xarray Dataset: METRIC(source, field, lead), METRIC_lead_mean(source, field), rank_histogram(field,
    lead, rank), points(field, lead); `field` runs over the fields and `all`; every score variable carries
    CF `units` (where its fields share one; the coordinate `field_units` gives each field's)."""
    import xarray as xr

    from dyfcli.metrics import lead_mean

    leads, lead_times, unit = lead_axis(inputs)
    fields = [*inputs.fields, ALL_FIELDS]
    units = field_units(inputs, options)
    members = int(results["forecast"][ALL_FIELDS]["rank_histogram"].shape[1]) - 1
    coords = {"source": list(SOURCES), "field": fields, "lead": leads,
              "lead_time": ("lead", lead_times, {"units": unit}), "rank": ("rank", np.arange(members + 1),
                                                                          {"long_name": "members below the truth"}),
              "field_units": ("field", [units[f] for f in fields])}
    ds = xr.Dataset(coords=coords)
    shared = units[ALL_FIELDS] if len({units[f] for f in inputs.fields}) == 1 else None
    for metric in scored_metrics(results["forecast"][ALL_FIELDS]):
        values = np.array([[results[s][f][metric].numpy() for f in fields] for s in SOURCES])
        metric_attrs = _metric_attrs(metric, shared, options)
        ds[metric] = (("source", "field", "lead"), values, metric_attrs)
        ds[f"{metric}_lead_mean"] = (("source", "field"),
                                     np.array([[lead_mean(results[s][f][metric]) for f in fields]
                                               for s in SOURCES]), metric_attrs)
    ds["rank_histogram"] = (("field", "lead", "rank"),
                            np.array([results["forecast"][f]["rank_histogram"].numpy() for f in fields]),
                            {"units": "1", "weights": options.weights})
    ds["points"] = (("field", "lead"), np.array([results["forecast"][f]["count"].numpy() for f in fields]),
                    {"units": "1", "long_name": "valid points scored"})
    ds.attrs.update({key: str(value) for key, value in attrs.items()})
    ds.attrs.update(dyf_weights=options.weights, dyf_units=options.units, dyf_ssr=options.ssr)
    return ds


def _metric_attrs(metric: str, shared_unit: str | None, options: ScoreOptions) -> dict:
    attrs = {"weights": options.weights, "scored_units": options.units}
    if shared_unit is not None or metric.startswith("ssr"):
        attrs["units"] = metric_units(metric, shared_unit or "")
    else:
        attrs["comment"] = "the fields have different units: see field_units"
    return attrs


def write_scores(ds, out: Path) -> None:
    """Write the scores by extension, marked `dyf_format = "dyf-scores"` (so a later --overwrite knows
    them as dyf's), through a temporary name so a failure leaves no partial output; only an older dyf
    scores output is ever replaced (`outputs.move_into_place`)."""
    from dyfcli import outputs

    from dyfcli.attrs import for_writing

    out = Path(out)
    ds = for_writing(ds.assign_attrs(dyf_format=outputs.SCORES_FORMAT))  # nested values as JSON strings
    if out.suffix == ".zarr":
        temporary = outputs.new_staging(outputs.staging_path(out))
        ds.to_zarr(temporary, mode="a")  # "w" would clear the staging marker
        outputs.unmark_staging(temporary)
    else:
        temporary = outputs.temporary_path(out)
        try:
            if out.suffix == ".nc":
                ds.to_netcdf(temporary, engine="netcdf4")
            else:
                _write_csv(ds, temporary)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    outputs.move_into_place(temporary, out, outputs.SCORES)


CSV_EXTRA_COLUMNS = ("weights", "units", "unit")


def _write_csv(ds, path: Path) -> None:
    """Long format: source, field, lead, lead_time, metric, value (lead 'mean' for the lead average), then
    weights (coslat|none), units (physical|standardized) and the value's unit."""
    import csv

    from dyfcli import outputs

    weights, units = ds.attrs["dyf_weights"], ds.attrs["dyf_units"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        # the header starts with the columns `outputs` recognises dyf's CSV by
        writer.writerow([*outputs.SCORES_CSV_HEADER.split(","), *CSV_EXTRA_COLUMNS])
        for source in ds["source"].values:
            for field in ds["field"].values:
                field_unit = str(ds["field_units"].sel(field=field).values)
                for metric in _scored_metrics(ds):
                    tail = [weights, units, metric_units(metric, field_unit)]
                    row = ds[metric].sel(source=source, field=field).values
                    for lead, lead_time, value in zip(ds["lead"].values, ds["lead_time"].values, row):
                        writer.writerow([source, field, f"{lead:g}", f"{lead_time:g}", metric, f"{value:.8g}", *tail])
                    mean = ds[f"{metric}_lead_mean"].sel(source=source, field=field).values
                    writer.writerow([source, field, "mean", "", metric, f"{float(mean):.8g}", *tail])


def describe_scores(path: Path | str) -> dict:
    """A JSON-ready summary of a scores file written by `dyf evaluate --out` (.nc, .zarr or .csv), for
    `dyf inspect`: what was scored and the lead-mean scores per source and field. DataError when `path` is
    not dyf's scores (recognised by `outputs.kind_at`, as `--overwrite` does)."""
    from dyfcli import outputs
    from dyfcli.attrs import decode
    from dyfcli.chunks import read_errors

    path = Path(path)
    if outputs.kind_at(path) != outputs.SCORES:
        raise DataError(f"{path} is not a dyf scores file (no dyf_format = {outputs.SCORES_FORMAT!r}); "
                        "give one written by `dyf evaluate --out`")
    if path.suffix == ".csv":
        return {"kind": "scores", "path": str(path), **_csv_scores(path)}
    import xarray as xr

    with read_errors(path, "the scores", "re-run `dyf evaluate --out` to write them again"):
        ds = xr.open_zarr(path) if path.suffix == ".zarr" else xr.open_dataset(path, engine="netcdf4")
        with ds:
            lead_mean = {str(source): {str(field): {metric: float(ds[f"{metric}_lead_mean"].sel(source=source,
                                                                                          field=field))
                                                    for metric in _scored_metrics(ds)}
                                       for field in ds["field"].values}
                         for source in ds["source"].values}
            attrs = {key: value for key, value in decode(ds.attrs).items() if key != "dyf_format"}
            leads = [float(lead) for lead in ds["lead"].values]
    return {"kind": "scores", "path": str(path), "attrs": attrs, "leads": leads, "lead_mean": lead_mean}


def _scored_metrics(ds) -> list[str]:
    from dyfcli.metrics import METRICS, SERIES_METRICS

    return [metric for metric in (*METRICS, *SERIES_METRICS) if f"{metric}_lead_mean" in ds.variables]


def _csv_scores(path: Path) -> dict:
    """The lead-mean scores and leads of the long CSV `_write_csv` writes."""
    import csv

    lead_mean: dict = {}
    leads: list[float] = []
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            try:
                if row["lead"] == "mean":
                    by_field = lead_mean.setdefault(row["source"], {}).setdefault(row["field"], {})
                    by_field[row["metric"]] = float(row["value"])
                elif float(row["lead"]) not in leads:
                    leads.append(float(row["lead"]))
            except (TypeError, ValueError) as err:  # a short row gives None
                raise DataError(f"{path} line {number} is damaged ({err}); re-run `dyf evaluate --out` to write "
                                "the scores again") from None
    return {"leads": leads, "lead_mean": lead_mean}


def check_outputs(out: Path | None, plots: Path | None, inputs: list = ()) -> None:
    """--out: a scores file name (missing folders are created when it is claimed); neither --out nor --plots
    may be or lie in an input."""
    from dyfcli import outputs

    if out is not None:
        if Path(out).suffix not in OUTPUT_SUFFIXES:
            raise UsageError(f"--out {out}: use a name ending in .nc, .zarr or .csv")
        outputs.check_path(Path(out), folder=Path(out).suffix == ".zarr")
        outputs.check_distinct(Path(out), inputs)
    if plots is not None:
        if Path(plots).exists() and not Path(plots).is_dir():
            raise UsageError(f"--plots {plots} is a file; give a folder for the plots")
        outputs.check_distinct(Path(plots), inputs, flag="--plots")  # plots only add files, never in an input


def _recorded_truth(forecast_path: Path) -> Path | None:
    """The data store a forecast names, read cheaply so the output checks know it before anything is
    locked or written (None when unreadable: `open_inputs` then says what is wrong)."""
    import zarr

    try:
        return _truth_path(zarr.open_group(str(forecast_path), mode="r"), forecast_path, None)
    except Exception:  # noqa: BLE001 - any failure is reported by open_inputs with its exit code
        return None


def _claim_scores(out: Path | None, overwrite: bool, inputs: list):
    """The lock on --out for the whole evaluation (nothing to claim without --out)."""
    from contextlib import nullcontext

    from dyfcli import outputs

    if out is None:
        return nullcontext()
    return outputs.claim_output(Path(out), outputs.SCORES, overwrite=overwrite, inputs=inputs)


# ----------------------------------------------------------------------------------------------- workflow

def evaluate(forecast_path: Path, truth_path: Path | None = None, out: Path | None = None,
             plots: Path | None = None, seed: int = 0, *, overwrite: bool = False,
             allow_other_truth: bool = False, options: ScoreOptions = ScoreOptions(), device: str = "cpu",
             scheduler: str | None = None) -> dict:
    """Score `forecast_path` against its data store; write `out` (replacing only dyf scores, with
    `overwrite`) and `plots` when given; return the summary. `device`: auto|cpu|cuda[:N] for the kernels.
    `scheduler`: a Dask scheduler address (default: env DASK_SCHEDULER_ADDRESS) whose workers score the
    blocks (`evaluate_cluster`)."""
    from dyfcli.runtime import resolve_device

    from dyfcli.cluster import connected
    from dyfcli.runtime import distributed

    options.check()
    address = _scheduler_alone(scheduler)
    device = str(resolve_device(device))
    given = [forecast_path, truth_path or _recorded_truth(Path(forecast_path))]
    check_outputs(out, plots, given)
    with distributed(backend="gloo") as ranks:  # gathers only: gloo, whatever the device
        if not ranks.is_main:  # rank 0 alone writes
            out = plots = None
        with _claim_scores(out, overwrite, given), connected(address) as client:
            cluster = _cluster(client, address, allow_other_truth)
            summary = _evaluate(forecast_path, truth_path, out, plots, seed, allow_other_truth, options, device,
                                ranks, cluster)
    if ranks.world > 1:
        summary.update(rank=ranks.rank, ranks=ranks.world)
    if cluster is not None:
        summary.update(scheduler=address)
    return summary


def _scheduler_alone(scheduler: str | None) -> str | None:
    """The Dask scheduler address (--scheduler, else env DASK_SCHEDULER_ADDRESS), or None; UsageError under
    torchrun/srun ranks, which would each send every block to the cluster."""
    from dyfcli.cluster import SCHEDULER_ENV, scheduler_address
    from dyfcli.runtime import launch_environment

    address = scheduler_address(scheduler)
    if address is not None and launch_environment() is not None:
        given = f"--scheduler {address}" if scheduler else f"{SCHEDULER_ENV}={address}"
        raise UsageError(f"{given} cannot be combined with torchrun/srun ranks: run one `dyf evaluate` process "
                         f"with --scheduler, or ranks without a scheduler (unset {SCHEDULER_ENV})")
    return address


def _cluster(client, address: str | None, allow_other_truth: bool):
    """An `evaluate_cluster.Cluster` for a connected client, else None."""
    if client is None:
        return None
    from dyfcli.evaluate_cluster import Cluster

    return Cluster(client, address, allow_other_truth)


def _evaluate(forecast_path: Path, truth_path: Path | None, out: Path | None, plots: Path | None,
              seed: int, allow_other_truth: bool = False, options: ScoreOptions = ScoreOptions(),
              device: str = "cpu", ranks=None, cluster=None) -> dict:
    inputs = open_inputs(Path(forecast_path), Path(truth_path) if truth_path else None, allow_other_truth)
    check_outputs(out, plots, [inputs.truth_path])  # the data store the forecast names
    options = resolve_options(inputs, options)
    results, example, stats = score(inputs, seed=seed, keep_example=plots is not None, options=options,
                                    device=device, ranks=ranks, cluster=cluster)
    leads, lead_times, unit = lead_axis(inputs)
    references = {source: scores_json(results[source], inputs.fields) for source in REFERENCES}
    summary = {
        "forecast": str(forecast_path), "truth": str(inputs.truth_path), "fields": inputs.fields,
        "members": stats["members"], "blocks": stats["blocks"], "leads": leads,
        "lead_time": lead_times, "lead_time_units": unit,
        "weights": options.weights, "units": options.units, "ssr": options.ssr, "device": device,
        "field_units": field_units(inputs, options),
        "scores": scores_json(results["forecast"], inputs.fields),
        "baselines": references,
        "rank_histogram": {field: rank_histogram_json(results["forecast"][field]) for field in inputs.fields},
        ALL_FIELDS: {"scores": scores_json(results["forecast"], [ALL_FIELDS])[ALL_FIELDS],
                     "baselines": {source: scores_json(results[source], [ALL_FIELDS])[ALL_FIELDS]
                                   for source in REFERENCES},
                     "rank_histogram": rank_histogram_json(results["forecast"][ALL_FIELDS])},
        "throughput": {"seconds": round(stats["seconds"], 3), "bytes_read": stats["bytes_read"],
                       "gb_per_s": stats["bytes_read"] / 1e9 / max(stats["seconds"], 1e-9),
                       "blocks_per_s": stats["blocks"] / max(stats["seconds"], 1e-9),
                       "cpu_seconds": round(stats["cpu_seconds"], 3)},
    }
    if out is not None:
        dataset = scores_dataset(results, inputs, {"forecast": forecast_path, "truth": inputs.truth_path,
                                                   "members": stats["members"]}, options)
        write_scores(dataset, Path(out))
        summary["out"] = str(out)
    if plots is not None:
        from dyfcli import plots as plotting

        units = {field: inputs.truth[field].attrs.get("units", "") for field in inputs.fields}
        summary["plots"] = [str(p) for p in plotting.write_all(
            Path(plots), summary, example, units=units, geo=_geo(inputs))]
    return summary


def _geo(inputs: Inputs) -> dict:
    """Coordinates of the first forecast series for map axes: lat ascending or descending, lon."""
    series = inputs.series_index[0]
    geo = {}
    for name in ("lat", "lon"):
        if name in inputs.truth.variables and inputs.truth[name].ndim == 2:  # curvilinear (3-D) ones: no extent
            geo[name] = np.asarray(inputs.truth[name].values[series], dtype=np.float64)
    return geo
