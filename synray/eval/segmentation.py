"""Linear segmentation probe on frozen patch tokens (1x1 conv, bilinear upsampling), scored by mIoU."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synray.eval.linear import LinearProbe, torch_threads

__all__ = ["confusion_matrix", "iou_per_class", "miou", 
           "infer_num_classes", "SegmentationProbe", "segmentation_probe"]

ArrayLike = torch.Tensor | np.ndarray


# ------------------------------------------------------------------------------------ metrics
def confusion_matrix(pred: ArrayLike, target: ArrayLike, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """[C, C] int64 pixel counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels are skipped."""
    p = torch.as_tensor(pred).long().reshape(-1)
    t = torch.as_tensor(target).long().reshape(-1)
    if p.numel() != t.numel():
        raise ValueError(f"prediction and target differ in size: {p.numel()} vs {t.numel()} pixels")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    for name, v in (("target", t), ("prediction", p)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            bad = int(v.min()) if int(v.min()) < 0 else int(v.max())
            raise ValueError(f"{name} class {bad} is out of range for num_classes={num_classes} "
                             f"(ignore_index={ignore_index})")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """IoU of each class from a [C, C] confusion matrix; NaN for a class absent from target and prediction."""
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(dim=1) + conf.sum(dim=0) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(union, float("nan")))


def miou(pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean IoU over the classes present in the ground truth or the prediction (NaN if no pixel counts)."""
    ious = iou_per_class(confusion_matrix(pred, target, num_classes, ignore_index))
    present = ~torch.isnan(ious)
    return float(ious[present].mean()) if present.any() else float("nan")


def _scores(conf: torch.Tensor) -> dict[str, float | list[float | None]]:
    ious = iou_per_class(conf)
    present = ~torch.isnan(ious)
    total = int(conf.sum())
    return {"miou": float(ious[present].mean()) if present.any() else float("nan"),
            "pixel_accuracy": float(conf.diagonal().sum()) / total if total else float("nan"),
            "iou_per_class": [None if math.isnan(v) else round(float(v), 6) for v in ious.tolist()]}


def infer_num_classes(masks: ArrayLike, ignore_index: int | None = None) -> int:
    """Largest mask value + 1 (``ignore_index`` left out), at least 2."""
    m = torch.as_tensor(masks)
    if ignore_index is not None:
        m = m[m != ignore_index]
    if m.numel() == 0:
        raise ValueError("the masks hold no labelled pixel")
    if int(m.min()) < 0:
        raise ValueError(f"mask values must be non-negative class indices, got {int(m.min())}")
    return max(2, int(m.max()) + 1)


