"""The suite's shared end-to-end runs (a pytest plugin of conftest.py): each is a session fixture that runs once,
whichever test asks first, and hands its outputs and what was seen on the way to every test that asserts on them.

- `stream_drill`: `synray run local` in stream+store mode with a training worker and then its driver killed, and the
  same run submitted with `ray job submit` to the suite's Ray, where it continues.
- `generated_store`: `synray generate local` (tiny vLLM -> tiny diffusers -> Parquet) with its vLLM engine actor
  and its diffusion actor killed mid-batch and its driver killed, then `jobs/generate.py` submitted again.
- `shapes_run`: `synray run shapes-synclr` in plain stream mode with a worker killed at step 3, its run directory
  (checkpoints included) on the suite's S3.
- `stored_runs`: CLIP training from a LaCLIP store on S3, evaluated on the generated store (also read from S3):
  `jobs/train.py` running out of `train.max_failures`, `synray train --fresh` (stopped once it chose its run
  directory), then `python jobs/train.py` submitted again, which continues the unfinished run to the end.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from synray.sweep.report import TRIAL_FILE, TRIALS_DIR
from procs import (Result, cli, in_process, job, kill_group, kill_pid, load_job, ray_env, ray_processes, run,
                   running_task, sets, task_outcome, start, stored_rows, synray_main, wait_until, metrics_log)

# ------------------------------------------------------------------------------------ generation
#: the generate drill: 48 captions x 3 images through vLLM and diffusers, 4 rows a shard. The engine runs one
#: sequence at a time and the renderer 20 denoising steps, so that their batches last long enough to be killed
#: in the middle (the tiny models finish every batch within a second otherwise).
GENERATE_SETS = ("data.num_captions=48", "images.per_caption=3", "images.steps=20", "data.rows_per_shard=4",
                 "captions.engine.batch_size=4", "captions.engine.extra={max_num_seqs: 1}")
#: tries at killing an actor while it runs a batch (a kill that lands just after the batch ended is tried again)
KILL_TRIES = 3
GENERATED_ROWS = 48
ENGINE, RENDERER, WRITER = "vLLMEngineStageUDF", "DiffusionRenderer", "ShardWriter"


@dataclass
class GenerateDrill:
    """The suite's generated store and how it was made: `killed` and `restarted` map an actor to the pid killed and
    to a pid of the same actor seen alive after the kill, `tasks` to the method call it was running when killed;
    `rows_before` were stored when the killed job was gone."""

    store: Path
    cfg: Any
    killed: dict[str, int]
    restarted: dict[str, int]
    tasks: dict[str, str]
    rows_before: int
    rerun: subprocess.CompletedProcess
    summary: dict[str, Any]

    @property
    def dir(self) -> str:
        return str(self.store)


def _shards(store: Path) -> int:
    return len(list(store.glob("shard-*.parquet")))


def _restarted(title: str, killed: int) -> int | None:
    alive = [p.pid for p in ray_processes(title) if p.pid != killed]
    return alive[0] if alive else None


@pytest.fixture(scope="session")
def generated_store(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> GenerateDrill:
    """`synray generate local` in its own process against the suite's Ray: the vLLM engine actor is killed while it
    runs a batch, the diffusion actor while it renders one after the first shard, and the driver after the next
    shard; then `python jobs/generate.py` (the resubmitted job) completes the store."""
    from synray.plan import load_run_config

    root = tmp_path_factory.mktemp("generate")
    store = root / "store"
    env = ray_env(ray_cluster)
    args = ("local", "--out", str(store), *sets(*GENERATE_SETS))
    others = {p.pid for p in ray_processes(WRITER)}   # store writers of other runs on the suite's Ray
    proc = start(cli("generate", *args), env, root / "first.log")
    killed, restarted, tasks = {}, {}, {}

    def kill_busy(actor: str) -> int:
        """SIGKILL `actor` while it runs a batch, and wait until that call has failed and a new process of the
        actor is up; the shards stored at the kill."""
        for _ in range(KILL_TRIES):
            busy = wait_until(lambda: running_task(actor), proc, f"a batch in {actor}")
            shards = _shards(store)
            kill_pid(busy.pid)
            outcome = wait_until(lambda: task_outcome(busy.task_id), proc, f"the end of {busy.name}")
            restarted[actor] = wait_until(lambda: _restarted(actor, busy.pid), proc, f"{actor}'s restart")
            if outcome == "FAILED":   # the call died with the process: its batch had to be retried
                killed[actor], tasks[actor] = busy.pid, busy.name
                return shards
        raise AssertionError(f"{actor}'s batches ended before each of {KILL_TRIES} kills")

    try:
        kill_busy(ENGINE)
        wait_until(lambda: _shards(store) >= 1, proc, "the first shard")
        at_kill = kill_busy(RENDERER)
        wait_until(lambda: _shards(store) > at_kill, proc, "a shard after the diffusion actor's restart")
    except AssertionError:
        print((root / "first.log").read_text()[-5000:])
        raise
    finally:
        kill_group(proc)
    # the job's actors die after their driver; its store writer may still commit one last whole shard
    wait_until(lambda: not {p.pid for p in ray_processes(WRITER)} - others, None,
               "the killed job's store writer to end", every_s=0.5)
    before = len(stored_rows(store, ["caption_id"]))
    rerun = run(job("generate.py", *args), env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads((store / "_summary.json").read_text())
    print(f"generate drill: killed {killed} in {tasks}, restarted {restarted}; {before} rows before the rerun")
    return GenerateDrill(store, load_run_config("local", list(GENERATE_SETS)), killed, restarted, tasks, before,
                         rerun, summary)


# ------------------------------------------------------------------------------------ the stream
#: the stream drill: 60 template captions (about half pass the caption filters) streamed and stored, 4 rows a
#: step, a checkpoint every 2 steps, and a 50-step budget that the stream runs out before
STREAM_STEPS, STREAM_EVERY, STREAM_ROWS_PER_STEP, STREAM_CAPTIONS, STREAM_REPLAY = 50, 2, 4, 60, 2


@dataclass
class StreamDrill:
    run_dir: Path
    store: Path
    job: subprocess.CompletedProcess   # `ray job submit ... jobs/pipeline.py` to the suite's Ray


@pytest.fixture(scope="session")
def stream_drill(ray_cluster: str, ray_jobs: Any, tmp_path_factory: pytest.TempPathFactory) -> StreamDrill:
    """`synray run local` in stream+store mode with each row used up to twice (data.replay), in its own process on
    the suite's Ray: a training worker killed after
    step 3 (the group restarts from its checkpoint and the stream goes on), the driver killed after step 5; then
    the same run submitted with `ray job submit` to the suite's Ray (as after a preemption), which continues it
    until the stream of 60 captions runs out before the 50-step budget. The training workers are killed with the
    driver, as a lost head node takes them: left to Ray, they outlive their driver for a moment, in which they can
    train on to the end of the stream (its rows are ready by then) and leave the resubmitted job nothing to do."""
    root = tmp_path_factory.mktemp("stream")
    store, runs = root / "store", root / "runs"
    overrides = ["captions.backend=template", "captions.style=concept_background",
                 f"data.num_captions={STREAM_CAPTIONS}", "data.mode=stream+store", f"data.store_dir={store}",
                 "data.rows_per_shard=4", "images.per_caption=2", "images.steps=2", f"train.steps={STREAM_STEPS}",
                 "train.captions_per_worker=2", "train.log_every=1", f"train.checkpoint_every={STREAM_EVERY}",
                 f"data.replay={STREAM_REPLAY}",
                 "eval.enabled=false", f"output_root={runs}"]
    proc = start(cli("run", "local", *sets(*overrides)), ray_env(ray_cluster), root / "first.log")

    def last_step() -> int:
        found = list(runs.glob("local-*/train/metrics.jsonl"))
        return max((r["step"] for r in metrics_log(found[0].parent.parent) if "loss" in r), default=0) if found else 0

    workers: list = []
    try:
        wait_until(lambda: last_step() >= 3, proc, "step 3")
        (worker, *_) = ray_processes("RayTrainWorker")
        kill_pid(worker.pid)
        wait_until(lambda: last_step() >= 4, proc, "step 4 after the worker's restart")
        workers = ray_processes("RayTrainWorker")   # found beforehand: the kills must follow step 5 at once
        wait_until(lambda: last_step() >= 5, proc, "step 5", every_s=0.05)
    finally:
        kill_group(proc)
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                kill_pid(worker.pid)
    job = ray_jobs.submit("jobs/pipeline.py", "local", *sets(*overrides))
    (run_dir,) = list(runs.glob("local-*"))
    return StreamDrill(run_dir, store, job)


# -------------------------------------------------------------------------------- the shapes run
#: the `shapes-synclr` world shrunk to 6 steps with a checkpoint every 2, its last worker killed at step 3 (the
#: fault drill), in plain `stream` mode, with every probe against the step-0 network
SHAPES_SETS = ("data.num_captions=120", "train.steps=6", "train.captions_per_worker=4", "train.warmup_steps=1",
               "train.log_every=2", "train.checkpoint_every=2", "train.fail_at_step=3", "train.backbone.size=tiny",
               "eval.heldout_captions=36", "eval.linear_epochs=5", "eval.segmentation_epochs=3")


@dataclass
class ShapesRun:
    """`synray run shapes-synclr` with its run directory (and so Ray Train's checkpoints) under `uri`."""

    result: Result
    uri: str
    bucket: str

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    def read(self, rel: str) -> bytes:
        """A file of the run directory, read from the bucket."""
        from synray.data.storage import Location

        return Location.of(f"{self.uri}/{rel}").read_bytes()

    def summary(self) -> dict[str, Any]:
        return json.loads(self.read("summary.json"))

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.read("train/metrics.jsonl").decode().splitlines()]


