"""The evaluation protocols (kNN, linear, zero-shot, segmentation) run on features already extracted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from synray.config import EVAL_PROTOCOLS, EvalConfig
from synray.eval.errors import EvalError
from synray.eval.knn import knn_accuracies, split_reference_query
from synray.eval.linear import selected_linear_probe
from synray.eval.segmentation import segmentation_probe
from synray.eval.zeroshot import zeroshot_classify

__all__ = ["SUPPORTED_PROTOCOLS", "BACKBONE_PROTOCOLS", "VALIDATION_FIGURES", "fit_validation", "check_protocols",
           "EvalArrays", "label_names", "reference_query", "run_protocols", "outputs_for"]

#: every protocol, in report order (zeroshot needs an image-text model, segmentation images with masks)
SUPPORTED_PROTOCOLS = EVAL_PROTOCOLS
#: protocols that need nothing beyond the backbone and labelled images
BACKBONE_PROTOCOLS = ("knn", "linear", "segmentation")
#: a query figure -> the same figure on the validation part of the reference side, what runs are chosen by
VALIDATION_FIGURES = {"knn_accuracy": "val_knn_accuracy", "linear_accuracy": "val_linear_accuracy"}
#: values of a `split` column: reference (probe training / kNN memory) and query (scored) images
REFERENCE_SPLITS = ("train",)
QUERY_SPLITS = ("test", "val", "validation", "query")


def check_protocols(protocols: Sequence[str]) -> list[str]:
    """The requested protocols, deduplicated in order; EvalError for any that cannot run."""
    out: list[str] = []
    for p in protocols:
        if p not in SUPPORTED_PROTOCOLS:
            raise EvalError(f"evaluation protocol {p!r} is not supported; supported: {', '.join(SUPPORTED_PROTOCOLS)}")
        if p not in out:
            out.append(p)
    if not out:
        raise EvalError(f"no evaluation protocol requested; supported: {', '.join(SUPPORTED_PROTOCOLS)}")
    return out


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


def outputs_for(protocols: Sequence[str]) -> tuple[str, ...]:
    """The feature outputs (see ``synray.eval.features.OUTPUTS``) that the protocols need."""
    out: list[str] = []
    if "knn" in protocols or "linear" in protocols:
        out.append("features")
    if "segmentation" in protocols:
        out.append("patch_tokens")
    if "zeroshot" in protocols:
        out.append("image_embeds")
    return tuple(out)


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


def _knn(feats: torch.Tensor, y: torch.Tensor, ref: torch.Tensor, query: torch.Tensor,
         fit_val: tuple[torch.Tensor, torch.Tensor] | None, cfg: EvalConfig, c: int) -> dict[str, Any]:
    def acc(a: torch.Tensor, b: torch.Tensor, tops: tuple[int, ...] = (1,)) -> dict[int, float]:
        return knn_accuracies(feats[a], y[a], feats[b], y[b], k=cfg.knn_k, temperature=cfg.knn_temperature,
                              num_classes=c, tops=tops)
    query_side = acc(ref, query, (1, 5))   # one vote for both figures
    return {"knn_accuracy": query_side[1], "knn_top5_accuracy": query_side[5],
            "val_knn_accuracy": acc(*fit_val)[1] if fit_val is not None else float("nan")}


def _linear(feats: torch.Tensor, y: torch.Tensor, ref: torch.Tensor, query: torch.Tensor,
            fit_val: tuple[torch.Tensor, torch.Tensor] | None, cfg: EvalConfig, c: int, seed: int) -> dict[str, Any]:
    fit, val = fit_val if fit_val is not None else (ref, None)
    probe = selected_linear_probe((feats[fit], y[fit]), (feats[val], y[val]) if val is not None else None,
                                  (feats[ref], y[ref]), (feats[query], y[query]), cfg.linear_weight_decay,
                                  epochs=cfg.linear_epochs, lr=cfg.linear_lr, batch_size=cfg.linear_batch_size,
                                  use_bn=cfg.linear_bn, seed=seed, num_classes=c)
    return {"linear_accuracy": probe["accuracy"], "linear_train_accuracy": probe["train_accuracy"],
            "val_linear_accuracy": probe["val_accuracy"], "linear_weight_decay": probe["weight_decay"]}


def _need(arrays: EvalArrays, attr: str, protocol: str) -> Any:
    value = getattr(arrays, attr)
    if value is None:
        raise EvalError(f"protocol {protocol!r} needs {attr.replace('_', ' ')}, which were not extracted")
    return value


def _zeroshot(arrays: EvalArrays, ref_query: tuple[np.ndarray, np.ndarray], cfg: EvalConfig,
              image_text: tuple[Any, Any, int]) -> dict[str, Any]:

    names = arrays.class_names or {}
    _, query = ref_query
    present = np.unique(arrays.labels[query])
    missing = [int(x) for x in present if int(x) not in names]
    if missing:
        raise EvalError(f"zero-shot needs a class name for every label; labels {missing[:10]} have none (give the "
                        "dataset a class_name or concept column, or use an image folder named by class)")
    candidates = sorted(names)
    position = {label: i for i, label in enumerate(candidates)}
    y = np.asarray([position[int(x)] for x in arrays.labels[query]], np.int64)
    model, tokenizer, max_length = image_text
    embeds = _need(arrays, "image_embeds", "zeroshot")[torch.from_numpy(query)]
    out = zeroshot_classify(model, tokenizer, max_length, embeds, y, [names[c] for c in candidates],
                            cfg.zeroshot_templates)
    return {"zeroshot_accuracy": out["accuracy"], "zeroshot_num_classes": out["num_classes"],
            "zeroshot_chance": 1.0 / out["num_classes"]}


def _segmentation(arrays: EvalArrays, ref: np.ndarray, query: np.ndarray, cfg: EvalConfig,
                  seed: int) -> dict[str, Any]:

    tokens = _need(arrays, "patch_tokens", "segmentation")
    masks = arrays.masks
    if masks is None:
        raise EvalError("the segmentation probe needs per-pixel class masks (a mask column, or a synray store "
                        "generated with images.backend=procedural)")
    ref_t, query_t = torch.from_numpy(ref), torch.from_numpy(query)
    masks_t = torch.as_tensor(np.asarray(masks)).long()
    try:
        out = segmentation_probe(tokens[ref_t], masks_t[ref_t], tokens[query_t], masks_t[query_t],
                                 num_classes=cfg.segmentation_num_classes, epochs=cfg.segmentation_epochs,
                                 lr=cfg.segmentation_lr, batch_size=cfg.segmentation_batch_size,
                                 use_bn=cfg.segmentation_bn, ignore_index=cfg.segmentation_ignore_index, seed=seed)
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
    """Run ``protocols`` on extracted arrays; the reference/query split is shared by all of them.

    The reference side is split again (by group, ``cfg.val_fraction``) into a fit part and a validation
    part: the linear probe's weight decay is chosen there, and the ``val_*`` figures (for choosing among
    runs without looking at the query side) are scored there.
    Returns ``num_reference`` / ``num_query`` / ``num_fit`` / ``num_val`` (images), ``num_classes`` (labels
    present), ``chance``, ``split`` (how the split was made) and per protocol: ``knn_accuracy``,
    ``knn_top5_accuracy``, ``val_knn_accuracy``; ``linear_accuracy``, ``linear_train_accuracy``,
    ``val_linear_accuracy``, ``linear_weight_decay`` (the chosen one); ``zeroshot_accuracy``,
    ``zeroshot_num_classes``, ``zeroshot_chance``; ``segmentation_miou``, ``segmentation_miou_objects`` (the
    background class left out), ``segmentation_pixel_accuracy``, ``segmentation_train_miou``,
    ``segmentation_num_classes``, ``segmentation_iou_per_class``.
    ``image_text`` is ``(ImageTextModel, tokenizer, max_length)`` for zero-shot.
    """
    if not arrays.has_labels and any(p in protocols for p in ("knn", "linear", "zeroshot")):
        raise EvalError("the dataset has no label column; only the segmentation protocol can run on it")
    if "zeroshot" in protocols and image_text is None:
        raise EvalError("zero-shot needs an image-text model (its text tower and image projection)")
    fraction = cfg.query_fraction if query_fraction is None else query_fraction
    ref, query, how = reference_query(arrays, seed=seed, query_fraction=fraction)
    classes, dense = np.unique(arrays.labels, return_inverse=True)
    c = int(classes.size)
    result: dict[str, Any] = {"num_reference": int(ref.size), "num_query": int(query.size),
                              "num_classes": c, "chance": 1.0 / c, "split": how}
    y = torch.from_numpy(dense.reshape(-1).astype(np.int64))
    ref_t, query_t = torch.from_numpy(ref), torch.from_numpy(query)
    split = fit_validation(arrays, ref, cfg.val_fraction, seed)
    fit_val = (torch.from_numpy(split[0]), torch.from_numpy(split[1])) if split is not None else None
    if split is not None:
        result.update(num_fit=int(split[0].size), num_val=int(split[1].size))
    if "knn" in protocols:
        result.update(_knn(_need(arrays, "features", "knn"), y, ref_t, query_t, fit_val, cfg, c))
    if "linear" in protocols:
        result.update(_linear(_need(arrays, "features", "linear"), y, ref_t, query_t, fit_val, cfg, c, seed))
    if "zeroshot" in protocols:
        result.update(_zeroshot(arrays, (ref, query), cfg, image_text))
    if "segmentation" in protocols:
        result.update(_segmentation(arrays, ref, query, cfg, seed))
    return result
