"""The CLIP-style image-text model (image encoder + projection, text tower, learnable logit scale) and its export."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from synray.models.backbone import Encoder, load_backbone, save_backbone

__all__ = ["ImageTextModel", "TextTowerError", "load_text_tower", "load_tokenizer", "text_tower_config", "tokenize",
           "save_image_text", "load_image_text", "is_image_text_dir", "TEXT_DIR"]

#: sub-folder of an exported model directory holding the text tower and its tokenizer
TEXT_DIR = "text"
#: image projection and logit scale, next to the backbone's own files
PROJECTION_FILE = "image_text.safetensors"
INFO_FILE = "image_text.json"
#: CLIP clamps the learnable logit scale at 100 (temperature 0.01)
MAX_LOGIT_SCALE = 100.0


class TextTowerError(ValueError):
    """A text tower that cannot be used for image-text training."""


class ImageTextModel(nn.Module):
    """Image encoder + linear projection, a CLIPTextModelWithProjection, and CLIP's learnable logit scale.

    ``forward(pixels, input_ids) -> (image_features, text_features, logit_scale)`` with unnormalised features of the
    text tower's ``projection_dim``. The text tower is causal and pools at the end token, so the padding after it
    changes nothing and no attention mask is passed (as CLIP's and open_clip's text encoders; with a mask,
    transformers' SDPA path reads it on the host to decide whether it may skip it).
    """

    def __init__(self, encoder: Encoder, text_tower: nn.Module, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.encoder = encoder
        self.text = text_tower
        self.image_projection = nn.Linear(encoder.embed_dim, int(text_tower.config.projection_dim), bias=False)
        # shape [1], not []: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return self.image_projection(self.encoder(pixel_values))

    def encode_text(self, input_ids: Tensor) -> Tensor:
        return self.text(input_ids=input_ids).text_embeds

    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, pixel_values: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.encode_image(pixel_values), self.encode_text(input_ids), self.scale()


def text_tower_config(path: str) -> Any:
    """The CLIPTextConfig at ``path`` (a directory or hub id), after checking it has a projection."""
    from transformers import AutoConfig   # here: importing transformers costs seconds

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TextTowerError(f"{path!r} cannot be loaded: {e}") from e
    config = getattr(config, "text_config", config)  # a full CLIP checkpoint: its text half
    if getattr(config, "model_type", None) != "clip_text_model" or not getattr(config, "projection_dim", None):
        raise TextTowerError(f"{path!r} is a {getattr(config, 'model_type', '?')!r} model; image-text training "
                             "needs a CLIP text model with a projection (CLIPTextModelWithProjection)")
    return config


def load_tokenizer(path: str) -> Any:
    """The text tower's tokenizer alone (what preprocessing needs)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_text_tower(path: str) -> tuple[nn.Module, Any]:
    """A CLIPTextModelWithProjection and its tokenizer from a local directory or hub id (safetensors only)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    text_tower_config(path)
    model = CLIPTextModelWithProjection.from_pretrained(path, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """input_ids [B, max_length]: padded and truncated (keeping the end token the text tower pools at)."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"]}


def save_image_text(model: ImageTextModel, tokenizer: Any, directory: str | Path, max_length: int) -> Path:
    """Export: the backbone (transformers format, loadable by AutoModel), text/ and the projection."""
    directory = save_backbone(model.encoder, directory)
    model.text.save_pretrained(str(directory / TEXT_DIR), safe_serialization=True)
    tokenizer.save_pretrained(str(directory / TEXT_DIR))
    save_file({"image_projection.weight": model.image_projection.weight.detach().cpu().contiguous(),
               "logit_scale": model.logit_scale.detach().cpu().reshape(1)}, str(directory / PROJECTION_FILE))
    (directory / INFO_FILE).write_text(json.dumps({"max_length": max_length}) + "\n")
    return directory


def is_image_text_dir(directory: str | Path) -> bool:
    return (Path(directory) / PROJECTION_FILE).is_file() and (Path(directory) / TEXT_DIR).is_dir()


def load_image_text(directory: str | Path, device: torch.device | str = "cpu") -> tuple[ImageTextModel, Any, int]:
    """(model, tokenizer, max_length) of a directory written by :func:`save_image_text`."""
    directory = Path(directory)
    if not is_image_text_dir(directory):
        raise TextTowerError(f"{directory} holds no image-text model (no {TEXT_DIR}/ and {PROJECTION_FILE}); "
                             "zero-shot needs a backbone trained with train.loss=clip")
    text, tokenizer = load_text_tower(str(directory / TEXT_DIR))
    model = ImageTextModel(load_backbone(directory), text)
    state = load_file(str(directory / PROJECTION_FILE))
    with torch.no_grad():
        model.image_projection.weight.copy_(state["image_projection.weight"])
        model.logit_scale.copy_(state["logit_scale"].reshape(1))
    info = json.loads((directory / INFO_FILE).read_text()) if (directory / INFO_FILE).exists() else {}
    return model.to(device).eval(), tokenizer, int(info.get("max_length", 77))
