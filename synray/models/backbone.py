"""ViT / DINOv2 image encoders from transformers, their size presets, and save/load helpers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from synray.config import BackboneConfig
from synray.models.sizes import SIZES, relative_cost

if TYPE_CHECKING:   # transformers is imported where a model is built or loaded: importing it costs seconds
    from transformers import PretrainedConfig

__all__ = ["SIZES", "backbone_config", "build_backbone", "Encoder", "save_backbone", "load_backbone",
           "enable_grad_checkpointing", "relative_cost"]

LAYER_NORM_EPS = 1e-6


def backbone_config(cfg: BackboneConfig) -> PretrainedConfig:
    """The transformers config of a backbone (no weights are built)."""
    from transformers import Dinov2Config, ViTConfig

    hidden, layers, heads = SIZES[cfg.size]
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                  layer_norm_eps=LAYER_NORM_EPS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if cfg.arch == "vit":
        return ViTConfig(intermediate_size=4 * hidden, **common)
    if cfg.arch == "dinov2":
        return Dinov2Config(mlp_ratio=4, use_mask_token=True, **common)
    raise ValueError(f"unknown backbone arch {cfg.arch!r} (vit, dinov2)")


def _model_from_config(config: PretrainedConfig) -> nn.Module:
    from transformers import Dinov2Model, ViTModel

    if config.model_type == "vit":
        return ViTModel(config, add_pooling_layer=False, use_mask_token=True)
    if config.model_type == "dinov2":
        return Dinov2Model(config)
    raise ValueError(f"unsupported backbone config {type(config).__name__}")


class Encoder(nn.Module):
    """A transformers ViT/DINOv2 model returning the CLS embedding or the patch tokens.

    ``bool_masked_pos`` ([B, P] bool) replaces those patch embeddings by the mask token (for
    masked image modelling). Inputs whose size differs from the configured ``image_size`` (e.g.
    local crops) get interpolated position embeddings.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.embed_dim: int = int(config.hidden_size)
        self.image_size: int = int(config.image_size)
        self.patch_size: int = int(config.patch_size)
        self.num_patches: int = (self.image_size // self.patch_size) ** 2

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def tokens(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        """Final (layer-normed) hidden states [B, 1 + P, D]: CLS token first, then the patches."""
        kwargs: dict = {}
        if bool_masked_pos is not None:
            kwargs["bool_masked_pos"] = bool_masked_pos
        if self.model.config.model_type == "vit" and tuple(pixel_values.shape[-2:]) != (self.image_size,) * 2:
            kwargs["interpolate_pos_encoding"] = True
        return self.model(pixel_values=pixel_values, **kwargs).last_hidden_state

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        """CLS embedding [B, D]."""
        return self.tokens(pixel_values, bool_masked_pos)[:, 0]

    def patch_tokens(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        """Patch tokens [B, P, D] (without the CLS token)."""
        return self.tokens(pixel_values, bool_masked_pos)[:, 1:]


def build_backbone(cfg: BackboneConfig, device: torch.device | str | None = None) -> Encoder:
    """A freshly initialised encoder for ``cfg`` (``device="meta"`` builds it without memory)."""
    config = backbone_config(cfg)
    if device is None:
        return Encoder(_model_from_config(config))
    with torch.device(device):
        return Encoder(_model_from_config(config))


def save_backbone(encoder: Encoder, directory: str | Path) -> Path:
    """Save the transformers model (config.json + model.safetensors) so AutoModel can load it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def load_backbone(directory: str | Path, device: torch.device | str = "cpu") -> Encoder:
    """Load an encoder saved by :func:`save_backbone` (or any ViT/DINOv2 checkpoint) with AutoModel."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(directory))
    kwargs: dict = {}
    if config.model_type == "vit":
        kwargs = {"add_pooling_layer": False, "use_mask_token": True}
    elif config.model_type != "dinov2":
        raise ValueError(f"{directory}: model type {config.model_type!r} is not a ViT or DINOv2 backbone")
    model = AutoModel.from_pretrained(str(directory), **kwargs)
    return Encoder(model.to(device))


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Turn on transformers' gradient checkpointing (non-reentrant) in every transformers model inside `model` (the
    image encoder, a text tower); returns how many. Each block's activations are then recomputed in the backward."""
    from transformers import PreTrainedModel

    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        inside = any(name.startswith(f"{outer}.") or outer == "" for outer in found)
        if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing and not inside:
            found[name] = m
    for m in found.values():
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return len(found)
