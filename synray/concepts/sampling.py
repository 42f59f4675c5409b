"""Deterministic per-row sampling of a concept and its SynCLR template (c / c_bg / c_rel)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from synray.concepts.bank import Concept, ConceptError
from synray.config import ConceptsConfig

TEMPLATES = ("c", "c_bg", "c_rel")
_PLAN_TAG = "concepts.plan_row"


def _tag_int(tag: str) -> int:
    return zlib.crc32(tag.encode("utf-8"))


def row_rng(seed: int, row_id: int, tag: str, *extra: int) -> np.random.Generator:
    """A generator that depends only on (seed, row_id, tag, *extra): never on batching or call order.

    Each consumer passes its own `tag`, so the streams of different consumers are independent.
    """
    if seed < 0 or row_id < 0 or any(e < 0 for e in extra):
        raise ValueError(f"seed, row_id and extra keys must be >= 0, got {seed}, {row_id}, {extra}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(row_id), _tag_int(tag),
                                                         *map(int, extra)]))


@dataclass(frozen=True)
class RowPlan:
    """What one row (one caption) is about: the concept, its label and the prompt template inputs."""

    concept: Concept
    label: int
    template: str
    background: str | None = None
    relation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat provenance fields for a data row."""
        return {"concept": self.concept.name, "kind": self.concept.kind, "label": self.label,
                "template": self.template, "background": self.background, "relation": self.relation}


def _template_cdf(cfg: ConceptsConfig) -> np.ndarray:
    w = cfg.template_weights
    weights = np.array([w.c, w.c_bg, w.c_rel], dtype=np.float64)
    total = weights.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"template weights must sum to > 0, got {weights.tolist()}")
    return np.cumsum(weights / total)


def plan_row(concepts: Sequence[Concept], cfg: ConceptsConfig, seed: int, row_id: int) -> RowPlan:
    """The plan of row `row_id`: a concept drawn uniformly from the bank, then a template.

    Concept choice is uniform (with replacement) from a per-row generator, so row plans depend on
    (seed, row_id) only. Objects draw their template by `cfg.template_weights` (normalised); an
    object without backgrounds falls back from c_bg to c. Other kinds always use "c". Four numbers
    are always drawn, so changing the weights never changes which concept a row gets.
    """
    if not concepts:
        raise ConceptError("cannot plan rows over an empty concept bank")
    rng = row_rng(seed, row_id, _PLAN_TAG)
    label = int(rng.integers(len(concepts)))
    u_template, u_background, u_relation = rng.random(3)
    concept = concepts[label]
    if concept.kind != "object":
        return RowPlan(concept, label, "c")
    template = TEMPLATES[min(int(np.searchsorted(_template_cdf(cfg), u_template, side="right")),
                             len(TEMPLATES) - 1)]
    if template == "c_bg":
        if not concept.backgrounds:
            return RowPlan(concept, label, "c")
        bg = concept.backgrounds[int(u_background * len(concept.backgrounds))]
        return RowPlan(concept, label, "c_bg", background=bg)
    if template == "c_rel":
        relations = list(cfg.relations)
        if not relations:
            raise ValueError("template c_rel needs at least one relation in concepts.relations")
        return RowPlan(concept, label, "c_rel", relation=relations[int(u_relation * len(relations))])
    return RowPlan(concept, label, "c")


def plan_rows(concepts: Sequence[Concept], cfg: ConceptsConfig, seed: int, start: int, count: int) -> list[RowPlan]:
    """Plans of rows start .. start+count-1 (identical to calling plan_row on each)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return [plan_row(concepts, cfg, seed, row_id) for row_id in range(start, start + count)]
