"""`synray sweep` end to end on the shapes world: the sweep drill.

A 3-trial sweep over the learning rate under ASHA, one trial at a time, whose driver is killed after its first
trial finished; then `python jobs/sweep.py --resume` (the resubmitted job): the finished trial is not run again,
the pool is not generated again, the second trial completes, and ASHA stops the third (which learns nothing) at a
rung where its loss is above the second's. The report lists all three."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from procs import cli, job, kill_group, ray_env, run, sets, start
from synray.sweep.report import TRIAL_FILE, TRIALS_DIR

#: trial 1 barely learns (lr 1e-9) and finishes: nothing ran before it for ASHA to compare it with; trial 2 learns
#: (ASHA compares it with trial 1, and it is better); trial 3 barely learns and runs after trial 2 in the resumed
#: sweep, whose ASHA compares it with trial 2's losses at steps 1, 2 and 4
LRS = [1e-9, 0.003, 1e-8]
#: trials are ranked by their training loss, without probes (a trial's evaluation is the run's: test_train.py)
SETS = ["tune.variants={}", "tune.space={train.lr: {grid: [0.000000001, 0.003, 0.00000001]}}",
        "data.num_captions=32", "train.steps=4", "train.checkpoint_every=2", "train.log_every=1",
        "train.warmup_steps=1", "eval.enabled=false", "tune.metric=loss", "tune.mode=min",
        "tune.max_concurrent_trials=1", "tune.scheduler=asha", "tune.asha_grace_steps=1",
        "tune.asha_reduction_factor=2"]
START_TIMEOUT_S = 600


def _stores(out: Path) -> dict[str, int]:
    """Every shard of the sweep's pools, with its modification time."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "pools").glob("*/shard-*.parquet")}


def _terminated(state: Path) -> set[str]:
    """The trial ids a saved Tune experiment state (what --resume reads) holds as finished."""
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):   # being written
        return set()
    trials = [json.loads(t[0]) for t in data.get("trial_data", [])]
    return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}


def _wait_for_first_trial(proc, out: Path) -> Path:
    """The first finished trial's record, once Tune's saved experiment state holds that trial as finished (a state
    saved after the record was written may still hold it running: under load, the resumed sweep then ran it again)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        done = sorted((out / TRIALS_DIR).glob(f"*/{TRIAL_FILE}"))
        states = sorted((out / "tune").glob("experiment_state-*.json"))
        if done and states and json.loads(done[0].read_text())["trial_id"] in _terminated(states[-1]):
            return done[0]
        time.sleep(1.0)
    raise AssertionError("no trial finished in time")


@pytest.fixture(scope="module")
def sweep_drill(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    out = root / "sweep"
    env = ray_env(ray_cluster)
    proc = start(cli("sweep", "scaling-local", "--out", str(out), *sets(*SETS)), env, root / "first.log")
    try:
        first = _wait_for_first_trial(proc, out)
        record = first.read_text()
    finally:
        kill_group(proc)
    stores = _stores(out)
    resumed = run(job("sweep.py", "--resume", str(out)), env, timeout_s=900)
    return {"out": out, "first": first, "record": record, "stores": stores, "resumed": resumed}


def _rows(out: Path) -> dict[float, dict]:
    with open(out / "report" / "results.csv") as f:
        return {float(row["train.lr"]): row for row in csv.DictReader(f)}


def test_the_resubmitted_sweep_job_completes_without_rerunning_its_finished_trial(sweep_drill):
    r, first = sweep_drill["resumed"], sweep_drill["first"]
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert first.read_text() == sweep_drill["record"]   # the finished trial was not run again
    fits = [json.loads(line) for line in (first.parent / "train" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for m in fits if m.get("event") == "fit_start") == 1
    assert json.loads(sweep_drill["record"])["params"]["train.lr"] == LRS[0]
    records = [json.loads(p.read_text()) for p in sorted((sweep_drill["out"] / TRIALS_DIR).glob(f"*/{TRIAL_FILE}"))]
    assert sorted(t["params"]["train.lr"] for t in records) == sorted(LRS[:2])   # the third never finished
    assert all(t["steps"] == 4 and t["captions"] == 32 and t["train"]["final_loss"] > 0 for t in records)
    # the work the allocation report prices: scaling-local's multi-positive step is 1 worker x 16 captions x 4 images,
    # one view each
    assert all(t["views_per_step"] == 16 * 4 and t["workers"] == 1 and t["work"] == {
        "captions": 32, "images": 32 * 4, "views": 4 * 16 * 4} for t in records)


def test_the_resumed_sweep_does_not_generate_its_pool_again(sweep_drill):
    out = sweep_drill["out"]
    assert sweep_drill["stores"] and _stores(out) == sweep_drill["stores"]   # the same shards, untouched
    (summary,) = [json.loads(p.read_text()) for p in (out / "pools").glob("*/_summary.json")]
    assert summary["rows_written"] == 0 and summary["rows_before"] == summary["rows_total"] == 32


def test_asha_stops_the_trial_that_learns_nothing_and_the_report_lists_it_unfinished(sweep_drill):
    """The report lists the trial ASHA stopped as unfinished with the last step and loss it logged, beside the two
    finished ones; no law is fitted (one data scale)."""
    rows, r = _rows(sweep_drill["out"]), sweep_drill["resumed"]
    assert {lr: row["status"] for lr, row in rows.items()} == {LRS[0]: "finished", LRS[1]: "finished",
                                                               LRS[2]: "unfinished"}
    stopped = rows[LRS[2]]
    assert 1 <= int(stopped["steps"]) <= 4 and float(stopped["final_loss"]) > 0
    assert all(int(rows[lr]["steps"]) == 4 for lr in LRS[:2])
    assert "2 finished trial(s), 1 unfinished" in r.stdout
    assert "a power-law fit needs at least 3" in r.stdout and f"sweep directory: {sweep_drill['out']}" in r.stdout


def test_the_resumed_sweeps_trials_started_the_stages_their_plans_listed(sweep_drill, ray_cluster):
    """Each trial the resubmitted job ran (the second, and the third that ASHA stopped) started what its run plan
    lists (synray.pipelines, as `trial_resources` counts it), plus its Tune function with the trial driver's
    resources (test_stages_run.py's check)."""
    from test_stages_run import check_plan_ran

    from synray.plan import plan_run
    from synray.stages import StageResources
    from synray.sweep.planning import plan_sweep_command
    from synray.sweep.pools import trial_config

    out = sweep_drill["out"]
    sweep = plan_sweep_command(None, [], resume=str(out))
    resumed = [json.loads(p.read_text()) for p in (out / TRIALS_DIR).glob("*/started.json")
               if p.parent.name != sweep_drill["first"].parent.name]
    assert len(resumed) == 2 and len({t["ray_job_id"] for t in resumed}) == 1
    plans = [plan_run(trial_config(sweep.cfg, sweep.space, sweep.data, t["params"]), fresh=True) for t in resumed]
    assert all(p.stages == plans[0].stages for p in plans)   # the trials differ by learning rate only
    driver = sweep.resources.driver
    stages = [*plans[0].stages, StageResources("trial driver", 1, driver["CPU"],
                                               custom={k: v for k, v in driver.items() if k != "CPU"},
                                               udf="ImplicitFunc")]
    check_plan_ran(stages, resumed[0]["ray_job_id"], ray_cluster, len(resumed) * plans[0].cfg.train.num_workers)
