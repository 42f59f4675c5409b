"""The pipelines a run executes, each a list of stages (synray.stages): the training input of each data mode with
the training workers, and the held-out evaluation pass. The run builds its Datasets from these lists; `synray
plan`, the placement check and a sweep trial's resources read the resources of the same lists.

Training input, by `data.mode`:
- ``stream``: the generation stages (synray.generation.pipeline), then row preprocessing;
- ``stream+store``: the same teed into the store by its shard writer, the stored rows training has not consumed
  replayed ahead of them (a union), then row preprocessing;
- ``stored``: the store's read tasks (a nested subset's, for sweep trials), the actor that skips rows the
  restored checkpoint consumed (when rows carry row ids), then row preprocessing.
The training workers (Ray Train) are the last stage of each: they hold their resources with the others.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from synray.config import RunConfig
from synray.data.driver import driver_actor
from synray.data.ledger import ROW_ID, SkipConsumed, StreamLedger
from synray.data.store import ParquetStore
from synray.eval.feature_pass import extractor_stages
from synray.generation.pipeline import GenerationPlan, generation_stages, replay_stage, store_fingerprint, store_info
from synray.stages import (EVAL_PHASE, LIGHT_STAGE_CPUS, TRAINING_WORKERS, Stage, StageResources, build, map_stage,
                           stage_resources)
from synray.train.objectives import training_rate
from synray.train.preprocess import preprocessing_stage
from synray.train.spec import TrainPlan

__all__ = ["DataPlan", "HeldoutPlan", "STORE_READ_TASKS", "STORE_READ_CPUS", "SAMPLE_GRID_ROWS", "training_stages",
           "heldout_source_stages", "heldout_stages", "run_stages", "stream_ledger", "training_input", "build_heldout",
           "sample_fraction"]

#: store reads in flight at once (each reads a shard or a block), at least: training reads as many at once as it
#: has preprocessing actors to feed, so that reads stay ahead of them and leave training its CPUs
STORE_READ_TASKS = 2
STORE_READ_CPUS = 0.25
#: Ray Data's listing of a Parquet read's files: one task of 1 CPU (its resources are not settable)
LIST_FILES = StageResources("file listing", 1, 1.0, tasks=True, udf="ListFiles")
#: rows of the held-out set drawn in a run's sample grid
SAMPLE_GRID_ROWS = 8


@dataclass(frozen=True)
class DataPlan:
    """Where training rows come from: a live generation stream, or a store (read, or kept while streaming)."""

    mode: str                            # stream, stored or stream+store
    store_dir: str | None
    generation: GenerationPlan | None    # the live pipeline (stream modes)
    max_row_id: int | None = None        # stored: only rows up to this plan row (the store's first data.first_rows)
    first_images: int | None = None      # stored: only the first m images of each row
    passes: int = 1                      # stored subsets: times the subset is read in one execution (one epoch)
    subset_shards: tuple[str, ...] = ()  # stored subsets: the shards holding the subset's rows


@dataclass(frozen=True)
class HeldoutPlan:
    """The labelled rows evaluation scores: a held-out set generated with another seed, or eval.dataset."""

    generation: GenerationPlan | None
    dataset: str | None
    columns: tuple[str, ...]


def _store_stages(cfg: RunConfig, data: DataPlan | None, columns: list[str], tracks_rows: bool,
                  ledger: Any) -> list[Stage]:
    """A store read in epochs (a nested subset in passes), its blocks in a seeded order, the rows the restored
    checkpoint's epoch trained on skipped."""
    subset = cfg.data.first_rows is not None or cfg.data.first_images is not None
    read = StageResources("store reads", max(STORE_READ_TASKS, cfg.data.preprocess_actors), STORE_READ_CPUS,
                          keys=("data.preprocess_actors",), tasks=True,
                          udf="_read_subset_block" if subset else "ReadFiles")
    skip = StageResources("consumed rows skipped", 1, LIGHT_STAGE_CPUS, udf="SkipConsumed")
    reads = (read,) if subset else (LIST_FILES, read)

    def add_read(_: Any) -> Any:
        assert data is not None and data.store_dir, "a stored run is built from its DataPlan"
        store = ParquetStore(data.store_dir)
        if data.subset_shards:
            ds = store.read_subset(columns, list(data.subset_shards), data.max_row_id, data.first_images,
                                   data.passes, num_cpus=read.cpus, tasks=read.actors)
        else:
            ds = store.read_dataset(columns=columns, num_cpus=read.cpus, tasks=read.actors)
        return ds.randomize_block_order(seed=cfg.seed)

    stages = [Stage(reads, add_read)]
    if tracks_rows:
        stages.append(Stage((skip,), lambda ds: map_stage(ds, skip, SkipConsumed, batch_format="pyarrow",
                                                          fn_constructor_kwargs={"ledger": ledger})))
    return stages


def _workers(cfg: RunConfig) -> Stage:
    t = cfg.train
    return Stage((StageResources(TRAINING_WORKERS, t.max_workers, t.cpus_per_worker,
                                 t.gpus_per_worker if t.use_gpu else 0.0, t.resources,
                                 ("train.num_workers", "train.cpus_per_worker", "train.gpus_per_worker"),
                                 udf="RayTrainWorker", rate=training_rate(cfg), rate_key="rates.train",
                                 min_actors=t.min_workers if t.elastic else None),), None)


