"""Session fixtures shared by the whole suite, and the tiers: a test that needs Ray or a vLLM engine is marked
`slow` by the fixtures it uses, so `make test-fast` (`-m "not slow"`) never starts one; the few other tests that
cost tens of seconds carry the mark themselves.

The end-to-end runs that several tests assert on (the generate drill, the shapes run, the stored runs) are session
fixtures in `runs.py`: each runs once, whichever test asks first.
"""

from __future__ import annotations

import gc
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["runs"]

# Every process of the suite (its Ray, jobs, DeepSpeed's step-test processes) finds this environment's tools first,
# as in an activated environment and on a cluster node's image: a job's `python`, and one `ninja`. DeepSpeed builds
# its CPU communication op with whichever ninja is on PATH, and two ninja versions (the system's and the venv's)
# hash the build command differently, so each rebuilds what the other built: 40 s of compiling each time.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

#: fixtures that start or join a Ray cluster, a vLLM engine or a tracking server: a test that uses one (directly or
#: through another fixture) is `slow`
SLOW_FIXTURES = frozenset({"ray_cluster", "vllm_engine", "mlflow_server"})


#: the shared end-to-end runs (runs.py, and the cluster rehearsal of its module): the test that
#: sets one up pays for the whole run, so it gets 30 minutes instead of the suite's 15 (each run's own waits fail
#: sooner, with the stacks of the processes it waited on)
SHARED_RUNS = {"stream_drill", "generated_store", "shapes_run", "stored_runs", "sweep_drill", "rehearsal"}
SHARED_RUN_TIMEOUT_S = 1800


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & used:
            item.add_marker(pytest.mark.slow)
        if SHARED_RUNS & used:
            item.add_marker(pytest.mark.timeout(SHARED_RUN_TIMEOUT_S))


