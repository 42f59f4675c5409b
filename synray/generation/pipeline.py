"""The generation pipeline: concepts -> captions -> images (-> Parquet shards) as one streaming Ray Dataset."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from synray.captions.backends import get_caption_backend
from synray.captions.stage import CleanCaptions, PlanRows
from synray.config import RunConfig
from synray.data.ledger import replay_rows
from synray.data.store import ShardWriter
from synray.images.base import Renderer
from synray.images.registry import get_renderer
from synray.stages import LIGHT_STAGE_CPUS, TRAINING_PHASE, Stage, StageResources, map_stage

if TYPE_CHECKING:   # Ray is imported where a Dataset is built: plans read this module without it
    import ray.data

log = logging.getLogger(__name__)

#: rows per block of the plan; small blocks keep the pipeline streaming
PLAN_ROWS_PER_BLOCK = 16
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
    procedural world's stores do not change with diffusion steps or guidance. The backend's `output_version`
    counts too: a change in how renders become stored bytes makes a new store.
    """
    d = cfg.to_dict()
    renderer = get_renderer(cfg.images.backend)
    keep = {"seed": d["seed"], "concepts": d["concepts"],
            "images": {**{k: v for k, v in d["images"].items() if k in renderer.reads},
                       "output_version": renderer.output_version},
            "captions": {k: v for k, v in d["captions"].items() if k not in CAPTION_RESOURCE_KEYS}}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def store_info(cfg: RunConfig) -> dict[str, Any]:
    """What a store records about the config that writes it (beside the fingerprint)."""
    return {"config_name": cfg.name, "config": cfg.to_dict()}


def generation_stages(cfg: RunConfig, gen: GenerationPlan | None = None, *, stats_actor: Any | None = None,
                      ledger: Any | None = None, store: str | None = None, passthrough: bool = True,
                      phase: str = TRAINING_PHASE, prefix: str = "") -> list[Stage]:
    """The generation stream: plan rows -> captions (the backend's stages) -> clean-up -> the renderer's pool (->
    the store's shard writer, `store` given: teeing rows into it with `passthrough`, else turning them into shard
    metadata). Resources come from `cfg`; `gen` (models resolved, the store's rows read) and the handles are needed
    only to build the Dataset.

    With a `StreamLedger` actor (training streams), each execution of the dataset (the first, and one per
    worker-group restart) skips the rows the ledger names (consumed by training, or already stored) and
    generates only what is still missing of `gen.wanted`.
    """
    img, light = cfg.images, {"cpus": LIGHT_STAGE_CPUS, "phase": phase}
    plan_rows = math.ceil(cfg.data.num_captions * cfg.captions.oversample)
    read = StageResources(f"{prefix}plan row ids", 1, 1.0, phase=phase, tasks=True, udf="ReadRange")
    rows = StageResources(f"{prefix}plan rows", 1, udf="PlanRows", **light)
    clean = StageResources(f"{prefix}caption clean-up", 1, udf="CleanCaptions", **light)
    renderer = get_renderer(img.backend)
    render = StageResources(f"{prefix}{img.backend} renderers", img.pool_size, img.num_cpus, img.num_gpus,
                            img.resources, ("images.pool_size", "images.num_cpus", "images.num_gpus"), phase,
                            udf=renderer.__name__, rate=renderer.expected_rate(img), rate_key="rates.images")

    def built() -> GenerationPlan:
        if gen is None:
            raise ValueError("a generation stream is built from its GenerationPlan (synray.plan.plan_generation)")
        return gen

    def add_rows(_: Any) -> ray.data.Dataset:
        import ray.data

        ds = ray.data.range(plan_rows, override_num_blocks=max(1, plan_rows // PLAN_ROWS_PER_BLOCK))
        return map_stage(ds, rows, PlanRows, fn_constructor_kwargs={
            "cfg": cfg, "skip_ids": built().skip_ids, "stats_actor": stats_actor, "ledger": ledger})

    def add_clean(ds: ray.data.Dataset) -> ray.data.Dataset:
        ds = map_stage(ds, clean, CleanCaptions, fn_constructor_kwargs={
            "cfg": cfg.captions, "existing": built().existing_captions, "stats_actor": stats_actor, "ledger": ledger,
            "wanted": built().wanted})
        return ds.limit(built().wanted)

    def add_render(ds: ray.data.Dataset) -> ray.data.Dataset:
        return map_stage(ds, render, renderer, batch_size=img.batch_size, fn_constructor_kwargs={
            "cfg": img, "model_path": built().t2i_path, "run_seed": cfg.seed, "stats_actor": stats_actor})

    stages = [Stage((read, rows), add_rows),
              *get_caption_backend(cfg.captions.backend).stages(cfg.captions, lambda: built().llm_path, phase, prefix),
              Stage((clean,), add_clean), Stage((render,), add_render)]
    if store is not None:
        stages.append(store_stage(store, passthrough, cfg.data.rows_per_shard, stats_actor, phase, prefix))
    return stages


def replay_stage(ledger: Any, columns: list[str], phase: str = TRAINING_PHASE) -> Stage:
    """The stored rows training has not consumed, read when an execution starts (stream+store restarts), ahead of
    what the stages before it stream (a union)."""
    res = StageResources("stored rows replayed", 1, 1.0, phase=phase, tasks=True, udf="_replay_stored")

    def add(ds: ray.data.Dataset) -> ray.data.Dataset:
        import ray.data

        replay = map_stage(ray.data.range(1, override_num_blocks=1), res, _replay_stored,
                           fn_kwargs={"ledger": ledger, "columns": columns}, batch_format="pyarrow")
        return replay.union(ds)

    return Stage((res,), add)


def _replay_stored(batch: Any, ledger: Any, columns: list[str]) -> Iterator[Any]:
    import ray

    view = ray.get(ledger.view.remote())
    for shard in view.replay_shards:
        table = replay_rows(shard, view.consumed, columns)
        if table.num_rows:
            yield table


def store_stage(root: str, passthrough: bool, rows_per_shard: int, stats_actor: Any | None,
                phase: str = TRAINING_PHASE, prefix: str = "") -> Stage:
    """Tee rows into atomic Parquet shards (passthrough) or turn them into shard metadata."""
    res = StageResources(f"{prefix}store writer", 1, LIGHT_STAGE_CPUS, phase=phase, udf="ShardWriter")
    return Stage((res,), lambda ds: map_stage(ds, res, ShardWriter, batch_size=rows_per_shard, batch_format="pyarrow",
                                              fn_constructor_kwargs={"root": root, "passthrough": passthrough,
                                                                     "stats_actor": stats_actor}))
