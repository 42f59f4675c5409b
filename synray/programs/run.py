"""The main job (`synray run`, `synray train`): execute a RunPlan: data -> training -> evaluation -> the run directory."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import ray.data

from synray.data.store import ParquetStore
from synray.eval.evaluate import evaluate_backbone
from synray.generation.pipeline import add_store_stage, build_pipeline, store_fingerprint, store_info
from synray.models.backbone import load_backbone
from synray.plan import HeldoutPlan, RunPlan
from synray.programs.rundir import RunDir
from synray.programs.session import session, stage_stats, stats_summary
from synray.train.trainer import TrainResult, fit
from synray.viz import loss_curve, sample_grid

log = logging.getLogger(__name__)

#: rows of the held-out set drawn in the sample grid
GRID_ROWS = 8
#: evaluation results printed at the end of a run, and those compared with chance
HEADLINE_METRICS = ("knn_accuracy", "linear_accuracy", "zeroshot_accuracy", "segmentation_miou",
                    "segmentation_pixel_accuracy")
CHANCE_METRICS = ("knn_accuracy", "linear_accuracy", "zeroshot_accuracy")


def training_dataset(plan: RunPlan, stats_actor: Any) -> ray.data.Dataset:
    """The Ray Dataset training reads: a store, or the live pipeline (teed into a store in stream+store mode)."""
    data, cfg = plan.data, plan.cfg
    columns = list(plan.train.columns)
    if data.generation is None:
        return ParquetStore(data.store_dir).read_dataset(columns=columns).randomize_block_order(seed=cfg.seed)
    ds = build_pipeline(data.generation, stats_actor)
    if data.mode == "stream+store":
        ParquetStore(data.store_dir).open_for_writing(store_fingerprint(cfg), store_info(cfg))
        ds = add_store_stage(ds, data.store_dir, True, cfg.data.rows_per_shard, stats_actor)
    return ds.select_columns(columns)


def heldout_rows(heldout: HeldoutPlan) -> list[dict[str, Any]]:
    """The labelled evaluation rows (generated, or read from eval.dataset), in caption-id order."""
    if heldout.dataset:
        rows = ParquetStore(heldout.dataset).read_dataset(columns=list(heldout.columns)).take_all()
    else:
        rows = build_pipeline(heldout.generation).select_columns(list(heldout.columns)).take_all()
    return sorted(rows, key=lambda r: str(r.get("caption_id", "")))  # the reference/query split then repeats across runs


def evaluate(plan: RunPlan, result: TrainResult, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's protocols on the trained backbone and on the same network as the workers built it at step 0."""
    cfg = plan.cfg
    size = cfg.train.backbone.image_size
    zeroshot = "zeroshot" in plan.protocols
    out = {}
    for side, directory in (("trained", result.backbone_dir), ("init", result.init_dir)):
        out[side] = evaluate_backbone(load_backbone(directory), rows, plan.protocols, cfg.eval, size, seed=cfg.seed,
                                      image_text=directory if zeroshot else None)
    return out


def write_metrics(rd: RunDir, metrics: list[dict[str, Any]]) -> Path:
    path = rd.path / "metrics.csv"
    keys = sorted({k for m in metrics for k in m})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(metrics)
    return path


def run(plan: RunPlan) -> tuple[RunDir, dict[str, Any]]:
    """Generate (or read) -> train -> evaluate; everything lands in a new run directory."""
    cfg = plan.cfg
    rd = RunDir.create(cfg)
    handler = rd.attach_log()
    start = time.time()
    for line in plan.describe():
        log.info("plan: %s", line)
    summary: dict[str, Any] = {"name": cfg.name, "run_dir": str(rd.path.resolve()), "mode": plan.data.mode,
                               "per_caption": plan.train.per_caption}
    try:
        with session(cfg.ray):
            stats = stage_stats()
            result = fit(cfg, plan.train, training_dataset(plan, stats), rd.path / "train")
            summary.update(stats_summary(stats))
            summary["train"] = _train_summary(result)
            if plan.heldout is not None and result.backbone_dir:
                rows = heldout_rows(plan.heldout)
                summary["eval"] = evaluate(plan, result, rows)
                summary["eval"]["heldout_rows"] = len(rows)
                sample_grid(rows[:GRID_ROWS], rd.path / "samples.png")
        if result.metrics:
            write_metrics(rd, result.metrics)
            loss_curve(result.metrics, rd.path / "loss_curve.png")
        summary["backbone_dir"] = result.backbone_dir
        summary["init_backbone_dir"] = result.init_dir
        summary["elapsed_s"] = round(time.time() - start, 2)
        rd.write_summary(summary)
    finally:
        logging.getLogger("synray").removeHandler(handler)
    return rd, summary


def _train_summary(result: TrainResult) -> dict[str, Any]:
    last = result.metrics[-1] if result.metrics else {}
    waits = [m["data_wait_fraction"] for m in result.metrics if "data_wait_fraction" in m]
    return {
        "steps": last.get("step", 0), "final_loss": last.get("loss"),
        "first_loss": result.metrics[0]["loss"] if result.metrics else None,
        "images_per_s": last.get("images_per_s"),
        "data_wait_fraction": sum(waits) / len(waits) if waits else None,
        "ended_early": bool(result.final.get("ended_early", False)),
        "worker_failures": result.failures, "elapsed_s": round(result.elapsed_s, 2),
        "checkpoint": result.checkpoint_dir,
    }


def print_summary(rd: RunDir, summary: dict[str, Any]) -> None:
    t = summary.get("train", {})
    print(f"run directory: {rd.path}")
    print(f"  trained {t.get('steps')} steps: loss {t.get('first_loss')} -> {t.get('final_loss')}, "
          f"data-wait fraction {t.get('data_wait_fraction')}")
    for stage, s in summary.get("stages", {}).items():
        print(f"  {stage:>9}: {s['rows']} rows, {s['rows_per_s']} rows/s overall, "
              f"{s['steady_rows_per_s']} rows/s after start-up")
    ev = summary.get("eval")
    if ev:
        for key in HEADLINE_METRICS:
            if key in ev["trained"]:
                chance = f" (chance {ev['trained']['chance']:.3f})" if key in CHANCE_METRICS else ""
                print(f"  {key}: trained {ev['trained'][key]:.3f} vs init {ev['init'][key]:.3f}{chance}")
    print(f"  summary: {rd.summary_path}")


def run_command(plan: RunPlan) -> int:
    rd, summary = run(plan)
    print_summary(rd, summary)
    return 0
