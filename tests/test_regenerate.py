"""Regeneration from provenance for the procedural backend (the diffusers case runs in test_generate)."""

from __future__ import annotations

import numpy as np

from synray.captions.templates import template_caption
from synray.concepts import load_bank, plan_row
from synray.config import ConceptsConfig, ImagesConfig
from synray.data.regenerate import images_config, regenerate_images
from synray.images.procedural import ProceduralRenderer


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
