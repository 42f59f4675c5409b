"""Regeneration from provenance: procedural images, template and LLM captions (diffusers images: test_generate)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import small_config
from synray.captions.cleanup import clean_caption
from synray.captions.rows import template_captions
from synray.captions.stage import CleanCaptions, PlanRows
from synray.concepts import load_bank, plan_row
from synray.config import ConceptsConfig, ImagesConfig
from synray.generation.regenerate import images_config, regenerate_caption, regenerate_images
from synray.images.procedural import ProceduralRenderer
from synray.language.templates import template_caption


def test_procedural_row_regenerates_byte_identical():
    bank = load_bank("builtin:shapes")
    caption = template_caption(plan_row(bank, ConceptsConfig(bank="builtin:shapes"), 0, 3), "shapes", 0, 3)
    cfg = ImagesConfig(backend="procedural", model="procedural", per_caption=3, resolution=64, output_size=32)
    out = ProceduralRenderer(cfg, None, 7)({"caption": np.asarray([caption], dtype=object),
                                            "caption_id": np.asarray(["00ff00ff00ff00ff"], dtype=object)})
    row = {k: out[k][0] for k in out}
    assert images_config(row).backend == "procedural"
    assert regenerate_images(row) == list(row["images"])
    row["seeds"] = [int(s) + 1 for s in row["seeds"]]
    assert regenerate_images(row) != list(row["images"])


def test_template_captions_regenerate_from_their_rows():
    """Rows planned and captioned as the pipeline does (template backend): each caption comes back from its row."""
    cfg = small_config("captions.backend=template", "captions.style=clip_templates")
    rows = CleanCaptions(cfg.captions)(template_captions(PlanRows(cfg)({"id": np.arange(12)})))
    assert len(rows["caption"]) >= 8
    for i in range(len(rows["caption"])):
        row = {k: v[i] for k, v in rows.items()}
        assert clean_caption(regenerate_caption(row), cfg.captions.cleanup)[0] == row["caption"]


def test_llm_caption_needs_the_rows_model():
    row = {"caption_id": "c1", "llm_model": "tiny:llm", "prompt": "dog =>", "prompt_seed": 1,
           "llm_sampling": '{"temperature": 0.8}'}
    with pytest.raises(ValueError, match="captioned by tiny:llm: pass a vllm.LLM"):
        regenerate_caption(row)
