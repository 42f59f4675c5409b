"""`synray sweep` end to end on the shapes world: a 2-trial sweep whose driver is killed after its first trial
finished, then `--resume`: the finished trial is not run again, the other completes, the report has both."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synray.sweep.report import TRIAL_FILE, TRIALS_DIR

SETS = ["tune.variants={}", "tune.space={train.temperature: {grid: [0.1, 0.2]}}", "data.num_captions=32",
        "train.steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.warmup_steps=1",
        "eval.heldout_captions=24", "eval.linear_epochs=5", "tune.max_concurrent_trials=1"]
START_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def _sweep(*args: str) -> list[str]:
    return [sys.executable, "-m", "synray.cli", "sweep", *args]


def _wait_for_first_trial(proc: subprocess.Popen, out: Path) -> Path:
    """The first finished trial's record, once Tune's experiment state (what --resume reads) is newer than it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        done = sorted((out / TRIALS_DIR).glob(f"*/{TRIAL_FILE}"))
        states = sorted((out / "tune").glob("experiment_state-*.json"))
        if done and states and states[-1].stat().st_mtime > done[0].stat().st_mtime:
            return done[0]
        time.sleep(1.0)
    raise AssertionError("no trial finished in time")


def test_an_interrupted_2_trial_sweep_resumes_without_rerunning_its_finished_trial(ray_cluster: str, tmp_path: Path):
    out = tmp_path / "sweep"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    sets = [x for s in SETS for x in ("--set", s)]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(_sweep("scaling-local", "--out", str(out), *sets), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            first = _wait_for_first_trial(proc, out)
            record = first.read_text()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    r = subprocess.run(_sweep("--resume", str(out)), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert first.read_text() == record  # the finished trial was not run again
    fits = [json.loads(line) for line in (first.parent / "train" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for m in fits if m.get("event") == "fit_start") == 1
    records = [json.loads(p.read_text()) for p in sorted((out / TRIALS_DIR).glob(f"*/{TRIAL_FILE}"))]
    assert sorted(t["params"]["train.temperature"] for t in records) == [0.1, 0.2]
    assert all(t["steps"] == 4 and t["captions"] == 32 and "knn_accuracy" in t["trained"] for t in records)
    with open(out / "report" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(row["train.temperature"]) for row in rows) == [0.1, 0.2]
    assert "a power-law fit needs at least 3" in r.stdout
