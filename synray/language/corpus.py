"""Deterministic text corpus (prompt + good completion documents) for pre-training the tiny caption LLM.

Each document is exactly what the LLM stage sends, followed by " " + a caption + "\n":
about 80% SynCLR prompts over the built-in `everyday` bank, about 20% LaCLIP rewrite prompts.
Target captions come from a small grammar and always mention the query's concept (and its
background or relation), so a model trained on them answers `dog =>` with a caption about a dog.
"""

from __future__ import annotations

import functools

import numpy as np

from synray.language.prompts import (
    DEFAULT_NUM_EXAMPLES,
    LACLIP_HEADER,
    NUM_LACLIP_POOLS,
    SYNCLR_HEADERS,
    laclip_pool,
    laclip_prompt,
    synclr_pool,
    synclr_prompt,
)
from synray.language.templates import with_article
from synray.concepts import Concept, RowPlan, load_bank, plan_row, row_rng
from synray.config import RELATIONS, ConceptsConfig

CORPUS_BANK = "builtin:everyday"
LACLIP_DOC_FRACTION = 0.2
_DOC_TAG = "captions.corpus_doc"

ADJECTIVES = (
    "red", "blue", "green", "yellow", "white", "black", "brown", "grey", "orange", "pink", "purple",
    "small", "large", "tiny", "big", "old", "new", "shiny", "wooden", "metal", "bright", "dark",
    "colorful", "vintage", "modern", "soft", "wet", "dusty", "clean", "striped", "round", "tall",
    "cozy", "quiet", "lonely", "happy", "sleepy", "worn", "golden", "silver",
)
SETTINGS = (
    "in the morning light", "at sunset", "at night", "on a sunny day", "on a rainy day",
    "in the snow", "under a cloudy sky", "in soft light", "at dawn", "in the afternoon sun",
)
SURFACES = ("wooden table", "white background", "stone floor", "grass", "shelf", "blanket", "sand")
PLACE_DETAILS = (
    "with a few people walking by", "with warm lights", "with no one around", "full of colors",
    "seen from above", "with a clear blue sky", "covered in fog", "after the rain",
)
TEXTURE_FORMS = (
    "a close-up of {c}", "a detailed texture of {c}", "a macro photo of {adj} {c}",
    "a pattern of {c} filling the frame", "the surface of {c} in soft light",
)
OBJECT_FORMS = (
    "{a_adj} {c}", "{a_adj} {c} {setting}", "a close-up photo of {a_adj} {c}",
    "{a_adj} {c} on a {surface}", "{a_adj} {c} and {a_other}", "a photo of {a_adj} {c} {setting}",
)
BACKGROUND_FORMS = (
    "{a_adj} {c} in the {bg}", "{a_adj} {c} in the {bg} {setting}", "a photo of {a_adj} {c} in a {bg}",
    "{a_c} in a {adj2} {bg}", "{a_adj} {c} and {a_other} in the {bg}",
)
RELATION_FORMS = (
    "{a_adj} {c} {rel} {a_other}", "{a_adj} {c} {rel} {a_adj2} {other}",
    "{a_c} {rel} {a_other} {setting}", "a photo of {a_adj} {c} {rel} {a_other}",
)
PLACE_FORMS = (
    "a view of the {c} {setting}", "{a_adj} {c} {detail}", "a wide photo of {a_c} {setting}",
    "the {c} {detail}",
)


@functools.lru_cache(maxsize=1)
def _bank() -> tuple[tuple[Concept, ...], tuple[str, ...]]:
    concepts = tuple(load_bank(CORPUS_BANK))
    objects = tuple(c.name for c in concepts if c.kind == "object")
    return concepts, objects


def _pick(rng: np.random.Generator, items: tuple[str, ...]) -> str:
    return items[int(rng.integers(len(items)))]


def synth_caption(plan: RowPlan, rng: np.random.Generator) -> str:
    """A short grammatical caption about the plan's concept (and its background or relation)."""
    _, objects = _bank()
    c = plan.concept.name
    adj, adj2 = _pick(rng, ADJECTIVES), _pick(rng, ADJECTIVES)
    other = _pick(rng, objects)
    while other == c:
        other = _pick(rng, objects)
    fields = {
        "c": c, "a_c": with_article(c), "adj": adj, "adj2": adj2, "a_adj": with_article(adj),
        "a_adj2": with_article(adj2), "other": other, "a_other": with_article(other),
        "setting": _pick(rng, SETTINGS), "surface": _pick(rng, SURFACES), "detail": _pick(rng, PLACE_DETAILS),
        "bg": plan.background or "", "rel": plan.relation or "",
    }
    if plan.concept.kind == "place":
        forms = PLACE_FORMS
    elif plan.concept.kind == "texture":
        forms = TEXTURE_FORMS
    elif plan.template == "c_bg" and plan.background:
        forms = BACKGROUND_FORMS
    elif plan.template == "c_rel" and plan.relation:
        forms = RELATION_FORMS
    else:
        forms = OBJECT_FORMS
    return _pick(rng, forms).format(**fields)


def training_corpus(seed: int, num_docs: int, num_examples: int = DEFAULT_NUM_EXAMPLES) -> list[str]:
    """`num_docs` documents; document i depends only on (seed, i)."""
    if num_docs < 0:
        raise ValueError(f"num_docs must be >= 0, got {num_docs}")
    concepts, _ = _bank()
    cfg = ConceptsConfig()
    docs: list[str] = []
    for i in range(num_docs):
        rng = row_rng(seed, i, _DOC_TAG)
        plan = plan_row(concepts, cfg, seed, i)
        if rng.random() < LACLIP_DOC_FRACTION:
            source = synth_caption(plan, rng)
            rewrite = synth_caption(plan, rng)
            prompt = laclip_prompt(source, seed, i, int(rng.integers(NUM_LACLIP_POOLS)), num_examples)
            docs.append(f"{prompt} {rewrite}\n")
        else:
            docs.append(f"{synclr_prompt(plan, seed, i, num_examples)} {synth_caption(plan, rng)}\n")
    return docs


def caption_vocabulary_texts() -> list[str]:
    """Every fixed string the prompts can contain (headers, pool lines, bank names, relations).

    A tokenizer trained on the corpus plus these texts covers every concept, even ones the
    sampled corpus missed.
    """
    concepts, _ = _bank()
    texts = [*SYNCLR_HEADERS.values(), LACLIP_HEADER, " ".join(RELATIONS)]
    for template in SYNCLR_HEADERS:
        texts.extend(f"{src} => {tgt}" for src, tgt in synclr_pool(template))
    for index in range(NUM_LACLIP_POOLS):
        texts.extend(f"{src} => {tgt}" for src, tgt in laclip_pool(index))
    for concept in concepts:
        texts.append(", ".join((concept.name, *concept.backgrounds)))
    return texts