@pytest.fixture(scope="session")
def shapes_run(ray_cluster: str, s3_server: dict[str, str], mlflow_server: Any) -> ShapesRun:
    """The run, tracked on the session's MLflow server (test_tracking.py reads it back)."""
    from conftest import S3_BUCKET

    result = synray_main("run", "shapes-synclr", *sets(*SHAPES_SETS, f"output_root=s3://{S3_BUCKET}/runs",
                                                       "tracking.backend=mlflow", f"tracking.uri={mlflow_server.url}"))
    assert result.code == 0, (result.error, result.trace[-3000:], result.log[-3000:])
    (line,) = [x for x in result.out.splitlines() if x.startswith("run directory: ")]
    return ShapesRun(result, line.split(": ", 1)[1], S3_BUCKET)


# ------------------------------------------------------------------------------ the stored runs
#: CLIP (LaCLIP's image-text training) on a store in `synray rewrite`'s layout, made from the generated store's 48
#: rows and kept in the suite's S3 bucket: 8 pairs a step, so an epoch is 6 steps; a checkpoint every 2 steps; the
#: fault drill kills the last worker at step 3, and no restart is allowed
STORED_SETS = ("train.loss=clip", "train.steps=7", "train.captions_per_worker=4", "train.log_every=1",
               "train.checkpoint_every=2", "train.fail_at_step=3", "train.max_failures=0",
               "eval.protocols=[knn, zeroshot]", "tracking.backend=tensorboard")
