"""Rows -> training tensors in two halves: decoding and tokenising on CPUs (a Ray Data stage), and the cheap
last step on the worker's device (flattening a caption's m images; LaCLIP's per-step image and caption picks)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from synray.data.codecs import decode_image, resize_square
from synray.data.schema import caption_label_id
from synray.models.image_text import tokenize

__all__ = ["BatchError", "ImageBatch", "ImageTextBatch", "decode_rows", "flatten_rows", "image_text_rows",
           "pick_pairs", "caption_ok"]


class BatchError(ValueError):
    """Rows that cannot be trained on as configured."""


# ------------------------------------------------------------------------- CPU side (Ray Data)
def _chw(arrays: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


def decode_rows(batch: dict[str, np.ndarray], per_caption: int,
                rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Caption rows -> `images` uint8 [n, m, 3, H, W] (the first m images of each row, or m drawn without
    replacement by `rng`), `caption_id` (the multi-positive group, int64 [n]) and `label` (int64 [n]). A row
    stays whole: its m images travel together."""
    images = []
    for row_images, cid in zip(batch["images"], batch["caption_id"]):
        imgs = list(row_images)
        if len(imgs) < per_caption:
            raise BatchError(f"row {cid} holds {len(imgs)} images but training uses images.per_caption="
                             f"{per_caption}; generate with that many images per caption")
        picked = (imgs[:per_caption] if rng is None or len(imgs) == per_caption
                  else [imgs[i] for i in sorted(rng.choice(len(imgs), per_caption, replace=False))])
        decoded = [decode_image(data) for data in picked]
        if len({a.shape for a in decoded}) != 1:
            raise BatchError(f"the images of row {cid} differ in size: {sorted({a.shape for a in decoded})}")
        images.append(_chw(decoded))
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise BatchError(f"images of one batch differ in size: {sorted(shapes)}")
    return {"images": np.stack(images) if images else np.zeros((0, per_caption, 3, 1, 1), np.uint8),
            "caption_id": np.asarray([caption_label_id(str(c)) for c in batch["caption_id"]], dtype=np.int64),
            "label": np.asarray([int(v) for v in batch["label"]], dtype=np.int64)}


def caption_ok(text: Any) -> bool:
    """LaCLIP's rule: a drawn caption with fewer than 2 words falls back to the original."""
    return isinstance(text, str) and len(text.split()) >= 2


def image_text_rows(batch: dict[str, np.ndarray], image_size: int, tokenizer: Any,
                    max_length: int) -> dict[str, np.ndarray]:
    """Image-text rows -> every candidate of each row, ready for a per-step draw on the worker.

    `images` uint8 [n, k_img, 3, S, S]: the row's `image`, or all of its `images`, resized to `image_size`;
    `input_ids` int64 [n, 1 + r, L]: the caption then its r rewrites, tokenised and padded (the text tower is causal
    and reads its end token, so padding after it changes nothing and no mask travels);
    `caption_ok` bool [n, 1 + r]: whether a candidate may be drawn (LaCLIP's fallback rule).
    """
    if "image" in batch:
        per_row = [[row] for row in batch["image"]]
    elif "images" in batch:
        per_row = [list(row) for row in batch["images"]]
    else:
        raise BatchError(f"image-text rows need an image or images column; found {sorted(batch)}")
    if any(not imgs for imgs in per_row) or len({len(imgs) for imgs in per_row}) > 1:
        raise BatchError(f"image-text rows must hold the same, non-zero number of images; got "
                         f"{sorted({len(imgs) for imgs in per_row})}")
    images = np.stack([_chw([resize_square(decode_image(d), image_size) for d in imgs]) for imgs in per_row])
    rewrites = batch.get("rewrites")
    options = [[str(c)] + ([str(r) for r in rewrites[i]] if rewrites is not None else [])
               for i, c in enumerate(batch["caption"])]
    if len({len(o) for o in options}) > 1:
        raise BatchError("rows of one dataset must hold the same number of rewrites")
    k = len(options[0]) if options else 1
    tokens = tokenize(tokenizer, [t for o in options for t in o], max_length)
    n = len(options)
    return {"images": images,
            "input_ids": tokens["input_ids"].numpy().reshape(n, k, max_length),
            "caption_ok": np.asarray([[caption_ok(t) for t in o] for o in options], dtype=bool).reshape(n, k)}


# ----------------------------------------------------------------------------- device side
@dataclass
class ImageBatch:
    """n captions x m images flattened to N = n*m rows, caption-major."""

    images: torch.Tensor          # uint8 [N, 3, H, W]
    caption_ids: torch.Tensor     # int64 [N]: the multi-positive group of each image
    labels: torch.Tensor          # int64 [N]: concept label of each image
    per_caption: int              # m

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device) -> "ImageBatch":
        return replace(self, images=self.images.to(device, non_blocking=True),
                       caption_ids=self.caption_ids.to(device, non_blocking=True),
                       labels=self.labels.to(device, non_blocking=True))


def flatten_rows(tensors: dict[str, torch.Tensor]) -> ImageBatch:
    """`decode_rows` output as tensors ([n, m, 3, H, W] ...) -> a flat batch of n*m images."""
    images = tensors["images"]
    m = int(images.shape[1])
    return ImageBatch(images.flatten(0, 1), tensors["caption_id"].repeat_interleave(m),
                      tensors["label"].repeat_interleave(m), m)


@dataclass
class ImageTextBatch:
    """n (image, caption) pairs: one image per row and one caption per draw (LaCLIP)."""

    images: torch.Tensor          # uint8 [n, 3, H, W]
    input_ids: torch.Tensor       # int64 [n, L]
    caption_index: torch.Tensor   # int64 [n]: 0 = the original caption, i = rewrite i

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device) -> "ImageTextBatch":
        return replace(self, images=self.images.to(device, non_blocking=True),
                       input_ids=self.input_ids.to(device, non_blocking=True),
                       caption_index=self.caption_index.to(device, non_blocking=True))


def pick_pairs(tensors: dict[str, torch.Tensor], rng: np.random.Generator) -> ImageTextBatch:
    """One pair per row: an image drawn among the row's, and a caption drawn uniformly among the original and
    its rewrites, falling back to the original when the draw may not be used. The draws come from `rng` on the
    host (no device sync); the tensors may live on any device."""
    images, ok = tensors["images"], tensors["caption_ok"]
    n, k_img = int(images.shape[0]), int(images.shape[1])
    k_cap = int(ok.shape[1])
    if k_cap == 0:
        raise ValueError("pick_pairs needs at least the original caption of each row")
    image_pick = rng.integers(k_img, size=n) if k_img > 1 else np.zeros(n, dtype=np.int64)
    caption_pick = rng.integers(k_cap, size=n) if k_cap > 1 else np.zeros(n, dtype=np.int64)
    rows = torch.arange(n, device=images.device)
    img = torch.from_numpy(image_pick).to(images.device, non_blocking=True)   # no wait for the copy
    cap = torch.from_numpy(caption_pick).to(images.device, non_blocking=True)
    cap = torch.where(ok[rows, cap], cap, torch.zeros_like(cap))  # on the device: no sync
    return ImageTextBatch(images[rows, img], tensors["input_ids"][rows, cap], cap)
