"""The generation pipeline: concepts -> captions -> images as one streaming Ray Dataset, and `synray generate`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synray.config import RunConfig

log = logging.getLogger(__name__)

#: rows per block of the plan; small blocks keep the pipeline streaming
PLAN_ROWS_PER_BLOCK = 16
#: CPUs of the light single-actor stages (planning, clean-up, shard writing)
LIGHT_STAGE_CPUS = 0.25


@dataclass
class GenerationPlan:
    """What a generation run will do, worked out on the driver before any resource is requested."""

    cfg: RunConfig
    llm_path: str | None
    t2i_path: str | None
    wanted: int
    skip_ids: set[str] = field(default_factory=set)
    existing_captions: list[str] = field(default_factory=list)

    @property
    def plan_rows(self) -> int:
        return math.ceil(self.cfg.data.num_captions * self.cfg.captions.oversample)


def validate_generation(cfg: RunConfig) -> None:
    """Every check that needs no Ray: concept bank, model paths, image settings."""
    from synray.captions.stage import check_concepts
    from synray.images.diffusion import check_t2i_model
    from synray.models.tiny import TINY_NAMES

    check_concepts(cfg.concepts)
    if cfg.images.backend == "diffusers" and cfg.images.model not in TINY_NAMES:
        check_t2i_model(cfg.images.model)
    if cfg.captions.backend == "vllm" and cfg.captions.model not in TINY_NAMES:
        from synray.models.tiny import resolve_model
        resolve_model(cfg.captions.model, cfg.model_cache)


def prepare(cfg: RunConfig, store=None) -> GenerationPlan:
    """Validate, resolve models (building tiny ones on first use) and read what a store already holds."""
    from synray.models.tiny import resolve_model

    validate_generation(cfg)
    llm = resolve_model(cfg.captions.model, cfg.model_cache) if cfg.captions.backend == "vllm" else None
    t2i = resolve_model(cfg.images.model, cfg.model_cache) if cfg.images.backend == "diffusers" else None
    plan = GenerationPlan(cfg, llm, t2i, wanted=cfg.data.num_captions)
    if store is not None:
        plan.skip_ids = store.existing_ids()
        plan.existing_captions = store.existing_captions()
        plan.wanted = max(0, cfg.data.num_captions - len(plan.skip_ids))
    return plan


def build_pipeline(plan: GenerationPlan, stats_actor: Any | None = None, row_offset: int = 0):
    """The lazy Ray Dataset of finished rows (caption + m images + provenance)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from synray.captions.stage import CleanCaptions, PlanRows, template_captions, vllm_postprocess, vllm_preprocess

    cfg = plan.cfg
    blocks = max(1, plan.plan_rows // PLAN_ROWS_PER_BLOCK)
    ds = ray.data.range(plan.plan_rows, override_num_blocks=blocks)
    if row_offset:
        ds = ds.map_batches(lambda b: {"id": b["id"] + row_offset}, num_cpus=LIGHT_STAGE_CPUS)
    ds = ds.map_batches(PlanRows, fn_constructor_kwargs={"cfg": cfg, "skip_ids": plan.skip_ids,
                                                         "stats_actor": stats_actor},
                        compute=ActorPoolStrategy(size=1), num_cpus=LIGHT_STAGE_CPUS)
    if cfg.captions.backend == "vllm":
        from synray.captions.llm import build_llm_processor

        proc = build_llm_processor(cfg.captions, plan.llm_path, vllm_preprocess(cfg.captions), vllm_postprocess)
        ds = proc(ds)
    else:
        ds = ds.map_batches(template_captions, num_cpus=LIGHT_STAGE_CPUS)
    ds = ds.map_batches(CleanCaptions, fn_constructor_kwargs={
        "cfg": cfg.captions, "existing": plan.existing_captions, "stats_actor": stats_actor},
        compute=ActorPoolStrategy(size=1), num_cpus=LIGHT_STAGE_CPUS)
    ds = ds.limit(plan.wanted)
    ds = add_image_stage(ds, plan, stats_actor)
    return ds


def add_image_stage(ds, plan: GenerationPlan, stats_actor: Any | None):
    """Fixed-size actor pool of renderers (diffusers, or the procedural world)."""
    from ray.data import ActorPoolStrategy

    from synray.images import renderer_class

    img = plan.cfg.images
    return ds.map_batches(
        renderer_class(img.backend),
        fn_constructor_kwargs={"cfg": img, "model_path": plan.t2i_path, "run_seed": plan.cfg.seed,
                               "stats_actor": stats_actor},
        compute=ActorPoolStrategy(size=img.pool_size), batch_size=img.batch_size,
        num_cpus=img.num_cpus, num_gpus=img.num_gpus or None)


def add_store_stage(ds, root: str, passthrough: bool, rows_per_shard: int, stats_actor: Any | None):
    """Tee rows into atomic Parquet shards (passthrough) or turn them into shard metadata."""
    from ray.data import ActorPoolStrategy

    from synray.data.store import ShardWriter

    return ds.map_batches(ShardWriter, fn_constructor_kwargs={"root": root, "passthrough": passthrough,
                                                             "stats_actor": stats_actor},
                          batch_size=rows_per_shard, batch_format="pyarrow",
                          compute=ActorPoolStrategy(size=1), num_cpus=LIGHT_STAGE_CPUS)


def store_info(cfg: RunConfig) -> dict[str, Any]:
    return {"config_name": cfg.name, "config": cfg.to_dict()}


def generate_to_store(cfg: RunConfig, out: str) -> dict[str, Any]:
    """Run concepts -> captions -> images -> store; resumes a store written by the same config."""
    import ray

    from synray.data.stats import StageStats
    from synray.data.store import SUMMARY_FILE, ParquetStore
    from synray.rundir import write_json
    from synray.session import session

    store = ParquetStore(out)
    store.open_for_writing(cfg.generation_fingerprint(), store_info(cfg))
    plan = prepare(cfg, store)
    log.info("store %s holds %d rows; generating %d more", out, len(plan.skip_ids), plan.wanted)
    start = time.time()
    rows = 0
    stats_summary: dict[str, Any] = {"stages": {}, "rejected": {}}
    if plan.wanted:
        with session(cfg.ray):
            stats = ray.remote(num_cpus=0)(StageStats).remote()
            ds = add_store_stage(build_pipeline(plan, stats), out, False, cfg.data.rows_per_shard, stats)
            for batch in ds.iter_batches(batch_size=None):
                rows += int(sum(batch["rows"]))
            stats_summary = ray.get(stats.summary.remote())
    elapsed = time.time() - start
    summary = {
        "store": str(Path(out).resolve()), "rows_written": rows, "rows_before": len(plan.skip_ids),
        "rows_total": store.num_rows(), "rows_wanted": cfg.data.num_captions,
        "images_per_row": cfg.images.per_caption, "elapsed_s": round(elapsed, 2), **stats_summary,
    }
    write_json(Path(out) / SUMMARY_FILE, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"rows written: {summary['rows_written']} (store now holds {summary['rows_total']} of "
             f"{summary['rows_wanted']} wanted, {summary['rows_before']} were there before)",
             f"elapsed: {summary['elapsed_s']} s"]
    for stage, s in summary.get("stages", {}).items():
        lines.append(f"  {stage:>9}: {s['rows']} rows, {s['rows_per_s']} rows/s over {s['active_s']} s "
                     f"({s['steady_rows_per_s']} rows/s after start-up)")
    for stage, reasons in summary.get("rejected", {}).items():
        lines.append(f"  rejected in {stage}: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
    if summary["rows_total"] < summary["rows_wanted"]:
        lines.append("  note: fewer rows than wanted; raise captions.oversample or relax captions.cleanup")
    return "\n".join(lines)


def generate_command(cfg: RunConfig, out: str) -> int:
    summary = generate_to_store(cfg, out)
    print(format_summary(summary))
    print(f"summary: {Path(out) / '_summary.json'}")
    return 0