STORED_EPOCH_STEPS = 6


@dataclass
class StoredRuns:
    """`failed`: `jobs/train.py`'s main (no restart allowed, its worker dies at step 3); `fresh`: `synray train
    --fresh` of the same config, stopped where training would start (the folder it was given); `resumed`: `python
    jobs/train.py` submitted again, which continues the unfinished run to the end."""

    failed: Result
    fresh: Result
    fresh_dir: Path
    resumed: subprocess.CompletedProcess
    run_dir: Path
    overrides: tuple[str, ...]
    store: str

    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "summary.json").read_text())


def laclip_store(generated: GenerateDrill, uri: str) -> str:
    """The generated rows in the layout `synray rewrite` writes (one image, the caption, its rewrites), with their
    `row_id` (so that a restarted epoch skips what its checkpoint trained on), written to `uri`."""
    import pyarrow as pa

    from synray.data.store import ParquetStore

    rows = stored_rows(generated.store, ["caption_id", "row_id", "caption", "images"])
    store = ParquetStore(uri)
    store.open_for_writing("test-rewrite", {"source": "generated_store"})
    store.write_shard(pa.table({
        "caption_id": [r["caption_id"] for r in rows], "row_id": [r["row_id"] for r in rows],
        "image": [r["images"][0] for r in rows], "caption": [r["caption"] for r in rows],
        "rewrites": [[f"a picture of {r['caption']}", "x"] for r in rows]}))
    return uri


@pytest.fixture(scope="session")
def stored_runs(generated_store: GenerateDrill, s3_server: dict[str, str], ray_cluster: str,
                tmp_path_factory: pytest.TempPathFactory) -> StoredRuns:
    from conftest import S3_BUCKET

    from synray.data.storage import copy_tree

    root = tmp_path_factory.mktemp("stored")
    store = laclip_store(generated_store, f"s3://{S3_BUCKET}/laclip")
    heldout = f"s3://{S3_BUCKET}/generated"   # the evaluation set: the generated store, read from the bucket
    copy_tree(generated_store.store, heldout)
    overrides = (*STORED_SETS, f"output_root={root}", f"eval.dataset={heldout}")
    args = ("local", "--data", store, *sets(*overrides))
    env = ray_env(ray_cluster)
    failed = in_process(load_job("train.py").main, list(args))
    (run_dir,) = list(root.glob("local-*"))
    with pytest.MonkeyPatch.context() as patch:   # --fresh is run up to the call that would train
        patch.setattr("synray.programs.run.fit", _stop_at_fit)
        fresh = synray_main("train", *args, "--fresh")
    assert isinstance(fresh.error, FitReached), fresh.error
    resumed = run(job("train.py", *args), env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    return StoredRuns(failed, fresh, fresh.error.out_dir.parent, resumed, run_dir, overrides, store)


class FitReached(Exception):
    """Raised where a run would start training: its training folder."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(str(out_dir))
        self.out_dir = Path(out_dir)


def _stop_at_fit(cfg: Any, plan: Any, dataset: Any, out_dir: Path, *args: Any, **kwargs: Any) -> None:
    raise FitReached(out_dir)


# -------------------------------------------------------------------------------- the sweep drill
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


@pytest.fixture(scope="session")
def sweep_drill(ray_cluster: str, mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The drill, tracked on the session's MLflow server (test_tracking.py reads it back)."""
    root = tmp_path_factory.mktemp("sweep")
    out = root / "sweep"
    env = ray_env(ray_cluster)
    tracked = ("tracking.backend=mlflow", f"tracking.uri={mlflow_server.url}")
    proc = start(cli("sweep", "scaling-local", "--out", str(out), *sets(*SETS, *tracked)), env, root / "first.log")
    try:
        first = _wait_for_first_trial(proc, out)
        record = first.read_text()
    finally:
        kill_group(proc)
    stores = _stores(out)
    resumed = run(job("sweep.py", "--resume", str(out)), env, timeout_s=900)
    return {"out": out, "first": first, "record": record, "stores": stores, "resumed": resumed}
