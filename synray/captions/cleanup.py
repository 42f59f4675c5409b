"""Caption clean-up rules: normalise an LLM completion to one caption, or name why it is rejected."""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from synray.config import CleanupConfig
from synray.language.prompts import ARROW, first_line

EMPTY = "empty"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
NON_PRINTABLE = "non_printable"
DEGENERATE = "degenerate"
DUPLICATE = "duplicate"
REJECT_REASONS = (EMPTY, TOO_SHORT, TOO_LONG, NON_PRINTABLE, DEGENERATE, DUPLICATE)

# The one-word-share rule only applies from this many words on ("dog dog" is too_short already).
MIN_WORDS_FOR_REPEAT_CHECK = 4
# An n-gram (n <= LOOP_MAX_NGRAM) repeated back to back this many times is a generation loop.
LOOP_MIN_REPEATS = 3
LOOP_MAX_NGRAM = 4

_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}
_ALLOWED_SPACE = " \t"
_WORD_RE = re.compile(r"[^\w]+", re.UNICODE)


def _strip_quotes(text: str) -> str:
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _has_non_printable(text: str) -> bool:
    return "\ufffd" in text or any(not ch.isprintable() and ch not in _ALLOWED_SPACE for ch in text)


def _norm_words(words: list[str]) -> list[str]:
    return [w for w in (_WORD_RE.sub("", w.lower()) for w in words) if w]


def _has_loop(words: list[str]) -> bool:
    """True when some n-gram (n <= LOOP_MAX_NGRAM) repeats LOOP_MIN_REPEATS times in a row."""
    for n in range(1, LOOP_MAX_NGRAM + 1):
        span = n * LOOP_MIN_REPEATS
        for start in range(0, len(words) - span + 1):
            gram = words[start:start + n]
            if all(words[start + k * n:start + (k + 1) * n] == gram for k in range(1, LOOP_MIN_REPEATS)):
                return True
    return False


def is_degenerate(words: list[str], max_repeat_fraction: float) -> bool:
    """One word is more than `max_repeat_fraction` of the words, or the text loops on an n-gram."""
    norm = _norm_words(words)
    if not norm:
        return True
    if len(norm) >= MIN_WORDS_FOR_REPEAT_CHECK:
        top = Counter(norm).most_common(1)[0][1]
        if top / len(norm) > max_repeat_fraction:
            return True
    return _has_loop(norm)


def normalize_caption(text: str) -> str:
    """First line, whitespace collapsed, surrounding quotes removed, anything from "=>" on cut off."""
    line = " ".join(first_line(text).split())
    line = _strip_quotes(line)
    if ARROW in line:  # the model went on to write the next `input => caption` example
        line = _strip_quotes(line.split(ARROW, 1)[0].strip())
    return line


def clean_caption(text: str, cfg: CleanupConfig) -> tuple[str | None, str | None]:
    """(caption, None) for a usable caption, else (None, reason) with reason in REJECT_REASONS.

    Checks, in order: empty, non_printable, too_short / too_long (words and characters),
    degenerate. "duplicate" comes only from a CaptionDeduper.
    """
    raw_line = first_line(text if isinstance(text, str) else "")
    if not raw_line:
        return None, EMPTY
    if _has_non_printable(raw_line):
        return None, NON_PRINTABLE
    caption = normalize_caption(raw_line)
    if not caption:
        return None, EMPTY
    words = caption.split(" ")
    if len(words) < cfg.min_words or len(caption) < cfg.min_chars:
        return None, TOO_SHORT
    if len(words) > cfg.max_words or len(caption) > cfg.max_chars:
        return None, TOO_LONG
    if is_degenerate(words, cfg.max_repeat_fraction):
        return None, DEGENERATE
    return caption, None


class CaptionDeduper:
    """Remembers captions by a normalised key (lowercase, punctuation and extra spaces removed)."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    @staticmethod
    def key(caption: str) -> str:
        return " ".join(_norm_words(caption.split()))

    def seen(self, caption: str) -> bool:
        """True if an equivalent caption was seen before; otherwise remember it and return False."""
        k = self.key(caption)
        if k in self._keys:
            return True
        self._keys.add(k)
        return False

    def __len__(self) -> int:
        return len(self._keys)


class RejectionCounter(Counter):
    """Counts of rejected captions by reason (a Counter over REJECT_REASONS)."""

    def record(self, reason: str | None) -> None:
        if reason is not None:
            if reason not in REJECT_REASONS:
                raise ValueError(f"unknown rejection reason {reason!r}; allowed: {', '.join(REJECT_REASONS)}")
            self[reason] += 1

    @property
    def rejected(self) -> int:
        return sum(self.values())

    def as_dict(self) -> dict[str, int]:
        """All reasons, zeros included, in REJECT_REASONS order."""
        return {r: int(self.get(r, 0)) for r in REJECT_REASONS}


def clean_captions(texts: Iterable[str], cfg: CleanupConfig, deduper: CaptionDeduper | None = None,
                   counter: RejectionCounter | None = None) -> list[str | None]:
    """Clean each text in order: the caption, or None when rejected (reasons go to `counter`).

    Duplicates are rejected when `cfg.dedupe` is on; a fresh deduper is used if none is given.
    """
    if deduper is None and cfg.dedupe:
        deduper = CaptionDeduper()
    out: list[str | None] = []
    for text in texts:
        caption, reason = clean_caption(text, cfg)
        if caption is not None and cfg.dedupe and deduper is not None and deduper.seen(caption):
            caption, reason = None, DUPLICATE
        if counter is not None:
            counter.record(reason)
        out.append(caption)
    return out
