"""Caption choice for LaCLIP training: one caption per draw among the original and its rewrites."""

from __future__ import annotations

import random
from typing import Any, Sequence

__all__ = ["pick_caption"]


def _randrange(rng: Any, n: int) -> int:
    if hasattr(rng, "integers"):  # numpy.random.Generator
        return int(rng.integers(n))
    if hasattr(rng, "randrange"):  # random.Random
        return int(rng.randrange(n))
    raise TypeError(f"rng must be a random.Random or numpy Generator, got {type(rng).__name__}")


def pick_caption(captions: Sequence[str], rng: random.Random | Any) -> str:
    """A caption drawn uniformly from ``[original, rewrite_1, ..., rewrite_k]``.

    ``captions[0]`` is the original. As in LaCLIP, a pick with fewer than 2 words falls back to
    the original. ``rng`` is a ``random.Random`` or a ``numpy.random.Generator``.
    """
    if not captions:
        raise ValueError("pick_caption needs at least the original caption")
    pick = captions[_randrange(rng, len(captions))]
    if not isinstance(pick, str) or len(pick.split()) < 2:
        return captions[0]
    return pick
