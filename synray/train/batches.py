"""Turns Ray Data batches of caption rows into training tensors: flat labelled images, or image-text pairs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from synray.data.codecs import decode_image, resize_square
from synray.data.schema import caption_label_id
from synray.models.image_text import tokenize
from synray.train.text import pick_caption


class BatchError(ValueError):
    """Rows that cannot be trained on as configured."""


@dataclass
class ImageBatch:
    """n captions x m images flattened to N = n*m rows, caption-major."""

    images: torch.Tensor          # uint8 [N, 3, H, W]
    caption_ids: torch.Tensor     # int64 [N]: the multi-positive group of each image
    labels: torch.Tensor          # int64 [N]: concept label of each image
    captions: list[str]           # n captions
    per_caption: int              # m

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device) -> "ImageBatch":
        return replace(self, images=self.images.to(device, non_blocking=True),
                       caption_ids=self.caption_ids.to(device), labels=self.labels.to(device))


def flatten_rows(batch: dict[str, np.ndarray], per_caption: int) -> ImageBatch:
    """Decode every image of every row; each row must hold at least `per_caption` images (the first m are used)."""
    arrays, cap_ids, labels = [], [], []
    captions = [str(c) for c in batch["caption"]]
    for row_images, cid, label in zip(batch["images"], batch["caption_id"], batch["label"]):
        imgs = list(row_images)
        if len(imgs) < per_caption:
            raise BatchError(f"row {cid} holds {len(imgs)} images but training uses images.per_caption="
                             f"{per_caption}; generate with that many images per caption")
        for data in imgs[:per_caption]:
            arrays.append(decode_image(data))
        cap_ids.extend([caption_label_id(str(cid))] * per_caption)
        labels.extend([int(label)] * per_caption)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise BatchError(f"images of one batch differ in size: {sorted(shapes)}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageBatch(images, torch.tensor(cap_ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64),
                      captions, per_caption)


@dataclass
class ImageTextBatch:
    """n (image, caption) pairs: one image per row and one caption per draw (LaCLIP)."""

    images: torch.Tensor          # uint8 [n, 3, H, W]
    captions: list[str]
    input_ids: torch.Tensor       # int64 [n, L]
    attention_mask: torch.Tensor  # int64 [n, L]

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device) -> "ImageTextBatch":
        return replace(self, images=self.images.to(device, non_blocking=True), input_ids=self.input_ids.to(device),
                       attention_mask=self.attention_mask.to(device))


def image_text_pairs(batch: dict[str, np.ndarray], rng: np.random.Generator, image_size: int,
                     tokenizer: Any, max_length: int) -> ImageTextBatch:
    """One pair per row: the row's ``image`` (or one of its ``images``, drawn at random) and a caption
    drawn from ``[caption, *rewrites]`` (LaCLIP). Images of other sizes are resized to ``image_size``."""
    if "image" in batch:
        encoded = list(batch["image"])
    elif "images" in batch:
        encoded = []
        for row_images in batch["images"]:
            imgs = list(row_images)
            if not imgs:
                raise BatchError("a row holds no images")
            encoded.append(imgs[int(rng.integers(len(imgs)))])
    else:
        raise BatchError(f"image-text rows need an image or images column; found {sorted(batch)}")
    rewrites = batch.get("rewrites")
    captions = []
    for i, caption in enumerate(batch["caption"]):
        options = [str(caption)] + ([str(r) for r in rewrites[i]] if rewrites is not None else [])
        captions.append(pick_caption(options, rng))
    arrays = [decode_image(data) for data in encoded]
    if len({a.shape for a in arrays}) != 1:
        arrays = [resize_square(a, image_size) for a in arrays]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    tokens = tokenize(tokenizer, captions, max_length)
    return ImageTextBatch(images, captions, tokens["input_ids"], tokens["attention_mask"])
