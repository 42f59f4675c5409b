"""SynCLR's training pieces: the EMA teacher and its schedules, multi-crop, iBOT masking and targets, the losses.

Everything here runs on the worker's device without host syncs, and takes its distributed context
from `synray.train.losses` (the gathers and reductions are no-ops on one process):

* the teacher follows the student by an exponential moving average whose momentum rises on a
  cosine from 0.994 to 1 (`ema_momentum`, `ema_update`);
* the contrastive part is StableRep's multi-positive loss between student queries and teacher keys,
  the keys gathered from every rank without gradient, the global crop's own key left out and a local
  crop's kept, as in the published code's default run (`multi_positive_keys_loss`);
* the masked-image-modelling part (iBOT) masks a share of the global crops' patch tokens
  (`mim_masks`); the teacher's prototype scores of the unmasked crop, centred by Sinkhorn-Knopp
  (`sinkhorn_knopp`) at a temperature that warms up from 0.04 to 0.07 (`teacher_temperature`),
  are the targets of the student's scores at the masked tokens (`ibot_loss`);
* `synclr_loss` adds them up (and returns each part, for the training log) from one forward of the student and teacher
  (`synray.models.heads.SynCLRModel`); the `synclr` objective in `synray.train.objectives` drives it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from synray.models.heads import SynCLROutputs
from synray.train.augment import Augment
from synray.train.losses import dist_rank_world, equal_sizes, gather_rows, multi_positive_terms
from synray.train.schedules import ema_momentum, mim_count, mim_shape, teacher_temperature

__all__ = ["ema_momentum", "teacher_temperature", "ema_update", "sinkhorn_knopp", "mim_count", "mim_masks",
           "masked_positions", "multi_positive_keys_loss", "ibot_loss", "synclr_loss", "MultiCrop"]


# ------------------------------------------------------- the teacher (its schedules: synray.train.schedules)
@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (buffers are copied)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher and student differ: {len(t_params)} vs {len(s_params)} parameters")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


# ----------------------------------------------------------------------------- iBOT targets
def _all_reduce(x: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    _, world = dist_rank_world()
    if world > 1:
        dist.all_reduce(x, op=op)
    return x


def _global_logsumexp(x: Tensor, dim: int) -> Tensor:
    """logsumexp over `dim` spanning every rank's entries (`dim` holds this rank's share), keeping the dim."""
    top = _all_reduce(x.max(dim=dim, keepdim=True).values.clone(), dist.ReduceOp.MAX)
    return top + torch.log(_all_reduce((x - top).exp().sum(dim=dim, keepdim=True)))


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """Teacher targets [B, K] from prototype scores [B, K] (SwAV/iBOT's centring): the softmax at `temperature`
    balanced over the prototypes of the whole global batch (all ranks) by `iterations` alternate normalisations,
    in log space (a sharp temperature underflows exp()). Each row of the result sums to 1; each prototype's
    column, summed over every rank's rows, comes close to B/K."""
    log_q = (teacher_logits.float() / temperature).T          # [K, B_local]
    _, world = dist_rank_world()
    k, b = log_q.shape[0], log_q.shape[1] * world
    for _ in range(iterations):
        log_q = log_q - _global_logsumexp(log_q, dim=1) - math.log(k)   # every prototype gets 1/K of the mass
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(b)   # every sample gets 1/B
    return (log_q.exp() * b).T


def mim_masks(batch: int, patches: int, image_share: float = 0.5, patch_share: float = 0.5,
              generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Which patch tokens the student sees as the mask token: bool [batch, patches]. round(batch x image_share)
    images, drawn at random, each get round(patches x patch_share) masked tokens, drawn at random; the others none."""
    n_images, n_tokens = mim_shape(batch, patches, image_share, patch_share)
    image_rank = torch.rand(batch, generator=generator, device=device).argsort()
    chosen = torch.zeros(batch, dtype=torch.bool, device=device).index_fill_(0, image_rank[:n_images], True)
    token_rank = torch.rand(batch, patches, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
    return (token_rank < n_tokens) & chosen[:, None]


def masked_positions(masks: Tensor, count: int) -> Tensor:
    """The indices [count] of the True entries of masks.flatten(), in order, without a host sync (boolean indexing
    would wait for the device to count them; `count` comes from `mim_count`)."""
    return masks.flatten().to(torch.int8).argsort(descending=True, stable=True)[:count].sort().values


def ibot_loss(student_scores: Tensor, teacher_targets: Tensor, student_temperature: float = 0.1) -> Tensor:
    """iBOT's masked-token loss on this rank: the cross-entropy between the teacher's targets [N, K] and the student's
    prototype scores [N, K] at the N masked tokens, averaged. Every masked image has as many masked tokens
    (`mim_masks`), so this is iBOT's mean over each image's tokens, then over the masked images. With no masked
    token: 0, with a gradient path."""
    if student_scores.shape[0] == 0:
        return student_scores.sum() * 0.0
    log_p = F.log_softmax(student_scores.float() / student_temperature, dim=-1)
    return -(teacher_targets.float() * log_p).sum(dim=-1).mean()


# ------------------------------------------------------------------------------ contrastive
def multi_positive_keys_loss(queries: Tensor, keys: Tensor, labels: Tensor, temperature: float = 0.1,
                             local_own_key: bool = True) -> Tensor:
    """SynCLR's contrastive part on this rank: each student query against the teacher keys [n, D] of every rank
    (gathered once, without gradient), the target uniform over the keys of the same caption (labels [n], global
    ids). `queries` is one view [n, D] (the global crop: returns a scalar) or several [v, n, D] (the global crop,
    then the local ones: returns [v], one loss per view, row i of every view being image i's). The global crop's
    query leaves its own image's key out; a local crop's keeps it as a positive and in the denominator unless
    `local_own_key` is false (the published code's --avoid_local_global_same). Each loss is this rank's share of
    the full-batch mean (every rank holds n rows)."""
    views = queries if queries.ndim == 3 else queries[None]
    if views.shape[1:] != keys.shape or labels.shape != keys.shape[:1]:
        raise ValueError(f"expected queries [n, D] or [v, n, D], keys [n, D] and labels [n]; got "
                         f"{tuple(queries.shape)}, {tuple(keys.shape)}, {tuple(labels.shape)}")
    sizes = equal_sizes(keys.shape[0])
    gk = gather_rows(F.normalize(keys.detach().float(), dim=-1), grad=False, sizes=sizes)
    all_labels = gather_rows(labels, grad=False, sizes=sizes).tensor
    per_view = torch.stack([multi_positive_terms(F.normalize(q.float(), dim=-1), gk, labels, all_labels,
                                                 temperature, leave_own_out=v == 0 or not local_own_key).mean()
                            for v, q in enumerate(views)])
    return per_view if queries.ndim == 3 else per_view[0]


def synclr_loss(out: SynCLROutputs, labels: Tensor, temperature: float, teacher_temp: float,
                student_temp: float = 0.1, sinkhorn_iterations: int = 3, ibot_weight: float = 1.0,
                local_own_key: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """SynCLR's loss per image, averaged: L(global) + mean L(local) (student queries against teacher keys) +
    ibot_weight x L_iBOT(global) (the student's scores at masked tokens against the teacher's, centred by
    Sinkhorn-Knopp at `teacher_temp`); and its three parts, loss_global, loss_local and loss_ibot (unweighted)."""
    per_view = multi_positive_keys_loss(out.queries, out.keys, labels, temperature, local_own_key)
    local = per_view[1:].mean() if per_view.shape[0] > 1 else per_view[0] * 0.0
    masked = out.teacher_scores.shape[0] > 0   # none with mask shares of 0, or too few images or patches: ibot_loss 0
    targets = sinkhorn_knopp(out.teacher_scores, teacher_temp, sinkhorn_iterations) if masked else out.teacher_scores
    ibot = ibot_loss(out.student_scores, targets, student_temp)
    return per_view[0] + local + ibot_weight * ibot, {"loss_global": per_view[0], "loss_local": local,
                                                       "loss_ibot": ibot}


# ------------------------------------------------------------------------------- multi-crop
class MultiCrop(nn.Module):
    """SynCLR's views of a batch, made on its device: one global crop (area `global_scale`, side `global_size`) and
    `local_crops` local ones (area `local_scale`, side `local_size`), each with the colour augmentation of `preset`."""

    def __init__(self, global_size: int, local_size: int, local_crops: int,
                 global_scale: tuple[float, float] = (0.32, 1.0), local_scale: tuple[float, float] = (0.08, 0.32),
                 preset: str = "strong") -> None:
        super().__init__()
        self.local_crops = local_crops
        self.global_view = Augment(preset, global_size, global_scale[0], global_scale[1])
        self.local_view = Augment(preset, local_size, local_scale[0], local_scale[1])

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The global views, and the local ones made as one batch of `local_crops` x the images (one pass of each
        op for all of them)."""
        if not self.local_crops:
            return self.global_view(images), []
        local = self.local_view(images.repeat(self.local_crops, 1, 1, 1))
        return self.global_view(images), list(local.chunk(self.local_crops))
