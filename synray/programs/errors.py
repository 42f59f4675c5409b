"""Which exceptions are bad input (exit status 2 and a one-line message) rather than bugs, for the command and the jobs."""

from __future__ import annotations

from synray.config import ConfigError

#: exit status of a command or job refused for bad input (a config, a path, a model, a store)
EXIT_BAD_INPUT = 2


def bad_input_message(e: BaseException) -> str | None:
    """What to print for input the user must fix: synray's own errors and missing files; None for anything else."""
    if isinstance(e, ConfigError):
        return f"synray: {e}"
    if isinstance(e, FileNotFoundError) or (isinstance(e, ValueError) and type(e).__module__.startswith("synray")):
        return f"synray: error: {e}"
    return None
