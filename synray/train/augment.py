"""Batched on-device training augmentation with kornia: SimCLR/StableRep (strong), LaCLIP crop, and resize-only."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from synray.config import AugmentConfig
from synray.models.preprocess import imagenet_normalize, to_float_images

__all__ = ["DEFAULT_CROP_SCALE_MIN", "PRESETS", "Augment", "build_augment", "blur_kernel_size"]

# Lower bound of the random-resized-crop area when AugmentConfig.crop_scale_min is unset:
# SimCLR/StableRep use 0.08, LaCLIP (CLIP training) 0.5.
DEFAULT_CROP_SCALE_MIN = {"strong": 0.08, "crop": 0.5}
PRESETS = ("strong", "crop", "none")


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's blur kernel: about 10% of the image side, odd, at least 3."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


def _ops(preset: str, image_size: int, scale_min: float, scale_max: float = 1.0) -> list[nn.Module]:
    from kornia import augmentation as K   # here: importing kornia costs seconds

    size = (image_size, image_size)
    if preset == "strong":
        return [
            K.RandomResizedCrop(size, scale=(scale_min, scale_max)),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0), p=0.5),
        ]
    if preset == "crop":
        return [K.RandomResizedCrop(size, scale=(scale_min, scale_max))]
    if preset == "none":
        return [K.Resize(size, antialias=True)]
    raise ValueError(f"unknown augmentation preset {preset!r} ({', '.join(PRESETS)})")


class Augment(nn.Module):
    """Random (or, for ``none``, fixed) view of a batch, normalised with ImageNet statistics.

    Input: [B, 3, H, W] uint8 or float in [0, 1], on any device; output float32
    [B, 3, image_size, image_size]. Randomness comes from torch's global generator
    (``torch.manual_seed``); ``forward(images, seed=s)`` draws from a private generator seeded
    with ``s`` instead, leaving the global one untouched.
    """

    def __init__(self, preset: str, image_size: int, crop_scale_min: float | None = None,
                 crop_scale_max: float = 1.0) -> None:
        super().__init__()
        if crop_scale_min is None:
            crop_scale_min = DEFAULT_CROP_SCALE_MIN.get(preset, 1.0)
        self.preset, self.image_size, self.crop_scale_min = preset, image_size, crop_scale_min
        self.ops = nn.Sequential(*_ops(preset, image_size, crop_scale_min, crop_scale_max))
        self.normalize = imagenet_normalize()

    def forward(self, images: Tensor, seed: int | None = None) -> Tensor:
        x = to_float_images(images)
        if seed is None:
            return self._run(x)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self._run(x)

    def _run(self, x: Tensor) -> Tensor:
        return self.normalize(self.ops(x).clamp(0.0, 1.0))


def build_augment(cfg: AugmentConfig, image_size: int, default_preset: str = "strong") -> Augment:
    """The training augmentation of ``cfg.preset`` (unset: ``default_preset``, the objective's own)."""
    return Augment(cfg.preset or default_preset, image_size, cfg.crop_scale_min)
