"""`dyf inspect PATH [--verify]`: describe any artefact dyf writes (data store, forecast store, checkpoint,
training state, scores file, run folder); with `--verify`, read every chunk of a store first (checksums,
missing chunk files) and refuse a damaged one (exit 4).

The description is printed as aligned `key: value` lines on stdout, so it pipes into `grep` or `less`;
with `--json` stdout holds only the JSON document and the text goes to stderr (docs/design.md §2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from dyfcli.cli.app import OPTIONS, app, run_command

LIST_ITEMS = 6  # longer lists show their first and last items and their length
WHAT = ("a data store, forecast store, checkpoint, training state, scores file (.nc, .zarr, .csv), "
        "WeatherBench-2 export or run folder")


# ----------------------------------------------------------------------------------------------- text

def render_text(summary: dict) -> str:
    """`kind: path`, then every other entry as an aligned `key: value` line, nested mappings indented."""
    rest = {key: value for key, value in summary.items() if key not in ("kind", "path")}
    return "\n".join([f"{summary.get('kind', '?')}: {summary.get('path')}", *_lines(rest, 1)])


def _lines(mapping: dict, depth: int) -> list[str]:
    indent = "  " * depth
    width = max((len(str(key)) for key in mapping), default=0) + 1
    lines = []
    for key, value in mapping.items():
        label = f"{indent}{str(key) + ':':<{width}}"
        if isinstance(value, dict) and value:
            lines.append(label.rstrip())
            lines.extend(_lines(value, depth + 1))
        else:
            lines.append(f"{label} {_scalar_text(value)}")
    return lines


def _scalar_text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return _list_text(list(value))
    if isinstance(value, dict):
        return "{}"
    return str(value)


def _list_text(items: list) -> str:
    """`a, b, c`; a long list as `a, b, c, ..., y, z (26 items)`; nested mappings as compact `k=v` items."""
    def item(value) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}={_scalar_text(v)}" for k, v in value.items()) + "}"
        return _scalar_text(value)

    if len(items) <= LIST_ITEMS:
        return "[" + ", ".join(item(value) for value in items) + "]"
    head, tail = items[:LIST_ITEMS // 2], items[-2:]
    return ("[" + ", ".join(item(value) for value in head) + ", ..., " + ", ".join(item(value) for value in tail)
            + f"] ({len(items)} items)")


def _render(summary: dict) -> str:
    """Text on stdout (pipe-able); with --json the JSON document owns stdout, so the text goes to stderr."""
    text = render_text(summary)
    if OPTIONS.json:
        return text  # run_command prints it on stderr
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `dyf inspect X | head -3`: the reader left; not an error (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return ""


# ----------------------------------------------------------------------------------------------- describing

def inspect_path(path: Path, verify: bool = False) -> dict:
    """The summary of whatever dyf artefact `path` is (DataError/CheckpointError naming what it is not)."""
    from dyfcli.errors import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; give the path of {WHAT}")
    if path.is_dir():
        return _inspect_folder(path, verify)
    if path.suffix in (".nc", ".csv"):
        from dyfcli.evaluate import describe_scores

        return describe_scores(path)
    from dyfcli import checkpoint, outputs

    if outputs.kind_at(path) == outputs.TRAINING_STATE:
        return checkpoint.describe_training_state(path)
    return checkpoint.describe(path)  # CheckpointError (exit 5) says what the file is instead


def _inspect_folder(path: Path, verify: bool) -> dict:
    import zarr

    from dyfcli.errors import DataError

    if _is_run_folder(path):
        from dyfcli.train import describe_run

        return describe_run(path)
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path} is not a readable Zarr store ({type(err).__name__}); give {WHAT}") from None
    fmt = attrs.get("dyf_format")
    if fmt == "dyf-forecast":
        from dyfcli import forecast_store

        verified = forecast_store.verify(path) if verify else None
        return _with_verify(forecast_store.describe(path), verified)
    if fmt == "dyf-scores":
        from dyfcli.evaluate import describe_scores

        return describe_scores(path)
    if fmt == "dyf-wb2-export":
        from dyfcli.export import describe

        return describe(path)
    from dyfcli import store

    verified = store.verify(path) if verify else None
    return _with_verify(store.describe(store.open_store(path)), verified)


def _is_run_folder(path: Path) -> bool:
    """`OUT.run/` of a training run: dyf's config.yaml or metrics.jsonl, and no Zarr metadata."""
    from dyfcli.outputs import RUN_FILES

    return (any((path / name).is_file() for name in RUN_FILES)
            and not any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zattrs")))


def _with_verify(summary: dict, verified: dict | None) -> dict:
    """The summary, with the counts of `--verify` when it ran (a damaged store never gets here)."""
    return summary if verified is None else {**summary, "verify": verified}


@app.command("inspect")
def inspect_command(
    path: Path = typer.Argument(..., help="A data store, forecast store, checkpoint, training state, scores "
                                          "file (.nc, .zarr, .csv) or run folder (OUT.run/)."),
    verify: bool = typer.Option(False, "--verify", help="Read every chunk of a store and check it (checksums, "
                                                        "missing chunk files); exit 4 naming damaged ones."),
) -> None:
    """Describe what dyf wrote at PATH (fields, grid, splits, provenance, scores, training progress) as
    key: value lines on stdout."""
    run_command("inspect", lambda: inspect_path(path, verify), _render)
