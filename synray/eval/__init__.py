"""Evaluation of frozen backbones on held-out caption rows: kNN and linear probes (zero-shot, segmentation later)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synray.config import EvalConfig
    from synray.models.backbone import Encoder

__all__ = ["SUPPORTED_PROTOCOLS", "check_protocols", "evaluate_backbone"]

#: protocols evaluate_backbone runs today
SUPPORTED_PROTOCOLS = ("knn", "linear")


def check_protocols(protocols: Sequence[str]) -> list[str]:
    """The requested protocols, deduplicated in order; ValueError for any this module cannot run yet."""
    out: list[str] = []
    for p in protocols:
        if p not in SUPPORTED_PROTOCOLS:
            raise ValueError(f"evaluation protocol {p!r} is not supported yet; supported: "
                             f"{', '.join(SUPPORTED_PROTOCOLS)}")
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError(f"no evaluation protocol requested; supported: {', '.join(SUPPORTED_PROTOCOLS)}")
    return out


def evaluate_backbone(encoder: "Encoder", rows: Sequence[Mapping[str, Any]] | Mapping[str, Any],
                      protocols: Sequence[str] | None, cfg: "EvalConfig", image_size: int, *,
                      seed: int = 0, query_fraction: float = 0.5, batch_size: int = 256) -> dict[str, Any]:
    """Run kNN and/or linear probes of ``encoder`` on held-out caption rows.

    The rows' images are embedded (CLS token, eval transform at ``image_size``) and split into
    reference and query sets by caption (no caption on both sides), stratified by label. Labels
    are re-indexed to the classes present. ``protocols=None`` means ``cfg.protocols``. Returns
    ``knn_accuracy`` / ``linear_accuracy`` (and ``linear_train_accuracy``) for the protocols run,
    plus ``num_reference`` / ``num_query`` (images), ``num_classes`` (present) and ``chance``.
    """
    import numpy as np
    import torch

    from synray.eval.features import extract_features, rows_to_images
    from synray.eval.knn import knn_accuracy, split_reference_query

    todo = check_protocols(list(cfg.protocols if protocols is None else protocols))
    images, labels, groups = rows_to_images(rows, image_size=image_size)
    if np.unique(groups).size < 2:
        raise ValueError(f"evaluation needs at least two held-out rows with images, got {np.unique(groups).size}")
    classes, dense = np.unique(labels, return_inverse=True)
    ref, query = split_reference_query(dense, groups, query_fraction=query_fraction, seed=seed)
    feats = extract_features(encoder, images, image_size, batch_size=batch_size)
    y = torch.from_numpy(dense.astype(np.int64))
    ref_t, query_t = torch.from_numpy(ref), torch.from_numpy(query)
    result: dict[str, Any] = {"num_reference": int(ref.size), "num_query": int(query.size),
                              "num_classes": int(classes.size), "chance": 1.0 / classes.size}
    if "knn" in todo:
        result["knn_accuracy"] = knn_accuracy(feats[ref_t], y[ref_t], feats[query_t], y[query_t], k=cfg.knn_k,
                                              temperature=cfg.knn_temperature, num_classes=int(classes.size))
    if "linear" in todo:
        from synray.eval.linear import linear_probe

        probe = linear_probe(feats[ref_t], y[ref_t], feats[query_t], y[query_t],
                             epochs=cfg.linear_epochs, num_classes=int(classes.size), seed=seed)
        result["linear_accuracy"] = probe["accuracy"]
        result["linear_train_accuracy"] = probe["train_accuracy"]
    return result
