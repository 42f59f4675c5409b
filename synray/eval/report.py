"""`synray eval`'s request and report: a saved model on a dataset, through the one evaluation path, into eval.json/.md."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from synray.config import RunConfig
from synray.data.storage import Location
from synray.eval.datasets import EvalSource, source_dataset
from synray.eval.errors import EvalError
from synray.eval.registry import PROTOCOLS

__all__ = ["EvalPlan", "model_image_size", "check_request", "evaluate_dataset", "format_table", "write_report",
           "default_out_dir"]

log = logging.getLogger(__name__)

JSON_FILE = "eval.json"
TABLE_FILE = "eval.md"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
#: the name `synray eval` gives its one model (its feature columns are "model/<output>")
MODEL = "model"


def model_image_size(model_dir: str | Path) -> int:
    """The input size of the backbone saved in ``model_dir`` (EvalError when it holds no backbone)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise EvalError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise EvalError(f"{path} holds no saved backbone (no config.json); pass a run's backbone/ directory")
    from transformers import AutoConfig   # here: importing transformers costs seconds

    config = AutoConfig.from_pretrained(str(path))
    if getattr(config, "model_type", None) not in ("vit", "dinov2"):
        raise EvalError(f"{path} holds a {getattr(config, 'model_type', '?')!r} model, not a ViT or DINOv2 backbone")
    return int(config.image_size)


def check_request(model_dir: str | Path, protocols: Sequence[str], source: EvalSource) -> None:
    """Refuse, before any Ray work, protocols that the model or the dataset cannot support (what each needs is its
    registry entry)."""
    from synray.models.image_text import is_image_text_dir

    todo = [PROTOCOLS[name] for name in protocols]
    for p in todo:
        if p.image_text and not is_image_text_dir(model_dir):
            raise EvalError(f"{p.name} needs an image-text model, but {model_dir} holds only an image backbone (no "
                            "text/ tower and image_text.safetensors projection); train with train.loss=clip, or drop "
                            f"--protocol {p.name}")
        if p.masks and not source.has_masks:
            raise EvalError(f"the {p.name} protocol needs per-pixel class masks, and {source.path} has none "
                            "(a Parquet 'mask' column, or a synray store generated with images.backend=procedural)")
    with_labels = [p.name for p in todo if p.labels]
    if with_labels and not source.has_labels:
        raise EvalError(f"{source.path} has no label column, which {', '.join(with_labels)} need")


@dataclass(frozen=True)
class EvalPlan:
    """A checked evaluation request (`synray eval`): what runs on which model and dataset."""

    model_dir: str
    dataset: str
    protocols: tuple[str, ...]
    image_size: int
    source: EvalSource


def evaluate_dataset(plan: EvalPlan, cfg: RunConfig) -> dict[str, Any]:
    """Extract features once through Ray Data, run the protocols, and return the report (Ray must be connected)."""
    from synray.eval.evaluate import evaluate_models

    todo = list(plan.protocols)
    log.info("evaluating %s on %s (%s, %d files) at %dpx: %s", plan.model_dir, plan.dataset, plan.source.kind,
             len(plan.source.files), plan.image_size, ", ".join(todo))
    scored = evaluate_models(source_dataset(plan.source), {MODEL: plan.model_dir}, todo, cfg.eval, plan.image_size,
                             seed=cfg.seed, where=plan.source.path, class_names=plan.source.class_names,
                             has_labels=plan.source.has_labels)
    return {"model_dir": str(Location.of(plan.model_dir)), "dataset": str(Location.of(plan.dataset)),
            "dataset_kind": plan.source.kind, "protocols": todo, "image_size": plan.image_size,
            "num_images": scored.images, "seed": cfg.seed, "results": scored.figures[MODEL],
            "eval_config": {**cfg.eval.model_dump(mode="json"), "protocols": todo},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _rows(results: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """(protocol, metric, value) for every figure of the protocols that ran, as their registry entries word them."""
    return [(p.name, m.row(results, cfg), results[m.key]) for p in PROTOCOLS.values() for m in p.metrics
            if m.key in results]


def format_table(report: Mapping[str, Any]) -> str:
    """The report as Markdown: a few lines about the data, then | protocol | metric | value |."""
    r = report["results"]
    lines = [f"# Evaluation of {report['model_dir']}", "",
             f"- dataset: {report['dataset']} ({report['dataset_kind']}, {report['num_images']} images)",
             f"- split: {r['split']}: {r['num_reference']} reference / {r['num_query']} query images"
             + (f" (reference: {r['num_fit']} fit / {r['num_val']} validation)" if "num_val" in r else ""),
             f"- classes: {r['num_classes']} (chance {r['chance']:.4f})", "",
             "| protocol | metric | value |", "| --- | --- | --- |"]
    for protocol, metric, value in _rows(r, report.get("eval_config", {})):
        lines.append(f"| {protocol} | {metric} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> tuple[str, str]:
    """Write eval.json and eval.md into ``out_dir`` (a directory, created if needed, or a cloud URI); returns
    where both went."""
    out = Location.of(out_dir)
    if out.is_file():
        raise EvalError(f"--out {out} exists and is not a directory")
    out.mkdir()
    out.join(JSON_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    out.join(TABLE_FILE).write_text(format_table(report))
    return out.join(JSON_FILE).uri, out.join(TABLE_FILE).uri


def default_out_dir(cfg: RunConfig, now: datetime | None = None) -> str:
    """``<output_root>/eval-<UTC timestamp>``."""
    stamp = (now or datetime.now(timezone.utc)).strftime(TIMESTAMP_FORMAT)
    return Location.of(cfg.output_root).join(f"eval-{stamp}").uri
