"""Turns Ray Data batches of caption rows (m encoded images each) into flat, labelled image tensors."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from synray.data.schema import caption_label_id


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


def decode_image(data: bytes) -> np.ndarray:
    """Encoded PNG/JPEG/WEBP -> uint8 [H, W, 3]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


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