@pytest.fixture(scope="session", autouse=True)
def synray_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A per-session model cache ($SYNRAY_CACHE), so tests never touch the user's ~/.cache/synray."""
    path = str(tmp_path_factory.mktemp("synray_cache"))
    old = os.environ.get("SYNRAY_CACHE")
    os.environ["SYNRAY_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("SYNRAY_CACHE", None)
    else:
        os.environ["SYNRAY_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_models(synray_cache: str) -> dict[str, str]:
    """The tiny models, built once per session: {"llm": dir, "sd": dir, "text": dir}.

    They are built through resolve_model into the session cache, so code under test that
    resolves `tiny:*` names gets these same directories without building again.
    """
    from synray.models.tiny import TINY_NAMES, resolve_model

    return {name.split(":", 1)[1]: resolve_model(name, cache_dir=synray_cache) for name in TINY_NAMES}


#: logical CPUs of the suite's one local Ray (stage actors and training workers time-share 2 cores), and one
#: logical GPU: enough to check GPU plans against a running cluster (nothing in the suite asks to use it)
RAY_TEST_CPUS, RAY_TEST_GPUS = 8, 1
#: the value of HF_TOKEN and AWS_SECRET_ACCESS_KEY in the suite's environment, as a cluster's nodes hold secrets:
#: made when the suite starts, so that no file holds it before; tests/test_jobs.py searches the outputs for it
CANARY = f"hf_{secrets.token_hex(16)}"


#: the bucket of the suite's local S3 server
S3_BUCKET = "synray-test"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A local S3 endpoint (moto) with one bucket, for the whole session. Its endpoint and fake credentials are
    in the environment before the suite's Ray starts, so Ray workers reach it as a cluster's nodes reach S3."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": CANARY, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


#: the tracking server's token, in the environment as a cluster's jobs get it: no tracked run may hold it
TRACKING_TOKEN = f"mlflow_{secrets.token_hex(16)}"


@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts in a folder of its own."""

    url: str
    root: Path
    proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        from procs import wait_until

        port = self.url.rsplit(":", 1)[1]
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", port,
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        self.proc = subprocess.Popen(cmd, stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_until(self.answers, self.proc, "the MLflow server answering", timeout_s=120)
        return self

    def answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow tracking server for the session; MLFLOW_TRACKING_TOKEN holds a canary while it runs."""
    from procs import free_port

    server = MlflowServer(f"http://127.0.0.1:{free_port()}", tmp_path_factory.mktemp("mlflow")).start()
    old = os.environ.get("MLFLOW_TRACKING_TOKEN")
    os.environ["MLFLOW_TRACKING_TOKEN"] = TRACKING_TOKEN
    yield server
    server.stop()
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_TOKEN", None)
    else:
        os.environ["MLFLOW_TRACKING_TOKEN"] = old


@pytest.fixture(scope="session")
def ray_cluster(tiny_models: dict[str, str], s3_server: dict[str, str]) -> Iterator[str]:
    """One local Ray for the whole suite, started as synray starts a local Ray (dashboard and job server on
    127.0.0.1, Ray's token authentication), with secrets in its environment; yields its address (subprocesses
    join it via RAY_ADDRESS, jobs go to its dashboard: `ray_jobs`)."""
    import ray

    from synray.config import RayConfig
    from synray.programs.session import init

    # Ray's state API sees a task start within 0.1 s instead of 1 s: the fault drills kill actors mid-batch
    os.environ["RAY_task_events_report_interval_ms"] = "100"
    # Ray Train's controller polls its workers every 0.2 s instead of 2 s: a worker's `ray.train.report` waits
    # until the controller has taken its previous report, which at 2 s is most of a tiny step
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    os.environ["HF_TOKEN"] = CANARY
    # DeepSpeed's CPU communication op, built (once per machine, some 40 s) before any training worker needs it:
    # left to the workers, the first two build it together, one waiting on the other's lock file, which stays
    # behind for good if a test kills the builder
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   check=True, capture_output=True)
    init(RayConfig(num_cpus=RAY_TEST_CPUS, num_gpus=RAY_TEST_GPUS))
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()


@dataclass
class RayJobs:
    """The suite's Ray as `ray job submit` reaches it."""

    dashboard: str          # the job server's address (http://127.0.0.1:<port>)
    session_dir: Path       # its session folder: Ray's logs, the jobs' logs and working directories

    def submit(self, *entrypoint: str, timeout_s: int = 480) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir <project> -- python <entrypoint...>`, waiting for the job to end; a job
        still running after `timeout_s` is stopped and fails the caller with its log's tail and where it waited."""
        from procs import ROOT, ray_stacks

        ray_cli = str(Path(sys.executable).parent / "ray")
        submission = f"synray-test-{secrets.token_hex(4)}"
        try:
            return subprocess.run([ray_cli, "job", "submit", "--address", self.dashboard, "--working-dir", str(ROOT),
                                   "--submission-id", submission, "--", "python", *entrypoint],
                                  capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        except subprocess.TimeoutExpired:
            stacks = ray_stacks()
            logs = subprocess.run([ray_cli, "job", "logs", "--address", self.dashboard, submission],
                                  capture_output=True, text=True, timeout=60).stdout
            subprocess.run([ray_cli, "job", "stop", "--address", self.dashboard, submission], capture_output=True,
                           timeout=120)
            tail = "\n".join(line[:300] for line in logs.splitlines()[-60:])
            raise AssertionError(f"job {' '.join(entrypoint[:2])} still running after {timeout_s} s; its log ends:"
                                 f"\n{tail}\nwhere it waited:\n{stacks}") from None


@pytest.fixture(scope="session")
def ray_jobs(ray_cluster: str) -> RayJobs:
    import ray

    node = ray._private.worker.global_worker.node
    return RayJobs(f"http://{node.address_info['webui_url']}", Path(node.get_session_dir_path()))


def small_config(*overrides: str):
    """The built-in `local` config shrunk for tests (more overrides may follow), validated as programs do."""
    from synray.plan import load_run_config

    base = ["data.num_captions=16", "images.per_caption=2", "images.steps=2", "train.steps=4",
            "train.captions_per_worker=2", "train.log_every=1", "train.checkpoint_every=2",
            "eval.heldout_captions=12"]
    return load_run_config("local", base + list(overrides))


@pytest.fixture(scope="session")
def vllm_engine(tiny_models: dict[str, str]) -> Iterator[Any]:
    """One offline vLLM engine over the tiny LLM with the caption stage's settings, shared by the suite."""
    from vllm import LLM

    from synray.captions.llm import engine_kwargs

    start = time.monotonic()
    llm = LLM(model=tiny_models["llm"], seed=0, **engine_kwargs(small_config().captions))
    print(f"vLLM engine start: {time.monotonic() - start:.1f} s")
    yield llm
    client = getattr(llm.llm_engine, "engine_core", None)
    if client is not None and hasattr(client, "shutdown"):
        client.shutdown()
    del llm
    gc.collect()
