"""Projection heads (StableRep's MLP) and the encoder + head model trained contrastively."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from synray.config import BackboneConfig, HeadConfig
from synray.models.backbone import Encoder, build_backbone

__all__ = ["MLPHead", "ContrastiveModel", "build_contrastive_model"]


class MLPHead(nn.Sequential):
    """``num_layers`` Linear layers; every hidden one is followed by BatchNorm1d + ReLU, the last
    one by nothing (StableRep: 3 layers, hidden 4096, out 256).

    The BatchNorm layers are per-rank; on GPUs ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns
    them into StableRep's synchronised ones (SyncBatchNorm does not run on the CPU).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        dim = in_dim
        for i in range(1, num_layers):
            layers[f"layer{i}"] = nn.Linear(dim, hidden_dim)
            layers[f"bn{i}"] = nn.BatchNorm1d(hidden_dim)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            dim = hidden_dim
        layers[f"layer{num_layers}"] = nn.Linear(dim, out_dim)
        super().__init__(layers)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim


class ContrastiveModel(nn.Module):
    """Encoder followed by a projection head: ``forward(pixels) -> [B, out_dim]`` projections."""

    def __init__(self, encoder: Encoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.head(self.encoder(pixel_values))

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Backbone (CLS) features without the head, as used for evaluation."""
        return self.encoder(pixel_values)


def build_contrastive_model(backbone: BackboneConfig, head: HeadConfig) -> ContrastiveModel:
    encoder = build_backbone(backbone)
    return ContrastiveModel(encoder, MLPHead(encoder.embed_dim, head.hidden_dim, head.out_dim, head.num_layers))
