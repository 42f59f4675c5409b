"""The main job (`synray run`, `synray train`): execute a RunPlan: data -> training -> evaluation -> the run directory."""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.data
from ray.data import ActorPoolStrategy

from synray.data.ledger import ROW_ID, SkipConsumed
from synray.data.stats import rejections_text
from synray.data.store import ParquetStore
from synray.eval import registry
from synray.eval.evaluate import evaluate_models
from synray.generation.pipeline import (LIGHT_STAGE_CPUS, add_store_stage, build_pipeline, replay_dataset,
                                        store_fingerprint, store_info)
from synray.plan import HeldoutPlan, RunPlan
from synray.programs.rundir import RunDir
from synray.programs.session import cluster_spec, session, stage_stats, stats_summary, stream_ledger
from synray.train.preprocess import add_preprocessing
from synray.train.trainer import TrainResult, fit
from synray.viz import loss_curve, sample_grid

log = logging.getLogger(__name__)

#: rows of the held-out set drawn in the sample grid
GRID_ROWS = 8


def training_dataset(plan: RunPlan, stats_actor: Any) -> tuple[ray.data.Dataset, Any]:
    """The Ray Dataset training reads, turned into ready arrays by the preprocessing actors, and a stream's ledger.

    A store is read in epochs (its rows trained on in the restored checkpoint's epoch skipped, when they carry
    `row_id`). A stream is the live pipeline; in stream+store mode it is teed into the store,
    and the stored rows training has not consumed are replayed first. Each execution (the first, and one per
    worker-group restart) skips what the ledger names: rows the restored checkpoint consumed, rows stored.
    """
    data, cfg = plan.data, plan.cfg
    tracks = plan.train.tracks_rows
    if data.generation is None:
        ledger = stream_ledger(None) if tracks else None
        columns = list(plan.train.columns) + ([ROW_ID] if tracks and ROW_ID not in plan.train.columns else [])
        store = ParquetStore(data.store_dir)
        if data.subset_shards:  # a nested subset (sweep trials), read in passes that cover the step budget
            ds = store.read_subset(columns, list(data.subset_shards), data.max_row_id, data.first_images, data.passes)
        else:
            ds = store.read_dataset(columns=columns)
        ds = ds.randomize_block_order(seed=cfg.seed)
        if tracks:
            ds = ds.map_batches(SkipConsumed, fn_constructor_kwargs={"ledger": ledger}, batch_format="pyarrow",
                                compute=ActorPoolStrategy(size=1), num_cpus=LIGHT_STAGE_CPUS)
        return add_preprocessing(ds, cfg, plan.train, track_rows=tracks), ledger
    ledger = stream_ledger(data.store_dir if data.mode == "stream+store" else None)
    ds = build_pipeline(data.generation, stats_actor, ledger=ledger)
    if data.mode == "stream+store":
        ParquetStore(data.store_dir).open_for_writing(store_fingerprint(cfg), store_info(cfg))
        ds = add_store_stage(ds, data.store_dir, True, cfg.data.rows_per_shard, stats_actor)
        ds = replay_dataset(ledger, list(plan.train.columns) + [ROW_ID]).union(ds)
    return add_preprocessing(ds, cfg, plan.train, track_rows=True), ledger


def heldout_dataset(heldout: HeldoutPlan) -> ray.data.Dataset:
    """The labelled evaluation rows (generated, or read from eval.dataset) in the evaluation's column names."""
    if heldout.dataset:
        ds = ParquetStore(heldout.dataset).read_dataset(columns=list(heldout.columns))
    else:
        ds = build_pipeline(heldout.generation).select_columns(list(heldout.columns))
    return ds.rename_columns({"concept": "class_name"}) if "concept" in heldout.columns else ds


def evaluate(plan: RunPlan, models: Mapping[str, str],
             shared: Mapping[str, str | None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's protocols on each of ``models`` (name -> saved backbone; a run scores "trained" and "init", the
    same network as the workers built it at step 0), through the one evaluation path on the held-out rows.

    ``shared`` names where the feature actors read a model when that differs (a remote run's storage). Returns
    the figures per model (and ``heldout_rows``) and the sample rows for the grid.
    """
    cfg = plan.cfg
    scored = evaluate_models(heldout_dataset(plan.heldout), models, plan.protocols, cfg.eval,
                             cfg.train.backbone.image_size, seed=cfg.seed,
                             where=plan.heldout.dataset or "the held-out set",
                             readable={k: v for k, v in (shared or {}).items() if v},
                             sample_fraction=min(1.0, 4 * GRID_ROWS / max(1, cfg.eval.heldout_captions)))
    return {**scored.figures, "heldout_rows": scored.rows}, scored.samples[:GRID_ROWS]


def trained_and_init(result: TrainResult) -> dict[str, str]:
    """What a run scores: the trained backbone and the same network at step 0."""
    return {"trained": result.backbone_dir, "init": result.init_dir}


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
                               "per_caption": plan.train.per_caption}
    try:
        stats = stage_stats()
        dataset, ledger = training_dataset(plan, stats)
        result = fit(cfg, plan.train, dataset, rd.path / "train", ledger, storage=rd.train_storage)
        rd.sync()   # a remote run: the exports go up now, where feature actors on other nodes read them
        summary.update(stats_summary(stats))
        summary["train"] = train_summary(result)
        check_trained(summary)
        if plan.heldout is not None and result.backbone_dir:
            shared = {"trained": rd.locate(result.backbone_dir), "init": rd.locate(result.init_dir)}
            summary["eval"], samples = evaluate(plan, trained_and_init(result), shared)
            sample_grid(samples, rd.path / "samples.png")
        if result.metrics:
            write_metrics(rd, result.metrics)
            loss_curve(result.metrics, rd.path / "loss_curve.png")
        summary["backbone_dir"] = rd.locate(result.backbone_dir)
        summary["init_backbone_dir"] = rd.locate(result.init_dir)
        summary["elapsed_s"] = round(time.time() - start, 2)
        rd.write_summary(summary)
    finally:
        logging.getLogger("synray").removeHandler(handler)
    return rd, summary


class EmptyStreamError(ValueError):
    """Training got not one batch: the data gave no usable rows."""


def check_trained(summary: dict[str, Any]) -> None:
    """EmptyStreamError when training ended at step 0 for lack of data, naming what the stages rejected."""
    t = summary["train"]
    if t["ended_early"] and not t["steps"]:
        rejected = rejections_text(summary.get("rejected", {}))
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
        "ended_early": bool(result.final.get("ended_early", False)),
        "worker_failures": result.failures, "elapsed_s": round(result.elapsed_s, 2),
        "checkpoint": result.checkpoint_dir,
    }


def print_summary(rd: RunDir, summary: dict[str, Any]) -> None:
    t = summary.get("train", {})
    print(f"run directory: {rd.where}")
    print(f"  trained {t.get('steps')} steps: loss {t.get('first_loss')} -> {t.get('final_loss')}, "
          f"data-wait fraction {t.get('data_wait_fraction')}")
    for stage, s in summary.get("stages", {}).items():
        print(f"  {stage:>9}: {s['rows']} rows, {s['rows_per_s']} rows/s overall, "
              f"{s['steady_rows_per_s']} rows/s after start-up")
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
