"""Linear probe on frozen features: optional non-affine BatchNorm, SGD with momentum and a cosine schedule, its
weight decay chosen on a validation split."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["LinearProbe", "linear_probe", "selected_linear_probe", "torch_threads"]

ArrayLike = torch.Tensor | np.ndarray


class LinearProbe(nn.Module):
    """BatchNorm1d(affine=False) (StableRep/MAE's feature normalisation) followed by one linear layer."""

    def __init__(self, dim: int, num_classes: int, use_bn: bool = True) -> None:
        super().__init__()
        self.norm: nn.Module = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if use_bn else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def _accuracy(model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 8192) -> float:
    if labels.numel() == 0:
        return float("nan")
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, feats.shape[0], chunk):
            pred = model(feats[start:start + chunk]).argmax(dim=1)
            correct += int((pred == labels[start:start + chunk]).sum())
    return correct / labels.numel()


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Cap torch's intra-op threads for the block (the probe's small matmuls run fastest on one)."""
    before = torch.get_num_threads()
    if n is None or n >= before:
        yield
        return
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batches(n: int, batch_size: int, gen: torch.Generator, min_size: int) -> list[torch.Tensor]:
    """A shuffled epoch in mini-batches; a trailing batch smaller than ``min_size`` is dropped."""
    order = torch.randperm(n, generator=gen)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() < min_size:
        chunks.pop()
    return chunks


def linear_probe(train_feats: ArrayLike, train_labels: ArrayLike, test_feats: ArrayLike, test_labels: ArrayLike,
                 epochs: int = 90, lr: float = 0.1, batch_size: int | None = 256, weight_decay: float = 0.0,
                 use_bn: bool = True, seed: int = 0, num_classes: int | None = None,
                 momentum: float = 0.9, num_threads: int | None = 1) -> dict[str, float | int]:
    """Train a linear classifier on frozen features and report its top-1 accuracy.

    SGD (momentum 0.9) with a per-step cosine schedule from ``lr`` to 0 over ``epochs`` epochs;
    ``batch_size=None`` (or >= the number of train rows) trains full-batch. The same ``seed``
    gives the same result (initialisation and shuffling use private generators). Training runs
    with at most ``num_threads`` torch threads (``None``: unchanged); one is fastest for probe-sized
    matmuls, and much faster on a busy CPU. Returns ``accuracy`` (test), ``train_accuracy``,
    ``num_classes`` and ``steps``.
    """
    xtr = torch.as_tensor(train_feats).float()
    xte = torch.as_tensor(test_feats).float().to(xtr.device)
    ytr = torch.as_tensor(train_labels).long().reshape(-1).to(xtr.device)
    yte = torch.as_tensor(test_labels).long().reshape(-1).to(xtr.device)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"features must be [N, D] with one D, got {tuple(xtr.shape)} and {tuple(xte.shape)}")
    if ytr.numel() != xtr.shape[0] or yte.numel() != xte.shape[0]:
        raise ValueError("labels and features differ in length")
    if xtr.shape[0] < 2 and use_bn:
        raise ValueError("the BatchNorm probe needs at least two training rows")
    if epochs < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1 and lr > 0 (got epochs={epochs}, lr={lr})")
    all_labels = torch.cat([ytr, yte])
    if int(all_labels.min()) < 0:
        raise ValueError("labels must be non-negative class indices")
    c = int(num_classes) if num_classes is not None else int(all_labels.max()) + 1
    if int(all_labels.max()) >= c:
        raise ValueError(f"label {int(all_labels.max())} is out of range for num_classes={c}")

    with torch_threads(num_threads):
        return _train(xtr, ytr, xte, yte, c, epochs, lr, batch_size, weight_decay, use_bn, seed, momentum)


def _train(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, c: int, epochs: int,
           lr: float, batch_size: int | None, weight_decay: float, use_bn: bool, seed: int,
           momentum: float) -> dict[str, float | int]:
    n = xtr.shape[0]
    bs = n if batch_size is None or batch_size >= n else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LinearProbe(xtr.shape[1], c, use_bn).to(xtr.device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    min_size = 2 if use_bn else 1
    steps_per_epoch = math.ceil(n / bs) - int(n > bs and 0 < n % bs < min_size)
    total = max(1, epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for _ in range(epochs):
        model.train()
        for idx in _batches(n, bs, gen, min_size):
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
            idx = idx.to(xtr.device)
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return {"accuracy": _accuracy(model, xte, yte), "train_accuracy": _accuracy(model, xtr, ytr),
            "num_classes": c, "steps": step}


def selected_linear_probe(fit: tuple[ArrayLike, ArrayLike], val: tuple[ArrayLike, ArrayLike] | None,
                          train: tuple[ArrayLike, ArrayLike], test: tuple[ArrayLike, ArrayLike],
                          weight_decays: list[float], **probe: Any) -> dict[str, Any]:
    """The linear protocol of MAE/StableRep/DINOv2 with its regularisation chosen off the test set.

    A probe per weight decay trains on ``fit`` and is scored on ``val`` (features, labels); the decay with the
    best validation accuracy (ties: the larger decay) is trained again on ``train`` (fit and val together)
    and scored once on ``test``. With one decay, or no ``val``, that decay is used as is. ``probe`` is passed
    to `linear_probe`. Returns `linear_probe`'s figures plus ``weight_decay`` (the chosen one),
    ``val_accuracy`` (its validation accuracy, NaN without a choice) and ``val_accuracies`` (per decay).
    """
    scores: dict[float, float] = {}
    if val is not None and len(weight_decays) > 1:
        for wd in weight_decays:
            scores[float(wd)] = float(linear_probe(*fit, *val, weight_decay=wd, **probe)["accuracy"])
        chosen = max(scores, key=lambda wd: (scores[wd], wd))
    else:
        chosen = float(weight_decays[0])
    out: dict[str, Any] = dict(linear_probe(*train, *test, weight_decay=chosen, **probe))
    out.update(weight_decay=chosen, val_accuracy=scores.get(chosen, float("nan")), val_accuracies=scores)
    return out
