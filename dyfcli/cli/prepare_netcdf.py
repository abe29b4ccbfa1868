"""`dyf prepare netcdf PATH... --var NAME --out STORE`: any CF gridded NetCDF/Zarr files -> a data store."""

from __future__ import annotations

from pathlib import Path

import typer

from dyfcli.cli.app import prepare_app, run_command


def _render(summary: dict) -> str:
    time = summary["time"]
    lines = [
        f"wrote {summary['out']}: {', '.join(summary['fields'])} from {summary['files']} file(s), "
        f"{summary['series']} series of {summary['grid'][0]} x {summary['grid'][1]}, "
        f"{time['steps']} steps of {time['step']} {time['first']}..{time['last']} ({time['calendar']} calendar)",
        "  splits: " + ", ".join(f"{name} {rule['steps']} steps" for name, rule in summary["splits"].items()),
        f"  normalisation {summary['normalization']}, valid fraction {summary['valid_fraction']:.3f}",
    ]
    if summary.get("resumed"):
        lines.append(f"  resumed an interrupted run: {summary['blocks_resumed']} time blocks were already "
                     f"written, {summary['blocks_written']} written now")
    lines.extend(f"  note: {note}" for note in summary["notes"])
    return "\n".join(lines)


def _parse_select(text: str | None) -> dict[str, str]:
    from dyfcli.errors import UsageError

    selection = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise UsageError(f"--select {text!r}: expected DIM=VALUE[,DIM=VALUE], e.g. plev=85000")
        dim, value = (side.strip() for side in part.split("=", 1))
        if dim in selection:
            raise UsageError(f"--select {text!r}: {dim} is selected twice ({selection[dim]}, {value}); "
                             "give each dimension once")
        selection[dim] = value
    return selection


@prepare_app.command("netcdf")
def prepare_netcdf_command(
    paths: list[str] = typer.Argument(..., help="NetCDF or GRIB files, Zarr stores, folders of them or globs "
                                      "(quoted globs are expanded by dyf)."),
    var: str = typer.Option(..., "--var", help="Variable(s) to store as fields, comma-separated "
                            "(same grid); NAME@LEVEL for one pressure level (z@500 -> field z500)."),
    out: Path = typer.Option(..., "--out", help="The data store (Zarr) to write."),
    tile: int = typer.Option(None, "--tile", help="Cut N x N tiles, one series each (tiles without valid "
                             "points are dropped). Default: the whole grid is one series."),
    train_until: str = typer.Option(None, "--train-until", help="Last training year/month/date/date-time "
                                    "(2019-07-14T06:00), or START:END "
                                    "(default: all but the last 20% of the dates)."),
    val: str = typer.Option(None, "--val", help="Validation period (default: the 10% of dates before the test)."),
    test: str = typer.Option(None, "--test", help="Test period (default: the last 10% of the dates)."),
    normalization: str = typer.Option("pixel", "--normalization", help="pixel (mean/std per grid point), "
                                      "global (one per field) or pixel-dayofyear (per grid point and day of "
                                      "year: the seasonal cycle; dated data)."),
    select: str = typer.Option(None, "--select", help="Reduce extra dimensions: DIM=VALUE[,DIM=VALUE] "
                               "(the coordinate value exactly, or an index when there is no coordinate)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    scheduler: str = typer.Option(None, "--scheduler", help="Address of a Dask distributed scheduler "
                                  "(default: env DASK_SCHEDULER_ADDRESS; none: threads here). Its workers must "
                                  "see the files; this process writes --out."),
) -> None:
    """Turn CF-convention gridded NetCDF or Zarr files (one or many) into a data store.

    An interrupted run, re-run with the same command, resumes: it skips the time blocks already written."""

    def workflow() -> dict:
        from dyfcli.sources.netcdf import prepare_netcdf

        variables = [name.strip() for name in var.split(",") if name.strip()]
        return prepare_netcdf(paths, variables, out, tile=tile, train_until=train_until, val=val, test=test,
                              normalization=normalization, select=_parse_select(select), overwrite=overwrite,
                              scheduler=scheduler)

    run_command("prepare netcdf", workflow, _render)
