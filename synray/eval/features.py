"""Frozen-encoder feature extraction: from caption rows (encoded images) to one embedding per image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synray.data.codecs import decode_image, resize_square
from synray.data.storage import local_copy
from synray.models.backbone import Encoder, load_backbone
from synray.models.image_text import load_image_text
from synray.models.preprocess import build_eval_transform

__all__ = ["OUTPUTS", "encode_images", "encode_arrays", "decode_row_images", "FeatureExtractor"]


def _as_nchw_uint8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """np [N, H, W, 3] or torch [N, 3, H, W] (uint8 or float in [0, 1]) -> torch [N, 3, H, W]."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be [N, H, W, 3], got shape {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor or np.ndarray, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"tensor images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    return images


def _encoder_device(encoder: torch.nn.Module) -> torch.device:
    for p in encoder.parameters():
        return p.device
    return torch.device("cpu")


#: what the extraction functions can return per image: CLS embedding [D], patch tokens [P, D],
#: projected image embedding of an image-text model [E]
OUTPUTS = ("features", "patch_tokens", "image_embeds")


def _check_outputs(outputs: Sequence[str], projection: torch.nn.Module | None) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(outputs))
    bad = [o for o in out if o not in OUTPUTS]
    if bad or not out:
        raise ValueError(f"unknown feature outputs {bad or list(outputs)}; choose from {', '.join(OUTPUTS)}")
    if "image_embeds" in out and projection is None:
        raise ValueError("image_embeds need the image projection of an image-text model")
    return out