# -------------------------------------------------------------------------------------- probe
class SegmentationProbe(nn.Module):
    """Per-patch linear classifier (a 1x1 conv) with optional non-affine BatchNorm, logits upsampled bilinearly."""

    def __init__(self, dim: int, num_classes: int, use_bn: bool = True) -> None:
        super().__init__()
        self.head = LinearProbe(dim, num_classes, use_bn)  # the classification probe, applied per patch

    def forward(self, tokens: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """tokens [B, P, D] (P = h * w, row-major) -> logits [B, C, *out_size]."""
        b, p, d = tokens.shape
        grid = _grid(p)
        logits = self.head(tokens.reshape(b * p, d)).reshape(b, grid, grid, -1)
        logits = logits.permute(0, 3, 1, 2)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


def _grid(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"patch tokens must form a square grid, got {num_patches} tokens")
    return side


def _check_inputs(tokens: torch.Tensor, masks: torch.Tensor, name: str) -> None:
    if tokens.ndim != 3:
        raise ValueError(f"{name} tokens must be [N, P, D], got shape {tuple(tokens.shape)}")
    if masks.ndim != 3 or masks.shape[0] != tokens.shape[0]:
        raise ValueError(f"{name} masks must be [N, H, W] with N = {tokens.shape[0]}, got {tuple(masks.shape)}")


def _predict_confusion(model: SegmentationProbe, tokens: torch.Tensor, masks: torch.Tensor, c: int,
                       ignore_index: int | None, batch_size: int) -> torch.Tensor:
    model.eval()
    conf = torch.zeros(c, c, dtype=torch.int64)
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            target = masks[start:start + batch_size]
            pred = model(tokens[start:start + batch_size], tuple(target.shape[-2:])).argmax(dim=1)
            conf += confusion_matrix(pred.cpu(), target.cpu(), c, ignore_index)
    return conf


def segmentation_probe(train_tokens: ArrayLike, train_masks: ArrayLike, test_tokens: ArrayLike,
                       test_masks: ArrayLike, num_classes: int | None = None, epochs: int = 30,
                       lr: float = 1e-2, batch_size: int = 16, weight_decay: float = 1e-4,
                       use_bn: bool = True, ignore_index: int | None = 255, seed: int = 0,
                       num_threads: int | None = 1) -> dict:
    """Train a linear per-patch classifier on frozen patch tokens; score it on the test images.

    Tokens are [N, P, D] (a square grid of P patches, row-major), masks [N, H, W] class indices.
    Logits at patch resolution are upsampled bilinearly to the mask size and trained with
    pixel-wise cross-entropy (AdamW, per-step cosine schedule from ``lr`` to 0); pixels equal to
    ``ignore_index`` count neither in the loss nor in the scores. ``num_classes`` defaults to the
    largest mask value + 1. Returns ``miou`` (mean IoU over classes present in the test ground
    truth or prediction), ``pixel_accuracy``, ``iou_per_class`` (None for absent classes),
    ``train_miou``, ``num_classes`` and ``steps``. The same ``seed`` gives the same result.
    Runs with at most ``num_threads`` torch threads (``None``: unchanged), like the linear probe.
    """
    xtr, xte = torch.as_tensor(train_tokens).float(), torch.as_tensor(test_tokens).float()
    mtr, mte = torch.as_tensor(train_masks).long(), torch.as_tensor(test_masks).long()
    _check_inputs(xtr, mtr, "train")
    _check_inputs(xte, mte, "test")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"train and test tokens differ in shape: {tuple(xtr.shape[1:])} vs {tuple(xte.shape[1:])}")
    if xtr.shape[0] < 1 or xte.shape[0] < 1:
        raise ValueError("the segmentation probe needs at least one train and one test image")
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 1, lr > 0 and batch_size >= 1 (got {epochs}, {lr}, {batch_size})")
    _grid(xtr.shape[1])
    c = int(num_classes) if num_classes is not None else infer_num_classes(
        torch.cat([mtr.reshape(-1), mte.reshape(-1)]), ignore_index)
    _check_mask_range(torch.cat([mtr.reshape(-1), mte.reshape(-1)]), c, ignore_index)
    with torch_threads(num_threads):
        model, steps = _train_probe(xtr, mtr, c, epochs, lr, batch_size, weight_decay, use_bn, ignore_index, seed)
        out = _scores(_predict_confusion(model, xte, mte, c, ignore_index, batch_size))
        out["train_miou"] = _scores(_predict_confusion(model, xtr, mtr, c, ignore_index, batch_size))["miou"]
    out["num_classes"] = c
    out["steps"] = steps
    return out


def _check_mask_range(values: torch.Tensor, c: int, ignore_index: int | None) -> None:
    if ignore_index is not None:
        values = values[values != ignore_index]
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= c):
        bad = int(values.min()) if int(values.min()) < 0 else int(values.max())
        raise ValueError(f"mask value {bad} is out of range for {c} classes (ignore_index={ignore_index}); "
                         "set eval.segmentation_num_classes or eval.segmentation_ignore_index")


def _train_probe(x: torch.Tensor, masks: torch.Tensor, c: int, epochs: int, lr: float, batch_size: int,
                 weight_decay: float, use_bn: bool, ignore_index: int | None,
                 seed: int) -> tuple[SegmentationProbe, int]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SegmentationProbe(x.shape[2], c, use_bn)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    bs = min(batch_size, n)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100 if ignore_index is None else ignore_index)
    total = max(1, epochs * math.ceil(n / bs))
    step = 0
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(bs):
            if use_bn and idx.numel() * x.shape[1] < 2:  # BatchNorm needs two tokens
                continue
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
            target = masks[idx]
            loss = loss_fn(model(x[idx], tuple(target.shape[-2:])), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model, step
