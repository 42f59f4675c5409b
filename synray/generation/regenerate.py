"""Regenerate a stored row from its provenance alone: its caption (LLM or template) and every image."""

from __future__ import annotations

import json
from typing import Any

from synray.config import ImagesConfig
from synray.images.registry import renderer_for_row
from synray.models.tiny import resolve_model


def images_config(row: dict[str, Any], **overrides: Any) -> ImagesConfig:
    """The image settings a row was rendered with (from its t2i_model / t2i_params columns)."""
    renderer = renderer_for_row(row)
    return ImagesConfig(backend=renderer.name, model=row["t2i_model"], per_caption=len(row["seeds"]),
                        **{**renderer.row_settings(row), **overrides})


def regenerate_images(row: dict[str, Any], model_cache: str | None = None) -> list[bytes]:
    """Render the row's caption again with its recorded seeds; equals the stored bytes on the same platform."""
    renderer = renderer_for_row(row)
    cfg = images_config(row)
    model_path = resolve_model(cfg.model, model_cache) if renderer.needs_model else None
    return renderer.regenerate(row, cfg, model_path)


def regenerate_caption(row: dict[str, Any], llm: Any | None = None) -> str:
    """The raw completion for the row's prompt and seed (template rows: the prompt itself).

    `llm` is a `vllm.LLM` over the row's `llm_model`; the per-request seed makes the answer
    independent of what else runs in the engine's batch. The stored caption is the clean-up of it.
    """
    if str(row["llm_model"]).startswith("template:"):
        return str(row["prompt"])
    if llm is None:
        raise ValueError(f"row {row['caption_id']} was captioned by {row['llm_model']}: pass a vllm.LLM for it")
    from vllm import SamplingParams

    params = json.loads(row["llm_sampling"])
    out = llm.generate([row["prompt"]], [SamplingParams(**params, seed=int(row["prompt_seed"]))], use_tqdm=False)
    return out[0].outputs[0].text
