"""The Typer application, global options and the one place where errors become exit codes.

Command modules (`dyfcli/cli/*.py`) register on `app` or `prepare_app`, parse their flags, and hand a
workflow function to `run_command`, which prints the returned summary as text on stderr or, with the
global `--json`, as exactly one JSON document on stdout.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import typer
from typer.core import TyperCommand, TyperGroup

from dyfcli.errors import DyfError

# `dyf --help` lists commands in the order a user runs them; commands not named here follow.
PIPELINE_ORDER = ("prepare", "train-interpolator", "train-forecaster", "forecast", "evaluate", "export", "inspect")
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


@dataclass
class GlobalOptions:
    json: bool = False
    verbose: bool = False


OPTIONS = GlobalOptions()


class DyfCommand(TyperCommand):
    """A command whose help reads like a classic Unix one (`dyf evaluate [OPTIONS] FORECAST`, `--out PATH`)
    and that also takes the global `--json` and `--verbose` after its name (`dyf evaluate F --json`).

    Typer shows required arguments as `{name}` and values as Python type names (`<list[str]>`); every
    parameter without its own metavar gets an upper-case one here (`METAVARS`, else as argparse does:
    `--method METHOD`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None and param.param_type_name == "argument":
                param.metavar = param.name.upper()
            elif param.metavar is None and not getattr(param, "is_flag", False):
                param.metavar = _option_metavar(param.opts)

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx, formatter) -> None:
        """Arguments by their metavar alone (Typer appends a type such as `<path>`), then the options."""
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append((param.metavar + ("..." if param.nargs != 1 else ""), record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


# What the value of a common option is (docs/design.md §2 spells them so); other options show their own name.
METAVARS = {"--out": "PATH", "--data": "STORE", "--truth": "STORE", "--ckpt": "MODEL.pt",
            "--interpolator": "INTERPOLATOR.pt", "--preset": "NAME|FILE", "--set": "KEY=VALUE",
            "--device": "auto|cpu|cuda[:N]", "--init": "SELECTION", "--steps": "SCHEDULE", "--horizon": "H",
            "--ensemble": "M", "--seed": "S", "--member-batch": "B", "--plots": "DIR", "--var": "NAME[@LEVEL][,...]",
            "--from": "DIR", "--workers": "N", "--tile": "N", "--scheduler": "ADDRESS"}


def _option_metavar(opts: list[str]) -> str:
    """`METAVARS`, else as argparse does: `--member-batch` -> MEMBER_BATCH (its longest spelling)."""
    longest = max(opts, key=len)
    return METAVARS.get(longest) or longest.lstrip("-").upper().replace("-", "_")


class DyfGroup(TyperGroup):
    """Lists its commands in pipeline order (`PIPELINE_ORDER`), then the others as registered."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return [name for name in PIPELINE_ORDER if name in names] + [n for n in names if n not in PIPELINE_ORDER]


class DyfTyper(typer.Typer):
    """A Typer app whose commands are `DyfCommand`s taking the global flags too, so every command module
    gets the same conventions."""

    def command(self, *args, cls=None, **kwargs):
        register = super().command(*args, cls=cls or DyfCommand, **kwargs)
        return lambda function: register(_with_global_flags(function))


def _with_global_flags(function: Callable) -> Callable:
    """`function` with `--json` and `--verbose` added to its options, so they work after the command's
    name as well as before it (`dyf evaluate F --json`)."""
    signature = inspect.signature(function, eval_str=True)
    flags = [
        inspect.Parameter("dyf_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--json", help="Print one JSON document on stdout at the end (as `dyf --json`).")),
        inspect.Parameter("dyf_verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--verbose", "-v", help="More log lines; tracebacks for internal errors (as `dyf --verbose`).")),
    ]

    @functools.wraps(function)
    def command(*args, dyf_json: bool = False, dyf_verbose: bool = False, **kwargs):
        _apply_global_flags(json_output=OPTIONS.json or dyf_json, verbose=OPTIONS.verbose or dyf_verbose)
        return function(*args, **kwargs)

    command.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *flags])
    command.__annotations__ = {**function.__annotations__, "dyf_json": bool, "dyf_verbose": bool}
    return command


def _apply_global_flags(json_output: bool, verbose: bool) -> None:
    OPTIONS.json = json_output
    OPTIONS.verbose = verbose
    from dyfcli.runtime import setup_logging

    setup_logging(verbose)


app = DyfTyper(
    name="dyf",
    help="Train and run DYffusion probabilistic forecasters on gridded spatiotemporal data.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=DyfGroup,
    context_settings=CONTEXT_SETTINGS,
)
prepare_app = DyfTyper(
    help="Turn raw files or a built-in simulator into a data store (Zarr).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=DyfGroup,
)
app.add_typer(prepare_app, name="prepare")


def _print_version(value: bool) -> None:
    if value:
        from dyfcli import __version__

        print(f"dyf {__version__}")
        raise typer.Exit(0)


@app.callback()
def _global(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document on stdout at the end."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines; tracebacks for internal errors."),
    _version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                  help="Print dyf's version and exit."),
) -> None:
    _apply_global_flags(json_output, verbose)


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
