"""The Typer application, global options and the one place where errors become exit codes.

Command modules (`dyfcli/cli/*.py`) register on `app` or `prepare_app`, parse their flags, and hand a
workflow function to `run_command`, which prints the returned summary as text on stderr or, with the
global `--json`, as exactly one JSON document on stdout.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import typer

from dyfcli.errors import DyfError

app = typer.Typer(
    name="dyf",
    help="Train and run DYffusion probabilistic forecasters on gridded spatiotemporal data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
prepare_app = typer.Typer(
    help="Turn raw files or a built-in simulator into a data store (Zarr).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(prepare_app, name="prepare")


@dataclass
class GlobalOptions:
    json: bool = False
    verbose: bool = False


OPTIONS = GlobalOptions()


@app.callback()
def _global(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document on stdout at the end."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines; tracebacks for internal errors."),
) -> None:
    OPTIONS.json = json_output
    OPTIONS.verbose = verbose
    from dyfcli.runtime import setup_logging

    setup_logging(verbose)


def strict_json(document) -> str:
    """One line of strict JSON (RFC 8259): NaN and infinities become null, anything else unknown a string.

    `json.dumps` writes NaN/Infinity by default, which JSON parsers other than Python's reject.
    """
    return json.dumps(_finite_or_none(json.loads(json.dumps(document, default=str))), allow_nan=False)


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def error_document(command: str, message: str, exit_code: int, kind: str) -> str:
    """The `--json` error document: `{"ok": false, "command": ..., "error": {kind, message, exit_code}}`."""
    return strict_json({"ok": False, "command": command,
                        "error": {"kind": kind, "message": message, "exit_code": exit_code}})


def emit_error(command: str, error: DyfError | Exception, exit_code: int, kind: str) -> None:
    message = getattr(error, "message", None) or str(error)
    print(f"error: {message}", file=sys.stderr)
    if OPTIONS.json:
        print(error_document(command, message, exit_code, kind))


def run_command(command: str, workflow: Callable[[], dict], render: Callable[[dict], str] | None = None) -> None:
    """Run `workflow`, print its summary (text or JSON), and exit with the documented code.

    Under torchrun/srun every rank runs the command; a summary with a `rank` other than 0 is not printed,
    so a job reports once (rank 0's summary, one JSON document). SIGTERM/SIGUSR1 outside a workflow's own
    stop handling (start-up, a command that saves no state) end with exit 128 + the signal's number (143
    for SIGTERM) and the usual error line.
    """
    from dyfcli.runtime import Terminated, stop_signals_outside

    try:
        with stop_signals_outside():
            summary = workflow() or {}
    except DyfError as err:
        emit_error(command, err, err.exit_code, err.kind)
        raise typer.Exit(err.exit_code) from None
    except Terminated as err:
        emit_error(command, DyfError(f"stopped by {err.signal_name} before the command reached a point where it "
                                     "saves its state; re-run the same command"), err.exit_code, "interrupted")
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        emit_error(command, DyfError("interrupted (SIGINT); re-run the same command to continue"), 130, "interrupted")
        raise typer.Exit(130) from None
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if OPTIONS.verbose:
            logging.getLogger("dyf").exception("internal error")
        emit_error(command, DyfError(f"internal error: {type(err).__name__}: {err} "
                                     "(re-run with --verbose for a traceback and report it)"), 1, "internal")
        raise typer.Exit(1) from None
    if summary.get("rank", 0) != 0:
        return
    if render is not None:
        text = render(summary)
        if text:
            print(text, file=sys.stderr)
    if OPTIONS.json:
        print(strict_json({"ok": True, "command": command, **summary}))


def parse_csv_ints(text: str, flag: str, count: int | None = None) -> list[int]:
    """`100,2,5` -> [100, 2, 5], with a usage error naming the flag."""
    from dyfcli.errors import UsageError

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None
    if count is not None and len(values) != count:
        raise UsageError(f"{flag} {text!r}: expected {count} comma-separated integers")
    if any(v < 0 for v in values):
        raise UsageError(f"{flag} {text!r}: values must not be negative")
    return values
