"""Tests for the kornia augmentation presets."""

from __future__ import annotations

import pytest
import torch

from synray.config import AugmentConfig
from synray.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from synray.train.augment import DEFAULT_CROP_SCALE_MIN, blur_kernel_size, build_augment

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
PRESETS = ["strong", "crop", "none"]


def _images(dtype: torch.dtype = torch.uint8, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, size, size, generator=g)
    return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_shape_dtype_range(preset: str, dtype: torch.dtype) -> None:
    aug = build_augment(AugmentConfig(preset=preset), image_size=32)
    out = aug(_images(dtype))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    pixels = out * STD + MEAN  # undo the normalisation: back in [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


@pytest.mark.parametrize("preset", ["strong", "crop"])
def test_views_differ_and_seed_reproduces(preset: str) -> None:
    aug = build_augment(AugmentConfig(preset=preset), image_size=32)
    x = _images()
    torch.manual_seed(0)
    a, b = aug(x), aug(x)
    assert not torch.allclose(a, b)
    torch.manual_seed(0)
    torch.testing.assert_close(aug(x), a)
    state = torch.get_rng_state()
    torch.testing.assert_close(aug(x, seed=3), aug(x, seed=3))
    assert not torch.allclose(aug(x, seed=3), aug(x, seed=4))
    assert torch.equal(torch.get_rng_state(), state)  # seeded calls leave the global generator alone


def test_none_is_deterministic_resize_and_normalise() -> None:
    aug = build_augment(AugmentConfig(preset="none"), image_size=32)
    x = _images(torch.float32, size=32)
    torch.testing.assert_close(aug(x), aug(x))
    torch.testing.assert_close(aug(x), (x - MEAN) / STD)  # same size: only normalisation
    big = _images(torch.float32, size=64)
    torch.testing.assert_close(build_eval_transform(32)(big), aug(big))
    assert aug(big).shape == (6, 3, 32, 32)


def test_crop_scale_defaults_and_override() -> None:
    assert build_augment(AugmentConfig(preset="strong"), 32).crop_scale_min == DEFAULT_CROP_SCALE_MIN["strong"] == 0.08
    assert build_augment(AugmentConfig(preset="crop"), 32).crop_scale_min == DEFAULT_CROP_SCALE_MIN["crop"] == 0.5
    assert build_augment(AugmentConfig(preset="crop", crop_scale_min=0.9), 32).crop_scale_min == 0.9


def test_blur_kernel_size_is_odd_tenth() -> None:
    assert blur_kernel_size(32) == 3
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(96) == 9


def test_rejects_bad_input() -> None:
    aug = build_augment(AugmentConfig(preset="none"), 32)
    with pytest.raises(ValueError):
        aug(torch.rand(3, 32, 32))
    with pytest.raises(TypeError):
        aug(torch.ones(1, 3, 32, 32, dtype=torch.int32))
