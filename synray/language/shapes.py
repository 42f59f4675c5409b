"""The caption language of the procedural shapes world: vocabulary, `ShapeScene`, parser, describer, caption style."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
import numpy as np

from synray.concepts import RowPlan

#: shape classes; mask value of a pixel covered by class i is 1 + i (0 = background). Order = builtin:shapes bank.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross",
                                  "ring", "diamond", "heart", "crescent")
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPE_CLASSES}
#: named object colours, RGB in 0..255; all bright, so they stand out from the world's dark backgrounds
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 55, 55), "green": (60, 200, 80), "blue": (70, 130, 255), "yellow": (245, 215, 50),
    "orange": (250, 140, 40), "purple": (175, 95, 235), "white": (245, 245, 245), "pink": (255, 135, 200),
}
#: object radius (circumradius) as a fraction of the image side, before count scaling and jitter; large
#: enough that a 32-pixel image shows the outline (at 0.7x these a mini ViT learned about half as fast)
SIZES: dict[str, float] = {"small": 0.28, "medium": 0.39, "large": 0.5}
#: count words -> count; "a"/"an"/"one" all mean 1 (describe writes the article)
COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
MAX_COUNT = 3
#: relations of the primary group to the secondary object(s); describe writes the first phrase of each
RELATIONS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below",),
    "next to": ("next to", "beside"),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "noisy", "gradient")
_VOWELS = "aeiou"

# Caption style. The shape is always named; colour, size and background each only with probability
# 1 - OMIT_ATTRIBUTE_P (else every image draws its own), so that what the m images of a caption share
# is mostly their shape: with attributes always named, a tiny ViT learns colours and textures first.
OMIT_ATTRIBUTE_P = 0.6
SECONDARY_P = 0.4                      # probability of a secondary object with a relation
COUNT_WEIGHTS = (0.75, 0.17, 0.08)     # primary count 1 / 2 / 3
SECONDARY_SIZES = ("small", "medium")  # the secondary object is always sized, and never large
_COUNT_P = np.asarray(COUNT_WEIGHTS, dtype=np.float64) / sum(COUNT_WEIGHTS)


def _check_choice(what: str, value: str | None, allowed: Iterable[str]) -> None:
    """ValueError naming the allowed words unless value is None or one of them."""
    if value is not None and value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class ShapeObject:
    """One group of identical objects: `count` shapes of one class; size/colour None = drawn per image."""

    shape: str
    count: int = 1
    size: str | None = None
    color: str | None = None

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPE_CLASSES)
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be 1..{MAX_COUNT}, got {self.count}")
        _check_choice("size", self.size, SIZES)
        _check_choice("colour", self.color, COLORS)

    @property
    def class_index(self) -> int:
        return SHAPE_CLASSES.index(self.shape)


@dataclass(frozen=True)
class ShapeScene:
    """A caption's meaning: a primary group, optionally a relation to a secondary group, a background texture."""

    primary: ShapeObject
    relation: str | None = None
    secondary: ShapeObject | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        if (self.relation is None) != (self.secondary is None):
            raise ValueError("a relation needs a secondary object and a secondary object needs a relation")
        _check_choice("relation", self.relation, RELATIONS)
        _check_choice("background", self.background, TEXTURES)

    @property
    def label(self) -> str:
        """The scene's class: the primary object's shape."""
        return self.primary.shape

    def mask_classes(self) -> set[int]:
        """Mask values (1 + class index) that the scene's objects produce."""
        objs = [self.primary] + ([self.secondary] if self.secondary else [])
        return {1 + o.class_index for o in objs}


# ------------------------------------------------------------------------------------- describe
def _describe_object(obj: ShapeObject) -> str:
    words = [w for w in (obj.size, obj.color) if w]
    words.append(obj.shape if obj.count == 1 else PLURALS[obj.shape])
    phrase = " ".join(words)
    if obj.count == 1:
        return ("an " if phrase[0] in _VOWELS else "a ") + phrase
    return f"{('one', 'two', 'three')[obj.count - 1]} {phrase}"


def describe(scene: ShapeScene) -> str:
    """The canonical caption of a scene (`parse_caption(describe(s)) == s`)."""
    parts = [_describe_object(scene.primary)]
    if scene.secondary is not None and scene.relation is not None:
        parts += [RELATIONS[scene.relation][0], _describe_object(scene.secondary)]
    if scene.background is not None:
        parts.append(f"on a {scene.background} background")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------- parse
_SINGULAR = {s: s for s in SHAPE_CLASSES}
_PLURAL = {p: s for s, p in PLURALS.items()}
_RELATION_PHRASES = sorted(((tuple(p.split()), name) for name, ps in RELATIONS.items() for p in ps),
                           key=lambda x: -len(x[0]))


