"""Evaluation of a frozen backbone on labelled caption rows in this process: the protocols of synray.eval.protocols."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synray.config import EvalConfig
from synray.data.codecs import decode_masks
from synray.eval.errors import EvalError
from synray.eval.features import encode_images, rows_to_images
from synray.eval.protocols import BACKBONE_PROTOCOLS, EvalArrays, check_protocols, label_names, outputs_for, \
    run_protocols
from synray.models.backbone import Encoder
from synray.models.image_text import is_image_text_dir, load_image_text

__all__ = ["evaluate_backbone", "resolve_image_text", "rows_to_masks", "rows_class_names"]


def resolve_image_text(image_text: Any) -> tuple[Any, Any, int]:
    """``(ImageTextModel, tokenizer, max_length)`` from that tuple itself or from a ``save_image_text`` directory."""
    if isinstance(image_text, (str, Path)):
        if not is_image_text_dir(image_text):
            raise EvalError(f"zero-shot needs an image-text model, and {image_text} holds none (no text/ tower "
                            "and image_text.safetensors projection); train one with train.loss=clip")
        return load_image_text(image_text)
    if isinstance(image_text, tuple) and len(image_text) == 3:
        return image_text
    raise EvalError("image_text must be a model directory or the (model, tokenizer, max_length) tuple "
                    f"that load_image_text returns, got {type(image_text).__name__}")


def _column(rows: Sequence[Mapping[str, Any]] | Mapping[str, Any], names: Sequence[str]) -> list[Any] | None:
    """The first of ``names`` that the rows have, as a list (None if they have none of them)."""
    if isinstance(rows, Mapping):
        col = next((n for n in names if n in rows), None)
        return None if col is None else list(rows[col])
    if not rows:
        return []
    col = next((n for n in names if all(n in r for r in rows)), None)
    return None if col is None else [r[col] for r in rows]


def rows_to_masks(rows: Sequence[Mapping[str, Any]] | Mapping[str, Any], size: int) -> Any:
    """The rows' ``masks`` (one encoded class mask per image) -> int64 [N, size, size], in image order."""
    masks, images = _column(rows, ("masks",)), _column(rows, ("images",)) or []
    if masks is None:
        raise EvalError("the segmentation protocol needs rows with a 'masks' column (one class mask per image; "
                        "the procedural image backend writes them)")
    flat: list[bytes] = []
    for i, (row_masks, row_images) in enumerate(zip(masks, images)):
        row_masks = [] if row_masks is None else list(row_masks)
        n_images = 0 if row_images is None else len(row_images)
        if len(row_masks) != n_images:
            raise EvalError(f"row {i} has {len(row_masks)} masks for {n_images} images")
        flat.extend(row_masks)
    return decode_masks(flat, size) if flat else np.zeros((0, size, size), np.int64)


def rows_class_names(rows: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[int, str] | None:
    """label -> name from the rows' ``class_name`` or ``concept`` column (None when they have neither)."""
    names = _column(rows, ("class_name", "concept"))
    labels = _column(rows, ("label",))
    if names is None or labels is None:
        return None
    return label_names(labels, names)


def evaluate_backbone(encoder: Encoder, rows: Sequence[Mapping[str, Any]] | Mapping[str, Any],
                      protocols: Sequence[str] | None, cfg: EvalConfig, image_size: int, *,
                      seed: int = 0, query_fraction: float | None = None, batch_size: int | None = None,
                      image_text: Any = None, class_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Run the evaluation protocols on ``encoder`` with held-out caption rows (in this process).

    The rows' images are embedded (eval transform at ``image_size``) and split into reference
    and query sets by caption (no caption on both sides), stratified by label. Labels are
    re-indexed to the classes present. ``protocols=None`` means ``cfg.protocols``;
    ``query_fraction`` / ``batch_size`` default to ``cfg.query_fraction`` / ``cfg.batch_size``.

    - ``knn`` / ``linear``: CLS embeddings of ``encoder``.
    - ``segmentation``: patch tokens of ``encoder``; the rows need ``masks`` (one PNG class mask
      per image, resized to ``image_size``).
    - ``zeroshot``: ``image_text`` (a ``save_image_text`` directory or the tuple ``load_image_text``
      returns) embeds the images and the prompts; class names come from ``class_names`` or the
      rows' ``class_name`` / ``concept`` column.

    Returns what :func:`synray.eval.protocols.run_protocols` returns (``knn_accuracy``,
    ``linear_accuracy``, ``zeroshot_accuracy``, ``segmentation_miou``, ... plus ``num_reference`` /
    ``num_query`` (images), ``num_classes`` (present), ``chance``).
    """
    todo = check_protocols(list(cfg.protocols if protocols is None else protocols))
    if "zeroshot" in todo and image_text is None:
        raise EvalError("protocol 'zeroshot' needs an image-text model: pass image_text= (a directory written by "
                        "save_image_text or the tuple load_image_text returns); the protocols that need only "
                        f"the backbone are {', '.join(BACKBONE_PROTOCOLS)}")
    text = resolve_image_text(image_text) if "zeroshot" in todo else None
    bs = cfg.batch_size if batch_size is None else batch_size
    images, labels, groups = rows_to_images(rows, image_size=image_size)
    if np.unique(groups).size < 2:
        raise EvalError(f"evaluation needs at least two held-out rows with images, got {np.unique(groups).size}")
    arrays = EvalArrays(labels=labels, groups=groups)
    if "segmentation" in todo:
        arrays.masks = rows_to_masks(rows, image_size)
    backbone_outputs = tuple(o for o in outputs_for(todo) if o != "image_embeds")
    if backbone_outputs:
        encoded = encode_images(encoder, images, image_size, bs, backbone_outputs)
        arrays.features, arrays.patch_tokens = encoded.get("features"), encoded.get("patch_tokens")
    if text is not None:
        model = text[0]
        arrays.image_embeds = encode_images(model.encoder, images, image_size, bs, ("image_embeds",),
                                            model.image_projection)["image_embeds"]
        arrays.class_names = dict(class_names) if class_names is not None else rows_class_names(rows)
    return run_protocols(arrays, todo, cfg, seed=seed, query_fraction=query_fraction, image_text=text)
