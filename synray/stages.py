"""Stages of a Ray Data pipeline, each declared once: what it asks of the cluster and how it joins a Dataset.

A pipeline (the generation stream, the training input, the held-out feature pass) is a list of `Stage`s. Each
stage's `resources` are computed from the config (and facts the planning step knows, such as whether a store's rows
carry row ids); its `add` puts it on a Dataset with exactly those resources (`map_stage`). Execution builds the
Dataset from the list (`build`); `synray plan`, the placement check and a sweep trial's resources read the same
list, so what a run is planned to hold is what it starts (tests/test_stages_run.py compares both with Ray's state).

A new stage is one `Stage` in the list of the pipeline it belongs to (synray.generation.pipeline, synray.pipelines,
synray.train.preprocess, synray.eval.evaluate), made with `map_stage` or a read function that takes its resources.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["LIGHT_STAGE_CPUS", "TRAINING_PHASE", "EVAL_PHASE", "Rate", "StageResources", "Stage", "map_stage", "build",
           "stage_resources", "by_phase", "remote_args"]

#: CPUs of the light single-actor stages (planning rows, caption clean-up, shard writing, skipping consumed rows)
LIGHT_STAGE_CPUS = 0.25
TRAINING_PHASE = "training"
#: the stage of the training group's workers (its size may vary: an elastic group)
TRAINING_WORKERS = "training workers"
EVAL_PHASE = "evaluation"


@dataclass(frozen=True)
class Rate:
    """Rows (captions) one actor of a stage handles per second when it never waits, and where the figure comes from
    (a reference measurement scaled to the settings, a config value, or a measured run)."""

    rows_per_s: float
    source: str


@dataclass(frozen=True)
class StageResources:
    """A stage's actors (or tasks, or workers), what each asks of the cluster, and the config keys that size it."""

    stage: str
    actors: int
    cpus: float
    gpus: float = 0.0
    custom: Mapping[str, float] = field(default_factory=dict)
    keys: tuple[str, ...] = ()   # the config keys of (the actor count, CPUs per actor, GPUs per actor)
    phase: str = TRAINING_PHASE
    tasks: bool = False   # short tasks, not actors (`actors` of them at once): they need room on some node now
    # and then, and hold nothing
    udf: str = ""         # what Ray names its actors or tasks after: the function or class the stage maps
    rate: Rate | None = None   # expected rows/s per actor (training workers: row uses/s); None: not declared
    rate_key: str = ""         # the `rates` key that overrides it (rates.images, ...)
    min_actors: int | None = None   # an elastic group's fewest (`actors`: its most); None: a fixed count

    def smallest(self) -> "StageResources":
        """The stage at its fewest actors (an elastic group's smallest size; a fixed stage as it is)."""
        return self if self.min_actors is None else replace(self, actors=self.min_actors, min_actors=None)

    def bundle(self) -> dict[str, float]:
        """One actor's resource request, as Ray sees it."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {}), **self.custom}

    def total(self, key: str) -> float:
        """What the stage holds of one resource while it runs (tasks hold nothing for long)."""
        return 0.0 if self.tasks else self.actors * self.bundle().get(key, 0.0)

    def describe(self) -> str:
        each = f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        each += "".join(f" + {v:g} {k}" for k, v in self.custom.items())
        kind = " tasks" if self.tasks else ""
        keys = ", ".join(k for k in self.keys if k)
        count = f"{self.min_actors}-{self.actors}" if self.min_actors is not None else str(self.actors)
        return f"{self.stage}: {count}{kind} x ({each})" + (f"  [{keys}]" if keys else "")

    def keys_for(self, resource: str) -> list[str]:
        """The settings that decide how much of `resource` the stage holds: its actor count and per-actor amount."""
        per_actor = {"CPU": 1, "GPU": 2}.get(resource)
        return [k for i, k in enumerate(self.keys) if k and (i == 0 or i == per_actor)]


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: the resources it holds (one entry, or several for a stage that Ray Data lays out as
    several operators, such as a vLLM processor) and how it is added to the Dataset built so far (None for the
    first stage, which makes the Dataset)."""

    resources: tuple[StageResources, ...]
    add: Callable[[Any], Any] | None   # None: not a Dataset operator (Ray Train's workers, fed by the Dataset)


def remote_args(res: StageResources) -> dict[str, Any]:
    """The Ray Data arguments that give a stage's actors or tasks its resources."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy   # here: planning reads this module without Ray

    return {"compute": (TaskPoolStrategy if res.tasks else ActorPoolStrategy)(size=res.actors), "num_cpus": res.cpus,
            **({"num_gpus": res.gpus} if res.gpus else {}), **({"resources": dict(res.custom)} if res.custom else {})}


def map_stage(ds: Any, res: StageResources, fn: Any, **kwargs: Any) -> Any:
    """``ds.map_batches(fn, **kwargs)`` with the stage's own resources."""
    return ds.map_batches(fn, **remote_args(res), **kwargs)


def build(stages: Sequence[Stage]) -> Any:
    """The Dataset of a pipeline: each stage added to what the ones before it built."""
    ds = None
    for stage in stages:
        if stage.add is not None:
            ds = stage.add(ds)
    return ds


def by_phase(stages: Sequence[StageResources]) -> dict[str, tuple[StageResources, ...]]:
    """The stages that hold resources at the same time, per phase, in the order the phases first come."""
    out: dict[str, tuple[StageResources, ...]] = {}
    for s in stages:
        out[s.phase] = out.get(s.phase, ()) + (s,)
    return out


def stage_resources(stages: Sequence[Stage]) -> list[StageResources]:
    """What a pipeline holds, stage by stage, as `synray plan` and the placement check read it."""
    return [r for s in stages for r in s.resources]
