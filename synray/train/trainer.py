"""The driver side of training: a Ray Train TorchTrainer over DeepSpeed workers, metrics and the exported backbone."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synray.config import RunConfig
from synray.train.worker import BACKBONE_DIR, train_worker

METRICS_FILE = "metrics.jsonl"


class TrainSetupError(ValueError):
    """A training setup that cannot work, found before any worker starts."""


def check_train_setup(cfg: RunConfig, per_caption: int) -> None:
    """Shape checks that need no cluster: positives per caption, batch splits, GPU-only settings."""
    t = cfg.train
    if t.loss == "stablerep" and per_caption < 2:
        raise TrainSetupError(f"train.loss=stablerep needs at least 2 images per caption (images.per_caption="
                              f"{per_caption}): with one image an anchor has no positive. Use train.loss=simclr "
                              "for m=1")
    if t.loss == "clip":
        check_text_tower(cfg)
    if cfg.data.mode == "stream":
        need = t.steps * t.grad_accum * t.captions_per_worker * t.num_workers
        if cfg.data.num_captions < t.captions_per_worker * t.num_workers:
            raise TrainSetupError(f"data.num_captions={cfg.data.num_captions} cannot fill one global batch of "
                                  f"train.captions_per_worker={t.captions_per_worker} x train.num_workers="
                                  f"{t.num_workers} rows")
        if cfg.data.num_captions < need:
            import logging
            logging.getLogger(__name__).warning(
                "stream mode: %d captions feed at most %d of the %d steps (each step takes %d rows)",
                cfg.data.num_captions, cfg.data.num_captions // (need // t.steps), t.steps, need // t.steps)


def check_text_tower(cfg: RunConfig) -> None:
    """train.text.model resolves to a CLIP text model with a projection (its config only is read)."""
    from synray.models.image_text import TextTowerError, text_tower_config
    from synray.models.tiny import ModelError, resolve_model

    try:
        config = text_tower_config(resolve_model(cfg.train.text.model, cfg.model_cache))
    except (ModelError, TextTowerError) as e:
        raise TrainSetupError(f"train.text.model={cfg.train.text.model!r}: {e}") from e
    if cfg.train.text.max_length > config.max_position_embeddings:
        raise TrainSetupError(f"train.text.max_length={cfg.train.text.max_length} exceeds the text tower's "
                              f"{config.max_position_embeddings} positions")


class MetricsLog:
    """Ray Train callback (runs in the controller): appends one JSON line per report to metrics.jsonl."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or not metrics[0]:
            return
        row = dict(metrics[0])
        waits = [m.get("data_wait_fraction") for m in metrics if m.get("data_wait_fraction") is not None]
        if waits:
            row["data_wait_fraction"] = sum(waits) / len(waits)
            row["data_wait_fraction_max"] = max(waits)
        row["time"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": "worker_failure", "ranks": sorted(worker_exceptions), "time": time.time()})
                    + "\n")


def _metrics_callback(path: str):
    from ray.train import UserCallback

    cls = type("SynrayMetricsLog", (MetricsLog, UserCallback), {})
    return cls(path)


@dataclass
class TrainResult:
    metrics: list[dict[str, Any]]
    final: dict[str, Any]
    checkpoint_dir: str | None
    backbone_dir: str | None
    elapsed_s: float
    failures: int


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fit(cfg: RunConfig, dataset: Any, out_dir: Path, per_caption: int, num_classes: int,
        epochs: bool, resume_from: str | None = None) -> TrainResult:
    """Train on `dataset` (Ray Dataset of caption rows); returns metrics and the exported backbone path."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.train
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "per_caption": per_caption, "num_classes": num_classes,
                           "epochs": epochs, "resume_from": resume_from},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        datasets={"train": dataset},
        run_config=ray.train.RunConfig(
            name="train", storage_path=str(out_dir),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[_metrics_callback(str(metrics_path))]),
    )
    start = time.time()
    result = trainer.fit()
    elapsed = time.time() - start
    rows = read_metrics(metrics_path)
    ckpt_dir = result.checkpoint.path if result.checkpoint else None
    backbone = None
    if ckpt_dir and (Path(ckpt_dir) / BACKBONE_DIR).exists():
        backbone = str(out_dir.parent / BACKBONE_DIR)
        shutil.copytree(Path(ckpt_dir) / BACKBONE_DIR, backbone, dirs_exist_ok=True)
    return TrainResult(metrics=[r for r in rows if "loss" in r], final=dict(result.metrics or {}),
                       checkpoint_dir=ckpt_dir, backbone_dir=backbone, elapsed_s=elapsed,
                       failures=sum(1 for r in rows if r.get("event") == "worker_failure"))
