"""Figures for `dyf evaluate --plots DIR` (matplotlib, Agg backend: no display needed).

- `scores_<field>.png`: CRPS, RMSE, spread and SSR against lead time, with persistence and climatology;
- `maps_<field>.png`: one initial time at the last scored lead: truth, ensemble mean, error, spread and a
  few members; invalid points (land, obstacles) in grey; north up;
- `rank_histogram_<field>.png`: frequency of the truth's rank among the members (flat = calibrated),
  pooled over lead times and, below, for up to `LEADS_SHOWN` lead times from first to last;
- `rollout_<field>.gif` (or `.png`, a strip of frames, when Pillow is missing): truth, ensemble mean and
  one member through the lead times.

Inputs are plain arrays: the evaluate summary dict (its `scores`, `baselines`, `rank_histogram`,
`lead_time`) and, for maps, an example block with `.ensemble (M, L, Y, X)`, `.truth (L, Y, X)`,
`.mask (Y, X)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE_STYLE = {"persistence": dict(color="tab:orange", linestyle="--"),
                   "climatology": dict(color="tab:green", linestyle=":")}
SCORE_PANELS = (("crps", "CRPS"), ("rmse", "RMSE of the ensemble mean"), ("spread", "spread"),
                ("ssr", "spread-skill ratio"))
MEMBERS_SHOWN = 3
LEADS_SHOWN = 8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_all(folder: Path, summary: dict, example: dict | None, units: dict[str, str],
              geo: dict | None = None) -> list[Path]:
    """Write every figure for every field into `folder`; return the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for field in summary["fields"]:
        unit = units.get(field, "")
        score_unit = summary.get("field_units", {}).get(field, unit)  # "1" for standardized scores
        written.append(plot_scores(folder / f"scores_{field}.png", summary, field, score_unit))
        written.append(plot_rank_histogram(folder / f"rank_histogram_{field}.png", summary, field))
        if example and field in example:
            block = example[field]
            lead_label = _lead_label(summary, -1)
            written.append(plot_maps(folder / f"maps_{field}.png", block, field, unit, lead_label, geo or {}))
            written.append(animate_rollout(folder / f"rollout_{field}", block, field, unit, summary, geo or {}))
    return written


def _options_label(summary: dict) -> str:
    """How the scores were made (area weights, units), for figure titles."""
    if "weights" not in summary:
        return ""
    return f" (weights {summary['weights']}, {summary.get('units', 'physical')} units)"


def _lead_label(summary: dict, index: int) -> str:
    value, unit = summary["lead_time"][index], summary["lead_time_units"]
    return f"lead time {value:g} {unit}".rstrip()


def _lead_axis_label(summary: dict) -> str:
    """With its unit; a store with float times (simulations) has none: its lead times are in the data's own
    time units, which the label says rather than leave the axis bare."""
    unit = summary["lead_time_units"]
    return f"lead time [{unit}]" if unit else "lead time [data time units]"


def _legend_below(figure, axes) -> None:
    """One legend for the figure, under the panels, where it hides no data (duplicate labels merged)."""
    labelled = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        figure.legend(labelled.values(), labelled.keys(), loc="lower center", ncol=len(labelled), fontsize=8,
                      frameon=False)


# ----------------------------------------------------------------------------------------------- scores

