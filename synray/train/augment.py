"""Batched on-device image augmentation with kornia: SimCLR/StableRep, LaCLIP crop, and resize-only."""

from __future__ import annotations

import torch
from kornia import augmentation as K
from torch import Tensor, nn

from synray.config import AugmentConfig

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_CROP_SCALE_MIN", "Augment", "build_augment",
           "build_eval_transform", "default_preset", "blur_kernel_size", "to_float_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Lower bound of the random-resized-crop area when AugmentConfig.crop_scale_min is unset:
# SimCLR/StableRep use 0.08, LaCLIP (CLIP training) 0.5.
DEFAULT_CROP_SCALE_MIN = {"strong": 0.08, "crop": 0.5}


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's blur kernel: about 10% of the image side, odd, at least 3."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


def to_float_images(images: Tensor) -> Tensor:
    """[B, 3, H, W] uint8 (0..255) or float (0..1) -> float32 in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


def _ops(preset: str, image_size: int, scale_min: float) -> list[nn.Module]:
    size = (image_size, image_size)
    if preset == "strong":
        return [
            K.RandomResizedCrop(size, scale=(scale_min, 1.0)),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0), p=0.5),
        ]
    if preset == "crop":
        return [K.RandomResizedCrop(size, scale=(scale_min, 1.0))]
    if preset == "none":
        return [K.Resize(size, antialias=True)]
    raise ValueError(f"unknown augmentation preset {preset!r} (strong, crop, none)")


class Augment(nn.Module):
    """Random (or, for ``none``, fixed) view of a batch, normalised with ImageNet statistics.

    Input: [B, 3, H, W] uint8 or float in [0, 1], on any device; output float32
    [B, 3, image_size, image_size]. Randomness comes from torch's global generator
    (``torch.manual_seed``); ``forward(images, seed=s)`` draws from a private generator seeded
    with ``s`` instead, leaving the global one untouched.
    """

    def __init__(self, preset: str, image_size: int, crop_scale_min: float | None = None) -> None:
        super().__init__()
        if crop_scale_min is None:
            crop_scale_min = DEFAULT_CROP_SCALE_MIN.get(preset, 1.0)
        self.preset, self.image_size, self.crop_scale_min = preset, image_size, crop_scale_min
        self.ops = nn.Sequential(*_ops(preset, image_size, crop_scale_min))
        self.normalize = K.Normalize(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD))

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


def default_preset(loss: str) -> str:
    """The augmentation each loss was published with: LaCLIP's crop for CLIP, SimCLR's strong set otherwise."""
    return "crop" if loss == "clip" else "strong"


def build_augment(cfg: AugmentConfig, image_size: int, loss: str = "stablerep") -> Augment:
    """The training augmentation of ``cfg.preset`` (unset: the loss's own) producing ``image_size`` square views."""
    return Augment(cfg.preset or default_preset(loss), image_size, cfg.crop_scale_min)


def build_eval_transform(image_size: int) -> Augment:
    """Deterministic resize + normalisation (the ``none`` preset), for evaluation."""
    return Augment("none", image_size)
