"""Last-mile preprocessing as a Ray Data stage: rows -> the objective's fixed-shape arrays, on CPU actors off
the training loop (decoding, resizing, tokenising), so the workers only move ready tensors to their device."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from synray.config import DataConfig, RunConfig
from synray.data.ledger import ROW_ID
from synray.stages import LIGHT_STAGE_CPUS, Rate, Stage, StageResources, map_stage
from synray.train.objectives import get_objective
from synray.train.spec import TrainPlan

if TYPE_CHECKING:   # Ray and torch are imported where they run: plans read the stage without them
    from ray.data import ExecutionOptions

__all__ = ["RowPreprocessor", "preprocessing_stage", "ingest_options", "ingest_block_bytes"]


class RowPreprocessor:
    """Ray Data UDF (one per actor): what the objective's `preprocess` makes of a batch of rows."""

    def __init__(self, cfg: RunConfig, plan: TrainPlan) -> None:
        import torch

        torch.set_num_threads(1)
        self.cfg, self.plan = cfg, plan
        self.objective = get_objective(plan.objective)
        self.state = self.objective.preprocess_setup(cfg, plan)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, Any]:
        out = self.objective.preprocess(rows, self.cfg, self.plan, self.state)
        if ROW_ID in rows:  # a stream: workers record the plan rows they train on (synray.data.ledger)
            out[ROW_ID] = np.asarray(rows[ROW_ID], dtype=np.int64)
        return out


#: 256-px JPEGs one CPU core decodes per second: ~900 for noise-like images, ~3,100 for smooth ones (PIL, measured
#: on this project's CI machine); the reference takes 1,000
REFERENCE_DECODES_PER_CPU_S, REFERENCE_DECODE_SIZE = 1000.0, 256


def preprocess_rate(cfg: RunConfig) -> Rate:
    """Rows one preprocessing actor decodes per second: the reference scaled to the images' pixels, over the images
    of a row that a step uses (the ones decoded)."""
    i, d, t = cfg.images, cfg.data, cfg.train
    decoded = get_objective(t.loss).images_per_row(t.images_per_row or i.per_caption)
    decodes = REFERENCE_DECODES_PER_CPU_S * d.preprocess_cpus * (REFERENCE_DECODE_SIZE / i.output_size) ** 2
    return Rate(decodes / decoded, f"reference: {REFERENCE_DECODES_PER_CPU_S:,.0f} {REFERENCE_DECODE_SIZE}-px JPEG "
                f"decodes per CPU core a second (measured with PIL), {i.output_size} px, {decoded} a row")


#: the stage of the preprocessing pool (Ray Data spreads its actors over the nodes that can hold them)
PREPROCESS_STAGE = "row preprocessing"


def preprocessing_stage(cfg: RunConfig, plan: TrainPlan | None = None, track_rows: bool = False) -> Stage:
    """The rows training reads -> ready arrays, by a fixed pool of `data.preprocess_actors` CPU actors.
    `track_rows`: also pass each row's `row_id`, so checkpoints record what training consumed. `plan` is needed
    only to build the Dataset."""
    d = cfg.data
    keep = StageResources("columns training reads", 1, LIGHT_STAGE_CPUS, tasks=True, udf="Project")
    res = StageResources(PREPROCESS_STAGE, d.preprocess_actors, d.preprocess_cpus, 0.0, d.preprocess_resources,
                         ("data.preprocess_actors", "data.preprocess_cpus"), udf="RowPreprocessor",
                         rate=preprocess_rate(cfg), rate_key="rates.preprocess")

    def add(ds: Any) -> Any:
        if plan is None:
            raise ValueError("row preprocessing is built from the run's TrainPlan")
        columns = list(plan.columns) + ([ROW_ID] if track_rows and ROW_ID not in plan.columns else [])
        return map_stage(ds.select_columns(columns, num_cpus=keep.cpus), res, RowPreprocessor, batch_format="numpy",
                         batch_size=d.preprocess_batch_rows, fn_constructor_kwargs={"cfg": cfg, "plan": plan})

    return Stage((keep, res), add)


def ingest_options(data: DataConfig) -> ExecutionOptions:
    """Ray Data's options for the training dataset: Ray Train's defaults, with the object store bytes its stages
    may hold capped at `data.stream_buffer_mb` (the bound that keeps a long stream's memory flat)."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    if data.stream_buffer_mb is not None:
        opts.resource_limits = opts.resource_limits.copy(object_store_memory=data.stream_buffer_mb * 2**20)
    return opts


def ingest_block_bytes(data: DataConfig, num_workers: int) -> int | None:
    """The largest block the training dataset may make under `data.stream_buffer_mb`: a small part of the cap.

    Ray Data's equal split hands a worker a block only while the rows it holds back can still even out every
    worker's share, so one large block (a restarted stream+store run replays its stored rows as one) needs as many
    rows held back for each other worker; when the cap cannot hold them, nothing more is made, the other workers
    wait for data and the first in a collective: the run hangs. With every block at most 1/(4 (n + 1)) of the cap,
    the rows held back and a block in flight per worker fit in it (tests/test_cluster_rehearsal.py: a restart of
    `shapes`, whose cap is 4 MB, hung without it)."""
    if data.stream_buffer_mb is None:
        return None
    return max(64 * 2**10, int(data.stream_buffer_mb * 2**20 / (4 * (num_workers + 1))))
