"""The plan is what runs: the actors and tasks Ray started for a run (read back from Ray's state API by the run's job
id) are the stages its plan listed, with the resources the plan listed.

Checked on the suite's shared runs: the stored run (jobs/train.py resubmitted: CLIP on a store, then kNN and
zero-shot on an evaluation dataset) and the stream+store run (jobs/pipeline.py submitted to the suite's Ray); a sweep
trial is checked in test_sweep_run.py with the same helper."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from synray.plan import load_run_config, plan_run
from synray.stages import StageResources

#: Ray's per-bundle name of a placement group's resources: CPU_group_<bundle>_<group id>
_BUNDLE = re.compile(r"^(?P<key>[A-Za-z_]+?)_group_(?P<index>\d+)_[0-9a-f]+$")


def held(required: dict[str, float]) -> dict[str, float]:
    """What an actor or task holds, as a plan states it: a placement group's bundle resources as the plain ones
    (Ray Train's workers); Ray's bookkeeping resources (node:..., bundle_group...) and Ray Data's memory estimate
    (not a reservation) left out."""
    out: dict[str, float] = {}
    for key, value in required.items():
        if key.startswith("node:") or key.startswith("bundle_group") or key == "memory":
            continue
        m = _BUNDLE.match(key)
        if m:
            if m["key"] != "bundle":
                out[m["key"]] = out.get(m["key"], 0.0) + value
        elif "_group_" not in key:
            out[key] = out.get(key, 0.0) + value
    return {k: round(v, 4) for k, v in out.items() if v}


def _ops(name: str) -> list[str]:
    """The operators of a Ray Data actor or task name ("MapWorker(A->MapBatches(X))" -> ["A", "X"])."""
    name = name.removeprefix("MapWorker(").removesuffix(")") if name.startswith("MapWorker(") else name
    return [op[len("MapBatches("):-1] if op.startswith("MapBatches(") else op for op in name.split("->")]


def _matches(op: str, udf: str) -> bool:
    return op == udf or (udf[:1].isupper() and op.startswith(udf))   # ReadFiles: ReadFilesParquetV2


def started(job_id: str, address: str) -> tuple[Counter, list[tuple[list[str], dict[str, float]]]]:
    """The actors (by their last operator, with what each holds) and the tasks (their operators, what each holds)
    that Ray started for a job, those that hold resources only."""
    from ray.util.state import list_actors, list_tasks

    actors: Counter = Counter()
    for a in list_actors(address=address, filters=[("job_id", "=", job_id)], limit=10_000, detail=True):
        resources = held(a.required_resources or {})
        if resources:
            # a class defined in a function reads `wrap_function.<locals>.ImplicitFunc` (Tune's trial driver) when
            # Ray registers it from a pickle (a resumed sweep), else `ImplicitFunc`: the class's own name
            actors[(_ops(a.class_name)[-1].rsplit(".", 1)[-1], json.dumps(resources, sort_keys=True))] += 1
    tasks = []
    for t in list_tasks(address=address, filters=[("job_id", "=", job_id)], limit=10_000, detail=True):
        resources = held(t.required_resources or {})
        if t.type == "NORMAL_TASK" and resources:
            tasks.append((_ops(t.name), resources))
    return actors, tasks


def check_plan_ran(stages: list[StageResources], job_id: str, address: str, workers: int) -> None:
    """Every actor and task that held resources is a planned stage with the resources the plan gave it; every planned
    actor stage ran, at least its actor count (a store read in epochs starts its pools once per epoch); the training
    workers ran as one group."""
    actors, tasks = started(job_id, address)
    planned: Counter = Counter()
    for s in stages:
        if not s.tasks:
            planned[(s.udf, json.dumps({k: round(v, 4) for k, v in s.bundle().items() if v}, sort_keys=True))] += \
                s.actors
    unplanned = [key for key in actors if key not in planned]
    assert not unplanned, (unplanned, sorted(planned))
    for key, count in planned.items():
        assert actors[key] >= count, (key, actors[key], count)
    assert sum(n for (udf, _), n in actors.items() if udf == "RayTrainWorker") == workers
    task_stages = [s for s in stages if s.tasks]
    for ops, resources in tasks:
        assert any(_matches(ops[-1], s.udf) and s.bundle() == resources for s in task_stages), (ops, resources,
                                                                                                 task_stages)


def _plan_of(run_dir: Path) -> Any:
    return plan_run(load_run_config(str(run_dir / "config.yaml")))


def test_the_stored_run_started_the_stages_its_plan_listed(stored_runs, ray_cluster):
    summary = json.loads((stored_runs.run_dir / "summary.json").read_text())
    plan = _plan_of(stored_runs.run_dir)
    assert plan.data.mode == "stored" and {s.udf for s in plan.stages} >= {"ReadFiles", "FeatureExtractor"}
    check_plan_ran(list(plan.stages), summary["ray_job_id"], ray_cluster, plan.cfg.train.num_workers)


def test_the_stream_and_store_run_started_the_stages_its_plan_listed(stream_drill, ray_cluster):
    summary = json.loads((stream_drill.run_dir / "summary.json").read_text())
    plan = _plan_of(stream_drill.run_dir)
    assert plan.data.mode == "stream+store" and {s.udf for s in plan.stages} >= {"ShardWriter", "PlanRows"}
    check_plan_ran(list(plan.stages), summary["ray_job_id"], ray_cluster, plan.cfg.train.num_workers)
