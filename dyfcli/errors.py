"""The exceptions that reach the user, each carrying its documented exit code (docs/design.md §2).

Raise them where data enters (flags, config, raw files, stores, checkpoints) with a message that names
the problem and the fix; `dyfcli.cli.app` maps them to one line on stderr and the exit code.
"""


class DyfError(Exception):
    """Base class: a one-line, user-facing error with an exit code."""

    exit_code = 1
    kind = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(DyfError):
    """Bad flags or flag values (exit 2)."""

    exit_code = 2
    kind = "usage"


class ConfigError(DyfError):
    """An invalid preset or `--set` override (exit 3)."""

    exit_code = 3
    kind = "config"


class DataError(DyfError):
    """Invalid or missing input data: raw files, stores, splits (exit 4)."""

    exit_code = 4
    kind = "data"


class CheckpointError(DyfError):
    """A missing, corrupt or incompatible checkpoint (exit 5)."""

    exit_code = 5
    kind = "checkpoint"


class Interrupted(DyfError):
    """Stopped by a signal after saving state; re-running the same command resumes (exit 75)."""

    exit_code = 75
    kind = "interrupted"


class Cancelled(Interrupted):
    """Stopped by Ctrl-C (SIGINT) after saving state; re-running the same command resumes (exit 130)."""

    exit_code = 130
