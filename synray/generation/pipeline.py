"""The generation pipeline: concepts -> captions -> images (-> Parquet shards) as one streaming Ray Dataset."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.data
from ray.data import ActorPoolStrategy

from synray.captions.llm import build_llm_processor
from synray.captions.stage import CleanCaptions, PlanRows, template_captions, vllm_postprocess, vllm_preprocess
from synray.config import RunConfig
from synray.data.ledger import replay_rows
from synray.data.store import ShardWriter
from synray.images.base import Renderer
from synray.images.registry import get_renderer

log = logging.getLogger(__name__)

#: rows per block of the plan; small blocks keep the pipeline streaming
PLAN_ROWS_PER_BLOCK = 16
#: CPUs of the light single-actor stages (planning, clean-up, shard writing)
LIGHT_STAGE_CPUS = 0.25
#: caption settings that decide resources, not which rows are written (left out of store fingerprints)
CAPTION_RESOURCE_KEYS = ("engine", "oversample")


@dataclass
class GenerationPlan:
    """What a generation run will do, worked out on the driver (models resolved, store read) before Ray starts."""

    cfg: RunConfig
    llm_path: str | None
    t2i_path: str | None
    renderer: type[Renderer]
    wanted: int
    skip_ids: set[str] = field(default_factory=set)
    existing_captions: list[str] = field(default_factory=list)

    @property
    def plan_rows(self) -> int:
        return math.ceil(self.cfg.data.num_captions * self.cfg.captions.oversample)


def store_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that decides which rows a generation run writes (not their count, not resources).

    Image settings count only where the configured backend reads them (`Renderer.reads`): the
    procedural world's stores do not change with diffusion steps or guidance.
    """
    d = cfg.to_dict()
    reads = get_renderer(cfg.images.backend).reads
    keep = {"seed": d["seed"], "concepts": d["concepts"],
            "images": {k: v for k, v in d["images"].items() if k in reads},
            "captions": {k: v for k, v in d["captions"].items() if k not in CAPTION_RESOURCE_KEYS}}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def store_info(cfg: RunConfig) -> dict[str, Any]:
    """What a store records about the config that writes it (beside the fingerprint)."""
    return {"config_name": cfg.name, "config": cfg.to_dict()}


def build_pipeline(plan: GenerationPlan, stats_actor: Any | None = None, row_offset: int = 0,
                   ledger: Any | None = None) -> ray.data.Dataset:
    """The lazy Ray Dataset of finished rows (caption + m images + provenance).

    With a `StreamLedger` actor (training streams), each execution of the dataset (the first, and one per
    worker-group restart) skips the rows the ledger names (consumed by training, or already stored) and
    generates only what is still missing of `plan.wanted`.
    """
    cfg = plan.cfg
    blocks = max(1, plan.plan_rows // PLAN_ROWS_PER_BLOCK)
    ds = ray.data.range(plan.plan_rows, override_num_blocks=blocks)
    if row_offset:
        ds = ds.map_batches(lambda b: {"id": b["id"] + row_offset}, num_cpus=LIGHT_STAGE_CPUS)
    ds = ds.map_batches(PlanRows, fn_constructor_kwargs={"cfg": cfg, "skip_ids": plan.skip_ids,
                                                         "stats_actor": stats_actor, "ledger": ledger},
                        compute=ActorPoolStrategy(size=1), num_cpus=LIGHT_STAGE_CPUS)
    if plan.llm_path is not None:
        proc = build_llm_processor(cfg.captions, plan.llm_path, vllm_preprocess(cfg.captions), vllm_postprocess)
        ds = proc(ds)
    else:
        ds = ds.map_batches(template_captions, num_cpus=LIGHT_STAGE_CPUS)
    ds = ds.map_batches(CleanCaptions, fn_constructor_kwargs={
        "cfg": cfg.captions, "existing": plan.existing_captions, "stats_actor": stats_actor, "ledger": ledger,
        "wanted": plan.wanted},
        compute=ActorPoolStrategy(size=1), num_cpus=LIGHT_STAGE_CPUS)
    ds = ds.limit(plan.wanted)
    return add_image_stage(ds, plan, stats_actor)


def add_image_stage(ds: ray.data.Dataset, plan: GenerationPlan, stats_actor: Any | None) -> ray.data.Dataset:
    """Fixed-size actor pool of the configured renderer."""
    img = plan.cfg.images
    return ds.map_batches(
        plan.renderer,
        fn_constructor_kwargs={"cfg": img, "model_path": plan.t2i_path, "run_seed": plan.cfg.seed,
                               "stats_actor": stats_actor},
        compute=ActorPoolStrategy(size=img.pool_size), batch_size=img.batch_size,
        num_cpus=img.num_cpus, num_gpus=img.num_gpus or None, **({"resources": img.resources} if img.resources else {}))


def replay_dataset(ledger: Any, columns: list[str]) -> ray.data.Dataset:
    """The stored rows training has not consumed, read when an execution starts (stream+store restarts)."""
    return ray.data.range(1, override_num_blocks=1).map_batches(
        _replay_stored, fn_kwargs={"ledger": ledger, "columns": columns}, batch_format="pyarrow",
        num_cpus=LIGHT_STAGE_CPUS)


def _replay_stored(batch: Any, ledger: Any, columns: list[str]) -> Iterator[Any]:
    view = ray.get(ledger.view.remote())
    for shard in view.replay_shards:
        table = replay_rows(shard, view.consumed, columns)
        if table.num_rows:
            yield table


def add_store_stage(ds: ray.data.Dataset, root: str, passthrough: bool, rows_per_shard: int,
                    stats_actor: Any | None) -> ray.data.Dataset:
    """Tee rows into atomic Parquet shards (passthrough) or turn them into shard metadata."""
    return ds.map_batches(ShardWriter, fn_constructor_kwargs={"root": root, "passthrough": passthrough,
                                                             "stats_actor": stats_actor},
                          batch_size=rows_per_shard, batch_format="pyarrow",
                          compute=ActorPoolStrategy(size=1), num_cpus=LIGHT_STAGE_CPUS)
