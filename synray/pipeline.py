"""The main job: generate -> train -> evaluate -> write the run directory (`synray run`, `synray train`)."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

from synray.config import RunConfig
from synray.rundir import RunDir

log = logging.getLogger(__name__)

#: rows of the held-out set drawn in the sample grid
GRID_ROWS = 8
#: evaluation results printed at the end of a run, and those compared with chance
HEADLINE_METRICS = ("knn_accuracy", "linear_accuracy", "zeroshot_accuracy", "segmentation_miou",
                    "segmentation_pixel_accuracy")
CHANCE_METRICS = ("knn_accuracy", "linear_accuracy", "zeroshot_accuracy")


def check_run(cfg: RunConfig, data_dir: str | None = None) -> int:
    """Every check that needs no cluster; returns the number of images per caption training will use."""
    from synray.data.generate import validate_generation
    from synray.data.schema import TRAIN_COLUMNS
    from synray.data.store import ParquetStore, StoreError
    from synray.train.trainer import check_train_setup

    per_caption = cfg.images.per_caption
    if data_dir is not None or cfg.data.mode == "stored":
        store = ParquetStore(data_dir or cfg.data.store_dir or "")
        if not (data_dir or cfg.data.store_dir):
            raise StoreError("data.mode=stored needs data.store_dir (or `synray train CONFIG --data DIR`)")
        shards = store.check_readable(("caption",) if cfg.train.loss == "clip" else TRAIN_COLUMNS)
        columns = train_columns(cfg, shards[0])
        per_caption = _stored_per_caption(shards[0]) if "images" in columns else 1
    else:
        validate_generation(cfg)
        if cfg.data.mode == "stream+store" and not cfg.data.store_dir:
            raise StoreError("data.mode=stream+store needs data.store_dir")
    if cfg.eval.enabled and cfg.eval.dataset is None:
        validate_generation(heldout_config(cfg))
    check_train_setup(cfg, per_caption)
    check_eval(cfg)
    if cfg.train.resume_from:
        from synray.train.engine import check_compatible

        check_compatible(cfg.train.resume_from, cfg.train)
    return per_caption


def train_columns(cfg: RunConfig, shard: Path | None = None) -> list[str]:
    """The columns training reads: caption rows for image losses; for CLIP the caption, the image(s)
    and, in a LaCLIP rewrite store, the rewrites."""
    import pyarrow.parquet as pq

    from synray.data.schema import TRAIN_COLUMNS
    from synray.data.store import StoreError

    if cfg.train.loss != "clip":
        return list(TRAIN_COLUMNS)
    if shard is None:
        return ["caption", "images"]
    names = set(pq.read_schema(shard).names)
    image = next((c for c in ("image", "images") if c in names), None)
    if image is None:
        raise StoreError(f"dataset {shard.parent} lacks an image or images column (it has {sorted(names)})")
    return ["caption", image] + (["rewrites"] if "rewrites" in names else [])


def _stored_per_caption(shard: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    lengths = pc.list_value_length(pq.read_table(shard, columns=["images"]).column("images"))
    return int(pc.min(lengths).as_py() or 0)


def heldout_config(cfg: RunConfig) -> RunConfig:
    """The held-out evaluation set: the same generator with another seed, rendered with eval.heldout_captions rows."""
    from synray.config import with_overrides

    seed = (cfg.seed + cfg.eval.seed_offset) % (2**31 - 1)
    return with_overrides(cfg, {"seed": seed, "data.num_captions": cfg.eval.heldout_captions,
                                "data.mode": "stream"})


def num_classes(cfg: RunConfig) -> int:
    from synray.captions.stage import check_concepts

    return check_concepts(cfg.concepts)


def training_dataset(cfg: RunConfig, stats_actor: Any, data_dir: str | None):
    """The Ray Dataset training reads, by data mode, and whether to loop over it in epochs."""
    from synray.data.generate import add_store_stage, build_pipeline, prepare, store_info
    from synray.data.store import ParquetStore

    if data_dir is not None or cfg.data.mode == "stored":
        store = ParquetStore(data_dir or cfg.data.store_dir)
        columns = train_columns(cfg, store.check_readable(("caption",))[0])
        ds = store.read_dataset(columns=columns).randomize_block_order(seed=cfg.seed)
        return ds, True
    plan = prepare(cfg)
    ds = build_pipeline(plan, stats_actor)
    if cfg.data.mode == "stream+store":
        store = ParquetStore(cfg.data.store_dir)
        store.open_for_writing(cfg.generation_fingerprint(), store_info(cfg))
        ds = add_store_stage(ds, cfg.data.store_dir, True, cfg.data.rows_per_shard, stats_actor)
    return ds.select_columns(train_columns(cfg)), False


#: held-out columns the protocols may read (masks: segmentation, procedural backend only; concept:
#: zero-shot class names)
EVAL_COLUMNS = ("caption_id", "caption", "label", "concept", "images", "masks")


def check_eval(cfg: RunConfig) -> None:
    """Protocols the run can feed: zero-shot needs image-text training, segmentation needs class masks."""
    from synray.eval import EvalError, check_protocols

    if not cfg.eval.enabled:
        return
    todo = check_protocols(cfg.eval.protocols)
    if "zeroshot" in todo and cfg.train.loss != "clip":
        raise EvalError(f"eval.protocols has zeroshot, which needs an image-text model (train.loss=clip); "
                        f"train.loss is {cfg.train.loss}")
    if "segmentation" in todo and cfg.eval.dataset is None and cfg.images.backend != "procedural":
        raise EvalError("eval.protocols has segmentation, which needs class masks: the held-out set has them "
                        "with images.backend=procedural, or give eval.dataset with a masks column")


def heldout_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    """Generate (or read) the labelled evaluation rows, in caption-id order."""
    import pyarrow.parquet as pq

    from synray.data.generate import build_pipeline, prepare
    from synray.data.store import ParquetStore

    if cfg.eval.dataset:
        store = ParquetStore(cfg.eval.dataset)
        names = set(pq.read_schema(store.check_readable(("caption", "label", "images"))[0]).names)
        rows = store.read_dataset(columns=[c for c in EVAL_COLUMNS if c in names]).take_all()
    else:
        columns = [c for c in EVAL_COLUMNS if c != "masks" or cfg.images.backend == "procedural"]
        rows = build_pipeline(prepare(heldout_config(cfg))).select_columns(columns).take_all()
    return sorted(rows, key=lambda r: str(r.get("caption_id", "")))  # the reference/query split then repeats across runs


def _init_image_text(cfg: RunConfig, encoder: Any) -> tuple[Any, Any, int]:
    """The image-text model as the workers started it: the fresh encoder, the text tower as loaded."""
    from synray.models.image_text import ImageTextModel
    from synray.train.worker import load_text

    text, tokenizer = load_text(cfg)
    return ImageTextModel(encoder, text, cfg.train.temperature).eval(), tokenizer, cfg.train.text.max_length


def evaluate(cfg: RunConfig, backbone_dir: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The configured protocols on the trained backbone and on the same network at initialisation."""
    import torch

    from synray.eval import evaluate_backbone
    from synray.models.backbone import build_backbone, load_backbone

    zeroshot = "zeroshot" in cfg.eval.protocols
    size = cfg.train.backbone.image_size
    trained = evaluate_backbone(load_backbone(backbone_dir), rows, cfg.eval.protocols, cfg.eval, size,
                                seed=cfg.seed, image_text=backbone_dir if zeroshot else None)
    torch.manual_seed(cfg.seed)  # the same initial weights the workers started from
    encoder = build_backbone(cfg.train.backbone)
    init = evaluate_backbone(encoder, rows, cfg.eval.protocols, cfg.eval, size, seed=cfg.seed,
                             image_text=_init_image_text(cfg, encoder) if zeroshot else None)
    return {"trained": trained, "init": init}


