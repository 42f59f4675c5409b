"""Bench (d): stream mode on a simulated GPU cluster, end to end vs its slowest stage alone.

Ray is started with declared GPUs, and the stream has the shape of synray's stream mode (planned rows
-> caption engines -> diffusion actors, each on a GPU, -> training workers on GPUs fed through
`streaming_split`, as Ray Train feeds them), but each stage's work is a sleep calibrated to a per-actor
rate. What is measured is then Ray's scheduling, backpressure and resource budgets, not the models.
Each split is run end to end, then with only its slowest stage's cost left in (that stage "alone",
through the same pipeline); the ratio is the end-to-end rate over the alone rate. The end-to-end run also
measures each stage's busy share (its actors' work over their time in the run: what `synray plan` calls
1 - idle share), reported beside the share the plan's arithmetic predicts from the same rates
(`synray.balance.stream_rates`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from synray.bench.report import Ratio

__all__ = ["SimStage", "Split", "SPLITS", "bench_cluster", "SIM_GPUS", "SIM_CPUS"]

GOAL = 0.9
#: a stage's measured busy share over the plan's predicted one (pipeline fill and drain lower it)
BUSY_GOAL = 0.8
#: the simulated node: logical CPUs and GPUs declared to a local Ray
SIM_CPUS, SIM_GPUS = 16, 5
#: rows per Ray Data batch and per training step of a worker
BATCH_ROWS = 16
#: bytes a row carries out of the caption stage and out of the diffusion stage (a caption; m encoded images)
CAPTION_BYTES, IMAGE_BYTES = 512, 64 * 1024
#: CPUs each simulated actor asks for (they sleep)
ACTOR_CPUS = 0.25
#: the share of rows at the start of a run left out of its rate (pipeline fill)
FILL_FRACTION = 0.15


@dataclass(frozen=True)
class SimStage:
    """One stage: its actors (one GPU each) and the rows per second each can do."""

    name: str
    actors: int
    rows_per_s: float        # per actor; 0 = free (the stage is left out of the cost)

    @property
    def capacity(self) -> float:
        return self.actors * self.rows_per_s if self.rows_per_s else float("inf")

    def seconds_per_row(self) -> float:
        return 1.0 / self.rows_per_s if self.rows_per_s else 0.0


@dataclass(frozen=True)
class Split:
    """Caption engines, diffusion actors and training workers of one simulated run."""

    name: str
    captions: SimStage
    images: SimStage
    train: SimStage

    @property
    def stages(self) -> tuple[SimStage, ...]:
        return self.captions, self.images, self.train

    def only(self, keep: str) -> "Split":
        """The same split with every stage but `keep` free."""
        free = {s.name: replace(s, rows_per_s=0.0) for s in self.stages if s.name != keep}
        return replace(self, **{f: free.get(getattr(self, f).name, getattr(self, f))
                                for f in ("captions", "images", "train")})


#: 1 caption engine + 2 diffusion actors + 2 training workers = 5 GPUs
SPLITS = (
    Split("generation-bound", SimStage("captions", 1, 400.0), SimStage("images", 2, 50.0), SimStage("train", 2, 100.0)),
    Split("training-bound", SimStage("captions", 1, 400.0), SimStage("images", 2, 100.0), SimStage("train", 2, 50.0)),
)


def _work(seconds: float) -> float:
    """Sleep for a stage's cost; the seconds it took (a busy time)."""
    t0 = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - t0


class Captioner:
    """A caption engine's cost: a sleep per row; each row gains a caption-sized payload and its share of the busy
    time."""

    def __init__(self, seconds_per_row: float) -> None:
        self.s = seconds_per_row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        busy = _work(self.s * n)
        return {"id": batch["id"], "caption": np.asarray([b"c" * CAPTION_BYTES] * n, dtype=object),
                "busy_captions": np.full(n, busy / n)}


class Renderer:
    """A diffusion actor's cost: a sleep per row; each row gains an image-sized payload and its busy time."""

    def __init__(self, seconds_per_row: float) -> None:
        self.s = seconds_per_row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        busy = _work(self.s * n)
        images = np.zeros((n, IMAGE_BYTES), dtype=np.uint8)
        return {**batch, "images": images, "busy_images": np.full(n, busy / n)}


