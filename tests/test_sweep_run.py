"""`synray sweep` end to end on the shapes world: the sweep drill.

A 3-trial sweep over the learning rate under ASHA, one trial at a time, whose driver is killed after its first
trial finished; then `python jobs/sweep.py --resume` (the resubmitted job): the finished trial is not run again,
the pool is not generated again, the second trial completes, and ASHA stops the third (which learns nothing) at a
rung where its loss is above the second's. The report lists all three."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from runs import LRS, _stores
from synray.sweep.report import TRIAL_FILE, TRIALS_DIR


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
