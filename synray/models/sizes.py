"""The backbone size presets and what a pass through one costs relative to ViT-B/16: plain arithmetic that plans read
without torch."""

from __future__ import annotations

from synray.config import BackboneConfig

__all__ = ["SIZES", "relative_cost"]

# size -> (hidden, layers, heads); MLP width is 4 x hidden. tiny is for CPU tests, mini for CPU runs
# that must learn something in minutes (the shapes world).
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 4),
    "mini": (128, 4, 4),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def relative_cost(cfg: BackboneConfig, image_size: int | None = None) -> float:
    """A forward-backward pass of one image through the backbone, relative to ViT-B/16 at 224 px: per layer about
    12 x tokens x hidden^2 (projections and MLP) + 2 x tokens^2 x hidden (attention) multiply-adds."""
    def cost(hidden: int, layers: int, tokens: int) -> float:
        return layers * tokens * hidden * (12 * hidden + 2 * tokens)

    hidden, layers, _ = SIZES[cfg.size]
    tokens = ((image_size or cfg.image_size) // cfg.patch_size) ** 2 + 1
    return cost(hidden, layers, tokens) / cost(768, 12, (224 // 16) ** 2 + 1)
