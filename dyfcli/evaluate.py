"""`dyf evaluate`: score a forecast store against the truth in a data store (docs/design.md §6).

The workflow streams the forecast one `(series, init)` block at a time (and each block in slices of lead
times), so memory stays bounded however large the forecast store is. For every block it looks the truth
up at the valid times in the data store, builds the two reference forecasts, and feeds
`metrics.ScoreAccumulator`s:

- `persistence`: the truth at the initial time, repeated for every lead (a 1-member ensemble);
- `climatology`: the data store's training mean `stats_mean_<field>` (for day-of-year statistics the mean
  of the valid time's day of year), also a 1-member ensemble, so its CRPS is its MAE.

Outputs: a summary dict (JSON-ready, for `--json`), an xarray Dataset written as NetCDF, Zarr or CSV by
the extension of `--out`, and optional plots (`dyfcli.plots`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyfcli.errors import DataError, UsageError

log = logging.getLogger("dyf.evaluate")

REFERENCES = ("persistence", "climatology")
# Float64 elements per slice of one block (members x leads x points): bounds the working memory.
SLICE_ELEMENTS = int(os.environ.get("DYF_EVALUATE_SLICE_ELEMENTS", 4_000_000))
OUTPUT_SUFFIXES = (".nc", ".zarr", ".csv")
# Intra-op threads for scoring. The kernels are memory-bound on modest slices, and OpenMP threads that
# spin-wait on a busy machine made them ten times slower; one thread per process is the safe default.
SCORE_THREADS = int(os.environ.get("DYF_EVALUATE_THREADS", 1))


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
                  time_index, init_index, leads, mask, Path(forecast_path))


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


def read_block(inputs: Inputs, field: str, series: int, init: int) -> Block:
    """One block of the forecast and the truth it is scored against (damaged chunks: DataError, exit 4)."""
    from dyfcli.forecast_store import FIX
    from dyfcli.chunks import read_errors

    leads = inputs.leads
    truth_series = inputs.series_index[series]
    with read_errors(inputs.forecast_path, f"{field!r} of series {series}, init {init}", FIX):
        ensemble = np.asarray(inputs.forecast[field][series, init].values, dtype=np.float32)[:, leads]
    mask = inputs.mask[series]
    if not np.isfinite(ensemble[..., mask]).all():
        log.warning("the forecast has non-finite values at valid points of series %d, init %d: "
                    "its scores will be NaN", series, init)
    truth_var = inputs.truth[field]
    times = inputs.time_index[init, leads]
    with read_errors(inputs.truth_path, f"{field!r} of series {truth_series} at the forecast's times"):
        truth = np.asarray(truth_var[truth_series, times].values, dtype=np.float32)
        x0 = np.asarray(truth_var[truth_series, int(inputs.init_index[init])].values, dtype=np.float32)
    persistence = np.broadcast_to(x0, truth.shape)[None]
    climatology = _climatology(inputs, field, truth_series, times, truth.shape)[None]
    return Block(field, series, init, ensemble, truth, persistence, climatology, mask)


def _climatology(inputs: Inputs, field: str, truth_series: int, times: np.ndarray, shape) -> np.ndarray:
    mean = inputs.truth[f"stats_mean_{field}"]
    if inputs.normalization == "global":
        return np.full(shape, float(mean.values), dtype=np.float32)
    if inputs.normalization == "pixel":
        return np.broadcast_to(np.asarray(mean[truth_series].values, dtype=np.float32), shape)
    dayofyear = inputs.truth["time"][times].dt.dayofyear.values  # 1..366
    return np.asarray(mean.values[dayofyear - 1, truth_series], dtype=np.float32)


def lead_slices(members: int, leads: int, points: int) -> list[slice]:
    """Slices of the lead axis whose float64 working set stays under SLICE_ELEMENTS."""
    per_lead = max(1, members * points)
    step = max(1, min(leads, SLICE_ELEMENTS // per_lead))
    return [slice(start, min(start + step, leads)) for start in range(0, leads, step)]


# ----------------------------------------------------------------------------------------------- scoring

SOURCES = ("forecast", *REFERENCES)


def score(inputs: Inputs, seed: int = 0, keep_example: bool = False) -> tuple[dict, dict | None, dict]:
    """Stream every block into accumulators. Returns (results[source][field], example block, stats)."""
    import time

    import torch

    from dyfcli.metrics import ScoreAccumulator
    from dyfcli.runtime import progress

    torch.set_num_threads(SCORE_THREADS)
    n_series, n_init = int(inputs.forecast.sizes["series"]), int(inputs.forecast.sizes["init"])
    members, n_leads = int(inputs.forecast.sizes["member"]), int(inputs.leads.size)
    accumulators = {source: {field: ScoreAccumulator(n_leads, members if source == "forecast" else 1, seed=seed)
                             for field in inputs.fields} for source in SOURCES}
    example = {} if keep_example else None
    n_bytes, start = 0, time.perf_counter()
    with progress("evaluate", n_series * n_init, "blocks") as bar:
        for series in range(n_series):
            for init in range(n_init):
                for field in inputs.fields:
                    block = read_block(inputs, field, series, init)
                    n_bytes += block.ensemble.nbytes
                    _accumulate(accumulators, block, torch)
                    if example is not None and series == 0 and init == 0:
                        example[field] = block
                bar.advance(1)
    results = {source: {field: acc.result() for field, acc in per_field.items()}
               for source, per_field in accumulators.items()}
    elapsed = time.perf_counter() - start
    stats = {"blocks": n_series * n_init, "bytes_read": n_bytes, "seconds": elapsed, "members": members}
    return results, example, stats


def _accumulate(accumulators: dict, block: Block, torch) -> None:
    """Feed one block to every source's accumulator, a slice of leads at a time.

    Valid points: the store's mask and a finite truth (a day missing from the raw files is NaN there).
    """
    members, leads = block.ensemble.shape[:2]
    for part in lead_slices(members, leads, int(block.mask.size)):
        truth = _tensor(block.truth[part], torch)
        mask = _tensor(block.mask[None] & np.isfinite(block.truth[part]), torch)
        sources = {"forecast": block.ensemble, "persistence": block.persistence, "climatology": block.climatology}
        for source, values in sources.items():
            accumulators[source][block.field].update(_tensor(values[:, part], torch), truth, mask,
                                                     lead_start=part.start)


def _tensor(array: np.ndarray, torch):
    """A tensor sharing memory where numpy allows it (broadcast views are copied)."""
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array)
    return torch.from_numpy(array)


# ----------------------------------------------------------------------------------------------- outputs

def scores_json(results: dict, fields: list[str]) -> dict:
    """{FIELD: {METRIC: {"per_lead": [...], "mean": x}}} for one source; NaN becomes None."""
    from dyfcli.metrics import METRICS, lead_mean

    return {field: {metric: {"per_lead": [_number(v) for v in results[field][metric].tolist()],
                             "mean": _number(lead_mean(results[field][metric]))}
                    for metric in METRICS}
            for field in fields}


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


def scores_dataset(results: dict, inputs: Inputs, attrs: dict):
    """xarray Dataset: METRIC(source, field, lead), METRIC_lead_mean(source, field), rank_histogram."""
    import xarray as xr

    from dyfcli.metrics import METRICS, lead_mean

    leads, lead_times, unit = lead_axis(inputs)
    coords = {"source": list(SOURCES), "field": list(inputs.fields), "lead": leads,
              "lead_time": ("lead", lead_times, {"units": unit})}
    ds = xr.Dataset(coords=coords)
    for metric in METRICS:
        values = np.array([[results[s][f][metric].numpy() for f in inputs.fields] for s in SOURCES])
        ds[metric] = (("source", "field", "lead"), values)
        ds[f"{metric}_lead_mean"] = (("source", "field"),
                                     np.array([[lead_mean(results[s][f][metric]) for f in inputs.fields]
                                               for s in SOURCES]))
    ds["rank_histogram"] = (("field", "lead", "rank"),
                            np.array([results["forecast"][f]["rank_histogram"].numpy() for f in inputs.fields]))
    ds["points"] = (("field", "lead"), np.array([results["forecast"][f]["count"].numpy() for f in inputs.fields]))
    ds.attrs.update({key: str(value) for key, value in attrs.items()})
    return ds


def write_scores(ds, out: Path) -> None:
    """Write the scores by extension, marked `dyf_format = "dyf-scores"` (so a later --overwrite knows
    them as dyf's), through a temporary name so a failure leaves no partial output; only an older dyf
    scores output is ever replaced (`outputs.move_into_place`)."""
    from dyfcli import outputs

    out = Path(out)
    ds = ds.assign_attrs(dyf_format=outputs.SCORES_FORMAT)
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


def _write_csv(ds, path: Path) -> None:
    """Long format: source, field, lead, lead_time, metric, value (lead 'mean' for the lead average)."""
    import csv

    from dyfcli import outputs
    from dyfcli.metrics import METRICS

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(outputs.SCORES_CSV_HEADER.split(","))  # the header `outputs` recognises dyf's CSV by
        for source in ds["source"].values:
            for field in ds["field"].values:
                for metric in METRICS:
                    row = ds[metric].sel(source=source, field=field).values
                    for lead, lead_time, value in zip(ds["lead"].values, ds["lead_time"].values, row):
                        writer.writerow([source, field, f"{lead:g}", f"{lead_time:g}", metric, f"{value:.8g}"])
                    mean = ds[f"{metric}_lead_mean"].sel(source=source, field=field).values
                    writer.writerow([source, field, "mean", "", metric, f"{float(mean):.8g}"])


def describe_scores(path: Path | str) -> dict:
    """A JSON-ready summary of a scores file written by `dyf evaluate --out` (.nc, .zarr or .csv), for
    `dyf inspect`: what was scored and the lead-mean scores per source and field. DataError when `path` is
    not dyf's scores (recognised by `outputs.kind_at`, as `--overwrite` does)."""
    from dyfcli import outputs
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
            attrs = {key: value for key, value in ds.attrs.items() if key != "dyf_format"}
            leads = [float(lead) for lead in ds["lead"].values]
    return {"kind": "scores", "path": str(path), "attrs": attrs, "leads": leads, "lead_mean": lead_mean}


def _scored_metrics(ds) -> list[str]:
    from dyfcli.metrics import METRICS

    return [metric for metric in METRICS if f"{metric}_lead_mean" in ds.variables]


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
             allow_other_truth: bool = False) -> dict:
    """Score `forecast_path` against its data store; write `out` (replacing only dyf scores, with
    `overwrite`) and `plots` when given; return the summary."""
    given = [forecast_path, truth_path or _recorded_truth(Path(forecast_path))]
    check_outputs(out, plots, given)
    with _claim_scores(out, overwrite, given):
        return _evaluate(forecast_path, truth_path, out, plots, seed, allow_other_truth)


