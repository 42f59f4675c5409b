"""Tests for the model-free caption styles (classname, clip_templates, concept_background)."""

from __future__ import annotations

import pytest

from synray.language import templates
from synray.language.templates import (
    CLIP_TEMPLATES,
    register_style,
    template_caption,
    template_styles,
    with_article,
)
from synray.concepts import Concept, RowPlan, load_bank, plan_rows
from synray.config import ConceptsConfig

KAYAK = Concept("kayak", "object", ("calm lake", "river", "beach"))
APPLE = Concept("apple", "object", ())
BEACH = Concept("beach", "place", ())


def test_classname():
    assert template_caption(RowPlan(KAYAK, 0, "c_bg", background="river"), "classname", 0, 0) == "kayak"


def test_clip_templates():
    assert 20 <= len(CLIP_TEMPLATES) <= 80 and len(set(CLIP_TEMPLATES)) == len(CLIP_TEMPLATES)
    caps = {template_caption(RowPlan(APPLE, 0, "c"), "clip_templates", 0, i) for i in range(300)}
    assert len(caps) > 20
    assert all("apple" in c and "a apple" not in c for c in caps)
    assert "a photo of an apple." in caps


def test_concept_background_uses_backgrounds():
    caps = [template_caption(RowPlan(KAYAK, 0, "c"), "concept_background", 0, i) for i in range(200)]
    assert all("kayak" in c and any(bg in c for bg in KAYAK.backgrounds) for c in caps)
    assert {"kayak, river", "kayak in calm lake"} & set(caps)
    planned = template_caption(RowPlan(KAYAK, 0, "c_bg", background="beach"), "concept_background", 0, 1)
    assert "beach" in planned


def test_concept_background_falls_back_to_classname():
    assert template_caption(RowPlan(APPLE, 0, "c"), "concept_background", 0, 3) == "apple"
    assert template_caption(RowPlan(BEACH, 0, "c"), "concept_background", 0, 3) == "beach"


def test_deterministic_per_row():
    bank = load_bank("builtin:everyday")
    plans = plan_rows(bank, ConceptsConfig(), 2, 0, 100)
    for style in ("classname", "clip_templates", "concept_background"):
        a = [template_caption(p, style, 2, i) for i, p in enumerate(plans)]
        b = [template_caption(p, style, 2, i) for i, p in reversed(list(enumerate(plans)))][::-1]
        assert a == b and all(a)


def test_unknown_and_pending_styles():
    with pytest.raises(ValueError, match=r"unknown template style 'fancy'; allowed: classname, "
                                         r"clip_templates, concept_background"):
        template_caption(RowPlan(KAYAK, 0, "c"), "fancy", 0, 0)
    assert "shapes" in template_styles()  # registered by the procedural world on first use


def test_register_style(monkeypatch):
    monkeypatch.setattr(templates, "_STYLES", dict(templates._STYLES))
    register_style("upper", lambda plan, rng: plan.concept.name.upper())
    assert template_caption(RowPlan(KAYAK, 0, "c"), "upper", 0, 0) == "KAYAK"
    assert "upper" in template_styles()
    with pytest.raises(ValueError, match="already registered"):
        register_style("upper", lambda plan, rng: "")


def test_with_article():
    assert with_article("apple") == "an apple" and with_article("dog") == "a dog"
