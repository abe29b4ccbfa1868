"""`dyf export FORECAST --to wb2 --out OUT.zarr`: a forecast store in WeatherBench-2's layout (`dyfcli.export`)."""

from __future__ import annotations

from pathlib import Path

import typer

from dyfcli.cli.app import app, run_command


def render(summary: dict) -> str:
    sizes = ", ".join(f"{dim} {size}" for dim, size in summary["sizes"].items())
    return (f"exported {summary['forecast']} to {summary['out']} ({summary['to']}): {', '.join(summary['fields'])}; "
            f"{sizes}; {summary['series']} series cover {100 * summary['covered_fraction']:.0f}% of the grid")


@app.command("export")
def export_command(
    forecast: Path = typer.Argument(..., help="A forecast store written by `dyf forecast`."),
    to: str = typer.Option(..., "--to", metavar="wb2", help="The layout: wb2 (WeatherBench 2: time, "
                                                            "prediction_timedelta, realization, latitude, longitude)."),
    out: Path = typer.Option(..., "--out", help="The export to write, a Zarr store (OUT.zarr)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out written by `dyf export` "
                                                              "(nothing else)."),
) -> None:
    """Export a forecast for other tools: WeatherBench-2 dims and CF attributes, tiles stitched back into
    their grid (NaN where no tile lies)."""
    from dyfcli.export import export

    run_command("export", lambda: export(forecast, out, to, overwrite=overwrite), render)
