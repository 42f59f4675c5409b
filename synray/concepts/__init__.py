"""Concept banks (built-in or user files) and the deterministic per-row plan of concept and template."""

from synray.concepts.bank import (
    BUILTIN_PREFIX,
    KINDS,
    Concept,
    ConceptError,
    builtin_banks,
    load_bank,
    load_concepts,
)
from synray.concepts.sampling import TEMPLATES, RowPlan, plan_row, plan_rows, row_rng

__all__ = [
    "BUILTIN_PREFIX", "KINDS", "TEMPLATES", "Concept", "ConceptError", "RowPlan",
    "builtin_banks", "load_bank", "load_concepts", "plan_row", "plan_rows", "row_rng",
]
