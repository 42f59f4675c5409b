"""Heads on an encoder: StableRep's projection MLP (contrastive training) and a linear classifier (supervised)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce

from synray.config import BackboneConfig, HeadConfig
from synray.models.backbone import Encoder, build_backbone

__all__ = ["CrossRankBatchNorm1d", "MLPHead", "ContrastiveModel", "build_contrastive_model", "Classifier",
           "build_classifier"]


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span every rank's rows, on any device (SimCLR's global BN).

    With per-rank statistics, a contrastive loss over features gathered from all ranks can be
    lowered by telling the ranks apart through their batch statistics instead of the images; on
    the CPU nn.SyncBatchNorm does not run, so this layer sums [sum(x), sum(x^2), n] over ranks with
    a differentiable all-reduce. One process, eval mode or no process group: plain BatchNorm1d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        d = x.shape[1]
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision: statistics in float32
        count = torch.full((1,), float(x.shape[0]), device=x.device, dtype=x32.dtype)
        stats = all_reduce(torch.cat([x32.sum(0), (x32 * x32).sum(0), count]))
        n = stats[-1]
        mean = stats[:d] / n
        var = (stats[d:2 * d] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """Running statistics as BatchNorm1d keeps them; `n` stays a tensor (no host sync in the step)."""
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        unbiased = var * n / (n - 1.0).clamp_min(1.0)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


class MLPHead(nn.Sequential):
    """``num_layers`` Linear layers; every hidden one is followed by BatchNorm1d + ReLU, the last
    one by nothing (StableRep: 3 layers, hidden 4096, out 256).

    The BatchNorm layers normalise over the rows of all ranks (:class:`CrossRankBatchNorm1d`, as
    StableRep's synchronised BN); on GPUs ``nn.SyncBatchNorm.convert_sync_batchnorm`` swaps in
    PyTorch's fused kernel.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        dim = in_dim
        for i in range(1, num_layers):
            layers[f"layer{i}"] = nn.Linear(dim, hidden_dim)
            layers[f"bn{i}"] = CrossRankBatchNorm1d(hidden_dim)
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


def build_contrastive_model(backbone: BackboneConfig, head: HeadConfig) -> ContrastiveModel:
    encoder = build_backbone(backbone)
    return ContrastiveModel(encoder, MLPHead(encoder.embed_dim, head.hidden_dim, head.out_dim, head.num_layers))


class Classifier(nn.Module):
    """Encoder + linear layer over concept labels (the supervised cross-entropy baseline)."""

    def __init__(self, encoder: Encoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.head(self.encoder(pixel_values))


def build_classifier(backbone: BackboneConfig, num_classes: int) -> Classifier:
    return Classifier(build_backbone(backbone), num_classes)
