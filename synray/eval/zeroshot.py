"""Zero-shot classification with an image-text model: class names x prompt templates, cosine scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synray.config import EvalConfig
from synray.models.image_text import ImageTextModel, tokenize

__all__ = ["DEFAULT_TEMPLATES", "prompt_name", "build_prompts", "average_template_embeddings",
           "class_text_embeddings", "zeroshot_logits", "zeroshot_accuracy", "zeroshot_classify"]

ArrayLike = torch.Tensor | np.ndarray

#: CLIP-style prompt templates (the default of ``eval.zeroshot_templates``)
DEFAULT_TEMPLATES: tuple[str, ...] = tuple(EvalConfig().zeroshot_templates)


def prompt_name(name: str) -> str:
    """A class name as it goes into a prompt: folder-style separators become spaces ("golden_retriever")."""
    return " ".join(str(name).replace("_", " ").split())


def build_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Class-major prompts: all templates of class 0, then of class 1, ... ([C * T] strings)."""
    if not class_names:
        raise ValueError("zero-shot needs at least one class name")
    if not templates:
        raise ValueError("zero-shot needs at least one prompt template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template needs exactly one {{}} for the class name; not {bad}")
    return [t.format(prompt_name(c)) for c in class_names for t in templates]


def average_template_embeddings(text_embeds: ArrayLike, num_classes: int) -> torch.Tensor:
    """[C * T, E] class-major prompt embeddings -> [C, E]: each normalised, averaged per class, renormalised."""
    e = torch.as_tensor(text_embeds).float()
    if e.ndim != 2 or num_classes < 1 or e.shape[0] % num_classes:
        raise ValueError(f"need [C * T, E] prompt embeddings for C={num_classes}, got shape {tuple(e.shape)}")
    per_class = F.normalize(e, dim=-1).reshape(num_classes, e.shape[0] // num_classes, e.shape[1])
    return F.normalize(per_class.mean(dim=1), dim=-1)


def class_text_embeddings(model: ImageTextModel, tokenizer: Any, class_names: Sequence[str],
                          templates: Sequence[str], max_length: int, batch_size: int = 256) -> torch.Tensor:
    """The zero-shot classifier [C, E]: every class's prompts through the text tower, template-averaged."""
    prompts = build_prompts(class_names, templates)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                enc = tokenize(tokenizer, prompts[start:start + batch_size], max_length)
                out.append(model.encode_text(enc["input_ids"].to(device)).float().cpu())
    finally:
        model.train(was_training)
    return average_template_embeddings(torch.cat(out), len(class_names))


def zeroshot_logits(image_embeds: ArrayLike, class_embeds: ArrayLike) -> torch.Tensor:
    """Cosine similarity [N, C] of each image embedding to each class embedding."""
    img = torch.as_tensor(image_embeds).float()
    cls = torch.as_tensor(class_embeds).float()
    if img.ndim != 2 or cls.ndim != 2 or img.shape[1] != cls.shape[1]:
        raise ValueError(f"need [N, E] image and [C, E] class embeddings, got {tuple(img.shape)} and "
                         f"{tuple(cls.shape)}")
    return F.normalize(img, dim=-1) @ F.normalize(cls, dim=-1).T


def zeroshot_accuracy(image_embeds: ArrayLike, class_embeds: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy of predicting the most similar class; labels index the rows of ``class_embeds``."""
    y = torch.as_tensor(labels).long().reshape(-1)
    logits = zeroshot_logits(image_embeds, class_embeds)
    if y.numel() != logits.shape[0]:
        raise ValueError(f"{y.numel()} labels for {logits.shape[0]} images")
    if y.numel() == 0:
        raise ValueError("zero-shot accuracy needs at least one image")
    if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
        raise ValueError(f"labels must index the {logits.shape[1]} classes")
    return float((logits.argmax(dim=1) == y).float().mean())


def zeroshot_classify(model: ImageTextModel, tokenizer: Any, max_length: int, image_embeds: ArrayLike,
                      labels: ArrayLike, class_names: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on images already embedded by ``model.encode_image``.

    ``labels`` index ``class_names``; every name is a candidate class, present in the images or not.
    Returns ``accuracy``, ``num_classes`` and ``num_templates``.
    """
    classifier = class_text_embeddings(model, tokenizer, class_names, templates, max_length, batch_size)
    return {"accuracy": zeroshot_accuracy(image_embeds, classifier, labels),
            "num_classes": len(class_names), "num_templates": len(templates)}