@ray.remote(num_cpus=ACTOR_CPUS, num_gpus=1)
class SimWorker:
    """A training worker's cost: a sleep per step of BATCH_ROWS rows; records when each step ended."""

    def run(self, shard: Any, seconds_per_row: float) -> list[tuple[float, int, dict[str, float]]]:
        """(end time, rows, busy seconds by stage) of each step."""
        done = []
        for batch in shard.iter_batches(batch_size=BATCH_ROWS, drop_last=True, prefetch_batches=2):
            busy = {"train": _work(seconds_per_row * len(batch["id"]))}
            busy.update({k.removeprefix("busy_"): float(v.sum()) for k, v in batch.items() if k.startswith("busy_")})
            done.append((time.time(), len(batch["id"]), busy))
        return done


def run_split(split: Split, rows: int, workers: list[Any]) -> tuple[float, dict[str, float]]:
    """Rows per second the training workers consumed, after the first FILL_FRACTION of the rows; and each stage's
    busy share over the same steps (the busy seconds of their rows / (actors x the steps' span))."""
    ds = ray.data.range(rows, override_num_blocks=max(1, rows // BATCH_ROWS))
    for stage, udf in ((split.captions, Captioner), (split.images, Renderer)):
        ds = ds.map_batches(udf, fn_constructor_kwargs={"seconds_per_row": stage.seconds_per_row()},
                            batch_size=BATCH_ROWS, compute=ActorPoolStrategy(size=stage.actors),
                            num_cpus=ACTOR_CPUS, num_gpus=1)
    shards = ds.streaming_split(len(workers), equal=True)
    steps = sorted(s for done in ray.get([w.run.remote(shard, split.train.seconds_per_row())
                                          for w, shard in zip(workers, shards)]) for s in done)
    skip = next(i for i, _ in enumerate(steps) if sum(s[1] for s in steps[:i + 1]) >= FILL_FRACTION * rows)
    span = steps[-1][0] - steps[skip][0]
    window = steps[skip + 1:]
    busy = {s.name: sum(step[2].get(s.name, 0.0) for step in window) / (s.actors * max(span, 1e-9))
            for s in split.stages if s.rows_per_s}
    return sum(s[1] for s in steps[skip + 1:]) / max(span, 1e-9), busy


def predicted_busy(split: Split) -> dict[str, float]:
    """Each stage's busy share by `synray plan`'s arithmetic: the bottleneck's rate over the stage's."""
    from synray.balance import stream_rates
    from synray.stages import Rate, StageResources

    rates = stream_rates([StageResources(s.name, s.actors, ACTOR_CPUS, 1.0, rate=Rate(s.rows_per_s, "calibrated"))
                          for s in split.stages])
    return {s.name: 1.0 - s.idle_share for s in rates.stages}


def bench_cluster(quick: bool) -> list[Ratio]:
    """(d): end-to-end rate / slowest stage alone, for each split. Needs a Ray with SIM_GPUS declared GPUs."""
    gpus = ray.cluster_resources().get("GPU", 0)
    need = max(sum(s.actors for s in split.stages) for split in SPLITS)
    if gpus < need:
        raise RuntimeError(f"the simulated cluster needs {need} declared GPUs; Ray has {gpus}")
    out = []
    for split in SPLITS:
        workers = [SimWorker.remote() for _ in range(split.train.actors)]  # Ray Train's workers outlive epochs too
        slowest = min(split.stages, key=lambda s: s.capacity)
        rows = int(slowest.capacity * (5 if quick else 40))  # about 5 s (40 s) of the bottleneck's work
        end_to_end, busy = run_split(split, rows, workers)
        alone, _ = run_split(split.only(slowest.name), rows, workers)
        for w in workers:
            ray.kill(w)
        predicted = predicted_busy(split)
        detail = {"end_to_end_rows_per_s": end_to_end, "slowest_stage": slowest.name, "alone_rows_per_s": alone,
                  "rows": rows, "calibrated_rows_per_s": {s.name: s.capacity for s in split.stages},
                  "actors": {s.name: s.actors for s in split.stages},
                  "idle_share": {k: 1.0 - v for k, v in busy.items()},
                  "predicted_idle_share": {k: 1.0 - v for k, v in predicted.items()}}
        out.append(Ratio(f"d.stream_{split.name}", f"end-to-end stream rows/s / slowest stage alone, simulated "
                         f"{need}-GPU cluster, {split.name}", end_to_end / alone, GOAL, detail=detail))
        out += [Ratio(f"d.busy_{split.name}_{name}", f"{name} busy share in the stream (1 - idle share) / synray "
                      f"plan's prediction from the stage rates, {split.name}", busy[name] / predicted[name],
                      BUSY_GOAL, detail={"busy_share": busy[name], "predicted_busy_share": predicted[name]})
                for name in busy]
    return out
