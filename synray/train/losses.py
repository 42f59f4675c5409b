"""Contrastive and supervised training losses, with the cross-rank gathers they need.

Distributed convention (used by every loss here that gathers across ranks):

* Each rank passes only its local rows. Features are all-gathered *with* gradient
  (:func:`gather_rows` with ``grad=True``); the backward pass of the gather **sums** the gradients that every
  rank's loss sends to a row, so the gradient reaching a rank's local features is the gradient of
  the sum of all ranks' losses.
* Each rank returns ``sum of its local per-anchor losses * world_size / total_anchors``. With equal
  local batch sizes (the normal case) that is simply the mean over the local anchors, and the
  average of the per-rank losses equals the full-batch loss (mean over all anchors).
* Hence, after the data-parallel engine (DDP or DeepSpeed) **averages** parameter gradients across
  ranks, the parameters receive exactly the gradient of the full-batch loss. Do not rescale the loss
  by the world size in the trainer. The gradient a rank sees on its own features is
  ``world_size`` times the full-batch gradient for those rows; the average over ranks removes it.
* For logging, all-reduce-average the per-rank loss values to get the full-batch loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Gathered",
    "dist_rank_world",
    "equal_sizes",
    "gather_rows",
    "multi_positive_contrastive",
    "multi_positive_terms",
    "info_nce",
    "clip_loss",
    "supervised_ce",
    "MASK_VALUE",
]

# Added to the logit of an anchor's own column: exp() of it is exactly 0 in float32.
MASK_VALUE = -1e9
# Labels made unique per rank for SimCLR/CLIP: rank * _RANK_STRIDE + local index.
_RANK_STRIDE = 1 << 32


class Gathered(NamedTuple):
    """Rows of all ranks concatenated in rank order, and where this rank's rows sit in them."""

    tensor: Tensor
    offset: int
    sizes: tuple[int, ...]


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _exchange_sizes(n: int, device: torch.device) -> tuple[int, ...]:
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return tuple(int(x.item()) for x in out)


def _all_gather_padded(x: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """All-gather rows of possibly different counts (pads to the largest, then trims)."""
    x = x.contiguous()
    biggest = max(sizes)
    if x.shape[0] < biggest:
        pad = x.new_zeros((biggest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather rows. Backward: sum the incoming gradients over ranks, keep our rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], offset: int) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.offset, ctx.n = sizes, offset, x.shape[0]
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset:ctx.offset + ctx.n], None, None


def equal_sizes(n: int) -> tuple[int, ...]:
    """Every rank's row count when all ranks hold ``n`` rows: nothing is exchanged (no host sync)."""
    _, world = dist_rank_world()
    return (n,) * world


def gather_rows(x: Tensor, *, grad: bool, sizes: tuple[int, ...] | None = None) -> Gathered:
    """All-gather the rows (dim 0) of ``x`` across ranks, in rank order.

    Local row counts may differ between ranks (they are exchanged first, a collective and a host
    sync, unless ``sizes`` is passed: from an earlier gather of the same batch, or ``equal_sizes(n)``
    when every rank's batch has a fixed size). With ``grad=True`` the result keeps the gradient
    to this rank's rows, and the backward pass sums the gradients from every rank (see the module
    docstring). Without torch.distributed, or with one rank, returns ``x`` itself and offset 0.
    """
    rank, world = dist_rank_world()
    if world == 1:
        return Gathered(x, 0, (x.shape[0],))
    if sizes is None:
        sizes = _exchange_sizes(x.shape[0], x.device)
    elif len(sizes) != world or sizes[rank] != x.shape[0]:
        raise ValueError(f"sizes {sizes} do not match world size {world} and local rows {x.shape[0]}")
    offset = sum(sizes[:rank])
    if grad and x.requires_grad:
        out = _GatherWithGrad.apply(x, sizes, offset)
    else:
        with torch.no_grad():
            out = _all_gather_padded(x.detach(), sizes)
    return Gathered(out, offset, sizes)


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision features are promoted to float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _ranks_scale(n_local: int, n_total: int) -> float:
    """Factor turning a local sum into this rank's share of the full-batch mean (see module doc)."""
    _, world = dist_rank_world()
    return world / max(n_total, 1) if n_local else 0.0