def _empty_outputs(encoder: Encoder, outputs: tuple[str, ...], image_size: int,
                   projection: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    dim = int(getattr(encoder, "embed_dim", 0))
    patches = (image_size // int(getattr(encoder, "patch_size", image_size) or image_size)) ** 2
    shapes = {"features": (0, dim), "patch_tokens": (0, patches, dim),
              "image_embeds": (0, int(getattr(projection, "out_features", 0)))}
    return {o: torch.empty(*shapes[o], dtype=torch.float32) for o in outputs}


def encode_images(encoder: Encoder, images_uint8: torch.Tensor | np.ndarray, image_size: int,
                  batch_size: int = 256, outputs: Sequence[str] = ("features",),
                  projection: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The requested ``outputs`` (see :data:`OUTPUTS`) of images, float32 on the CPU, in one encoder pass.

    ``images_uint8``: torch [N, 3, H, W] or numpy [N, H, W, 3], resized to ``image_size`` and
    normalised by the eval transform. ``image_embeds`` apply ``projection`` (an image-text model's
    ``image_projection``) to the CLS embedding. The encoder runs in eval mode under
    ``torch.inference_mode``; its previous train/eval mode is restored afterwards.
    """
    todo = _check_outputs(outputs, projection)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = _as_nchw_uint8(images_uint8)
    device = _encoder_device(encoder)
    transform = build_eval_transform(image_size).to(device)
    was_training = encoder.training
    encoder.eval()
    out: dict[str, list[torch.Tensor]] = {o: [] for o in todo}
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                x = transform(images[start:start + batch_size].to(device, non_blocking=True))
                if todo == ("features",):
                    cls, patches = encoder(x), None
                else:
                    tokens = encoder.tokens(x)
                    cls, patches = tokens[:, 0], tokens[:, 1:]
                parts = {"features": cls, "patch_tokens": patches,
                         "image_embeds": projection(cls) if projection is not None else None}
                for o in todo:
                    out[o].append(parts[o].float().cpu())
    finally:
        encoder.train(was_training)
    if images.shape[0] == 0:
        return _empty_outputs(encoder, todo, image_size, projection)
    return {o: torch.cat(v) for o, v in out.items()}


def encode_arrays(encoder: Encoder, arrays: Sequence[np.ndarray], image_size: int, batch_size: int = 256,
                  outputs: Sequence[str] = ("features",),
                  projection: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Like :func:`encode_images` for a list of [H, W, 3] images whose sizes may differ (kept in order)."""
    todo = _check_outputs(outputs, projection)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(tuple(a.shape), []).append(i)
    result: dict[str, torch.Tensor] = {}
    for idx in by_shape.values():
        part = encode_images(encoder, np.stack([arrays[i] for i in idx]), image_size, batch_size, todo, projection)
        for o, t in part.items():
            if o not in result:
                result[o] = torch.empty(len(arrays), *t.shape[1:], dtype=torch.float32)
            result[o][torch.as_tensor(idx)] = t
    if not result:
        return _empty_outputs(encoder, todo, image_size, projection)
    return result


def _decode(data: bytes, image_size: int | None) -> np.ndarray:
    arr = decode_image(bytes(data))
    return arr if image_size is None else resize_square(arr, image_size)


def decode_row_images(row_images: Any, image_size: int | None = None) -> list[np.ndarray]:
    """The encoded images of one row (list / array of bytes) -> uint8 [H, W, 3] arrays (optionally resized)."""
    if row_images is None:
        return []
    return [_decode(data, image_size) for data in list(row_images)]


def _per_row_column(flat: np.ndarray, counts: list[int]) -> np.ndarray:
    """Per-image values [N, ...] -> one [m_i, ...] array per row: stacked [B, m, ...] when all m_i agree."""
    splits = np.split(flat, np.cumsum(counts)[:-1]) if counts else []
    if counts and len(set(counts)) == 1:
        return np.stack(splits).astype(np.float32, copy=False)
    column = np.empty(len(splits), dtype=object)
    for i, part in enumerate(splits):
        column[i] = part.reshape(-1, *flat.shape[1:]).astype(np.float32, copy=False)
    return column


class FeatureExtractor:
    """Callable for ``Dataset.map_batches`` (actor pool): adds per-image feature columns to caption rows.

    ``model_dir`` is a :func:`save_backbone` directory (for ``image_embeds`` a :func:`save_image_text` one),
    or a mapping ``{prefix: directory}`` of several models that the actor holds together (a run's trained
    and initial backbones): each batch's images are decoded once and encoded by every model. Models are
    loaded once per instance. For a batch (dict of columns with ``images``), each requested output
    (:data:`OUTPUTS`; default ``features``, the CLS embedding) of each model becomes a column holding, per
    row, a float32 array [m, ...] with one entry per image: a [B, m, ...] array when every row has the same
    number of images, else an object array of [m_i, ...] arrays, named ``prefix + output`` (a single
    directory: no prefix). With ``drop_images`` the encoded images are removed from the output batch.
    """

    def __init__(self, model_dir: str | Path | Mapping[str, str | Path], image_size: int, batch_size: int = 256,
                 device: str | torch.device = "cpu", drop_images: bool = False,
                 outputs: Sequence[str] = ("features",)) -> None:
        dirs = dict(model_dir) if isinstance(model_dir, Mapping) else {"": model_dir}
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.drop_images = drop_images
        #: prefix -> (encoder, image projection or None, outputs)
        self.models: dict[str, tuple[Encoder, torch.nn.Module | None, tuple[str, ...]]] = {}
        for name, directory in dirs.items():
            local = local_copy(directory)   # a model under a cloud URI is downloaded once per actor
            projection = None
            if "image_embeds" in outputs:
                model, _, _ = load_image_text(local, device=device)
                encoder, projection = model.encoder.eval(), model.image_projection
            else:
                encoder = load_backbone(local, device=device).eval()
            self.models[name] = (encoder, projection, _check_outputs(outputs, projection))

    @property
    def embed_dim(self) -> int:
        return int(next(iter(self.models.values()))[0].embed_dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if "images" not in batch:
            raise ValueError(f"batch lacks the 'images' column (it has {sorted(batch)})")
        per_row = [decode_row_images(imgs) for imgs in batch["images"]]
        counts = [len(r) for r in per_row]
        flat = [a for r in per_row for a in r]
        out = {k: v for k, v in batch.items() if not (self.drop_images and k == "images")}
        for prefix, (encoder, projection, outputs) in self.models.items():
            encoded = encode_arrays(encoder, flat, self.image_size, self.batch_size, outputs, projection)
            for name, values in encoded.items():
                out[prefix + name] = _per_row_column(values.numpy(), counts)
        return out
