"""`dyf prepare sst RAW_DIR --out STORE`: NOAA OISST v2.1 files -> a data store of 60x60 SST boxes."""

from __future__ import annotations

from pathlib import Path

import typer

from dyfcli.cli.app import prepare_app, run_command


def _render(summary: dict) -> str:
    lines = [
        f"wrote {summary['out']}: boxes {summary['boxes']} x {summary['days']} days "
        f"{summary['time'][0]}..{summary['time'][1]} ({summary['layout']} files, values in {summary['values']})",
        "  split days: " + ", ".join(f"{name} {days}" for name, days in summary["split_days"].items()),
        f"  blocks written {summary['blocks_written']}, skipped from an earlier run {summary['blocks_resumed']}; "
        f"{summary['seconds']} s" + (f", {summary['workers']} reading process(es)" if summary.get("workers") else ""),
    ]
    if summary["missing_days"]:
        lines.append("  missing days stored as NaN: " + ", ".join(summary["missing_days"]))
    if summary["stats_filled_days_of_year"]:
        lines.append("  days of year without training data (statistics from the nearest day): "
                     + ", ".join(map(str, summary["stats_filled_days_of_year"])))
    return "\n".join(lines)


@prepare_app.command("sst")
def prepare_sst_command(
    raw_dir: Path = typer.Argument(..., help="Folder of OISST files: PSL sst.day.mean.YYYY.nc, NCEI "
                                   "YYYYMM/oisst-avhrr-v02r01.YYYYMMDD.nc, or DYffusion's box files."),
    out: Path = typer.Option(..., "--out", help="The data store (Zarr) to write."),
    boxes: str = typer.Option("84-89,108-112", "--boxes", help="Box ids (row*24+col of the 15° tiling from "
                              "60°S, 0°E) and ranges, or 'all' (boxes with >= 95% ocean)."),
    years: str = typer.Option(None, "--years", help="Years to read, e.g. 1982-2020 (default: all found)."),
    train_until: str = typer.Option("2018", "--train-until", help="Last training year/month/date, or START:END."),
    val: str = typer.Option("2019", "--val", help="Validation period: year, YYYY-MM, date or START:END."),
    test: str = typer.Option("2020", "--test", help="Test period: year, YYYY-MM, date or START:END."),
    allow_gaps: bool = typer.Option(False, "--allow-gaps", help="Store days missing from the files as NaN "
                                    "instead of stopping."),
    scheduler: str = typer.Option(None, "--scheduler", help="Address of a Dask scheduler (default: env "
                                  "DASK_SCHEDULER_ADDRESS, else local processes). Its workers must see the files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    workers: int = typer.Option(None, "--workers", help="Processes that read the raw files on this machine "
                                "(default: the available CPU cores); ignored with --scheduler."),
) -> None:
    """Cut NOAA OISST v2.1 daily SST into the paper's 60x60 boxes with day-of-year statistics."""

    def workflow() -> dict:
        from dyfcli.sources.oisst import prepare_sst

        return prepare_sst(raw_dir, out, boxes=boxes, years=years, train_until=train_until, val=val, test=test,
                           allow_gaps=allow_gaps, scheduler=scheduler, overwrite=overwrite, workers=workers)

    run_command("prepare sst", workflow, _render)
