"""The `dyf` command line. Each module registers its commands on the shared Typer app."""

from __future__ import annotations

import sys

import typer

try:  # Typer >= 0.20 vendors Click as typer._click; older versions use Click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from dyfcli.cli.app import OPTIONS, app, error_document

# Registration happens on import; keep these imports light (no torch/xarray at module level).
from dyfcli.cli import prepare_sst as _prepare_sst  # noqa: F401,E402
from dyfcli.cli import prepare_sim as _prepare_sim  # noqa: F401,E402
from dyfcli.cli import prepare_netcdf as _prepare_netcdf  # noqa: F401,E402
from dyfcli.cli import train as _train  # noqa: F401,E402
from dyfcli.cli import forecast as _forecast  # noqa: F401,E402
from dyfcli.cli import evaluate as _evaluate  # noqa: F401,E402
from dyfcli.cli import export as _export  # noqa: F401,E402
from dyfcli.cli import inspect as _inspect  # noqa: F401,E402
from dyfcli.cli import presets as _presets  # noqa: F401,E402


def main(argv: list[str] | None = None) -> None:
    """Console entry point: map Click's usage errors to exit 2, and signals before a command runs to 130
    (Ctrl-C) or 128 + N (SIGTERM/SIGUSR1), each with a JSON error document under --json."""
    from dyfcli.runtime import Terminated, stop_signals_outside

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with stop_signals_outside():
            code = app(args=args, prog_name="dyf", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as err:  # e.g. `dyf prepare`: the help, and exit 2
        print(err.format_message(), file=sys.stderr)
        _error_exit(args, f"`{err.ctx.command_path}` needs a subcommand; see the list above" if err.ctx
                    else "a subcommand is needed", json_only=True)
    except click_exceptions.UsageError as err:
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
        _error_exit(args, err.format_message(), hint=hint)
    except typer.Abort:  # Ctrl-C before the command's own handling (Click turns it into Abort)
        _error_exit(args, "interrupted (SIGINT) before the command started", 130, "interrupted")
    except Terminated as err:
        _error_exit(args, f"stopped by {err.signal_name} before the command started", err.exit_code, "interrupted")
    except typer.Exit as err:
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _error_exit(args: list[str], message: str, code: int = 2, kind: str = "usage", hint: str = "",
                json_only: bool = False) -> None:
    """Exit `code` with an error line on stderr (unless `json_only`) and, with --json, the JSON error document."""
    if not json_only:
        print(f"error: {message}{hint}", file=sys.stderr)
    if "--json" in args:
        command = " ".join(a for a in args if not a.startswith("-"))[:80]
        print(error_document(command, message, code, kind))
    sys.exit(code)


__all__ = ["app", "main", "OPTIONS"]
