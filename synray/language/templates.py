"""Model-free caption styles: classname, CLIP-style templates, concept+background (scaling-laws study), shapes.

Styles are functions `(plan, rng) -> caption` in a registry; a new style plugs in with
`register_style(name, fn)`. The procedural `shapes` style comes from synray.language.shapes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from synray.concepts import RowPlan, row_rng
from synray.language.shapes import shapes_caption

StyleFn = Callable[[RowPlan, np.random.Generator], str]

# "{a}" is the concept with its indefinite article ("an apple"), "{c}" the bare name.
CLIP_TEMPLATES: tuple[str, ...] = (
    "a photo of {a}.",
    "a photo of the {c}.",
    "a close-up photo of {a}.",
    "a close-up photo of the {c}.",
    "a bright photo of {a}.",
    "a dark photo of the {c}.",
    "a blurry photo of {a}.",
    "a cropped photo of the {c}.",
    "a good photo of {a}.",
    "a bad photo of the {c}.",
    "a low resolution photo of {a}.",
    "a jpeg corrupted photo of the {c}.",
    "a photo of a small {c}.",
    "a photo of a large {c}.",
    "a photo of the big {c}.",
    "a photo of my {c}.",
    "a photo of a clean {c}.",
    "a photo of a dirty {c}.",
    "a photo of a nice {c}.",
    "a photo of a weird {c}.",
    "a photo of a cool {c}.",
    "a black and white photo of {a}.",
    "a cropped image of {a}.",
    "an image of {a}.",
    "a picture of {a}.",
    "a rendering of {a}.",
    "a 3d render of the {c}.",
    "a painting of {a}.",
    "an oil painting of the {c}.",
    "a watercolor painting of {a}.",
    "a sketch of {a}.",
    "a drawing of the {c}.",
    "a cartoon {c}.",
    "a plastic {c}.",
    "a toy {c}.",
    "an origami {c}.",
    "a sculpture of {a}.",
    "an embroidered {c}.",
    "a tattoo of {a}.",
    "graffiti of {a}.",
    "art of the {c}.",
    "itap of {a}.",
    "a snapshot of {a}.",
    "a studio photo of {a}.",
    "a photo of {a} outdoors.",
    "a photo of {a} indoors.",
    "a photo of {a} in the wild.",
    "there is {a} in the scene.",
    "there is {a} in the photo.",
    "this is {a}.",
)

CONCEPT_BACKGROUND_FORMS: tuple[str, ...] = (
    "{c}, {bg}",
    "{c} in {bg}",
    "{a} in the {bg}",
    "a photo of {a} in the {bg}",
    "{a}, {bg} in the background",
)

CLASSNAME = "classname"
CLIP_TEMPLATES_STYLE = "clip_templates"
CONCEPT_BACKGROUND = "concept_background"
SHAPES = "shapes"
_STYLE_TAG = "captions.template_style"
_VOWELS = "aeiou"


def with_article(phrase: str) -> str:
    """`phrase` with "a" or "an" in front ("an apple", "a dog")."""
    phrase = phrase.strip()
    return f"an {phrase}" if phrase[:1].lower() in _VOWELS else f"a {phrase}"


def _fill(form: str, name: str, background: str | None = None) -> str:
    return form.format(c=name, a=with_article(name), bg=background or "")


def _classname(plan: RowPlan, rng: np.random.Generator) -> str:
    return plan.concept.name


def _clip_templates(plan: RowPlan, rng: np.random.Generator) -> str:
    return _fill(CLIP_TEMPLATES[int(rng.integers(len(CLIP_TEMPLATES)))], plan.concept.name)


def _concept_background(plan: RowPlan, rng: np.random.Generator) -> str:
    """The plan's background if it has one, else one of the concept's; the class name when it has none."""
    form_index = int(rng.integers(len(CONCEPT_BACKGROUND_FORMS)))
    bg_index = int(rng.integers(max(len(plan.concept.backgrounds), 1)))
    background = plan.background or (plan.concept.backgrounds[bg_index] if plan.concept.backgrounds else None)
    if not background:
        return plan.concept.name
    return _fill(CONCEPT_BACKGROUND_FORMS[form_index], plan.concept.name, background)


_STYLES: dict[str, StyleFn] = {
    CLASSNAME: _classname,
    CLIP_TEMPLATES_STYLE: _clip_templates,
    CONCEPT_BACKGROUND: _concept_background,
    SHAPES: shapes_caption,
}


def register_style(name: str, fn: StyleFn, replace: bool = False) -> None:
    """Add a caption style `fn(plan, rng) -> str` under `name`."""
    if name in _STYLES and not replace:
        raise ValueError(f"template style {name!r} is already registered")
    _STYLES[name] = fn


def template_styles() -> list[str]:
    """Names of the registered styles."""
    return sorted(_STYLES)


def template_caption(plan: RowPlan, style: str, seed: int, row_id: int) -> str:
    """The caption of a row for a model-free style; it depends only on (plan, style, seed, row_id)."""
    fn = _STYLES.get(style)
    if fn is None:
        raise ValueError(f"unknown template style {style!r}; allowed: {', '.join(template_styles())}")
    return fn(plan, row_rng(seed, row_id, _STYLE_TAG))
