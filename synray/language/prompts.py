"""LLM prompt builders: SynCLR caption synthesis (c / c_bg / c_rel) and LaCLIP caption rewriting.

Prompt layout (one item per line, joined with "\n"; the query line ends with "=>" and no space, so
the model's completion starts with " caption"):

    <header>
    <input> => <caption>        (num_examples in-context examples)
    <query input> =>

SynCLR inputs: `c` -> "dog", `c_bg` -> "dog, park", `c_rel` -> "dog, next to". Places, textures and
any other non-object kind use the `c` header and pool.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np

from synray.concepts import RowPlan, row_rng

SYNCLR_HEADERS = {
    "c": "Generate an image description with an object category:",
    "c_bg": "Generate an image description with an object category and an environment category:",
    "c_rel": "Generate an image description with an object category and a relation:",
}
LACLIP_HEADER = "write image captions differently,"
ARROW = "=>"
EXAMPLE_SEPARATOR = f" {ARROW} "
NUM_LACLIP_POOLS = 4
DEFAULT_NUM_EXAMPLES = 3

_SYNCLR_TAG = "captions.synclr_examples"
_LACLIP_TAG = "captions.laclip_examples"

Example = tuple[str, str]


# ------------------------------------------------------------------------------------ example pools
def _parse_pool(text: str, name: str) -> tuple[Example, ...]:
    out: list[Example] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        src, sep, tgt = line.partition(EXAMPLE_SEPARATOR)
        if not sep or not src.strip() or not tgt.strip():
            raise ValueError(f"example pool {name}, line {lineno}: expected 'input => caption', got {line!r}")
        out.append((src.strip(), tgt.strip()))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _pool(name: str) -> tuple[Example, ...]:
    res = resources.files("synray") / "language" / "pools" / f"{name}.txt"
    return _parse_pool(res.read_text(encoding="utf-8"), name)


def synclr_pool(template: str) -> tuple[Example, ...]:
    """The in-context example pool of a SynCLR template ("c", "c_bg" or "c_rel")."""
    if template not in SYNCLR_HEADERS:
        raise ValueError(f"unknown SynCLR template {template!r}; allowed: {', '.join(SYNCLR_HEADERS)}")
    return _pool(f"synclr_{template}")


def laclip_pool(index: int) -> tuple[Example, ...]:
    """LaCLIP example pool number `index % NUM_LACLIP_POOLS`."""
    return _pool(f"laclip_{index % NUM_LACLIP_POOLS}")


# ------------------------------------------------------------------------------------------ helpers
def synclr_template(plan: RowPlan) -> str:
    """The template a plan's prompt uses: its own for objects, always "c" for other kinds."""
    return plan.template if plan.concept.kind == "object" and plan.template in SYNCLR_HEADERS else "c"


def synclr_input(plan: RowPlan) -> str:
    """The query input of a plan: "dog", "dog, park" or "dog, next to"."""
    template = synclr_template(plan)
    name = plan.concept.name
    if template == "c_bg" and plan.background:
        return f"{name}, {plan.background}"
    if template == "c_rel" and plan.relation:
        return f"{name}, {plan.relation}"
    return name


def _example_concept(src: str) -> str:
    return src.split(",", 1)[0].strip().casefold()


@functools.lru_cache(maxsize=None)
def _example_concepts(pool: tuple[Example, ...]) -> tuple[str, ...]:
    return tuple(_example_concept(src) for src, _ in pool)


def _pick(pool: tuple[Example, ...], k: int, rng: np.random.Generator, avoid: str | None = None) -> list[Example]:
    """k distinct examples in random order; examples about the `avoid` concept are skipped."""
    if k < 0:
        raise ValueError(f"num_examples must be >= 0, got {k}")
    if avoid is None:
        candidates = list(pool)
    else:
        candidates = [ex for ex, key in zip(pool, _example_concepts(pool)) if key != avoid]
    if k > len(candidates):
        raise ValueError(f"num_examples={k} but the example pool has only {len(candidates)} usable examples")
    return [candidates[int(i)] for i in rng.choice(len(candidates), size=k, replace=False)]


def _render(header: str, examples: list[Example], query: str) -> str:
    lines = [header, *(f"{src}{EXAMPLE_SEPARATOR}{tgt}" for src, tgt in examples), f"{query} {ARROW}"]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- public
def synclr_prompt(plan: RowPlan, seed: int, row_id: int, num_examples: int = DEFAULT_NUM_EXAMPLES) -> str:
    """The SynCLR prompt of a row; its examples depend only on (seed, row_id).

    Examples about the query's own concept are never shown, so the model cannot copy its answer.
    """
    template = synclr_template(plan)
    rng = row_rng(seed, row_id, _SYNCLR_TAG)
    examples = _pick(synclr_pool(template), num_examples, rng, avoid=plan.concept.name.casefold())
    return _render(SYNCLR_HEADERS[template], examples, synclr_input(plan))


def laclip_prompt(caption: str, seed: int, row_id: int, rewrite_index: int,
                  num_examples: int = DEFAULT_NUM_EXAMPLES) -> str:
    """The LaCLIP rewrite prompt for rewrite `rewrite_index` of a caption (pool = index % NUM_LACLIP_POOLS)."""
    if rewrite_index < 0:
        raise ValueError(f"rewrite_index must be >= 0, got {rewrite_index}")
    query = " ".join(str(caption).split())
    if not query:
        raise ValueError("cannot build a rewrite prompt for an empty caption")
    rng = row_rng(seed, row_id, _LACLIP_TAG, rewrite_index)
    examples = _pick(laclip_pool(rewrite_index), num_examples, rng)
    return _render(LACLIP_HEADER, examples, query)


def first_line(completion: str) -> str:
    """The completion's first line, stripped (leading spaces/tabs before it are ignored)."""
    text = (completion or "").lstrip(" \t")
    return text.splitlines()[0].strip() if text else ""
