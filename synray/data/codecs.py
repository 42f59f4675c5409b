"""Image and class-mask codecs shared by every stage: encode, decode, resize, and row columns of objects."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["IMAGE_FORMATS", "encode_image", "encode_uint8", "decode_image", "resize_square", "encode_mask",
           "decode_class_mask", "decode_masks", "object_array"]

#: encoded image formats a row may hold (the `image_format` column)
IMAGE_FORMATS = ("png", "jpeg", "webp")


def encode_image(arr: np.ndarray, fmt: str, size: int, quality: int = 95) -> bytes:
    """float [H, W, 3] in [0, 1] -> resized (Lanczos) and encoded image bytes (png, jpeg or webp)."""
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return encode_uint8(np.asarray(img), fmt, quality)


def encode_uint8(arr: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> encoded image bytes (png, jpeg or webp), at its size."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; allowed: {', '.join(IMAGE_FORMATS)}")
    img = Image.fromarray(arr)
    out = io.BytesIO()
    if fmt == "png":
        img.save(out, format="PNG", optimize=False)
    elif fmt == "jpeg":
        img.save(out, format="JPEG", quality=quality)
    else:
        img.save(out, format="WEBP", quality=quality)
    return out.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded PNG/JPEG/WEBP -> uint8 [H, W, 3]."""
    with Image.open(io.BytesIO(bytes(data))) as img:
        return np.asarray(img.convert("RGB"))


def resize_square(array: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3] (bicubic); returned as is when already that size."""
    if array.shape[:2] == (size, size):
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BICUBIC))


def encode_mask(mask: np.ndarray, size: int) -> bytes:
    """uint8 class-index mask [H, W] -> PNG bytes, nearest-resized to size x size."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def decode_class_mask(data: bytes, size: int | None = None) -> np.ndarray:
    """An encoded class-index mask (PNG: L, P or I mode; RGB only when grey) -> int64 [H, W].

    With ``size`` the mask is nearest-resized to ``size`` x ``size`` (the resolution the encoder sees).
    """
    with Image.open(io.BytesIO(bytes(data))) as img:
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.NEAREST)
        arr = np.asarray(img)
    if arr.ndim == 3:
        if arr.shape[2] >= 3 and not (np.array_equal(arr[..., 0], arr[..., 1])
                                      and np.array_equal(arr[..., 0], arr[..., 2])):
            raise ValueError("a segmentation mask must hold one class index per pixel (a single-channel "
                             f"PNG); got a colour image of shape {arr.shape}")
        arr = arr[..., 0]
    return arr.astype(np.int64)


def decode_masks(masks: Sequence[bytes], size: int) -> np.ndarray:
    """Encoded masks -> int64 [N, size, size]."""
    if not len(masks):
        return np.zeros((0, size, size), np.int64)
    return np.stack([decode_class_mask(m, size) for m in masks])


def object_array(items: Sequence[Any]) -> np.ndarray:
    """A 1-D object array holding each item as one element (lists of image bytes stay whole)."""
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr
