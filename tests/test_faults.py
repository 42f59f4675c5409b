"""Fault injection on the real pipeline: processes killed by pid in the middle of the work, then what survived.

Each test runs a `synray` command in a subprocess against the suite's Ray, kills a process (a vLLM engine
actor, a diffusion actor, a training worker, the driver) when the work has reached a given point, lets the
job recover or reruns the same command, and then checks the store and the training log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from conftest import small_config

#: how long a test waits for the point where it kills something
WAIT_S = 600


def ray_processes(title: str) -> list[psutil.Process]:
    """Ray worker processes whose title (`ray::ClassName...`) contains `title`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if cmd.startswith("ray::") and title in cmd:
            found.append(proc)
    return found


def kill_one(title: str) -> int:
    """SIGKILL one live Ray process of that title; its pid."""
    (proc, *_) = ray_processes(title) or [None]
    assert proc is not None, f"no process {title!r} to kill"
    proc.send_signal(signal.SIGKILL)
    return proc.pid


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert proc.poll() is None, f"the command ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def cli(args: list[str], overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "synray.cli", *args] + [a for o in overrides for a in ("--set", o)]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_driver(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stored_rows(store: Path, columns: list[str] | None = None) -> list[dict]:
    return [r for s in sorted(store.glob("shard-*.parquet")) for r in pq.read_table(s, columns=columns).to_pylist()]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ fast
def test_an_unfinished_run_of_the_same_config_is_continued(tmp_path: Path):
    from synray.programs.rundir import RunDir

    cfg = small_config(f"output_root={tmp_path}")
    first = RunDir.create(cfg)
    assert RunDir.unfinished(cfg) is None            # nothing trained yet
    (first.path / "train").mkdir()
    assert RunDir.unfinished(cfg).path == first.path  # trained, no summary: its driver died
    other = small_config(f"output_root={tmp_path}", "train.steps=5")
    assert RunDir.unfinished(other) is None           # another config never continues it
    first.write_summary({"done": True})
    assert RunDir.unfinished(cfg) is None             # finished


# ------------------------------------------------------------------------------- real kills
@pytest.mark.slow
def test_generate_survives_killed_engine_renderer_and_driver(ray_cluster: str, tmp_path: Path, vllm_engine):
    """vLLM engine actor and diffusion actor killed: the job recovers by itself; the driver killed: the same
    command run again completes. Every caption id is stored once; rows regenerate from their provenance."""
    from synray.captions.cleanup import clean_caption
    from synray.generation.regenerate import regenerate_caption, regenerate_images

    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    store = tmp_path / "store"
    wanted = 96
    overrides = [f"data.num_captions={wanted}", "data.rows_per_shard=4", "images.per_caption=2", "images.steps=4"]
    cmd = cli(["generate", "local", "--out", str(store)], overrides)
    proc = start(cmd, env, tmp_path / "first.log")
    wait_until(lambda: bool(ray_processes("vLLMEngineStageUDF")), proc, "the vLLM engine actor")
    time.sleep(3)
    kill_one("vLLMEngineStageUDF")
    wait_until(lambda: len(list(store.glob("shard-*.parquet"))) >= 1, proc, "the first shard")
    kill_one("DiffusionRenderer")
    shards_at_restart = len(list(store.glob("shard-*.parquet")))
    wait_until(lambda: len(list(store.glob("shard-*.parquet"))) > shards_at_restart, proc,
               "a shard after the diffusion actor's restart")
    kill_driver(proc)
    settle_deadline = time.monotonic() + WAIT_S  # the job's actors die after their driver; a writer may commit
    while ray_processes("ShardWriter") and time.monotonic() < settle_deadline:  # one last whole shard
        time.sleep(0.5)
    before = len(stored_rows(store, ["caption_id"]))
    assert 0 < before < wanted, "the driver was to die in the middle of the work"

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((store / "_summary.json").read_text())
    assert summary["rows_before"] == before and summary["rows_total"] == wanted

    rows = stored_rows(store)
    ids = [r["caption_id"] for r in rows]
    assert len(ids) == wanted and len(set(ids)) == wanted, "every caption id exactly once"
    cleanup = small_config().captions.cleanup
    for row in rows[::12]:  # rows of both runs, from either side of every kill
        assert regenerate_images(row) == list(row["images"])
    again = [clean_caption(regenerate_caption(row, vllm_engine), cleanup)[0] for row in rows]
    assert again == [row["caption"] for row in rows]


@pytest.mark.slow
def test_run_stream_store_survives_killed_worker_and_driver(ray_cluster: str, tmp_path: Path):
    """`synray run` in stream+store: a training worker killed (the group restarts from its checkpoint and the
    stream goes on without regenerating), then the driver killed and the same command run again (it continues
    the run from its latest checkpoint). Each caption id is stored once, no row is trained on twice, every
    consumed row is a stored one, and the steps after each failure follow the checkpoint it resumed."""
    from synray.data.ledger import load_consumed
    from synray.generation.regenerate import regenerate_images

    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    store, runs = tmp_path / "store", tmp_path / "runs"
    steps, every, rows_per_step = 10, 2, 4
    overrides = ["captions.backend=template", "captions.style=concept_background", "data.num_captions=48",
                 "data.mode=stream+store", f"data.store_dir={store}", "data.rows_per_shard=4",
                 "images.per_caption=2", "images.steps=2", f"train.steps={steps}", "train.captions_per_worker=2",
                 "train.log_every=1", f"train.checkpoint_every={every}", "eval.enabled=false",
                 f"output_root={runs}"]
    cmd = cli(["run", "local"], overrides)
    proc = start(cmd, env, tmp_path / "first.log")

    def logged_steps() -> list[int]:
        found = list(runs.glob("local-*/train/metrics.jsonl"))
        return [r["step"] for r in metrics(found[0].parent.parent) if "loss" in r] if found else []

    wait_until(lambda: max(logged_steps(), default=0) >= 3, proc, "step 3")
    kill_one("RayTrainWorker")
    wait_until(lambda: max(logged_steps(), default=0) >= 7, proc, "step 7 after the worker's restart")
    kill_driver(proc)

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "continuing the unfinished run" in again.stderr + again.stdout
    (run_dir,) = list(runs.glob("local-*"))
    log = metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == steps and summary["train"]["worker_failures"] >= 1

    # after each failure (worker, driver) the steps go on from a checkpoint taken before it
    cuts = [i for i, r in enumerate(log) if r.get("event") == "worker_failure"]
    cuts += [i for i, r in enumerate(log) if r.get("event") == "fit_start"][1:]
    assert len(cuts) >= 2
    for cut in cuts:
        before = [r["step"] for r in log[:cut] if "loss" in r]
        after = next(r["step"] for r in log[cut + 1:] if "loss" in r)
        resumed = after - 1
        assert resumed % every == 0 and resumed <= before[-1], (before, after)
        assert before[-1] - resumed <= every, "resumed from the last checkpoint, not an older one"

    consumed = load_consumed(Path(summary["train"]["checkpoint"]))
    assert len(consumed) == steps * rows_per_step, "a row trained on before a checkpoint was trained on again"
    rows = stored_rows(store)
    ids = [r["caption_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a caption id stored twice"
    assert set(consumed.tolist()) <= {r["row_id"] for r in rows}, "trained on a row the store does not hold"
    for row in rows[::6]:
        assert regenerate_images(row) == list(row["images"])
