"""A cluster rehearsed on this machine (run as a script by the `cluster_rehearsal` fixture, in its own process so
that its Ray stays apart from the suite's): several Ray nodes started with Ray's `ray.cluster_utils.Cluster`, each
declaring the custom resource of one of cluster.yaml's node types at a fraction of its size; `synray run shapes`
in stream+store mode with each stage asking for its node type's resource as the GPU configs do; a diffusion node
lost while the stream renders, then the training node that holds the workers. Writes what Ray's state API saw
and what happened to `report.json` in the folder it is given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from procs import cli, free_port, kill_group, metrics_log, ray_stacks, sets, start, wait_until   # noqa: E402

#: the node types of cluster.yaml the rehearsal starts (2 of each worker type, so that one can be lost), scaled
#: down to CPUs this machine can time-share; each declares its type's custom resource as cluster.yaml does
NODES = {"head": 4, "diffusion_gpu": 2, "train_gpu": 3}
COUNTS = {"head": 1, "diffusion_gpu": 2, "train_gpu": 2}
#: the run: shapes in stream+store, each stage tagged with its node type's resource as the GPU configs tag theirs
#: (a token share: the node's CPUs decide how many fit). The stream holds about 100 rows ahead of training, so
#: the renderer is still at work when its node goes; a checkpoint every 2 steps.
STEPS, EVERY = 12, 2
OVERRIDES = ("data.mode=stream+store", "data.num_captions=2000", "data.rows_per_shard=16",
             f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=1",
             "train.captions_per_worker=4", "train.warmup_steps=1", "train.backbone.size=tiny",
             "train.max_failures=3", "images.resources={diffusion_node: 0.001}",
             "train.resources={train_node: 0.001}", "data.preprocess_resources={train_node: 0.001}",
             "eval.resources={train_node: 0.001}", "eval.protocols=[knn]", "eval.heldout_captions=36")


def custom_resources() -> dict[str, str]:
    """cluster.yaml's node types and the one custom resource each declares."""
    from synray.placement import load_cluster_file

    spec = load_cluster_file(ROOT / "cluster.yaml")
    return {t.name: next(k for k in t.resources if k not in ("CPU", "GPU")) for t in spec.node_types}


def start_cluster():
    from ray.cluster_utils import Cluster

    resource = custom_resources()
    common = {"object_store_memory": 200 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "num_cpus": NODES["head"], "resources": {resource["head"]: 1},
        "dashboard_port": free_port(), "include_dashboard": True})
    nodes = {cluster.head_node.node_id: "head"}
    for kind in ("diffusion_gpu", "train_gpu"):
        for _ in range(COUNTS[kind]):
            node = cluster.add_node(**common, num_cpus=NODES[kind], resources={resource[kind]: 1})
            nodes[node.node_id] = kind
    cluster.wait_for_nodes()
    return cluster, nodes


def actors(address: str) -> list[dict]:
    from ray.util.state import list_actors

    return [{"id": a.actor_id, "class": a.class_name, "repr": a.repr_name or "", "node": a.node_id,
             "state": a.state, "pid": a.pid}
            for a in list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False)]


def node_of(address: str, title: str) -> str | None:
    """The node of a live actor whose class or repr name holds `title`."""
    for a in actors(address):
        if a["state"] == "ALIVE" and (title in a["class"] or title in a["repr"]) and a["node"]:
            return a["node"]
    return None


def last_step(runs: Path) -> int:
    found = list(runs.glob("shapes-*/train/metrics.jsonl"))
    if not found:
        return 0
    return max((r["step"] for r in metrics_log(found[0].parent.parent) if "loss" in r), default=0)


def lose(cluster, nodes: dict[str, str], node_id: str, runs: Path, lost: list[dict]) -> None:
    """Kill every process of a node at once (a spot reclaim, a dead host), as Ray's autoscaler would then see it."""
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    lost.append({"node": node_id, "type": nodes[node_id], "step": last_step(runs), "time": time.time()})
    cluster.remove_node(node, allow_graceful=False)


def main(out: Path) -> int:
    store, runs = out / "store", out / "runs"
    cluster, nodes = start_cluster()
    address = cluster.address
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    report: dict = {"nodes": nodes, "lost": [], "address": address}
    args = ("shapes", *sets(*OVERRIDES, f"data.store_dir={store}", f"output_root={runs}"))
    try:
        plan = subprocess.run(cli("plan", *args), env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
        report["plan"] = {"rc": plan.returncode, "out": plan.stdout, "err": plan.stderr[-3000:]}
        proc = start(cli("run", *args), env, out / "run.log")
        try:
            wait_until(lambda: last_step(runs) >= 2, proc, "step 2")
            renderer = wait_until(lambda: node_of(address, "ProceduralRenderer"), proc, "the renderer's node")
            report["seen_before_loss"] = actors(address)
            lose(cluster, nodes, renderer, runs, report["lost"])
            wait_until(lambda: last_step(runs) >= report["lost"][-1]["step"] + 3, proc, "3 steps after the loss")
            trainer = wait_until(lambda: node_of(address, "RayTrainWorker"), proc, "a training worker's node")
            report["seen_before_second_loss"] = actors(address)
            lose(cluster, nodes, trainer, runs, report["lost"])
            try:
                proc.wait(timeout=420)
            except subprocess.TimeoutExpired:
                report["stacks"] = ray_stacks()
                raise
            report["seen_at_end"] = actors(address)
        finally:
            kill_group(proc)
        report["rc"] = proc.returncode
        report["run_dirs"] = [str(p) for p in runs.glob("shapes-*")]
        report["store"] = str(store)
    finally:
        (out / "report.json").write_text(json.dumps(report, indent=1))
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    # a lost node is declared dead after 3 missed health checks 0.5 s apart (Ray's defaults take some 15-30 s), and
    # Ray Train's controller polls its workers every 0.2 s (as the suite's Ray does: a step waits on its report)
    os.environ.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="3",
                      RAY_health_check_timeout_ms="500", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    # this Ray's sessions (and the address file Ray's Cluster writes) in a folder of their own, with a short path:
    # a Unix socket's path is at most 107 bytes
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="synray-cluster-", dir="/tmp")
    sys.exit(main(Path(sys.argv[1])))
