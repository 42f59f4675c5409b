"""The error type of evaluation inputs that cannot be used (bad datasets, models or protocol requests)."""

from __future__ import annotations

__all__ = ["EvalError"]


class EvalError(ValueError):
    """An evaluation input that cannot be used; the message names what was found and what is expected."""
