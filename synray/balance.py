"""Stage rates in a plan: each stream stage's expected rows/s, the bottleneck, idle shares, a balanced GPU split, and
whether generating first and training on the store would cost fewer GPU-hours than the stream.

A stage declares its rate per actor (`StageResources.rate`: rows/s while it never waits, with where the figure comes
from). A stream moves at its slowest stage; every other stage waits for the rest of the time (its idle share).
Training works on rows `data.replay` times, so it needs new rows at its rate / replay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from synray.stages import LIGHT_STAGE_CPUS, Rate, StageResources

__all__ = ["Rate", "StageRate", "StreamRates", "stream_rates", "GpuSplit", "balanced_split", "Costs", "stream_costs",
           "TRAINING_STAGE", "gpu_stages"]

TRAINING_STAGE = "training workers"


@dataclass(frozen=True)
class StageRate:
    stage: StageResources
    rows_per_s: float        # the whole stage (actors x rate), in new rows of the stream (training: / replay)
    idle_share: float        # of its time, at the bottleneck's pace

    @property
    def name(self) -> str:
        return self.stage.stage


@dataclass(frozen=True)
class StreamRates:
    stages: tuple[StageRate, ...]
    unrated: tuple[str, ...]     # stages that hold an actor pool and declare no rate
    replay: int

    @property
    def bottleneck(self) -> StageRate | None:
        return min(self.stages, key=lambda s: s.rows_per_s) if self.stages else None

    def of(self, stage: str) -> StageRate | None:
        return next((s for s in self.stages if s.name == stage), None)


def gpu_stages(stages: Sequence[StageResources]) -> list[StageResources]:
    """The rated actor pools that hold GPUs (what a GPU split divides)."""
    return [s for s in stages if s.gpus > 0 and s.rate is not None and not s.tasks]


def stage_rows_per_s(stage: StageResources, replay: int = 1) -> float:
    """What a stage handles, in new rows of the stream per second (the training workers' row uses / replay)."""
    assert stage.rate is not None
    uses = replay if stage.stage == TRAINING_STAGE else 1
    return stage.actors * stage.rate.rows_per_s / uses


def stream_rates(stages: Sequence[StageResources], replay: int = 1) -> StreamRates:
    """The rates of the stages that run at the same time (one phase): each stage's rows/s and idle share."""
    rated = [s for s in stages if s.rate is not None and s.actors > 0]
    unrated = tuple(s.stage for s in stages if s.rate is None and not s.tasks and s.actors > 0
                    and (s.gpus > 0 or s.cpus > LIGHT_STAGE_CPUS))
    if not rated:
        return StreamRates((), unrated, replay)
    rates = {s.stage: stage_rows_per_s(s, replay) for s in rated}
    slowest = min(rates.values())
    return StreamRates(tuple(StageRate(s, rates[s.stage], 1.0 - slowest / rates[s.stage]) for s in rated),
                       unrated, replay)


# ------------------------------------------------------------------------------------- GPU split
@dataclass(frozen=True)
class GpuSplit:
    """Whole GPUs per GPU stage, and the stream's rate with them (new rows/s)."""

    gpus: dict[str, int]
    rows_per_s: float


def _per_gpu(stage: StageResources, replay: int) -> float:
    """New rows/s one GPU's worth of the stage gives."""
    return stage_rows_per_s(stage, replay) / (stage.actors * stage.gpus)


def balanced_split(stages: Sequence[StageResources], budget: int, replay: int = 1) -> GpuSplit | None:
    """The split of `budget` whole GPUs among the rated GPU stages (at least one GPU each) that makes the stream
    fastest: the largest minimum over stages of GPUs x rate per GPU (None when the stages outnumber the GPUs)."""
    pools = gpu_stages(stages)
    if not pools or budget < len(pools):
        return None
    per_gpu = [_per_gpu(s, replay) for s in pools]
    best: tuple[float, tuple[int, ...]] | None = None
    for counts in _compositions(budget, len(pools)):
        rate = min(n * r for n, r in zip(counts, per_gpu))
        if best is None or rate > best[0] + 1e-12:
            best = (rate, counts)
    assert best is not None
    return GpuSplit({s.stage: n for s, n in zip(pools, best[1])}, best[0])


def _compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """Every way to write `total` as `parts` positive integers, in order."""
    if parts == 1:
        return [(total,)]
    return [(first, *rest) for first in range(1, total - parts + 2) for rest in _compositions(total - first, parts - 1)]


# ----------------------------------------------------------------------------- stream or stored
@dataclass(frozen=True)
class Costs:
    """GPU-hours of the run's rows and steps: streamed, or generated on every GPU first and then trained on."""

    stream_gpu_h: float
    stored_gpu_h: float
    stream_h: float          # wall-clock hours of each
    stored_h: float

    @property
    def stored_is_cheaper(self) -> bool:
        return self.stored_gpu_h < self.stream_gpu_h


def stream_costs(stages: Sequence[StageResources], rows: int, train_row_uses: int, replay: int = 1) -> Costs | None:
    """The GPU-hours of `rows` new rows trained on `train_row_uses` times in all (steps x rows a step, at most rows x
    replay): in a stream every GPU stage is held until both are done; generated first, all the stream's GPUs go to
    generation (split between its GPU stages for the fastest rate), then the training workers alone train on the
    store as many row uses at their own rate."""
    pools = gpu_stages(stages)
    train = next((s for s in pools if s.stage == TRAINING_STAGE), None)
    generation = [s for s in pools if s.stage != TRAINING_STAGE]
    if train is None or not generation:
        return None
    gpus = sum(s.actors * s.gpus for s in pools)
    gen_rate = min(stage_rows_per_s(s) for s in generation)
    train_uses_per_s = stage_rows_per_s(train)     # row uses per second at full speed
    uses = min(train_row_uses, rows * replay)        # a stream ends with its rows
    stream_s = max(rows / gen_rate, uses / train_uses_per_s)
    split = balanced_split(generation, max(len(generation), math.floor(gpus)))
    gen_s = rows / split.rows_per_s if split else rows / gen_rate
    train_s = uses / train_uses_per_s
    train_gpus = train.actors * train.gpus
    return Costs(stream_gpu_h=gpus * stream_s / 3600, stored_gpu_h=(gpus * gen_s + train_gpus * train_s) / 3600,
                 stream_h=stream_s / 3600, stored_h=(gen_s + train_s) / 3600)
