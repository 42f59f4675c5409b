"""Regenerate a stored row from its provenance alone: its caption (LLM or template) and every image."""

from __future__ import annotations

import json
from typing import Any

from synray.config import ImagesConfig


def images_config(row: dict[str, Any], **overrides: Any) -> ImagesConfig:
    """The image settings a row was rendered with (from its t2i_model / t2i_params columns)."""
    params = json.loads(row["t2i_params"])
    backend = "procedural" if row["t2i_model"] == "procedural" else "diffusers"
    fields = {k: params[k] for k in ("guidance_scale", "steps", "scheduler", "resolution", "output_size",
                                    "dtype", "negative_prompt", "image_format") if k in params}
    if backend == "procedural":
        fields = {k: v for k, v in fields.items() if k in ("resolution", "output_size", "image_format")}
    return ImagesConfig(backend=backend, model=row["t2i_model"], per_caption=len(row["seeds"]),
                        **fields, **overrides)


def regenerate_images(row: dict[str, Any], model_cache: str | None = None) -> list[bytes]:
    """Render the row's caption again with its recorded seeds; equals the stored bytes on the same platform."""
    cfg = images_config(row)
    seeds = [int(s) for s in row["seeds"]]
    from synray.images.diffusion import encode_image, load_pipeline, render_images

    if cfg.backend == "procedural":
        from synray.images.procedural import regenerate

        return [encode_image(regenerate(row["caption"], seed, cfg.resolution)[0].astype("float32") / 255.0,
                             cfg.image_format, cfg.output_size, cfg.jpeg_quality) for seed in seeds]
    from synray.models.tiny import resolve_model

    pipe = load_pipeline(resolve_model(cfg.model, model_cache), cfg)
    return [encode_image(arr, cfg.image_format, cfg.output_size, cfg.jpeg_quality)
            for arr in render_images(pipe, row["caption"], seeds, cfg)]


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
