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
