"""The evaluation protocols' code (kNN, linear, zero-shot, segmentation), run on features already extracted; what
each protocol is, needs and reports is its entry in `synray.eval.registry`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from synray.config import EvalConfig
from synray.eval.errors import EvalError
from synray.eval.knn import knn_accuracies, split_reference_query
from synray.eval.linear import selected_linear_probe
from synray.eval.registry import PROTOCOLS, get_protocol
from synray.eval.segmentation import segmentation_probe
from synray.eval.zeroshot import zeroshot_classify

__all__ = ["fit_validation", "EvalArrays", "ProtocolInput", "label_names", "reference_query",
           "run_protocols", "run_knn", "run_linear", "run_zeroshot", "run_segmentation"]

#: values of a `split` column: reference (probe training / kNN memory) and query (scored) images
REFERENCE_SPLITS = ("train",)
QUERY_SPLITS = ("test", "val", "validation", "query")


@dataclass
class EvalArrays:
    """One entry per image: labels, group (caption / source row) ids, and what the protocols need.

    ``class_names`` maps a label to its name (zero-shot); ``split`` holds a dataset's own
    train/test assignment (else a stratified split by group is drawn); ``has_labels`` is False
    for mask-only datasets (labels are then all 0 and only segmentation can run).
    """

    labels: np.ndarray
    groups: np.ndarray
    features: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    masks: np.ndarray | None = None
    split: np.ndarray | None = None
    class_names: dict[int, str] | None = None
    has_labels: bool = True

    def __len__(self) -> int:
        return int(np.asarray(self.labels).shape[0])


def label_names(labels: Sequence[Any], names: Sequence[Any]) -> dict[int, str]:
    """label -> class name from per-item (label, name) pairs; one label with two names is an error."""
    out: dict[int, str] = {}
    for label, name in zip(labels, names):
        if name is None or (isinstance(name, float) and np.isnan(name)):
            continue
        name = name.decode() if isinstance(name, bytes) else str(name)
        prev = out.setdefault(int(label), name)
        if prev != name:
            raise EvalError(f"label {int(label)} has two class names: {prev!r} and {name!r}")
    return out


def reference_query(arrays: EvalArrays, seed: int = 0,
                    query_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray, str]:
    """(reference indices, query indices, how): the dataset's split column if any, else a stratified split.

    Without a split column, groups (captions) are split whole, stratified by label, with ``seed``.
    """

    if arrays.split is not None:
        split = np.asarray([s.decode() if isinstance(s, bytes) else str(s) for s in arrays.split])
        unknown = sorted(set(split) - set(REFERENCE_SPLITS) - set(QUERY_SPLITS))
        if unknown:
            raise EvalError(f"split column values {unknown} are not understood; use {REFERENCE_SPLITS[0]!r} for "
                            f"reference images and one of {list(QUERY_SPLITS)} for query images")
        ref = np.flatnonzero(np.isin(split, REFERENCE_SPLITS)).astype(np.int64)
        query = np.flatnonzero(np.isin(split, QUERY_SPLITS)).astype(np.int64)
        if not ref.size or not query.size:
            raise EvalError(f"the split column gives {ref.size} reference (train) and {query.size} query (test) "
                            "images; both need at least one")
        return ref, query, "split column"
    if np.unique(arrays.groups).size < 2:
        raise EvalError(f"evaluation needs at least two rows with images, got {np.unique(arrays.groups).size}")
    ref, query = split_reference_query(arrays.labels, arrays.groups, query_fraction=query_fraction, seed=seed)
    return ref, query, f"stratified {1 - query_fraction:g}/{query_fraction:g}, captions whole (seed {seed})"


def fit_validation(arrays: EvalArrays, ref: np.ndarray, fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The reference side split again, by group and stratified by label, into a fit part and a validation part
    (indices into the arrays); None when the reference side has fewer than two groups."""
    try:
        fit, val = split_reference_query(arrays.labels[ref], arrays.groups[ref], query_fraction=fraction,
                                         seed=seed + 1)
    except ValueError:
        return None
    return ref[fit], ref[val]


