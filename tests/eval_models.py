"""Small models shared by the evaluation tests (a helper module, not collected as tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from synray.config import BackboneConfig

SIZE = 32          # the tiny backbones' input size
PATCH = 8          # -> a 4 x 4 grid of patch tokens
EMBED_DIM = 64     # the tiny ViT's width


def tiny_backbone(seed: int = 0):
    from synray.models.backbone import build_backbone

    torch.manual_seed(seed)
    return build_backbone(BackboneConfig(size="tiny", image_size=SIZE, patch_size=PATCH))


def save_tiny_image_text(text_dir: str, out_dir: Path, seed: int = 0) -> Path:
    """A tiny ViT + the tiny text tower (tiny:text) exported with save_image_text."""
    from synray.models.image_text import ImageTextModel, load_text_tower, save_image_text

    text, tokenizer = load_text_tower(text_dir)
    model = ImageTextModel(tiny_backbone(seed), text)
    return save_image_text(model, tokenizer, out_dir, max_length=16)


def score_rows(model_dir: Path, rows: list[dict], protocols: list[str], cfg, image_size: int = SIZE, **kw) -> dict:
    """What the evaluation path (synray.eval.evaluate.evaluate_models) does to a batch of rows, in this process:
    a FeatureExtractor adds the protocols' outputs, rows_to_arrays flattens them (caption groups, masks, class
    names), run_protocols scores them."""
    import numpy as np

    from synray.eval.evaluate import rows_to_arrays
    from synray.eval.features import FeatureExtractor
    from synray.eval.protocols import run_protocols
    from synray.eval.registry import outputs_for

    outputs = outputs_for(protocols)
    batch = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}
    out = FeatureExtractor(model_dir, image_size=image_size, outputs=outputs)(batch)
    extracted = [{k: v[i] for k, v in out.items()} for i in range(len(rows))]
    return run_protocols(rows_to_arrays(extracted, image_size, outputs), protocols, cfg, **kw)
