"""`dyf evaluate FORECAST`: score a forecast store against its data store (docs/design.md §6)."""

from __future__ import annotations

from pathlib import Path

import typer

from dyfcli.cli.app import app, run_command

TABLE_METRICS = ("crps", "crps_fair", "mse", "rmse", "spread", "ssr", "ssr_unbiased", "ssr_per_series")


def _format(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def render(summary: dict) -> str:
    """A Rich table per field: rows are metrics, columns the forecast and references (mean over leads)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    buffer = StringIO()
    console = Console(file=buffer, width=110, force_terminal=False, color_system=None)
    leads = summary["lead_time"]
    span = f"{leads[0]:g}-{leads[-1]:g} {summary['lead_time_units']}" if leads else ""
    rows = [(field, summary["scores"][field], {ref: scores[field] for ref, scores in summary["baselines"].items()})
            for field in summary["fields"]]
    if len(summary["fields"]) > 1:
        rows.append(("all fields", summary["all"]["scores"], summary["all"]["baselines"]))
    for field, forecast_scores, baselines in rows:
        table = Table(title=f"{field}: mean over {len(leads)} lead times ({span}), "
                            f"{summary['members']} members, {summary['blocks']} blocks\n"
                            f"weights {summary['weights']}, {summary['units']} units")
        table.add_column("metric")
        table.add_column("forecast", justify="right")
        table.add_column("first lead", justify="right")
        table.add_column("last lead", justify="right")
        for reference in baselines:
            table.add_column(reference, justify="right")
        for metric in [m for m in TABLE_METRICS if m in forecast_scores]:
            scores = forecast_scores[metric]
            row = [metric, _format(scores["mean"]), _format(scores["per_lead"][0]), _format(scores["per_lead"][-1])]
            row += [_format(baselines[ref][metric]["mean"]) for ref in baselines]
            table.add_row(*row)
        console.print(table)
    for key in ("out", "plots"):
        if key in summary:
            value = summary[key]
            console.print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
    return buffer.getvalue().rstrip()


@app.command("evaluate")
def evaluate_command(
    forecast: Path = typer.Argument(..., help="A forecast store written by `dyf forecast`."),
    truth: Path | None = typer.Option(None, "--truth", help="Data store with the truth (default: the "
                                                            "forecast's dyf_truth attribute)."),
    out: Path | None = typer.Option(None, "--out", help="Write the scores: .nc (NetCDF), .zarr or .csv."),
    plots: Path | None = typer.Option(None, "--plots", help="Folder for PNG/GIF figures."),
    seed: int = typer.Option(0, "--seed", help="Seed for breaking ties in the rank histogram."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out written by "
                                                              "`dyf evaluate` (nothing else)."),
    allow_other_truth: bool = typer.Option(False, "--allow-other-truth",
                                           help="Score against a --truth store other than the one the "
                                                "forecast was made from (same schema)."),
    weights: str | None = typer.Option(None, "--weights", metavar="coslat|none",
                                       help="Area weights: cos(latitude), normalised to mean 1 over the valid "
                                            "points (default where the data store has latitudes), or none."),
    units: str = typer.Option("physical", "--units", metavar="physical|standardized",
                              help="Score in the store's physical units, or the standardised fields (the "
                                   "errors over the store's normalisation std; the paper's SST units)."),
    ssr: str = typer.Option("pooled", "--ssr", metavar="pooled|per-series",
                            help="per-series adds ssr_per_series (spread/RMSE per series, then averaged: the "
                                 "paper's protocol for trajectories) next to the pooled ssr."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda[:N]: numpy kernels on the CPU, torch on "
                                                        "a GPU (auto: the GPU when there is one)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Address of a Dask distributed scheduler "
                                         "whose workers score the blocks (default: env DASK_SCHEDULER_ADDRESS; "
                                         "none: this process). The workers must see the stores at the same "
                                         "paths (a shared file system) and run the same dyf."),
) -> None:
    """Score a forecast: CRPS, fair CRPS, MSE/RMSE, spread, SSR and rank histograms per field and lead time,
    with persistence and climatology as references, and the row `all` pooling every field. Under torchrun
    (`torchrun --nproc-per-node N -m dyfcli evaluate ...`) the ranks share the blocks; the scores are those
    of one process; so are they with `--scheduler ADDRESS`, where Dask workers score the blocks and this
    process adds their sums."""
    from dyfcli.evaluate import ScoreOptions, evaluate

    options = ScoreOptions(weights, units, ssr)
    run_command("evaluate", lambda: evaluate(forecast, truth, out, plots, seed, overwrite=overwrite,
                                             allow_other_truth=allow_other_truth, options=options,
                                             device=device, scheduler=scheduler), render)