@dataclass(frozen=True)
class ProtocolInput:
    """What every protocol is given: the arrays, dense labels, the reference/query split (shared by all protocols)
    and its fit/validation split of the reference side."""

    arrays: EvalArrays
    y: torch.Tensor                 # labels re-indexed to 0..num_classes-1
    ref: np.ndarray
    query: np.ndarray
    fit_val: tuple[np.ndarray, np.ndarray] | None
    cfg: EvalConfig
    num_classes: int
    seed: int
    image_text: tuple[Any, Any, int] | None = None

    def need(self, attr: str, protocol: str) -> Any:
        value = getattr(self.arrays, attr)
        if value is None:
            raise EvalError(f"protocol {protocol!r} needs {attr.replace('_', ' ')}, which were not extracted")
        return value


def _t(idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(idx)


def run_knn(p: ProtocolInput) -> dict[str, Any]:
    feats, y, cfg = p.need("features", "knn"), p.y, p.cfg

    def acc(a: np.ndarray, b: np.ndarray, tops: tuple[int, ...] = (1,)) -> dict[int, float]:
        a, b = _t(a), _t(b)
        return knn_accuracies(feats[a], y[a], feats[b], y[b], k=cfg.knn_k, temperature=cfg.knn_temperature,
                              num_classes=p.num_classes, tops=tops)
    query_side = acc(p.ref, p.query, (1, 5))   # one vote for both figures
    return {"knn_accuracy": query_side[1], "knn_top5_accuracy": query_side[5],
            "val_knn_accuracy": acc(*p.fit_val)[1] if p.fit_val is not None else float("nan")}


def run_linear(p: ProtocolInput) -> dict[str, Any]:
    feats, y, cfg = p.need("features", "linear"), p.y, p.cfg
    fit, val = (_t(i) for i in p.fit_val) if p.fit_val is not None else (_t(p.ref), None)
    ref, query = _t(p.ref), _t(p.query)
    probe = selected_linear_probe((feats[fit], y[fit]), (feats[val], y[val]) if val is not None else None,
                                  (feats[ref], y[ref]), (feats[query], y[query]), cfg.linear_weight_decay,
                                  epochs=cfg.linear_epochs, lr=cfg.linear_lr, batch_size=cfg.linear_batch_size,
                                  use_bn=cfg.linear_bn, seed=p.seed, num_classes=p.num_classes)
    return {"linear_accuracy": probe["accuracy"], "linear_train_accuracy": probe["train_accuracy"],
            "val_linear_accuracy": probe["val_accuracy"], "linear_weight_decay": probe["weight_decay"]}


def run_zeroshot(p: ProtocolInput) -> dict[str, Any]:
    arrays = p.arrays
    if p.image_text is None:
        raise EvalError("zero-shot needs an image-text model (its text tower and image projection)")
    names = arrays.class_names or {}
    present = np.unique(arrays.labels[p.query])
    missing = [int(x) for x in present if int(x) not in names]
    if missing:
        raise EvalError(f"zero-shot needs a class name for every label; labels {missing[:10]} have none (give the "
                        "dataset a class_name or concept column, or use an image folder named by class)")
    candidates = sorted(names)
    position = {label: i for i, label in enumerate(candidates)}
    y = np.asarray([position[int(x)] for x in arrays.labels[p.query]], np.int64)
    model, tokenizer, max_length = p.image_text
    embeds = p.need("image_embeds", "zeroshot")[_t(p.query)]
    out = zeroshot_classify(model, tokenizer, max_length, embeds, y, [names[c] for c in candidates],
                            p.cfg.zeroshot_templates)
    return {"zeroshot_accuracy": out["accuracy"], "zeroshot_num_classes": out["num_classes"],
            "zeroshot_chance": 1.0 / out["num_classes"]}


def run_segmentation(p: ProtocolInput) -> dict[str, Any]:
    tokens, cfg = p.need("patch_tokens", "segmentation"), p.cfg
    masks = p.arrays.masks
    if masks is None:
        raise EvalError("the segmentation probe needs per-pixel class masks (a mask column, or a synray store "
                        "generated with images.backend=procedural)")
    ref_t, query_t = _t(p.ref), _t(p.query)
    masks_t = torch.as_tensor(np.asarray(masks)).long()
    try:
        out = segmentation_probe(tokens[ref_t], masks_t[ref_t], tokens[query_t], masks_t[query_t],
                                 num_classes=cfg.segmentation_num_classes, epochs=cfg.segmentation_epochs,
                                 lr=cfg.segmentation_lr, batch_size=cfg.segmentation_batch_size,
                                 use_bn=cfg.segmentation_bn, ignore_index=cfg.segmentation_ignore_index, seed=p.seed)
    except ValueError as e:
        raise EvalError(f"segmentation probe: {e}") from e
    objects = [v for i, v in enumerate(out["iou_per_class"]) if v is not None and i != cfg.segmentation_background]
    return {"segmentation_miou": out["miou"], "segmentation_pixel_accuracy": out["pixel_accuracy"],
            "segmentation_miou_objects": float(np.mean(objects)) if objects else float("nan"),
            "segmentation_train_miou": out["train_miou"], "segmentation_num_classes": out["num_classes"],
            "segmentation_iou_per_class": out["iou_per_class"]}


def run_protocols(arrays: EvalArrays, protocols: Sequence[str], cfg: EvalConfig, *, seed: int = 0,
                  query_fraction: float | None = None,
                  image_text: tuple[Any, Any, int] | None = None) -> dict[str, Any]:
    """Run ``protocols`` (entries of `synray.eval.registry.PROTOCOLS`) on extracted arrays; the reference/query
    split is shared by all of them.

    The reference side is split again (by group, ``cfg.val_fraction``) into a fit part and a validation
    part: the linear probe's weight decay is chosen there, and the ``val_*`` figures (for choosing among
    runs without looking at the query side) are scored there.
    Returns ``num_reference`` / ``num_query`` / ``num_fit`` / ``num_val`` (images), ``num_classes`` (labels
    present), ``chance``, ``split`` (how the split was made) and each protocol's figures (its registry entry's
    metrics, and details: ``linear_weight_decay`` chosen, ``segmentation_iou_per_class``, ...).
    ``image_text`` is ``(ImageTextModel, tokenizer, max_length)`` for zero-shot.
    """
    todo = [get_protocol(name) for name in protocols]
    labelled = [p.name for p in todo if p.labels]
    if not arrays.has_labels and labelled:
        raise EvalError(f"the dataset has no label column, which {', '.join(labelled)} need; only "
                        f"{', '.join(p.name for p in PROTOCOLS.values() if not p.labels)} can run on it")
    if image_text is None and any(p.image_text for p in todo):
        raise EvalError("zero-shot needs an image-text model (its text tower and image projection)")
    fraction = cfg.query_fraction if query_fraction is None else query_fraction
    ref, query, how = reference_query(arrays, seed=seed, query_fraction=fraction)
    classes, dense = np.unique(arrays.labels, return_inverse=True)
    c = int(classes.size)
    result: dict[str, Any] = {"num_reference": int(ref.size), "num_query": int(query.size),
                              "num_classes": c, "chance": 1.0 / c, "split": how}
    fit_val = fit_validation(arrays, ref, cfg.val_fraction, seed)
    if fit_val is not None:
        result.update(num_fit=int(fit_val[0].size), num_val=int(fit_val[1].size))
    inputs = ProtocolInput(arrays, torch.from_numpy(dense.reshape(-1).astype(np.int64)), ref, query, fit_val, cfg,
                           c, seed, image_text)
    for protocol in todo:
        result.update(protocol.runner()(inputs))
    return result
