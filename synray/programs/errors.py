"""Which exceptions are bad input (exit status 2 and a one-line message) rather than bugs, for the command and the jobs."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable

from synray.config import ConfigError

#: exit status of a command or job refused for bad input (a config, a path, a model, a store)
EXIT_BAD_INPUT = 2


#: the last line of a synray error's traceback inside a Ray worker's error text
_REMOTE_ERROR = re.compile(r"^\s*synray\.[\w.]+Error: (.+)$", re.MULTILINE)


def _is_synray_error(e: BaseException) -> bool:
    return isinstance(e, ValueError) and any(c.__module__.startswith("synray") for c in type(e).__mro__)


def _chain(e: BaseException):
    """e, then what caused it: `__cause__`/`__context__`, and the `cause` a Ray task error carries from a worker."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += [cur.__cause__, cur.__context__, getattr(cur, "cause", None)]


def bad_input_message(e: BaseException) -> str | None:
    """What to print for input the user must fix: synray's own errors (also when raised inside a Ray worker and
    wrapped by Ray) and missing files; None for anything else."""
    if isinstance(e, ConfigError):
        return f"synray: {e}"
    if isinstance(e, FileNotFoundError):
        return f"synray: error: {e}"
    chain = list(_chain(e))
    for cur in chain:
        if _is_synray_error(cur) and not isinstance(getattr(cur, "cause", None), BaseException):
            return f"synray: error: {cur}"   # (a Ray wrapper's own text is a traceback: its cause is used)
    for cur in chain:  # raised in a Ray worker and wrapped again there: only its traceback text came back
        found = _REMOTE_ERROR.search(str(cur))
        if found:
            return f"synray: error: {found.group(1)}"
    return None


def exit_status(fn: Callable[[], int]) -> int:
    """fn()'s exit status; bad input, found while planning or while running, is printed in one line and gives
    EXIT_BAD_INPUT. Anything else (a bug, a crash) propagates with its traceback."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - only bad input is turned into a message
        message = bad_input_message(e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return EXIT_BAD_INPUT


def job_logging(verbose: bool = False) -> None:
    """The log format of the `synray` command and the `jobs/` entrypoints."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