class _Words:
    """A cursor over the words of a caption that builds error messages naming the unparsable part."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = re.sub(r"[.,;!]+", " ", text.lower()).split()
        self.i = 0

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.words[j] if j < len(self.words) else None

    def take(self) -> str | None:
        w = self.peek()
        self.i += 1
        return w

    def fail(self, expected: str) -> ValueError:
        got = " ".join(self.words[self.i:]) or "(end of caption)"
        return ValueError(f"cannot parse caption {self.text!r}: expected {expected} at {got!r}")


def _parse_object(w: _Words) -> ShapeObject:
    word = w.peek()
    if word not in COUNT_WORDS:
        raise w.fail(f"a count ({', '.join(COUNT_WORDS)})")
    count = COUNT_WORDS[w.take()]  # type: ignore[index]
    size = w.take() if w.peek() in SIZES else None
    color = w.take() if w.peek() in COLORS else None
    noun = w.peek()
    nouns = _SINGULAR if count == 1 else _PLURAL
    if noun not in nouns:
        form = "a shape" if count == 1 else "a plural shape"
        raise w.fail(f"{form} ({', '.join(nouns)})")
    w.take()
    return ShapeObject(nouns[noun], count, size, color)  # type: ignore[index]


def _parse_relation(w: _Words) -> str | None:
    for phrase, name in _RELATION_PHRASES:
        if tuple(w.words[w.i:w.i + len(phrase)]) == phrase:
            w.i += len(phrase)
            return name
    return None


def _parse_background(w: _Words) -> str:
    start = w.i
    if w.take() == "on" and w.peek() in ("a", "an"):
        w.take()
        texture = w.take()
        if texture in TEXTURES and w.take() == "background" and w.peek() is None:
            return texture
    w.i = start
    raise w.fail(f"'on a <texture> background' at the end (textures: {', '.join(TEXTURES)})")


def parse_caption(text: str) -> ShapeScene:
    """The scene a caption describes; raises ValueError naming the part that does not parse.

    Grammar (case-insensitive, punctuation ignored):
        caption    := object [relation object] ["on a" texture "background"]
        object     := count [size] [colour] shape      (plural shape when count > 1)
        count      := a | an | one | two | three
        relation   := (to the) left of | (to the) right of | above | below | next to | beside
    """
    if not isinstance(text, str):
        raise ValueError(f"cannot parse caption {text!r}: not a string")
    w = _Words(text)
    if not w.words:
        raise ValueError(f"cannot parse caption {text!r}: empty caption")
    primary = _parse_object(w)
    relation = secondary = background = None
    if w.peek() is not None and w.peek() != "on":
        relation = _parse_relation(w)
        if relation is None:
            raise w.fail(f"a relation ({', '.join(p for ps in RELATIONS.values() for p in ps)}) or "
                         "'on a <texture> background'")
        secondary = _parse_object(w)
    if w.peek() is not None:
        background = _parse_background(w)
    return ShapeScene(primary, relation, secondary, background)


# ---------------------------------------------------------------------------------- caption style
def _maybe(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str | None:
    """A uniform choice from options, or None with probability OMIT_ATTRIBUTE_P (always two draws)."""
    keep, pick = rng.random(), int(rng.integers(len(options)))
    return None if keep < OMIT_ATTRIBUTE_P else options[pick]


def random_scene(primary_shape: str, rng: np.random.Generator) -> ShapeScene:
    """A random scene whose primary object has class `primary_shape` (a fixed number of draws per scene)."""
    if primary_shape not in SHAPE_CLASSES:
        raise ValueError(f"the shapes caption style needs a shape-class concept; got {primary_shape!r} "
                         f"(shape classes: {', '.join(SHAPE_CLASSES)}; use concepts.bank=builtin:shapes)")
    count = 1 + int(rng.choice(len(_COUNT_P), p=_COUNT_P))
    size, color = _maybe(rng, tuple(SIZES)), _maybe(rng, tuple(COLORS))
    add_secondary = rng.random() < SECONDARY_P
    others = [s for s in SHAPE_CLASSES if s != primary_shape]
    sec_shape = others[int(rng.integers(len(others)))]
    sec_size = SECONDARY_SIZES[int(rng.integers(len(SECONDARY_SIZES)))]
    sec_color = _maybe(rng, tuple(COLORS))
    relation = tuple(RELATIONS)[int(rng.integers(len(RELATIONS)))]
    background = _maybe(rng, TEXTURES)
    fallback, fallback_pick = int(rng.integers(3)), rng.random()
    if not add_secondary and size is None and color is None and background is None:
        # "a heart" / "two stars" are too short for caption clean-up (min 3 words): name one attribute
        options = (tuple(SIZES), tuple(COLORS), TEXTURES)[fallback]
        value = options[int(fallback_pick * len(options))]
        size, color, background = [value if i == fallback else None for i in range(3)]
    primary = ShapeObject(primary_shape, count, size, color)
    if not add_secondary:
        return ShapeScene(primary, background=background)
    return ShapeScene(primary, relation, ShapeObject(sec_shape, 1, sec_size, sec_color), background)


def shapes_caption(plan: RowPlan, rng: np.random.Generator) -> str:
    """The `shapes` template style: a random caption whose primary object is the plan's shape concept."""
    return describe(random_scene(plan.concept.name, rng))