def training_stages(cfg: RunConfig, *, data: DataPlan | None = None, train: TrainPlan | None = None,
                    tracks_rows: bool = True, stats_actor: Any | None = None, ledger: Any | None = None) -> list[Stage]:
    """What training holds at once: its input's stages and the workers. From the config alone (and whether a store's
    rows carry row ids), so that `synray plan` lists them before a run's inputs exist; `data`, `train` and the
    handles are needed only to build the Dataset."""
    mode = cfg.data.mode
    if mode == "stored":
        columns = list(train.columns) if train is not None else []
        columns += [ROW_ID] if tracks_rows and ROW_ID not in columns else []
        stages = _store_stages(cfg, data, columns, tracks_rows, ledger)
    else:
        store = cfg.data.store_dir if mode == "stream+store" else None
        stages = generation_stages(cfg, data.generation if data is not None else None, stats_actor=stats_actor,
                                   ledger=ledger, store=store, passthrough=True)
        if mode == "stream+store":
            stages.append(replay_stage(ledger, (list(train.columns) if train is not None else []) + [ROW_ID]))
    return [*stages, preprocessing_stage(cfg, train, track_rows=tracks_rows or mode != "stored"), _workers(cfg)]


def heldout_source_stages(cfg: RunConfig, heldout_cfg: RunConfig | None,
                          heldout: HeldoutPlan | None = None) -> list[Stage]:
    """The labelled rows the evaluation pass reads, in the evaluation's column names: eval.dataset's read tasks, or
    the held-out set generated by `heldout_cfg` (another seed). `heldout` is needed only to build the Dataset."""
    columns = StageResources("columns evaluation reads", 1, LIGHT_STAGE_CPUS, phase=EVAL_PHASE, tasks=True,
                             udf="Project")
    if cfg.eval.dataset:
        read = StageResources("evaluation dataset reads", STORE_READ_TASKS, STORE_READ_CPUS, phase=EVAL_PHASE,
                              tasks=True, udf="ReadFiles")

        def add_read(_: Any) -> Any:
            assert heldout is not None, "the evaluation dataset is read as its HeldoutPlan says"
            return _eval_columns(ParquetStore(cfg.eval.dataset).read_dataset(
                columns=list(heldout.columns), num_cpus=read.cpus, tasks=read.actors), heldout)

        return [Stage((replace(LIST_FILES, phase=EVAL_PHASE), read, columns), add_read)]
    assert heldout_cfg is not None, "a generated held-out set needs its config (synray.plan.heldout_config)"
    stages = generation_stages(heldout_cfg, heldout.generation if heldout is not None else None, phase=EVAL_PHASE,
                               prefix="held-out ")
    return [*stages, Stage((columns,), lambda ds: _eval_columns(ds.select_columns(list(heldout.columns),
                                                                                   num_cpus=columns.cpus), heldout))]


def heldout_stages(cfg: RunConfig, heldout_cfg: RunConfig | None, protocols: tuple[str, ...],
                   sample_fraction: float) -> list[Stage]:
    """The evaluation pass: its source, then the feature actors (synray.eval.feature_pass.extractor_stages, which
    `evaluate_models` adds to the source when it runs)."""
    return [*heldout_source_stages(cfg, heldout_cfg),
            *extractor_stages(cfg.eval, cfg.train.backbone.image_size, protocols, sample_fraction=sample_fraction)]


def _eval_columns(ds: Any, heldout: HeldoutPlan) -> Any:
    if "concept" not in heldout.columns:
        return ds
    return ds.rename_columns({"concept": "class_name"}, num_cpus=LIGHT_STAGE_CPUS)


def run_stages(cfg: RunConfig, heldout_cfg: RunConfig | None, protocols: tuple[str, ...],
               tracks_rows: bool = True) -> tuple[StageResources, ...]:
    """What a run holds at once while training, then while evaluating (the held-out source and the feature actors,
    each holding the trained and the initial backbone)."""
    stages = training_stages(cfg, tracks_rows=tracks_rows)
    if protocols:
        stages += heldout_stages(cfg, heldout_cfg, protocols, sample_fraction(cfg))
    return tuple(stage_resources(stages))


def stream_ledger(store_dir: str | None) -> Any:
    """A StreamLedger actor: what a training stream skips and replays after a worker-group restart."""
    return driver_actor(StreamLedger, store_dir)


def training_input(cfg: RunConfig, data: DataPlan, train: TrainPlan, stats_actor: Any) -> tuple[Any, Any]:
    """The Dataset training reads (`training_stages` of the data mode, built: ready arrays from the preprocessing
    actors) and the stream ledger every execution consults (rows the restored checkpoint consumed, rows stored).

    A store is read in epochs (its rows trained on in the restored checkpoint's epoch skipped, when they carry
    `row_id`). A stream is the live pipeline; in stream+store mode it is teed into the store, and the stored rows
    training has not consumed are replayed first.
    """
    if data.generation is None:
        ledger = stream_ledger(None) if train.tracks_rows else None
    else:
        ledger = stream_ledger(data.store_dir if data.mode == "stream+store" else None)
        if data.mode == "stream+store":
            ParquetStore(data.store_dir).open_for_writing(store_fingerprint(cfg), store_info(cfg))
    stages = training_stages(cfg, data=data, train=train, tracks_rows=train.tracks_rows, stats_actor=stats_actor,
                             ledger=ledger)
    return build(stages), ledger


def build_heldout(heldout: HeldoutPlan, cfg: RunConfig) -> Any:
    """The labelled evaluation rows (generated, or read from eval.dataset) in the evaluation's column names."""
    return build(heldout_source_stages(cfg, heldout.generation.cfg if heldout.generation is not None else None,
                                       heldout))


def sample_fraction(cfg: RunConfig) -> float:
    """The share of held-out rows whose images reach the driver: about 4 x the sample grid's rows."""
    return min(1.0, 4 * SAMPLE_GRID_ROWS / max(1, cfg.eval.heldout_captions))
