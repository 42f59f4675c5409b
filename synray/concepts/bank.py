"""Concept banks: the `Concept` record and loading banks from built-ins or .txt/.csv/.json/.parquet files."""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq

from synray.config import ConceptsConfig

KINDS = ("object", "place", "texture", "shape")
DEFAULT_KIND = "object"
BUILTIN_PREFIX = "builtin:"
SUPPORTED_SUFFIXES = (".txt", ".csv", ".json", ".parquet")
BACKGROUND_SEPARATOR = "|"
_BUILTIN_SUFFIXES = (".csv", ".json", ".txt")


class ConceptError(ValueError):
    """A concept bank that cannot be used; the message names the bank and the problem."""


@dataclass(frozen=True)
class Concept:
    """One concept of a bank. Its label is its index in the loaded (filtered) bank."""

    name: str
    kind: str
    backgrounds: tuple[str, ...] = ()


# A raw entry read from a bank file: (where in the file, {"concept": ..., "kind": ..., "backgrounds": ...}).
_Record = tuple[str, dict[str, Any]]


# ------------------------------------------------------------------------------------ built-ins
def _banks_dir() -> Any:
    return resources.files("synray") / "concepts" / "banks"


def builtin_banks() -> list[str]:
    """Names of the built-in banks (use them as `builtin:NAME`)."""
    names = {p.name.rsplit(".", 1)[0] for p in _banks_dir().iterdir()
             if p.name.endswith(_BUILTIN_SUFFIXES)}
    return sorted(names)


@functools.lru_cache(maxsize=8)
def _builtin_concepts(name: str) -> tuple[Concept, ...]:
    root = _banks_dir()
    for suffix in _BUILTIN_SUFFIXES:
        res = root / f"{name}{suffix}"
        if res.is_file():
            label = f"{BUILTIN_PREFIX}{name}"
            return tuple(_to_concepts(_parse_text(res.read_text(encoding="utf-8"), suffix, label), label))
    available = ", ".join(f"{BUILTIN_PREFIX}{n}" for n in builtin_banks()) or "none"
    raise ConceptError(f"unknown built-in concept bank {BUILTIN_PREFIX}{name!r}; available: {available}")