def _evaluate(forecast_path: Path, truth_path: Path | None, out: Path | None, plots: Path | None,
              seed: int, allow_other_truth: bool = False) -> dict:
    inputs = open_inputs(Path(forecast_path), Path(truth_path) if truth_path else None, allow_other_truth)
    check_outputs(out, plots, [inputs.truth_path])  # the data store the forecast names
    results, example, stats = score(inputs, seed=seed, keep_example=plots is not None)
    leads, lead_times, unit = lead_axis(inputs)
    summary = {
        "forecast": str(forecast_path), "truth": str(inputs.truth_path), "fields": inputs.fields,
        "members": stats["members"], "blocks": stats["blocks"], "leads": leads,
        "lead_time": lead_times, "lead_time_units": unit,
        "scores": scores_json(results["forecast"], inputs.fields),
        "baselines": {source: scores_json(results[source], inputs.fields) for source in REFERENCES},
        "rank_histogram": {field: {"per_lead": results["forecast"][field]["rank_histogram"].tolist(),
                                   "total": results["forecast"][field]["rank_histogram"].sum(0).tolist()}
                           for field in inputs.fields},
        "throughput": {"seconds": round(stats["seconds"], 3), "bytes_read": stats["bytes_read"],
                       "gb_per_s": stats["bytes_read"] / 1e9 / max(stats["seconds"], 1e-9),
                       "blocks_per_s": stats["blocks"] / max(stats["seconds"], 1e-9)},
    }
    if out is not None:
        dataset = scores_dataset(results, inputs, {"forecast": forecast_path, "truth": inputs.truth_path,
                                                   "members": stats["members"]})
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
