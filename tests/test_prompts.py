"""Tests for the SynCLR and LaCLIP prompt builders, their example pools and the tiny-LLM corpus."""

from __future__ import annotations

import re

import pytest

from synray.language.corpus import caption_vocabulary_texts, training_corpus
from synray.language.prompts import (
    LACLIP_HEADER,
    NUM_LACLIP_POOLS,
    SYNCLR_HEADERS,
    first_line,
    laclip_pool,
    laclip_prompt,
    synclr_input,
    synclr_pool,
    synclr_prompt,
)
from synray.concepts import Concept, RowPlan, load_bank, plan_rows
from synray.config import ConceptsConfig

DOG = Concept("dog", "object", ("park", "beach"))
EXAMPLE_RE = re.compile(r"^[^=]+ => [^=]+$")


def _plans():
    return {
        "c": RowPlan(DOG, 0, "c"),
        "c_bg": RowPlan(DOG, 0, "c_bg", background="park"),
        "c_rel": RowPlan(DOG, 0, "c_rel", relation="next to"),
    }


@pytest.mark.parametrize("template,query", [("c", "dog =>"), ("c_bg", "dog, park =>"), ("c_rel", "dog, next to =>")])
def test_synclr_prompt_structure(template, query):
    plan = _plans()[template]
    lines = synclr_prompt(plan, seed=0, row_id=5).split("\n")
    assert lines[0] == SYNCLR_HEADERS[template]
    assert len(lines) == 5 and lines[-1] == query
    pool = set(synclr_pool(template))
    for line in lines[1:4]:
        assert EXAMPLE_RE.match(line), line
        src, tgt = line.split(" => ")
        assert (src, tgt) in pool
    assert len(set(lines[1:4])) == 3


def test_headers_are_the_papers():
    assert SYNCLR_HEADERS["c"] == "Generate an image description with an object category:"
    assert SYNCLR_HEADERS["c_bg"] == ("Generate an image description with an object category "
                                      "and an environment category:")
    assert SYNCLR_HEADERS["c_rel"] == "Generate an image description with an object category and a relation:"


def test_synclr_inputs():
    plans = _plans()
    assert [synclr_input(plans[t]) for t in ("c", "c_bg", "c_rel")] == ["dog", "dog, park", "dog, next to"]


def test_places_and_textures_use_c_header():
    for kind in ("place", "texture"):
        plan = RowPlan(Concept("thing", kind), 0, "c_bg", background="x")
        lines = synclr_prompt(plan, 0, 0).split("\n")
        assert lines[0] == SYNCLR_HEADERS["c"] and lines[-1] == "thing =>"


def test_synclr_prompt_deterministic_per_row():
    plan = _plans()["c"]
    a = [synclr_prompt(plan, 3, i) for i in range(50)]
    b = [synclr_prompt(plan, 3, i) for i in reversed(range(50))][::-1]
    assert a == b
    assert len(set(a)) > 10
    assert a != [synclr_prompt(plan, 4, i) for i in range(50)]


def test_num_examples():
    plan = _plans()["c_rel"]
    assert synclr_prompt(plan, 0, 0, num_examples=0).split("\n") == [SYNCLR_HEADERS["c_rel"], "dog, next to =>"]
    assert len(synclr_prompt(plan, 0, 0, num_examples=8).split("\n")) == 10
    with pytest.raises(ValueError, match="num_examples=500"):
        synclr_prompt(plan, 0, 0, num_examples=500)


def test_examples_never_about_the_query_concept():
    plan = RowPlan(Concept("kayak", "object", ("mountain lake",)), 0, "c_bg", background="mountain lake")
    for row in range(200):
        examples = synclr_prompt(plan, 0, row).split("\n")[1:-1]
        assert not any(e.startswith("kayak,") for e in examples)


def test_pools_are_large_and_well_formed():
    for template in SYNCLR_HEADERS:
        pool = synclr_pool(template)
        assert len(pool) >= 30 and len(set(pool)) == len(pool)
        for src, tgt in pool:
            assert "=>" not in tgt and "\n" not in tgt
            assert src.count(",") == (0 if template == "c" else 1), src
    for index in range(NUM_LACLIP_POOLS):
        pool = laclip_pool(index)
        assert len(pool) >= 15 and len(set(pool)) == len(pool)
    assert NUM_LACLIP_POOLS >= 4
    assert laclip_pool(NUM_LACLIP_POOLS + 1) == laclip_pool(1)


def test_laclip_prompt_format():
    prompt = laclip_prompt("a dog on a  beach\n", seed=0, row_id=2, rewrite_index=1)
    lines = prompt.split("\n")
    assert lines[0] == LACLIP_HEADER == "write image captions differently,"
    assert len(lines) == 5 and lines[-1] == "a dog on a beach =>"
    pool = set(laclip_pool(1))
    for line in lines[1:4]:
        assert tuple(line.split(" => ")) in pool


def test_laclip_rewrites_use_different_pools_and_are_deterministic():
    prompts = [laclip_prompt("a cat", 0, 9, k) for k in range(NUM_LACLIP_POOLS)]
    for k, prompt in enumerate(prompts):
        assert all(tuple(line.split(" => ")) in set(laclip_pool(k)) for line in prompt.split("\n")[1:4])
    assert prompts == [laclip_prompt("a cat", 0, 9, k) for k in range(NUM_LACLIP_POOLS)]
    with pytest.raises(ValueError, match="empty caption"):
        laclip_prompt("  ", 0, 0, 0)


def test_first_line():
    assert first_line(" a dog in a park.\nbird => a bird") == "a dog in a park."
    assert first_line("  spaced out  ") == "spaced out"
    assert first_line("") == "" and first_line("\nsecond") == ""


# ---------------------------------------------------------------------------------------- corpus
def test_corpus_documents_look_like_prompts_plus_caption():
    docs = training_corpus(seed=0, num_docs=400)
    assert len(docs) == 400
    names = {c.name for c in load_bank("builtin:everyday")}
    headers = set(SYNCLR_HEADERS.values())
    laclip = 0
    for doc in docs:
        assert doc.endswith("\n") and doc.count("\n") == 5
        lines = doc[:-1].split("\n")
        query, _, answer = lines[-1].partition(" => ")
        assert answer and "=>" not in answer
        if lines[0] == LACLIP_HEADER:
            laclip += 1
            continue
        assert lines[0] in headers
        concept = query.split(",")[0]
        assert concept in names
        assert concept in answer
    assert 0.12 < laclip / len(docs) < 0.28


def test_corpus_matches_the_llm_stage_prompts():
    seed = 4
    docs = training_corpus(seed, 50)
    bank = load_bank("builtin:everyday")
    plans = plan_rows(bank, ConceptsConfig(), seed, 0, 50)
    matched = 0
    for i, (doc, plan) in enumerate(zip(docs, plans)):
        prompt = synclr_prompt(plan, seed, i)
        if not doc.startswith(LACLIP_HEADER):
            assert doc.startswith(prompt + " ")
            matched += 1
    assert matched > 25


def test_corpus_deterministic():
    docs = training_corpus(1, 3000)
    assert docs == training_corpus(1, 3000)
    assert docs[:100] == training_corpus(1, 100)
    assert docs != training_corpus(2, 3000)


def test_vocabulary_texts_cover_the_bank():
    text = "\n".join(caption_vocabulary_texts())
    for c in load_bank("builtin:everyday"):
        assert c.name in text
    assert LACLIP_HEADER in text