# --------------------------------------------------------------------------------------- public
def load_bank(spec: str, kinds: list[str] | None = None, max_concepts: int | None = None) -> list[Concept]:
    """Load a bank (`builtin:NAME` or a file), keep only `kinds`, then the first `max_concepts`.

    Concept names must be unique (compared case-insensitively, whitespace collapsed). Raises
    ConceptError for a missing/unreadable file, an unknown built-in, a missing `concept` column,
    a bad kind, duplicate names or an empty bank after filtering.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConceptError(f"concept bank spec must be 'builtin:NAME' or a file path, got {spec!r}")
    spec = spec.strip()
    if spec.startswith(BUILTIN_PREFIX):
        label = spec
        concepts = list(_builtin_concepts(spec[len(BUILTIN_PREFIX):].strip()))
    else:
        label = spec
        concepts = _to_concepts(_read_file(Path(spec).expanduser()), label)
    return _filter(concepts, label, kinds, max_concepts)


def load_concepts(cfg: ConceptsConfig) -> list[Concept]:
    """The bank a `ConceptsConfig` asks for (bank, kinds, max_concepts)."""
    return load_bank(cfg.bank, cfg.kinds, cfg.max_concepts)


# -------------------------------------------------------------------------------------- reading
def _read_file(path: Path) -> list[_Record]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ConceptError(f"concept bank {path}: unsupported file type {suffix or '(none)'!r}; "
                           f"use one of {', '.join(SUPPORTED_SUFFIXES)} or builtin:NAME")
    if not path.exists():
        raise ConceptError(f"concept bank file not found: {path}")
    if not path.is_file():
        raise ConceptError(f"concept bank {path} is not a file")
    if suffix == ".parquet":
        return _parse_parquet(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConceptError(f"cannot read concept bank {path}: {e}") from None
    return _parse_text(text, suffix, str(path))


def _parse_text(text: str, suffix: str, label: str) -> list[_Record]:
    if suffix == ".txt":
        return _parse_txt(text)
    if suffix == ".csv":
        return _parse_csv(text, label)
    return _parse_json(text, label)


def _parse_txt(text: str) -> list[_Record]:
    out: list[_Record] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((f"line {lineno}", {"concept": line}))
    return out


def _parse_csv(text: str, label: str) -> list[_Record]:
    try:
        reader = csv.DictReader(io.StringIO(text))
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "concept" not in fields:
            raise ConceptError(f"concept bank {label}: missing 'concept' column "
                               f"(found columns: {', '.join(fields) or 'none'})")
        reader.fieldnames = fields
        out: list[_Record] = []
        for row in reader:
            if all(not (v or "").strip() for k, v in row.items() if k is not None):
                continue
            out.append((f"line {reader.line_num}", row))
        return out
    except csv.Error as e:
        raise ConceptError(f"cannot read concept bank {label}: malformed CSV: {e}") from None


def _parse_json(text: str, label: str) -> list[_Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConceptError(f"cannot read concept bank {label}: malformed JSON: {e}") from None
    if isinstance(data, dict):
        if "concepts" not in data:
            raise ConceptError(f"concept bank {label}: a JSON object needs a 'concepts' list "
                               f"(found keys: {', '.join(map(str, data)) or 'none'})")
        data = data["concepts"]
    if not isinstance(data, list):
        raise ConceptError(f"concept bank {label}: JSON must be a list of concepts or "
                           f"{{\"concepts\": [...]}}, got {type(data).__name__}")
    out: list[_Record] = []
    for i, item in enumerate(data):
        where = f"item {i}"
        if isinstance(item, str):
            item = {"concept": item}
        elif not isinstance(item, dict):
            raise ConceptError(f"concept bank {label}: {where} must be an object or a string, "
                               f"got {type(item).__name__}")
        elif "concept" not in item:
            raise ConceptError(f"concept bank {label}: {where} has no 'concept' key "
                               f"(keys: {', '.join(map(str, item)) or 'none'})")
        out.append((where, item))
    return out


def _parse_parquet(path: Path) -> list[_Record]:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for bad files
        raise ConceptError(f"cannot read concept bank {path}: {e}") from None
    columns = {name.lower(): name for name in table.column_names}
    if "concept" not in columns:
        raise ConceptError(f"concept bank {path}: missing 'concept' column "
                           f"(found columns: {', '.join(table.column_names) or 'none'})")
    data = {key: table.column(columns[key]).to_pylist()
            for key in ("concept", "kind", "backgrounds") if key in columns}
    return [(f"row {i}", {k: v[i] for k, v in data.items()}) for i in range(table.num_rows)]


# ------------------------------------------------------------------------------------ validating
def _clean_name(value: Any) -> str:
    return re.sub(r"\s+", " ", str(value)).strip() if value is not None else ""


def _backgrounds(value: Any, label: str, where: str) -> tuple[str, ...]:
    if value is None or (isinstance(value, float) and value != value):
        return ()
    if isinstance(value, str):
        parts: Iterable[Any] = value.split(BACKGROUND_SEPARATOR)
    elif isinstance(value, (list, tuple)):
        parts = value
    else:
        raise ConceptError(f"concept bank {label}: {where}: 'backgrounds' must be a "
                           f"'{BACKGROUND_SEPARATOR}'-separated string or a list, got {type(value).__name__}")
    out: dict[str, None] = {}
    for part in parts:
        name = _clean_name(part)
        if name:
            out[name] = None
    return tuple(out)


def _to_concepts(records: list[_Record], label: str) -> list[Concept]:
    concepts: list[Concept] = []
    first_seen: dict[str, str] = {}
    for where, rec in records:
        name = _clean_name(rec.get("concept"))
        if not name:
            raise ConceptError(f"concept bank {label}: {where} has an empty concept name")
        kind_raw = rec.get("kind")
        kind = _clean_name(kind_raw).lower() or DEFAULT_KIND
        if kind not in KINDS:
            raise ConceptError(f"concept bank {label}: {where}: bad kind {kind_raw!r} for concept "
                               f"{name!r}; allowed: {', '.join(KINDS)}")
        key = name.casefold()
        if key in first_seen:
            raise ConceptError(f"concept bank {label}: duplicate concept name {name!r} "
                               f"({first_seen[key]} and {where})")
        first_seen[key] = where
        concepts.append(Concept(name, kind, _backgrounds(rec.get("backgrounds"), label, where)))
    return concepts


def _filter(concepts: list[Concept], label: str, kinds: list[str] | None,
            max_concepts: int | None) -> list[Concept]:
    if kinds is not None:
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ConceptError(f"unknown concept kind(s) {', '.join(map(repr, bad))}; "
                               f"allowed: {', '.join(KINDS)}")
        wanted = set(kinds)
        concepts = [c for c in concepts if c.kind in wanted]
    if max_concepts is not None:
        if max_concepts < 1:
            raise ConceptError(f"max_concepts must be >= 1, got {max_concepts}")
        concepts = concepts[:max_concepts]
    if not concepts:
        detail = f" after keeping kinds {', '.join(kinds)}" if kinds is not None else ""
        raise ConceptError(f"concept bank {label} is empty{detail}")
    return concepts
