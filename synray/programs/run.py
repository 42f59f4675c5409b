"""The main job (`synray run`, `synray train`): execute a RunPlan: data -> training -> evaluation -> the run directory."""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.data

from synray.data.stats import rejections_text
from synray.data.store import ParquetStore
from synray.eval import registry
from synray.eval.evaluate import evaluate_models
from synray.generation.pipeline import store_fingerprint
from synray.pipelines import SAMPLE_GRID_ROWS, build_heldout, sample_fraction, training_input
from synray.plan import RunPlan, model_names
from synray.programs.rundir import RunDir
from synray.programs.session import cluster_spec, session, stage_stats, stats_summary
from synray.programs.tracked import TRACKING_FILE, MetricsFollower, log_outcome, tracked_run
from synray.programs.usage import device_hours
from synray.tracking import Buffered, check_tracking
from synray.train.trainer import METRICS_FILE, TrainResult, fit
from synray.viz import loss_curve, sample_grid

log = logging.getLogger(__name__)


def evaluate(plan: RunPlan, models: Mapping[str, str],
             shared: Mapping[str, str | None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's protocols on each of ``models`` (name -> saved backbone; a run scores "trained" and "init", the
    same network as the workers built it at step 0), through the one evaluation path on the held-out rows.

    ``shared`` names where the feature actors read a model when that differs (a remote run's storage). Returns
    the figures per model (and ``heldout_rows``) and the sample rows for the grid.
    """
    cfg = plan.cfg
    scored = evaluate_models(build_heldout(plan.heldout, cfg), models, plan.protocols, cfg.eval,
                             cfg.train.backbone.image_size, seed=cfg.seed,
                             where=plan.heldout.dataset or "the held-out set",
                             readable={k: v for k, v in (shared or {}).items() if v},
                             sample_fraction=sample_fraction(cfg))
    return {**scored.figures, "heldout_rows": scored.rows}, scored.samples[:SAMPLE_GRID_ROWS]


def trained_and_init(result: TrainResult) -> dict[str, str]:
    """What a run scores: the trained backbone and the same network at step 0."""
    return {"trained": result.backbone_dir, "init": result.init_dir}


@dataclass
class Executed:
    """What the body of a run or a sweep trial did: the fit, its summary, the stage counters, the probes."""

    result: TrainResult
    train: dict[str, Any]
    stats: dict[str, Any]
    figures: dict[str, Any] | None = None     # per model ("trained", "init") and heldout_rows
    samples: list[dict[str, Any]] = field(default_factory=list)


def execute(plan: RunPlan, out: RunDir, callbacks: Sequence[Any] = (), tracker: Buffered | None = None) -> Executed:
    """The body of a run and of a sweep trial: the training input, the fit (its Train run under out/train, so a
    restarted run resumes its checkpoints; its reports sent to `tracker` as they come), the exports synced to where
    feature actors on other nodes read them, then the probes on the trained network and on the same network at
    step 0."""
    stats_actor = stage_stats()
    dataset, ledger = training_input(plan.cfg, plan.data, plan.train, stats_actor)
    following = MetricsFollower(out.path / "train" / METRICS_FILE, tracker) if tracker else nullcontext()
    with following:
        result = fit(plan.cfg, plan.train, dataset, out.path / "train", ledger, callbacks=list(callbacks),
                     storage=out.train_storage)
    fit_end = time.time()
    out.sync()   # a remote run: the exports go up now
    stats = stats_summary(stats_actor)
    done = Executed(result, train_summary(result), stats)
    done.train["device_hours"] = device_hours(plan.stages, result.metrics, fit_end - result.elapsed_s, fit_end)
    check_trained(done.train, stats.get("rejected", {}))
    if plan.heldout is not None and result.backbone_dir:
        shared = {"trained": out.locate(result.backbone_dir), "init": out.locate(result.init_dir)}
        done.figures, done.samples = evaluate(plan, trained_and_init(result), shared)
    return done


def write_metrics(rd: RunDir, metrics: list[dict[str, Any]]) -> Path:
    path = rd.path / "metrics.csv"
    keys = sorted({k for m in metrics for k in m})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(metrics)
    return path


def run(plan: RunPlan) -> tuple[RunDir, dict[str, Any]]:
    """Generate (or read) -> train -> evaluate; everything lands in a new run directory.

    The plan is first placed on the cluster it joins (PlacementError, before any directory or actor exists, when
    a phase can never fit)."""
    check_tracking(plan.cfg.tracking, plan.cfg.output_root)   # an unreachable tracker: refused before Ray starts
    with session(plan.cfg.ray):
        for placement in plan.place(cluster_spec()):
            log.info("placement (%s): %s", placement.phase, placement.describe())
        return _run_in_session(plan)


def _run_in_session(plan: RunPlan) -> tuple[RunDir, dict[str, Any]]:
    cfg = plan.cfg
    rd = None if plan.fresh else RunDir.unfinished(cfg)
    if rd is not None:
        log.warning("continuing the unfinished run %s from its latest checkpoint (--fresh starts a new one)", rd.path)
    rd = rd or RunDir.create(cfg)
    handler = rd.attach_log()
    start = time.time()
    for line in plan.describe():
        log.info("plan: %s", line)
    summary: dict[str, Any] = {"name": cfg.name, "run_dir": rd.where, "mode": plan.data.mode,
                               "per_caption": plan.train.per_caption,
                               "ray_job_id": ray.get_runtime_context().get_job_id()}   # its actors, tasks and logs
    try:
        with tracked_run(cfg, Path(rd.where).name, run_tags(plan, summary), saved=rd.path / TRACKING_FILE) as tracker:
            _execute_run(plan, rd, summary, start, tracker)
    finally:
        logging.getLogger("synray").removeHandler(handler)
    return rd, summary


def run_tags(plan: RunPlan, summary: Mapping[str, Any]) -> dict[str, str]:
    """What a tracked run is tagged with: the config, the data's mode and store, the store fingerprint of what it
    generates, the models it loads, the Ray job (its actors and logs) and the run directory."""
    cfg = plan.cfg
    tags = {"synray.config": cfg.name, "synray.mode": plan.data.mode, "synray.run_dir": summary["run_dir"],
            "synray.ray_job_id": summary["ray_job_id"], "synray.captions_backend": cfg.captions.backend,
            "synray.images_backend": cfg.images.backend, "synray.loss": cfg.train.loss}
    if plan.data.store_dir:
        tags["synray.store"] = plan.data.store_dir
    if plan.data.mode == "stored" and plan.data.store_dir:
        meta = ParquetStore(plan.data.store_dir).meta() or {}
        tags["synray.store_fingerprint"] = str(meta.get("fingerprint", "unknown"))
        tags["synray.store_config"] = str(meta.get("config_name", "unknown"))
    else:
        tags["synray.store_fingerprint"] = store_fingerprint(cfg)
    tags.update({f"synray.model.{k}": v for k, v in model_names(cfg).items()})
    return tags


def _execute_run(plan: RunPlan, rd: RunDir, summary: dict[str, Any], start: float, tracker: Buffered | None) -> None:
    done = execute(plan, rd, tracker=tracker)
    summary.update(done.stats)
    summary["train"] = done.train
    if done.figures is not None:
        summary["eval"] = done.figures
        sample_grid(done.samples, rd.path / "samples.png")
    if done.result.metrics:
        write_metrics(rd, done.result.metrics)
        loss_curve(done.result.metrics, rd.path / "loss_curve.png")
    summary["backbone_dir"] = rd.locate(done.result.backbone_dir)
    summary["init_backbone_dir"] = rd.locate(done.result.init_dir)
    summary["elapsed_s"] = round(time.time() - start, 2)
    rd.write_summary(summary)
    if tracker is not None:
        log_outcome(tracker, rd.path, summary, done.train["steps"], done.result.backbone_dir,
                    f"synray-{plan.cfg.name}")


class EmptyStreamError(ValueError):
    """Training got not one batch: the data gave no usable rows."""


def check_trained(train: dict[str, Any], rejected: dict[str, Any]) -> None:
    """EmptyStreamError when training ended at step 0 for lack of data, naming what the stages rejected."""
    if train["ended_early"] and not train["steps"]:
        rejected = rejections_text(rejected)
        raise EmptyStreamError("training got no full batch: the data ran out before step 1 ("
                               + (f"rows rejected by {rejected}" if rejected else "no rows") + "); check the "
                               "caption and image settings, or raise data.num_captions")


def train_summary(result: TrainResult) -> dict[str, Any]:
    last = result.metrics[-1] if result.metrics else {}
    waits = [m["data_wait_fraction"] for m in result.metrics if "data_wait_fraction" in m]
    return {
        "steps": last.get("step", 0), "final_loss": last.get("loss"),
        "final_loss_parts": {k: v for k, v in last.items() if k.startswith("loss_")},
        "first_loss": result.metrics[0]["loss"] if result.metrics else None,
        "images_per_s": last.get("images_per_s"),
        "data_wait_fraction": sum(waits) / len(waits) if waits else None,
        "rows_trained": last.get("rows_trained"), "uses_per_row": last.get("uses_per_row"),
        "ended_early": bool(result.final.get("ended_early", False)),
        "worker_failures": result.failures, "elapsed_s": round(result.elapsed_s, 2),
        "checkpoint": result.checkpoint_dir, "steps_by_world_size": steps_by_world_size(result.metrics),
    }


def steps_by_world_size(metrics: list[dict[str, Any]]) -> dict[str, int]:
    """How many of the run's steps each group size trained: a step counts for the size of the first report at or
    after it, the last report of a step winning (a group restarted from a checkpoint trains its later steps again)."""
    reported = {int(m["step"]): int(m["world_size"]) for m in metrics if "world_size" in m}
    out: dict[str, int] = {}
    last = 0
    for step in sorted(reported):
        out[str(reported[step])] = out.get(str(reported[step]), 0) + step - last
        last = step
    return out


def _fig(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_summary(rd: RunDir, summary: dict[str, Any]) -> None:
    t = summary.get("train", {})
    print(f"run directory: {rd.where}")
    print(f"  trained {t.get('steps')} steps: loss {_fig(t.get('first_loss'))} -> {_fig(t.get('final_loss'))}, "
          f"data-wait fraction {_fig(t.get('data_wait_fraction'), '.2f')}"
          + (f", {t['rows_trained']} rows used {t['uses_per_row']:.2f} times each" if t.get("rows_trained") else ""))
    for stage, s in summary.get("stages", {}).items():
        print(f"  {stage:>9}: {s['rows']} rows, {s['rows_per_s']} rows/s overall, "
              f"{s['steady_rows_per_s']} rows/s after start-up")
    held = t.get("device_hours", {}).get("total")
    if held:
        print("  device-hours held while training: " + ", ".join(f"{v:g} {k}" for k, v in held.items())
              + " (by stage: summary.json train.device_hours)")
    ev = summary.get("eval")
    if ev:
        chance_metrics = registry.chance_metrics()
        for key in registry.headline_metrics():
            if key in ev["trained"]:
                chance = f" (chance {ev['trained']['chance']:.3f})" if key in chance_metrics else ""
                print(f"  {key}: trained {ev['trained'][key]:.3f} vs init {ev['init'][key]:.3f}{chance}")
    print(f"  summary: {rd.locate(rd.summary_path)}")


def run_command(plan: RunPlan) -> int:
    rd, summary = run(plan)
    print_summary(rd, summary)
    return 0
