"""The `dyf` command line. Each module registers its commands on the shared Typer app."""

from __future__ import annotations

import json
import sys

import typer

try:  # Typer >= 0.20 vendors Click as typer._click; older versions use Click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from dyfcli.cli.app import OPTIONS, app

# Registration happens on import; keep these imports light (no torch/xarray at module level).
from dyfcli.cli import prepare_sst as _prepare_sst  # noqa: F401,E402
from dyfcli.cli import prepare_sim as _prepare_sim  # noqa: F401,E402
from dyfcli.cli import prepare_netcdf as _prepare_netcdf  # noqa: F401,E402
from dyfcli.cli import train as _train  # noqa: F401,E402
from dyfcli.cli import forecast as _forecast  # noqa: F401,E402
from dyfcli.cli import evaluate as _evaluate  # noqa: F401,E402
from dyfcli.cli import inspect as _inspect  # noqa: F401,E402


def main(argv: list[str] | None = None) -> None:
    """Console entry point: map Click's usage errors to exit 2 (and a JSON error with --json)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=args, prog_name="dyf", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as err:
        print(err.format_message(), file=sys.stderr)
        sys.exit(2)
    except click_exceptions.UsageError as err:
        message = err.format_message()
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
        print(f"error: {message}{hint}", file=sys.stderr)
        if "--json" in args:
            print(json.dumps({"ok": False, "command": " ".join(a for a in args if not a.startswith("-"))[:80],
                              "error": {"kind": "usage", "message": message, "exit_code": 2}}))
        sys.exit(2)
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main", "OPTIONS"]