def multi_positive_contrastive(features: Tensor, labels: Tensor, temperature: float = 0.1, *,
                               same_size: bool = False) -> Tensor:
    """StableRep's multi-positive contrastive loss on this rank's rows.

    features: [N, D] local embeddings (L2-normalised here); labels: [N] integer ids (e.g. caption
    ids, global across ranks: rows with equal labels are positives of each other). Every local row
    is an anchor against all rows of all ranks (gathered with gradient); its own column is
    excluded. The target of anchor i is uniform over its positives; an anchor with no positive has
    an all-zero target and contributes 0, but still counts in the mean (as in StableRep's code,
    which averages over all anchors). Returns the per-rank share of the full-batch mean (the local
    mean when all ranks hold the same number of rows). ``same_size=True`` promises that every rank
    holds as many rows as this one, so no sizes are exchanged.
    """
    if features.ndim != 2 or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"expected features [N, D] and labels [N]; got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    z = F.normalize(_at_least_fp32(features), dim=-1)
    gz = gather_rows(z, grad=True, sizes=equal_sizes(z.shape[0]) if same_size else None)
    all_labels = gather_rows(labels, grad=False, sizes=gz.sizes).tensor
    per_anchor = multi_positive_terms(z, gz, labels, all_labels, temperature)
    return per_anchor.sum() * _ranks_scale(z.shape[0], gz.tensor.shape[0])


def multi_positive_terms(anchors: Tensor, columns: Gathered, labels: Tensor, column_labels: Tensor,
                         temperature: float, leave_own_out: bool = True) -> Tensor:
    """Each local anchor's multi-positive term [n]: its L2-normalised row against every rank's `columns` (anchor i's
    own column, at `columns.offset + i`, left out of the logits and the positives unless `leave_own_out` is
    false), the target uniform over the columns with its label."""
    n = anchors.shape[0]
    logits = (anchors @ columns.tensor.T) / temperature
    positives = labels[:, None] == column_labels[None, :]
    if leave_own_out:
        rows = torch.arange(n, device=anchors.device)
        own = (rows, rows + columns.offset)  # each anchor's own column
        logits = logits.index_put(own, logits.new_full((n,), MASK_VALUE))
        positives = positives.index_put(own, torch.zeros(n, dtype=torch.bool, device=anchors.device))
    counts = positives.sum(dim=1)
    # -sum_j target_ij * log_softmax(logits)_ij with target_i uniform over i's positives (all zero without any)
    return torch.logsumexp(logits, dim=1) * (counts > 0) \
        - (positives.to(anchors.dtype) * logits).sum(dim=1) / counts.clamp(min=1)


def _rank_unique_ids(n: int, device: torch.device) -> Tensor:
    rank, _ = dist_rank_world()
    return torch.arange(n, device=device, dtype=torch.long) + rank * _RANK_STRIDE


def info_nce(view1: Tensor, view2: Tensor, temperature: float = 0.1, *, same_size: bool = False) -> Tensor:
    """SimCLR's NT-Xent: 2N anchors (both views), each with its other view as the one positive.

    The same loss as :func:`multi_positive_contrastive` with m = 2 views per label; labels are
    made unique across ranks, so all other rows of all ranks are negatives.
    """
    if view1.shape != view2.shape:
        raise ValueError(f"views differ in shape: {tuple(view1.shape)} vs {tuple(view2.shape)}")
    ids = _rank_unique_ids(view1.shape[0], view1.device)
    return multi_positive_contrastive(torch.cat([view1, view2]), torch.cat([ids, ids]), temperature,
                                      same_size=same_size)


def clip_loss(image_features: Tensor, text_features: Tensor,
              logit_scale: Tensor | float | None = None, temperature: float = 0.07, *,
              same_size: bool = False) -> Tensor:
    """Symmetric CLIP loss: local images vs all texts, and local texts vs all images.

    ``logit_scale`` is the multiplier on cosine similarities (CLIP's ``exp(log_scale)``, may be a
    learnable tensor); when None, ``1 / temperature`` is used. Row i of both inputs is a pair;
    the other ranks' rows (gathered with gradient) are negatives.
    """
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"{image_features.shape[0]} images but {text_features.shape[0]} texts")
    scale = (1.0 / temperature) if logit_scale is None else logit_scale
    img = F.normalize(_at_least_fp32(image_features), dim=-1)
    txt = F.normalize(_at_least_fp32(text_features), dim=-1)
    g_img = gather_rows(img, grad=True, sizes=equal_sizes(img.shape[0]) if same_size else None)
    g_txt = gather_rows(txt, grad=True, sizes=g_img.sizes)
    n, n_total = img.shape[0], g_img.tensor.shape[0]
    targets = torch.arange(n, device=img.device) + g_img.offset
    loss_i = F.cross_entropy(scale * img @ g_txt.tensor.T, targets, reduction="sum")
    loss_t = F.cross_entropy(scale * txt @ g_img.tensor.T, targets, reduction="sum")
    return 0.5 * (loss_i + loss_t) * _ranks_scale(n, n_total)


def supervised_ce(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Plain cross-entropy over class logits (the supervised baseline); mean over local rows."""
    return F.cross_entropy(_at_least_fp32(logits), labels.long(), label_smoothing=label_smoothing)
