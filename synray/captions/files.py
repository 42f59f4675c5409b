"""Captions read from a file (StableRep renders the captions of an existing dataset): row i takes the file's line i."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pyarrow.parquet as pq

#: the column a Parquet caption file holds its captions in
CAPTION_COLUMN = "caption"


class CaptionFileError(ValueError):
    """A caption file that cannot be read as asked."""


@lru_cache(maxsize=2)
def read_caption_file(path: str) -> tuple[str, ...]:
    """The captions of a text file (one per line, blank lines skipped) or of a Parquet file's `caption` column,
    in file order; cached, since a plan-row actor asks for them once per batch."""
    p = Path(path)
    if not p.is_file():
        raise CaptionFileError(f"captions.source={path}: no such file (a text file with one caption per line, or "
                               f"Parquet with a {CAPTION_COLUMN!r} column, on storage every node sees)")
    if p.suffix == ".parquet":
        names = pq.read_schema(p).names
        if CAPTION_COLUMN not in names:
            raise CaptionFileError(f"captions.source={path} has no {CAPTION_COLUMN!r} column (it has {names})")
        captions = [str(c) for c in pq.read_table(p, columns=[CAPTION_COLUMN]).column(0).to_pylist() if c]
    else:
        captions = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise CaptionFileError(f"captions.source={path} holds no captions")
    return tuple(captions)
