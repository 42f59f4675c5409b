"""The row schema: one row = one caption with all of its images, plus everything needed to regenerate it."""

from __future__ import annotations

import hashlib

import pyarrow as pa

#: columns every stored row has (docs/generation.md documents each one)
ROW_SCHEMA = pa.schema([
    pa.field("caption_id", pa.string(), nullable=False),    # sha256(run seed, row id, prompt)[:16]
    pa.field("row_id", pa.int64(), nullable=False),          # index in the run's generation plan
    pa.field("label", pa.int64(), nullable=False),           # concept index in the (filtered) bank
    pa.field("concept", pa.string(), nullable=False),
    pa.field("kind", pa.string()),                           # object / place / texture / shape
    pa.field("template", pa.string()),                       # c / c_bg / c_rel, or the template style
    pa.field("prompt", pa.string()),                         # what the LLM saw (template: the caption)
    pa.field("caption", pa.string(), nullable=False),
    pa.field("images", pa.list_(pa.binary()), nullable=False),  # m encoded images (png/jpeg/webp)
    pa.field("seeds", pa.list_(pa.int64()), nullable=False),    # one generator seed per image
    pa.field("image_format", pa.string()),
    # provenance: with the row's seeds these regenerate the caption and every image
    pa.field("run_seed", pa.int64()),
    pa.field("prompt_seed", pa.int64()),
    pa.field("llm_model", pa.string()),
    pa.field("llm_sampling", pa.string()),                   # JSON: temperature, top_p, max_tokens
    pa.field("t2i_model", pa.string()),
    pa.field("t2i_params", pa.string()),                     # JSON: guidance, steps, scheduler, sizes...
    pa.field("render_group", pa.string()),                   # JSON: the batched diffusers call of the row, else null
    pa.field("masks", pa.list_(pa.binary())),                # procedural backend: m PNG class masks, else null
])

#: the columns training needs from a store
TRAIN_COLUMNS = ("caption_id", "label", "caption", "images")

#: image seeds are (run seed, caption id, image index) hashed into this many bits
SEED_BITS = 63


def _digest(*parts: object) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x1f")
    return h.digest()


def caption_id(run_seed: int, row_id: int, prompt: str) -> str:
    """Stable id of a row: depends on what the LLM is asked, never on what it answers."""
    return _digest("caption", run_seed, row_id, prompt).hex()[:16]


def prompt_seed(run_seed: int, row_id: int) -> int:
    """Per-request LLM sampling seed (vLLM's per-request seed keeps rows independent of batching)."""
    return int.from_bytes(_digest("prompt", run_seed, row_id)[:4], "big") & 0x7FFFFFFF


def image_seed(run_seed: int, cap_id: str, index: int) -> int:
    """Seed of the generator of image `index` of a caption: independent of batch size and placement."""
    return int.from_bytes(_digest("image", run_seed, cap_id, index)[:8], "big") >> (64 - SEED_BITS)


def caption_label_id(cap_id: str) -> int:
    """The caption id as an int64, used as the multi-positive group label in training."""
    return int(cap_id[:15], 16)
