"""Where a training worker gets its batches and sends its reports: Ray Train, or local processes (tests, debugging).

The worker (`synray.train.worker`) only talks to a `WorkerContext`. Under Ray Train that is
`RayTrainContext` (the dataset shard of preprocessed rows as tensors on the worker's device,
`ray.train.report`, Ray's checkpoints). `LocalContext` runs the same worker code in plain
`torch.distributed` processes over preprocessed rows held in memory, with checkpoints in a local
folder: the fast tests drive real DeepSpeed steps through it without starting Ray.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from synray.data.ledger import ROW_ID

__all__ = ["WorkerContext", "RayTrainContext", "LocalContext"]


class WorkerContext(Protocol):
    """What a training worker needs from the system that runs it."""

    rank: int
    world_size: int
    local_rank: int       # among the group's workers on this node

    def batches(self, rows: int, epoch: int, shuffle_rows: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of this worker's preprocessed rows in tensor batches of `rows` (a partial last one dropped)."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The run's latest reported checkpoint as a local directory, or None for a fresh run."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Report metrics (every rank, every time), with this rank's part of a checkpoint if it has one."""

    def wait_for_checkpoints(self) -> None:
        """Block until every checkpoint reported so far is registered (before a deliberate exit)."""

    def start_stream(self, consumed: np.ndarray) -> None:
        """Called by every rank before reading a row: the group starts from a checkpoint that consumed these
        plan rows (a stream then skips them)."""

    def preemption(self) -> dict[str, Any] | None:
        """Called by every rank at the same steps: a node of the group is being preempted ({"deadline_ms": UNIX ms
        or None, "ranks": its workers}), or None."""


class RayTrainContext:
    """A worker of a Ray Train run: its dataset shard ("train"), `ray.train.report` and Ray's checkpoints.

    Batches arrive as tensors already on the worker's device (`iter_torch_batches`, with `prefetch_batches`
    in flight and pinned host memory on a GPU).
    """

    def __init__(self, prefetch_batches: int, pin_memory: bool, ledger: Any | None = None) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        self._shard = ray.train.get_dataset_shard("train")
        self.prefetch_batches, self.pin_memory = prefetch_batches, pin_memory
        self.ledger = ledger

    def batches(self, rows: int, epoch: int, shuffle_rows: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self._shard.iter_torch_batches(batch_size=rows, drop_last=True, device="auto",
                                                   prefetch_batches=self.prefetch_batches, pin_memory=self.pin_memory,
                                                   local_shuffle_buffer_size=shuffle_rows or None,
                                                   local_shuffle_seed=(seed + epoch) if shuffle_rows else None))

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def wait_for_checkpoints(self) -> None:
        ray.train.get_all_reported_checkpoints()

    def preemption(self) -> dict[str, Any] | None:
        """Ray Train's notice of a drained node (`get_preemption_info`, a barrier of the group's workers)."""
        info = ray.train.get_preemption_info()
        return None if info is None else {"deadline_ms": info.deadline_ms, "ranks": info.preempted_ranks}

    def start_stream(self, consumed: np.ndarray) -> None:
        """Rank 0 tells the stream's ledger what the restored checkpoint consumed; no rank reads a row before
        (the stream's stages read the ledger when the dataset starts executing, at the first read)."""
        if self.ledger is None:
            return
        if self.rank == 0:
            ray.get(self.ledger.publish.remote(consumed))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


class LocalContext:
    """A worker among plain `torch.distributed` processes: rows in memory, reports and checkpoints under `root`.

    `rows` is this rank's shard of preprocessed rows as columns (numpy arrays of equal length). Each report becomes one
    line of `root/reports-rank{r}.jsonl`; a report with a checkpoint is merged by every rank into
    `root/checkpoint_NNNNNN/` (a barrier follows), as Ray Train merges the ranks' directories.
    """

    def __init__(self, rank: int, world_size: int, rows: dict[str, np.ndarray], root: str | Path) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, rank   # processes of one machine
        self.rows = rows
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._reports = len(self.read_reports(self.root, rank))

    def batches(self, rows: int, epoch: int, shuffle_rows: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        n = len(next(iter(self.rows.values())))
        order = np.arange(n)
        if shuffle_rows:
            order = np.random.default_rng(seed + epoch).permutation(n)
        for start in range(0, n - rows + 1, rows):
            idx = order[start:start + rows]
            yield {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in self.rows.items()}

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.glob("checkpoint_*") if p.is_dir())

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        self._barrier()  # every rank sees the same checkpoints before any rank reports a new one
        yield found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        index = self._reports
        self._reports += 1
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.root / f"checkpoint_{index:06d}", dirs_exist_ok=True)
        with open(self.root / f"reports-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({**metrics, "checkpoint": checkpoint_dir is not None}, sort_keys=True) + "\n")
        self._barrier()

    @staticmethod
    def _barrier() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def wait_for_checkpoints(self) -> None:
        """Nothing to wait for: `report` returns once every rank has written its part."""

    def preemption(self) -> dict[str, Any] | None:
        """Processes of one machine: no node is ever preempted."""
        return None

    def start_stream(self, consumed: np.ndarray) -> None:
        """Rows that carry a plan-row id skip those the restored checkpoint consumed, as a stream or store does."""
        if ROW_ID in self.rows and consumed.size:
            keep = ~np.isin(self.rows[ROW_ID], consumed)
            self.rows = {k: v[keep] for k, v in self.rows.items()}

    @staticmethod
    def read_reports(root: str | Path, rank: int = 0) -> list[dict[str, Any]]:
        path = Path(root) / f"reports-rank{rank}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
