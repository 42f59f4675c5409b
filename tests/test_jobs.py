"""The `jobs/` entrypoints on a real Ray head: `ray job submit` of the pipeline, and plans checked against it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CANARY = "hf_synrayCanary0123456789secret"
HEAD_START_TIMEOUT_S = 90
#: the head declares one GPU (a logical one on this CPU): enough to check GPU plans against a running cluster
HEAD_GPUS = 1


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def job_head(tiny_models: dict[str, str], synray_cache: str) -> Iterator[dict]:
    """A second local Ray head (`ray start --head`, token authentication, dashboard on 127.0.0.1), with secrets in
    its environment as a cluster node would have; the suite's own Ray stays untouched."""
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
    # its own temp dir: `ray start` records its address there, where later `ray.init()` calls do not look
    temp_dir = tempfile.mkdtemp(prefix="synray-head-", dir="/tmp")   # short: Ray's socket paths live below it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "SYNRAY_CACHE": synray_cache, "HF_TOKEN": CANARY,
           "AWS_SECRET_ACCESS_KEY": CANARY}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", "--num-cpus=8", f"--num-gpus={HEAD_GPUS}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        wait_for_port(gcs, deadline)
        wait_for_port(dash, deadline)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}"}
    finally:
        os.killpg(head.pid, signal.SIGTERM)   # --block: the head stops every process it started
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def synray(args: list[str], env: dict, timeout_s: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synray.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT)


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def test_pipeline_job_submitted_with_ray_job_submit_trains_keeps_its_rows_and_leaks_no_secret(job_head, tmp_path):
    """`ray job submit --working-dir . -- python jobs/pipeline.py local` (shrunk, stream+store): the job succeeds,
    prints its run directory, and writes the run there: summary, backbone, evaluation. The stream ends before the
    step budget: every stored row is trained on exactly once (but the last partial batch), every caption id is
    stored once. The secrets in the cluster's environment reach no output: not the run, the store or the logs."""
    from synray.data.ledger import load_consumed

    store = tmp_path / "kept"
    overrides = sets("data.num_captions=16", "data.mode=stream+store", f"data.store_dir={store}",
                     "data.rows_per_shard=4", "train.steps=50", "train.captions_per_worker=2", "train.log_every=1",
                     "train.checkpoint_every=50", "eval.heldout_captions=12", f"output_root={tmp_path}")
    r = subprocess.run(["ray", "job", "submit", "--address", job_head["dashboard"], "--working-dir", str(ROOT), "--",
                        "python", "jobs/pipeline.py", "local", *overrides],
                       env=job_head["env"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0 and "succeeded" in r.stdout, (r.stdout + r.stderr)[-4000:]
    (run_dir,) = list(tmp_path.glob("local-*"))
    assert f"run directory: {run_dir}" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    t = summary["train"]
    assert summary["mode"] == "stream+store" and t["ended_early"] and t["steps"] >= 2
    assert summary["eval"]["heldout_rows"] == 12 and 0 <= summary["eval"]["trained"]["knn_accuracy"] <= 1
    assert (run_dir / "backbone" / "config.json").exists()
    stored = [row for s in sorted(store.glob("shard-*.parquet"))
              for row in pq.read_table(s, columns=["caption_id", "row_id"]).to_pylist()]
    assert len({row["caption_id"] for row in stored}) == len(stored) >= 12   # each caption id stored once
    consumed = set(load_consumed(Path(t["checkpoint"])).tolist())
    stored_rows = {row["row_id"] for row in stored}
    rows_per_step = 2 * 2
    assert len(consumed) == t["steps"] * rows_per_step                         # no row trained on twice
    assert consumed <= stored_rows and len(stored_rows - consumed) < rows_per_step   # all but a partial batch
    assert CANARY not in r.stdout + r.stderr
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_one_gpu_stream_plan_is_refused_before_anything_starts(job_head, tmp_path):
    """On a cluster with one GPU, a stream with diffusion and training each on whole GPUs can never be placed:
    `synray run` exits 2 before any run directory exists, and `synray plan --address` says the same."""
    one_gpu = sets("images.num_gpus=1", "train.use_gpu=true", f"output_root={tmp_path}")
    r = synray(["run", "local", *one_gpu], {**job_head["env"], "RAY_ADDRESS": job_head["gcs"]})
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert "has at most 1 GPU" in r.stderr
    for key in ("images.num_gpus", "train.gpus_per_worker", "data.mode=stored"):
        assert key in r.stderr, key
    assert not list(tmp_path.iterdir())   # no run directory, nothing generated
    r = synray(["plan", "local", *one_gpu, "--address", job_head["gcs"]], job_head["env"])
    assert r.returncode == 2 and "refused: the training phase holds 3 GPU at once" in r.stdout, r.stdout[-3000:]


def test_fractional_gpus_make_the_same_plan_fit_one_gpu(job_head):
    shared = sets("images.num_gpus=0.5", "train.use_gpu=true", "train.gpus_per_worker=0.25")
    r = synray(["plan", "local", *shared, "--address", job_head["gcs"]], job_head["env"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "nodes on the Ray cluster at" in r.stdout and "checks: ok" in r.stdout
    assert "training workers: 2 x (0.5 CPU + 0.25 GPU)" in r.stdout
