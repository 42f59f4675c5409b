"""The registry of evaluation protocols: `eval.protocols` names entries of `PROTOCOLS` here, and nowhere else.

Each `Protocol` declares what it needs (feature outputs, labels, masks, an image-text model: checked when a run or
an evaluation is planned), the function of `synray.eval.protocols` that runs it, and its metrics: which are
headline figures (printed after a run, columns of sweep tables), which are accuracies compared with chance, which
have a validation twin (what runs are chosen by), which a sweep may rank by, and each one's row in `eval.md`. Every
list of metrics elsewhere is derived from these records. A new protocol is one entry here, its function in
`synray.eval.protocols` and its settings in `EvalConfig`.

This module imports neither torch nor the protocols' code, so that commands which only parse arguments or validate a
config stay light; `Protocol.runner()` imports the implementation when a protocol first runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from synray.config import LOSS_METRIC
from synray.eval.errors import EvalError

__all__ = ["Metric", "Protocol", "PROTOCOLS", "LOSS_METRIC", "protocol_names", "get_protocol", "check_protocols",
           "outputs_for", "headline_metrics", "chance_metrics", "validation_figures", "tune_metrics", "protocol_of"]

Row = Callable[[Mapping[str, Any], Mapping[str, Any]], str]


@dataclass(frozen=True)
class Metric:
    """One figure a protocol reports."""

    key: str
    row: Row                          # its eval.md row text, from (the results, the eval config)
    headline: bool = False            # printed after a run, a column of sweep tables
    chance: bool = False              # a classification accuracy, printed beside chance
    validation: str | None = None     # the same figure on the validation part of the reference side
    tunable: bool = False             # tune.metric may rank and fit a sweep by it


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: what it needs, the function that runs it, what it reports."""

    name: str
    description: str
    outputs: tuple[str, ...]          # the feature outputs it reads (synray.eval.features.OUTPUTS)
    metrics: tuple[Metric, ...]
    run: str                          # its function in synray.eval.protocols: (ProtocolInput) -> figures
    labels: bool = True               # needs class labels
    masks: bool = False               # needs per-pixel class masks
    image_text: bool = False          # needs an image-text model (a text tower and an image projection)

    def runner(self) -> Callable[[Any], dict[str, Any]]:
        return getattr(importlib.import_module("synray.eval.protocols"), self.run)


def _fixed(text: str) -> Row:
    return lambda results, cfg: text


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("knn", "weighted k-nearest-neighbour vote on the CLS features (DINO's classifier)", ("features",), (
        Metric("knn_accuracy", lambda r, c: f"top-1 accuracy (k={c.get('knn_k')}, T={c.get('knn_temperature')})",
               headline=True, chance=True, validation="val_knn_accuracy", tunable=True),
        Metric("knn_top5_accuracy", _fixed("top-5 accuracy"), headline=True),
        Metric("val_knn_accuracy", _fixed("validation top-1 accuracy")),
    ), run="run_knn"),
    Protocol("linear", "a linear classifier on the frozen CLS features, its weight decay chosen on validation",
             ("features",), (
        Metric("linear_accuracy", lambda r, c: f"top-1 accuracy (weight decay {r['linear_weight_decay']:g}, chosen "
                                               "on validation)",
               headline=True, chance=True, validation="val_linear_accuracy", tunable=True),
        Metric("val_linear_accuracy", _fixed("validation accuracy")),
        Metric("linear_train_accuracy", _fixed("train accuracy")),
    ), run="run_linear"),
    Protocol("zeroshot", "zero-shot classification from class-name prompts (CLIP)", ("image_embeds",), (
        Metric("zeroshot_accuracy", lambda r, c: f"top-1 accuracy ({r['zeroshot_num_classes']} classes, "
                                                 f"{len(c.get('zeroshot_templates') or [])} templates)",
               headline=True, chance=True, tunable=True),
    ), run="run_zeroshot", image_text=True),
    Protocol("segmentation", "a linear per-patch classifier on the patch tokens, scored per pixel",
             ("patch_tokens",), (
        Metric("segmentation_miou", lambda r, c: f"mIoU ({r['segmentation_num_classes']} classes)",
               headline=True, tunable=True),
        Metric("segmentation_miou_objects",
               lambda r, c: f"mIoU of the objects (class {c.get('segmentation_background')} left out)", headline=True),
        Metric("segmentation_pixel_accuracy", _fixed("pixel accuracy"), headline=True, tunable=True),
    ), run="run_segmentation", labels=False, masks=True),
)}


def protocol_names() -> tuple[str, ...]:
    """Every protocol, in report order."""
    return tuple(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise EvalError(f"evaluation protocol {name!r} is not supported; supported: "
                        f"{', '.join(PROTOCOLS)}") from None


def check_protocols(protocols: Sequence[str]) -> list[str]:
    """The requested protocols, deduplicated in order; EvalError naming the supported ones for any unknown."""
    out = [get_protocol(p).name for p in dict.fromkeys(protocols)]
    if not out:
        raise EvalError(f"no evaluation protocol requested; supported: {', '.join(PROTOCOLS)}")
    return out


def _metrics(protocols: Sequence[str] | None = None) -> list[Metric]:
    return [m for name in (PROTOCOLS if protocols is None else protocols) for m in PROTOCOLS[name].metrics]


def outputs_for(protocols: Sequence[str]) -> tuple[str, ...]:
    """The feature outputs the protocols read, each once."""
    return tuple(dict.fromkeys(o for name in protocols for o in get_protocol(name).outputs))


def headline_metrics() -> tuple[str, ...]:
    return tuple(m.key for m in _metrics() if m.headline)


def chance_metrics() -> tuple[str, ...]:
    return tuple(m.key for m in _metrics() if m.chance)


def validation_figures() -> dict[str, str]:
    """A query figure -> the same figure on the validation part of the reference side."""
    return {m.key: m.validation for m in _metrics() if m.validation}


def tune_metrics() -> tuple[str, ...]:
    """What a sweep may rank trials by: the tunable probe figures, and the training loss."""
    return (*(m.key for m in _metrics() if m.tunable), LOSS_METRIC)


def protocol_of(metric: str) -> str | None:
    """The protocol that reports `metric` (None for the loss, or a figure no protocol reports)."""
    return next((p.name for p in PROTOCOLS.values() for m in p.metrics if m.key == metric), None)
