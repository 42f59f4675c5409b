"""Weighted k-nearest-neighbour classification on frozen features (DINO protocol) and group-wise splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["knn_votes", "knn_accuracies", "knn_accuracy", "split_reference_query"]

ArrayLike = torch.Tensor | np.ndarray


def _feats(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).float()
    if t.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(t.shape)}")
    return t


def _labels(y: ArrayLike, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(y).long().reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries for {n} feature rows")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must be non-negative class indices")
    return t


def knn_votes(train_feats: ArrayLike, train_labels: ArrayLike, test_feats: ArrayLike, k: int = 20,
              temperature: float = 0.07, num_classes: int | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Class votes [M, C] of each test row: its k most cosine-similar train rows, each weighted exp(sim / T)."""
    train = _feats(train_feats, "train_feats")
    test = _feats(test_feats, "test_feats")
    labels = _labels(train_labels, train.shape[0], "train_labels").to(train.device)
    if train.shape[0] == 0:
        raise ValueError("kNN needs at least one reference (train) row")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"feature widths differ: train {train.shape[1]}, test {test.shape[1]}")
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0 (got k={k}, temperature={temperature})")
    c = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    if int(labels.max()) >= c:
        raise ValueError(f"train label {int(labels.max())} is out of range for num_classes={c}")
    k = min(k, train.shape[0])
    train = F.normalize(train, dim=1)
    test = F.normalize(test.to(train.device), dim=1)
    out = []
    for start in range(0, test.shape[0], max(1, chunk_size)):
        sim = test[start:start + chunk_size] @ train.T                      # [b, N_train]
        top_sim, top_idx = sim.topk(k, dim=1)                                 # [b, k]
        votes = torch.zeros(sim.shape[0], c, device=sim.device)
        out.append(votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp()).cpu())
    return torch.cat(out) if out else torch.zeros(0, c)


def knn_accuracies(train_feats: ArrayLike, train_labels: ArrayLike, test_feats: ArrayLike, test_labels: ArrayLike,
                   k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                   chunk_size: int = 1024, tops: Sequence[int] = (1,)) -> dict[int, float]:
    """Top-n accuracy of the weighted kNN classifier (cosine similarity, DINO's exp(sim / T) votes) for each n in
    ``tops``: the share of test rows whose class is among the n classes with the most votes (DINO reports 1 and
    5). The votes are computed once for all of them."""
    test = _feats(test_feats, "test_feats")
    truth = _labels(test_labels, test.shape[0], "test_labels")
    if truth.numel() == 0:
        raise ValueError("kNN accuracy needs at least one query (test) row")
    if num_classes is None:
        num_classes = int(max(int(torch.as_tensor(train_labels).max()), int(truth.max()))) + 1
    votes = knn_votes(train_feats, train_labels, test, k, temperature, num_classes, chunk_size)
    ranked = votes.topk(min(max(tops), votes.shape[1]), dim=1).indices == truth[:, None]   # [M, n]: is it the truth
    return {n: float(ranked[:, :n].any(dim=1).float().mean()) for n in tops}


def knn_accuracy(train_feats: ArrayLike, train_labels: ArrayLike, test_feats: ArrayLike, test_labels: ArrayLike,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 1024, top: int = 1) -> float:
    """Top-``top`` accuracy of the weighted kNN classifier (`knn_accuracies` for one n)."""
    return knn_accuracies(train_feats, train_labels, test_feats, test_labels, k, temperature, num_classes,
                          chunk_size, (top,))[top]


def split_reference_query(labels: ArrayLike, groups: ArrayLike, query_fraction: float = 0.5,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split item indices into (reference, query) by group: a group (caption) lies wholly on one side.

    Stratified by label: every label with at least two groups gets at least one group on each
    side (about ``query_fraction`` of its groups in the query). Groups whose label has a single
    group cannot be stratified; they are split at random with the same fraction. A group's label
    is the label of its first item. Both sides are non-empty whenever there are two groups or more.
    Returns sorted int64 index arrays.
    """
    if not 0.0 < query_fraction < 1.0:
        raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
    lab = np.asarray(labels).reshape(-1)
    grp = np.asarray(groups).reshape(-1)
    if lab.shape != grp.shape:
        raise ValueError(f"labels ({lab.size}) and groups ({grp.size}) differ in length")
    uniq, first = np.unique(grp, return_index=True)
    if uniq.size < 2:
        raise ValueError(f"need at least two groups to split, got {uniq.size}")
    group_label = lab[first]
    rng = np.random.default_rng(seed)
    query_groups: list[np.ndarray] = []
    singles: list[np.ndarray] = []
    for label in np.unique(group_label):
        members = uniq[group_label == label]
        if members.size == 1:
            singles.append(members)
            continue
        members = rng.permutation(members)
        n_query = int(np.clip(round(members.size * query_fraction), 1, members.size - 1))
        query_groups.append(members[:n_query])
    if singles:
        pool = rng.permutation(np.concatenate(singles))
        query_groups.append(pool[:int(round(pool.size * query_fraction))])
    query_set = np.concatenate(query_groups) if query_groups else np.zeros(0, uniq.dtype)
    if query_set.size == 0:                   # only possible with few single-group labels
        query_set = rng.choice(uniq, 1)
    elif query_set.size == uniq.size:
        query_set = query_set[1:]
    in_query = np.isin(grp, query_set)
    return np.flatnonzero(~in_query).astype(np.int64), np.flatnonzero(in_query).astype(np.int64)