def write_metrics(rd: RunDir, metrics: list[dict[str, Any]]) -> Path:
    path = rd.path / "metrics.csv"
    keys = sorted({k for m in metrics for k in m})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(metrics)
    return path


def run(cfg: RunConfig, data_dir: str | None = None) -> tuple[RunDir, dict[str, Any]]:
    """Generate (or read) -> train -> evaluate; everything lands in a new run directory."""
    import ray

    from synray.data.stats import StageStats
    from synray.session import session
    from synray.train.trainer import fit
    from synray.viz import loss_curve, sample_grid

    per_caption = check_run(cfg, data_dir)
    classes = num_classes(cfg)
    rd = RunDir.create(cfg)
    handler = rd.attach_log()
    start = time.time()
    summary: dict[str, Any] = {"name": cfg.name, "run_dir": str(rd.path.resolve()), "mode":
                               "stored" if data_dir else cfg.data.mode, "per_caption": per_caption}
    try:
        with session(cfg.ray):
            stats = ray.remote(num_cpus=0)(StageStats).remote()
            ds, epochs = training_dataset(cfg, stats, data_dir)
            result = fit(cfg, ds, rd.path / "train", per_caption, classes, epochs, cfg.train.resume_from)
            summary.update(ray.get(stats.summary.remote()))
            summary["train"] = _train_summary(result)
            if cfg.eval.enabled and result.backbone_dir:
                rows = heldout_rows(cfg)
                summary["eval"] = evaluate(cfg, result.backbone_dir, rows)
                summary["eval"]["heldout_rows"] = len(rows)
                sample_grid(rows[:GRID_ROWS], rd.path / "samples.png")
        if result.metrics:
            write_metrics(rd, result.metrics)
            loss_curve(result.metrics, rd.path / "loss_curve.png")
        summary["backbone_dir"] = result.backbone_dir
        summary["elapsed_s"] = round(time.time() - start, 2)
        rd.write_summary(summary)
    finally:
        logging.getLogger("synray").removeHandler(handler)
    return rd, summary


def _train_summary(result) -> dict[str, Any]:
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


def run_command(cfg: RunConfig) -> int:
    rd, summary = run(cfg)
    print_summary(rd, summary)
    return 0


def train_command(cfg: RunConfig, data_dir: str) -> int:
    rd, summary = run(cfg, data_dir=data_dir)
    print_summary(rd, summary)
    return 0
