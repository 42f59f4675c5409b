"""What the image encoders take as input: uint8 or [0, 1] images -> float32, ImageNet-normalised, resized views."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "to_float_images", "imagenet_normalize", "EvalTransform",
           "build_eval_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float_images(images: Tensor) -> Tensor:
    """[B, 3, H, W] uint8 (0..255) or float (0..1) -> float32 in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


def imagenet_normalize() -> nn.Module:
    """Normalisation with the ImageNet mean and standard deviation (what the backbones are trained on)."""
    from kornia import augmentation as K   # here: importing kornia costs seconds

    return K.Normalize(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD))


class EvalTransform(nn.Module):
    """Deterministic resize to ``image_size`` (antialiased) and ImageNet normalisation, for evaluation."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        from kornia import augmentation as K

        self.image_size = image_size
        self.resize = K.Resize((image_size, image_size), antialias=True)
        self.normalize = imagenet_normalize()

    def forward(self, images: Tensor) -> Tensor:
        return self.normalize(self.resize(to_float_images(images)).clamp(0.0, 1.0))


def build_eval_transform(image_size: int) -> EvalTransform:
    return EvalTransform(image_size)
