"""The driver side of training: a Ray Train TorchTrainer over DeepSpeed workers, metrics and the exported backbone."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
from ray.train.torch import TorchTrainer

from synray.config import RunConfig
from synray.train.preprocess import ingest_block_bytes, ingest_options
from synray.train.spec import TrainPlan
from synray.train.worker import BACKBONE_DIR, CHECKPOINT_SCORE, INIT_DIR, train_worker

METRICS_FILE = "metrics.jsonl"
#: checkpoints Ray Train keeps: the step-0 export and the two latest
CHECKPOINTS_KEPT = 3


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
    cls = type("SynrayMetricsLog", (MetricsLog, ray.train.UserCallback), {})
    return cls(path)


@dataclass
class TrainResult:
    metrics: list[dict[str, Any]]
    final: dict[str, Any]
    checkpoint_dir: str | None
    backbone_dir: str | None     # the trained model, exported at the end
    init_dir: str | None         # the same network at step 0, exported by the workers
    elapsed_s: float
    failures: int


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def copy_export(checkpoint: Any, name: str, dest: Path) -> str | None:
    """Copy the folder `name` of a Ray checkpoint (local or cloud storage) to `dest`; None when it has none."""
    if checkpoint is None:
        return None
    src = f"{checkpoint.path.rstrip('/')}/{name}"
    if checkpoint.filesystem.get_file_info(src).type == pafs.FileType.NotFound:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src, str(dest), source_filesystem=checkpoint.filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    return str(dest)


def _checkpoint_uri(checkpoint: Any, storage: str | None) -> str:
    """A checkpoint's path as users reach it: the local path, or its URI under a cloud storage path."""
    if storage is None or "://" not in storage:
        return checkpoint.path
    scheme, rest = storage.split("://", 1)
    base, sep, query = rest.partition("?")
    return f"{scheme}://{checkpoint.path.lstrip('/')}{sep}{query}"


def _init_checkpoint(result: Any) -> Any:
    for checkpoint, metrics in result.best_checkpoints or []:
        if metrics.get("init_export"):
            return checkpoint
    return None


def fit(cfg: RunConfig, plan: TrainPlan, dataset: Any, out_dir: Path, ledger: Any | None = None,
        callbacks: Sequence[Any] = (), storage: str | None = None) -> TrainResult:
    """Train on `dataset` (a Ray Dataset of caption rows) as planned; exports land beside `out_dir`.

    A stream passes its `StreamLedger` actor: each worker group tells it what its checkpoint consumed before
    reading. Ray Train keeps its state under `out_dir/train`: a second `fit` on the same `out_dir` (a rerun
    after the driver died) starts from the latest checkpoint there. `callbacks`: more Ray Train callbacks (a sweep
    trial forwards its metrics to Tune with them). `storage`: Ray Train's storage path instead of `out_dir` (a
    cloud URI: checkpoints go there; the metrics log and the exports stay in `out_dir`, on the driver's node).
    """
    t = cfg.train
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {}), **t.resources}
    block_bytes = ingest_block_bytes(cfg.data, t.max_workers)
    if block_bytes is not None:   # on the dataset's own context, which its execution reads
        dataset.context.target_max_block_size = block_bytes
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "plan": plan, "ledger": ledger},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources,
                                               elastic_resize_monitor_interval_s=t.resize_check_s),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest_options(cfg.data)),
        run_config=ray.train.RunConfig(
            name="train", storage_path=storage or str(out_dir),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures,
                                                   max_preemption_failures=t.max_preemptions),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT,
                                                         checkpoint_score_attribute=CHECKPOINT_SCORE,
                                                         checkpoint_score_order="max"),
            callbacks=[_metrics_callback(str(metrics_path)), *callbacks]),
    )
    start = time.time()
    with open(metrics_path, "a") as f:  # a rerun after the driver died appends to the same log
        f.write(json.dumps({"event": "fit_start", "time": start}) + "\n")
    result = trainer.fit()
    elapsed = time.time() - start
    rows = read_metrics(metrics_path)
    backbone = copy_export(result.checkpoint, BACKBONE_DIR, out_dir.parent / BACKBONE_DIR)
    init = copy_export(_init_checkpoint(result), INIT_DIR, out_dir.parent / INIT_DIR)
    return TrainResult(metrics=[r for r in rows if "loss" in r], final=dict(result.metrics or {}),
                       checkpoint_dir=_checkpoint_uri(result.checkpoint, storage) if result.checkpoint else None,
                       backbone_dir=backbone, init_dir=init, elapsed_s=elapsed,
                       failures=sum(1 for r in rows if r.get("event") == "worker_failure"))
