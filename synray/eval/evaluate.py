"""The one evaluation path (`synray run`, `synray eval`, sweep trials): labelled rows through a Ray Data pool of
feature actors holding every model, then the protocols of the registry on each model's features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
import torch

from synray.config import EvalConfig
from synray.data.codecs import decode_masks
from synray.eval.errors import EvalError
from synray.eval.feature_pass import extractor_stages
from synray.eval.protocols import EvalArrays, label_names, run_protocols
from synray.eval.registry import PROTOCOLS, outputs_for
from synray.models.image_text import is_image_text_dir, load_image_text

__all__ = ["Scored", "evaluate_models", "resolve_image_text", "caption_key", "caption_groups", "rows_to_arrays",
           "in_order", "collect_rows", "model_rows"]


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


# ------------------------------------------------------------------------------- rows -> arrays
def caption_key(text: Any) -> str:
    """A caption as the split compares it: lower case, runs of white space as one space, no end punctuation."""
    return " ".join(str(text).lower().split()).strip(" .!?,;:")


def caption_groups(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """One group id per row: rows whose captions are equal once normalised (`caption_key`) share one, so an
    identical caption never lies on both sides of a reference/query split; a row without a caption is its own."""
    keys = [caption_key(r["caption"]) if r.get("caption") not in (None, "") else f"\0row {i}"
            for i, r in enumerate(rows)]
    return np.unique(np.asarray(keys, dtype=object), return_inverse=True)[1].astype(np.int64).reshape(-1)


def _stack(rows: Sequence[Mapping[str, Any]], key: str) -> Any:
    parts = [np.asarray(r[key], dtype=np.float32) for r in rows if len(r[key])]
    return torch.from_numpy(np.concatenate(parts)) if parts else None


def _masks(rows: Sequence[Mapping[str, Any]], counts: Sequence[int], size: int) -> np.ndarray:
    """Each row's encoded class masks (one per image) -> int64 [N, size, size], in image order."""
    flat: list[bytes] = []
    for i, (r, n) in enumerate(zip(rows, counts)):
        row_masks = [] if r.get("masks") is None else list(r["masks"])
        if len(row_masks) != n:
            raise EvalError(f"row {i} has {len(row_masks)} masks for {n} images")
        flat.extend(row_masks)
    return decode_masks(flat, size)


def rows_to_arrays(rows: Sequence[Mapping[str, Any]], image_size: int, outputs: Sequence[str],
                   class_names: Mapping[int, str] | None = None, has_labels: bool = True) -> EvalArrays:
    """Collected rows (canonical columns plus one feature column per output, [m_i, ...] per row) -> arrays.

    Each image gets its row's label, split and class name, and its row's caption group (`caption_groups`).
    Masks are decoded and nearest-resized to ``image_size``.
    """
    counts = [len(r[outputs[0]]) if outputs else len(r["images"]) for r in rows]
    labels = np.repeat(np.asarray([int(r["label"]) for r in rows], np.int64), counts)
    arrays = EvalArrays(labels=labels, groups=np.repeat(caption_groups(rows), counts), has_labels=has_labels)
    for name in outputs:
        setattr(arrays, name, _stack(rows, name))
    if rows and "split" in rows[0]:
        arrays.split = np.repeat(np.asarray([r["split"] for r in rows], dtype=object), counts)
    if any(isinstance(r.get("masks"), (list, tuple, np.ndarray)) for r in rows):  # an all-null column: none
        arrays.masks = _masks(rows, counts, image_size)
    names = dict(class_names or {})
    if rows and "class_name" in rows[0]:
        names.update(label_names([r["label"] for r in rows], [r["class_name"] for r in rows]))
    arrays.class_names = names or None
    return arrays
def _eval_error_in(exc: BaseException) -> str | None:
    """The message of an EvalError raised inside a Ray task (Ray passes it on as text), else None."""
    marker = f"{EvalError.__module__}.{EvalError.__name__}: "
    lines = [line for line in str(exc).splitlines() if line.startswith(marker)]
    return lines[-1][len(marker):] if lines else None


def in_order(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds`` executed in input order (reproducible groups, splits and ``limit``s: a held-out stream's
    `limit` keeps its first rows by row id, not the first to finish). Set on the dataset's own context: a
    Dataset copies the global DataContext when it is built, so setting that at execution time does nothing."""
    ds.context.execution_options.preserve_order = True
    return ds


def collect_rows(ds: ray.data.Dataset, where: str) -> list[dict[str, Any]]:
    """Run a feature-extraction dataset in input order; an EvalError inside a task comes back as one."""
    try:
        rows = in_order(ds).take_all()
    except Exception as e:
        message = _eval_error_in(e)
        if message is None:
            raise
        raise EvalError(f"{where}: {message}") from None
    if not rows:
        raise EvalError(f"evaluation dataset {where} holds no rows")
    return rows


def model_rows(rows: Sequence[Mapping[str, Any]], name: str, outputs: Sequence[str]) -> list[dict[str, Any]]:
    """The rows with model ``name``'s outputs under their plain names (what rows_to_arrays reads)."""
    return [{**r, **{o: r[f"{name}/{o}"] for o in outputs}} for r in rows]


# ---------------------------------------------------------------------------------- the path
@dataclass
class Scored:
    """What evaluating several models on one dataset gave."""

    figures: dict[str, dict[str, Any]]   # model name -> what run_protocols returned
    rows: int
    images: int
    samples: list[dict[str, Any]]        # rows that kept their images (a run's sample grid)


def evaluate_models(ds: ray.data.Dataset, models: Mapping[str, str], protocols: Sequence[str], cfg: EvalConfig,
                    image_size: int, *, seed: int, where: str, readable: Mapping[str, str] | None = None,
                    class_names: Mapping[int, str] | None = None, has_labels: bool = True,
                    sample_fraction: float = 0.0) -> Scored:
    """``protocols`` on each of ``models`` (name -> saved model) over the labelled rows of ``ds`` (the canonical
    columns of `synray.eval.datasets`, or a generated held-out set's).

    The images are encoded by all models in one pass through Ray Data (`extractor_stages`: a pool of
    `eval.feature_actors` actors, on GPUs when eval.use_gpu; ``readable`` names where the actors load a model when
    that differs, a remote run's storage), and only features reach the driver, plus the images of a seeded
    ``sample_fraction`` of the rows (drawn by caption id). Rows are put in caption-id order, so the reference/query
    split repeats across runs.
    """
    outputs = outputs_for(protocols)
    at = {name: (readable or {}).get(name) or d for name, d in models.items()}
    for stage in extractor_stages(cfg, image_size, protocols, at, sample_fraction):
        ds = stage.add(ds)
    rows = collect_rows(ds, where)
    rows.sort(key=lambda r: str(r.get("caption_id", "")))
    image_text = any(PROTOCOLS[p].image_text for p in protocols)
    figures, images = {}, 0
    for name, directory in models.items():
        arrays = rows_to_arrays(model_rows(rows, name, outputs), image_size, outputs, class_names, has_labels)
        figures[name] = run_protocols(arrays, protocols, cfg, seed=seed,
                                      image_text=resolve_image_text(directory) if image_text else None)
        images = len(arrays)
    samples = [r for r in rows if sample_fraction and r.get("images") is not None and len(r["images"])]
    return Scored(figures, len(rows), images, samples)