def plot_scores(path: Path, summary: dict, field: str, unit: str) -> Path:
    plt = _pyplot()
    lead_times = summary["lead_time"]
    figure, axes = plt.subplots(1, len(SCORE_PANELS), figsize=(4.2 * len(SCORE_PANELS), 3.6), squeeze=False)
    for axis, (metric, title) in zip(axes[0], SCORE_PANELS):
        forecast = _floats(summary["scores"][field][metric]["per_lead"])
        axis.plot(lead_times, forecast, marker="o", markersize=3, color="tab:blue",
                  label=f"forecast ({summary['members']} members)")
        if metric in ("crps", "rmse"):
            for reference, style in REFERENCE_STYLE.items():
                values = _floats(summary["baselines"][reference][field][metric]["per_lead"])
                axis.plot(lead_times, values, label=reference, **style)
        if metric == "ssr":
            unbiased = _floats(summary["scores"][field]["ssr_unbiased"]["per_lead"])
            axis.plot(lead_times, unbiased, marker="s", markersize=3, color="tab:purple",
                      label="finite-ensemble corrected")
            axis.axhline(1.0, color="grey", linewidth=0.8)
            axis.set_ylim(bottom=0, top=max(1.2, float(np.nanmax(np.r_[forecast, unbiased, 1.0])) * 1.1))
        if metric == "spread":
            axis.set_ylim(bottom=0, top=max(float(np.nanmax(np.r_[forecast, 0.0])) * 1.2, 1e-12))
        axis.set_title(title)
        axis.set_xlabel(_lead_axis_label(summary))
        axis.set_ylabel(metric if metric == "ssr" else f"{metric} [{unit}]" if unit else metric)
        axis.grid(alpha=0.3)
    _legend_below(figure, axes[0])
    figure.suptitle(f"{field}: scores against lead time{_options_label(summary)}")
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _floats(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def plot_rank_histogram(path: Path, summary: dict, field: str) -> Path:
    """Pooled over all lead times on top; below, one panel per lead time (`shown_leads`), same y scale."""
    plt = _pyplot()
    histogram = summary["rank_histogram"][field]
    per_lead = np.asarray(histogram["per_lead"], dtype=np.float64)
    leads = shown_leads(per_lead.shape[0])
    columns = min(4, len(leads))
    rows = 1 + -(-len(leads) // columns)
    figure = plt.figure(figsize=(3.2 * columns, 2.6 * rows + 0.6))
    grid = figure.add_gridspec(rows, columns)
    pooled = figure.add_subplot(grid[0, :])
    _rank_bars(pooled, np.asarray(histogram["total"], dtype=np.float64))
    pooled.set_title("all lead times", fontsize=10)
    pooled.set_xlabel(f"rank of the truth among {per_lead.shape[1] - 1} members")
    for number, lead in enumerate(leads):
        axis = figure.add_subplot(grid[1 + number // columns, number % columns], sharey=pooled)
        _rank_bars(axis, per_lead[lead])
        axis.set_title(_lead_label(summary, lead), fontsize=9)
        axis.set_xlabel("rank", fontsize=8)
        if number % columns:
            axis.set_ylabel("")
    _legend_below(figure, [pooled])
    figure.suptitle(f"{field}: rank histograms (flat = calibrated){_options_label(summary)}")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def shown_leads(count: int) -> list[int]:
    """Up to `LEADS_SHOWN` lead indices, evenly spread from the first to the last."""
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, min(count, LEADS_SHOWN))})


def _rank_bars(axis, counts: np.ndarray) -> None:
    """Frequencies of each rank (0 .. members) with integer ticks, and the flat line of a calibrated ensemble."""
    from matplotlib.ticker import MaxNLocator

    axis.bar(np.arange(counts.size), counts / max(counts.sum(), 1.0), width=1.0, color="tab:blue",
             edgecolor="white")
    axis.axhline(1.0 / counts.size, color="black", linestyle="--", linewidth=1, label="calibrated (flat)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(counts.size, 10)))
    axis.set_xlim(-0.5, counts.size - 0.5)
    axis.set_ylabel("frequency")


# ----------------------------------------------------------------------------------------------- maps

def _map_frame(values: np.ndarray, mask: np.ndarray, geo: dict) -> tuple[np.ma.MaskedArray, list | None]:
    """Mask invalid points and orient north up: returns the array for imshow(origin='lower') and extent."""
    frame = np.ma.masked_where(~mask | ~np.isfinite(values), values)
    lat, lon = geo.get("lat"), geo.get("lon")
    if lat is None or lon is None or lat.size < 2 or lon.size < 2:
        return frame, None
    if lat[0] > lat[-1]:  # rows run north to south: flip so row 0 is the southernmost
        frame, lat = frame[::-1], lat[::-1]
    return frame, [float(lon[0]), float(lon[-1]), float(lat[0]), float(lat[-1])]


def _show(axis, plt, values, mask, geo, title, cmap, vmin, vmax, unit):
    frame, extent = _map_frame(values, mask, geo)
    colormap = plt.get_cmap(cmap).with_extremes(bad="lightgrey")
    image = axis.imshow(frame, origin="lower", cmap=colormap, vmin=vmin, vmax=vmax, extent=extent,
                        aspect="auto", interpolation="nearest")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("lon" if extent else "x")
    axis.set_ylabel("lat" if extent else "y")
    bar = plt.colorbar(image, ax=axis, shrink=0.85)
    bar.set_label(unit, fontsize=8)
    return image


def _value_range(arrays: list[np.ndarray], mask: np.ndarray) -> tuple[float, float]:
    valid = np.concatenate([a[mask & np.isfinite(a)] for a in arrays])
    if valid.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(valid, [1, 99])
    return float(low), float(high if high > low else low + 1e-6)


def plot_maps(path: Path, block, field: str, unit: str, lead_label: str, geo: dict, lead_index: int = -1) -> Path:
    plt = _pyplot()
    ensemble, truth, mask = block.ensemble[:, lead_index], block.truth[lead_index], block.mask
    mean, spread = ensemble.mean(axis=0), ensemble.std(axis=0)
    members = ensemble[:MEMBERS_SHOWN]
    vmin, vmax = _value_range([truth, mean], mask)
    error = mean - truth
    limit = float(np.nanmax(np.abs(error[mask]))) if mask.any() else 1.0
    panels = [(truth, "truth", "viridis", vmin, vmax), (mean, "ensemble mean", "viridis", vmin, vmax),
              (error, "error (mean - truth)", "RdBu_r", -limit, limit),
              (spread, "ensemble spread (std)", "magma", 0.0, float(np.nanmax(spread[mask])) if mask.any() else 1.0)]
    panels += [(member, f"member {i}", "viridis", vmin, vmax) for i, member in enumerate(members)]
    columns = 4
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis, (values, title, cmap, low, high) in zip(axes.flat, panels):
        _show(axis, plt, values, mask, geo, title, cmap, low, high, unit)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle(f"{field} [{unit}], series {block.series}, init {block.init}, {lead_label}")
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def animate_rollout(stem: Path, block, field: str, unit: str, summary: dict, geo: dict) -> Path:
    """GIF through the lead times (PillowWriter) or, without Pillow, a PNG strip of up to 8 frames."""
    plt = _pyplot()
    from matplotlib import animation

    truth, mask = block.truth, block.mask
    mean = block.ensemble.mean(axis=0)
    member = block.ensemble[0]
    vmin, vmax = _value_range([truth, mean], mask)
    panels = ((truth, "truth"), (mean, "ensemble mean"), (member, "member 0"))
    try:
        import PIL  # noqa: F401 - PillowWriter needs it
    except ImportError:
        return _rollout_strip(stem.with_suffix(".png"), panels, block, field, unit, summary, geo, vmin, vmax)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    images = [_show(axis, plt, values[0], mask, geo, title, "viridis", vmin, vmax, unit)
              for axis, (values, title) in zip(axes[0], panels)]
    heading = figure.suptitle("")

    def draw(lead: int):
        for image, (values, _) in zip(images, panels):
            image.set_data(_map_frame(values[lead], mask, geo)[0])
        heading.set_text(f"{field} [{unit}], series {block.series}, init {block.init}, {_lead_label(summary, lead)}")
        return images

    figure.tight_layout(rect=(0, 0, 1, 0.92))
    figure.set_layout_engine("none")  # lay out once, not again for every frame
    movie = animation.FuncAnimation(figure, draw, frames=truth.shape[0], blit=False)
    path = stem.with_suffix(".gif")
    movie.save(path, writer=animation.PillowWriter(fps=4), dpi=70)
    plt.close(figure)
    return path


def _rollout_strip(path, panels, block, field, unit, summary, geo, vmin, vmax) -> Path:
    plt = _pyplot()
    leads = np.unique(np.linspace(0, block.truth.shape[0] - 1, min(8, block.truth.shape[0])).astype(int))
    figure, axes = plt.subplots(len(panels), leads.size, figsize=(2.6 * leads.size, 2.4 * len(panels)),
                                squeeze=False)
    for row, (values, title) in enumerate(panels):
        for column, lead in enumerate(leads):
            _show(axes[row][column], plt, values[lead], block.mask, geo,
                  f"{title}, {_lead_label(summary, lead)}", "viridis", vmin, vmax, unit)
    figure.suptitle(f"{field} [{unit}], series {block.series}, init {block.init}")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
