"""Heads on an encoder: StableRep's projection MLP, a linear classifier, SynCLR's prototype head and student/teacher."""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce

from synray.config import BackboneConfig, HeadConfig, SynCLRConfig
from synray.models.backbone import Encoder, build_backbone

__all__ = ["CrossRankBatchNorm1d", "MLPHead", "ContrastiveModel", "build_contrastive_model", "Classifier",
           "build_classifier", "PrototypeHead", "LayerNormMLP", "trunc_normal_init", "SynCLRNet", "SynCLROutputs",
           "SynCLRModel", "build_synclr_model"]


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span every rank's rows, on any device (SimCLR's global BN).

    With per-rank statistics, a contrastive loss over features gathered from all ranks can be
    lowered by telling the ranks apart through their batch statistics instead of the images;
    nn.SyncBatchNorm does not run on the CPU and syncs the host on a GPU, so this layer sums [sum(x), sum(x^2),
    n] over ranks with a differentiable all-reduce. One process, eval mode or no process group: plain
    BatchNorm1d, unless the rows and parameters are in half precision (then float32 statistics, as across ranks).
    """

    def forward(self, x: Tensor) -> Tensor:
        distributed = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed and x.dtype == self.running_mean.dtype == getattr(self.weight, "dtype", x.dtype):
            return super().forward(x)
        # across ranks, or half-precision rows and parameters beside float32 statistics (DeepSpeed's bf16 casts
        # parameters, not buffers): statistics and normalisation in float32
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.training or not self.track_running_stats:
            d = x.shape[1]
            count = torch.full((1,), float(x.shape[0]), device=x.device, dtype=x32.dtype)
            stats = torch.cat([x32.sum(0), (x32 * x32).sum(0), count])
            stats = all_reduce(stats) if distributed else stats
            n = stats[-1]
            mean = stats[:d] / n
            var = (stats[d:2 * d] / n - mean * mean).clamp_min(0.0)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean.detach(), var.detach(), n.detach())
        else:
            mean, var = self.running_mean.to(x32.dtype), self.running_var.to(x32.dtype)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.to(x32.dtype) + self.bias.to(x32.dtype)
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
    StableRep's synchronised BN), on GPUs too: PyTorch's SyncBatchNorm indexes with a boolean mask (a host
    sync) in every forward.
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


# ------------------------------------------------------------------------------------ SynCLR
class PrototypeHead(nn.Module):
    """DINO/iBOT's head: an MLP (GELU) to an L2-normalised bottleneck, then cosine scores against K prototypes
    (the weight-normalised last layer with its norm fixed at 1). ``forward(x [..., D]) -> [..., K]``."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, prototypes: int, num_layers: int = 3,
                 trainable_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        # weight_norm's g: each prototype's norm, from 1, learnt (the published head) or held at 1
        self.norms = nn.Parameter(torch.ones(prototypes, 1)) if trainable_norm else None

    def forward(self, x: Tensor) -> Tensor:
        weight = F.normalize(self.prototypes, dim=-1)
        return F.linear(F.normalize(self.mlp(x), dim=-1), weight if self.norms is None else weight * self.norms)


class LayerNormMLP(nn.Sequential):
    """SynCLR's projection and predictor: ``num_layers`` Linear layers, each hidden one followed by LayerNorm and
    GELU, the last one without bias followed by a LayerNorm without affine parameters."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers += [nn.Linear(dim, out_dim, bias=False), nn.LayerNorm(out_dim, elementwise_affine=False)]
        super().__init__(*layers)


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """Every Linear layer of `module` from torch's trunc_normal_ at std 0.02 (cut at +-2, as DINO and SynCLR call
    it), biases at 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SynCLRNet(nn.Module):
    """What the student and the teacher share: the encoder, the projection head (keys, and queries before the
    predictor) and the prototype head on patch tokens (iBOT)."""

    def __init__(self, encoder: Encoder, head: nn.Module, prototypes: PrototypeHead) -> None:
        super().__init__()
        self.encoder, self.head, self.prototypes = encoder, head, prototypes


@dataclass
class SynCLROutputs:
    """One SynCLR forward: student queries of every view, teacher keys, prototype scores at the masked tokens."""

    queries: Tensor          # [1 + local crops, B, out_dim]: the global crop's first
    keys: Tensor             # [B, out_dim], the teacher's, of the unmasked global crop (no gradient)
    student_scores: Tensor   # [masked tokens, K] at the masked positions of the student's global crop
    teacher_scores: Tensor   # [masked tokens, K] at the same positions of the teacher's unmasked crop (no gradient)


class SynCLRModel(nn.Module):
    """SynCLR's student (a `SynCLRNet` plus the predictor) and its EMA teacher (a copy of the student's net).

    The teacher's parameters do not require gradients, so the optimizer never holds them; they are part of the
    module's state dict, so checkpoints carry them. It runs in float32 (its EMA needs the precision) and under
    autocast when the student runs in half precision."""

    def __init__(self, student: SynCLRNet, predictor: nn.Module) -> None:
        super().__init__()
        self.student, self.predictor = student, predictor
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)

    def keep_teacher_fp32(self) -> None:
        """Undo an engine's cast of the whole module to half precision, for the teacher alone."""
        self.teacher.float()

    def forward(self, global_view: Tensor, local_views: Tensor | None, masks: Tensor, positions: Tensor
                ) -> SynCLROutputs:
        """global_view [B, 3, H, W]; local_views [k*B, 3, h, w] (crop-major) or None; masks [B, P] bool: the
        student's masked tokens; positions [n]: the masked entries of masks.flatten()."""
        s = self.student
        tokens = s.encoder.tokens(global_view, masks)
        queries = self.predictor(s.head(tokens[:, 0]))
        if local_views is not None:
            queries = torch.cat([queries, self.predictor(s.head(s.encoder(local_views)))])
        student_scores = s.prototypes(tokens[:, 1:].flatten(0, 1)[positions])
        with torch.no_grad(), self._teacher_autocast(global_view.device):
            t = self.teacher
            t_tokens = t.encoder.tokens(global_view)
            keys = t.head(t_tokens[:, 0])
            teacher_scores = t.prototypes(t_tokens[:, 1:].flatten(0, 1)[positions])
        return SynCLROutputs(queries.view(-1, global_view.shape[0], queries.shape[-1]), keys.float(),
                             student_scores, teacher_scores.float())

    def _teacher_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        student_dtype = next(self.student.parameters()).dtype
        if student_dtype == torch.float32 or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=student_dtype)


def build_synclr_model(backbone: BackboneConfig, head: HeadConfig, cfg: SynCLRConfig) -> SynCLRModel:
    """The student at its initial weights (from torch's global generator) and the teacher as its copy."""
    encoder = build_backbone(backbone)
    mlp = LayerNormMLP if cfg.head_norm == "ln" else MLPHead
    projection = mlp(encoder.embed_dim, head.hidden_dim, head.out_dim, head.num_layers)
    prototypes = PrototypeHead(encoder.embed_dim, cfg.prototype_hidden_dim, cfg.prototype_bottleneck_dim,
                               cfg.prototypes, trainable_norm=cfg.prototype_norm == "trainable")
    predictor = mlp(head.out_dim, cfg.predictor_hidden_dim, head.out_dim, cfg.predictor_layers)
    if cfg.head_init == "trunc_normal":
        for part in (projection, predictor, prototypes.mlp):
            trunc_normal_init(part)
    return SynCLRModel(SynCLRNet(encoder, projection, prototypes), predictor)
