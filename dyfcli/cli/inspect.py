"""`dyf inspect PATH [--verify]`: describe a data store, forecast store or checkpoint; with `--verify`,
read every chunk of a store first (checksums, missing chunk files) and refuse a damaged one (exit 4)."""

from __future__ import annotations

from pathlib import Path

import typer

from dyfcli.cli.app import app, run_command


def _render(summary: dict) -> str:
    lines = [f"{summary.get('kind', '?')}: {summary.get('path')}"]
    for key, value in summary.items():
        if key in ("kind", "path", "recipe", "series"):
            continue
        if isinstance(value, dict):
            lines.append(f"  {key}:")
            lines.extend(f"    {k}: {v}" for k, v in value.items())
        else:
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def inspect_path(path: Path, verify: bool = False) -> dict:
    from dyfcli.errors import DataError

    if not path.exists():
        raise DataError(f"{path} does not exist; give the path of a data store, forecast store or checkpoint")
    if path.is_file():
        from dyfcli import checkpoint

        return checkpoint.describe(path)
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path} is not a readable Zarr store ({type(err).__name__}); "
                        "give a store made by dyf or a checkpoint file") from None
    fmt = attrs.get("dyf_format")
    if fmt == "dyf-forecast":
        from dyfcli import forecast_store

        verified = forecast_store.verify(path) if verify else None
        return _with_verify(forecast_store.describe(path), verified)
    from dyfcli import store

    verified = store.verify(path) if verify else None
    return _with_verify(store.describe(store.open_store(path)), verified)


def _with_verify(summary: dict, verified: dict | None) -> dict:
    """The summary, with the counts of `--verify` when it ran (a damaged store never gets here)."""
    return summary if verified is None else {**summary, "verify": verified}


@app.command("inspect")
def inspect_command(
    path: Path = typer.Argument(..., help="A data store, forecast store or checkpoint."),
    verify: bool = typer.Option(False, "--verify", help="Read every chunk of a store and check it (checksums, "
                                                        "missing chunk files); exit 4 naming damaged ones."),
) -> None:
    """Describe a data store, forecast store or checkpoint (fields, grid, splits, provenance)."""
    run_command("inspect", lambda: inspect_path(path, verify), _render)
