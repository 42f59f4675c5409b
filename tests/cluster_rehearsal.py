"""A cluster rehearsed on this machine (run as a script by the `cluster_rehearsal` fixture, in its own process so
that its Ray stays apart from the suite's): several Ray nodes started with Ray's `ray.cluster_utils.Cluster`, each
declaring the custom resource of one of cluster.yaml's node types at a fraction of its size; `synray run shapes`
in stream+store mode with each stage asking for its node type's resource as the GPU configs do, and an elastic
training group of 1-3 workers, one a training node. A diffusion node is lost while the stream renders; then a
training node gets a spot interruption notice (from a local instance-metadata service; the node's spot watcher drains
it for preemption with the notice's deadline) and is removed at its deadline; once the group goes on at 2 workers a
training node is added, and it grows back to 3. Writes what Ray's state API saw and what happened to `report.json`
in the folder it is given."""

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

#: the node types of cluster.yaml the rehearsal starts (2 diffusion nodes, so that one can be lost, and 3 training
#: nodes), scaled down to CPUs this machine can time-share; each declares its type's custom resource as
#: cluster.yaml does
NODES = {"head": 4, "diffusion_gpu": 2, "train_gpu": 2}
COUNTS = {"head": 1, "diffusion_gpu": 2, "train_gpu": 3}
#: the run: shapes in stream+store, each stage tagged with its node type's resource as the GPU configs tag theirs
#: (a token share: the node's CPUs decide how many fit; a training worker takes 0.6 of its node's, so one a node,
#: as one a GPU). The stream holds about 100 rows ahead of training, so the renderer is still at work when its node
#: goes; a checkpoint every 2 steps; a step of 12 rows at every size of the group (4 x 3, 3 x 2 x 2, 4 x 1 x 3).
STEPS, EVERY, STEP_ROWS = 200, 2, 12
#: seconds between the drain's notice and the training node's end (a spot reclaim gives 120)
DEADLINE_S = 20
OVERRIDES = ("data.mode=stream+store", "data.num_captions=3000", "data.rows_per_shard=16",
             f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=1",
             "train.num_workers=[1, 3]", "train.captions_per_worker=4", "train.resize_check_s=2",
             "train.warmup_steps=1", "train.backbone.size=tiny",
             "train.max_failures=3", "images.resources={diffusion_node: 0.001}",
             "train.resources={train_node: 0.6}", "data.preprocess_resources={train_node: 0.001}",
             "eval.resources={train_node: 0.001}", "eval.protocols=[knn]", "eval.heldout_captions=36",
             "data.preprocess_actors=2")


def custom_resources() -> dict[str, str]:
    """cluster.yaml's node types and the one custom resource each declares."""
    from synray.placement import load_cluster_file

    spec = load_cluster_file(ROOT / "cluster.yaml")
    return {t.name: next(k for k in t.resources if k not in ("CPU", "GPU")) for t in spec.node_types}


#: what every node of the rehearsal gets
COMMON = {"object_store_memory": 200 * 2**20}


def add_node(cluster, nodes: dict[str, str], kind: str):
    node = cluster.add_node(**COMMON, num_cpus=NODES[kind], resources={custom_resources()[kind]: 1})
    nodes[node.node_id] = kind
    return node


def start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        **COMMON, "num_cpus": NODES["head"], "resources": {custom_resources()["head"]: 1},
        "dashboard_port": free_port(), "include_dashboard": True})
    nodes = {cluster.head_node.node_id: "head"}
    for kind in ("diffusion_gpu", "train_gpu"):
        for _ in range(COUNTS[kind]):
            add_node(cluster, nodes, kind)
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


def reports(runs: Path) -> list[dict]:
    found = list(runs.glob("shapes-*/train/metrics.jsonl"))
    return [r for r in metrics_log(found[0].parent.parent) if "loss" in r] if found else []


def nodes_of(address: str, title: str) -> set[str]:
    """The nodes of the live actors whose class or repr name holds `title`."""
    return {a["node"] for a in actors(address) if a["state"] == "ALIVE" and a["node"]
            and (title in a["class"] or title in a["repr"])}


def last_step(runs: Path) -> int:
    return max((r["step"] for r in reports(runs)), default=0)


def reported_after(runs: Path, since: float, key: str, value: object = None) -> dict | None:
    """The first training report since `since` (UNIX time) that has `key` (equal to `value`, if given)."""
    return next((r for r in reports(runs) if r["time"] > since and key in r and value in (None, r[key])), None)


def drain(address: str, node_id: str, runs: Path, drained: dict) -> None:
    """A spot reclaim's notice, as EC2 gives it and cluster.yaml's nodes take it: the node's spot watcher
    (`python -m synray.spotwatch`) polls a local instance-metadata service, which announces the node's termination
    `DEADLINE_S` ahead; the watcher drains the node for preemption with that deadline and exits. The caller removes the
    node at the deadline."""
    from imds import InstanceMetadata

    metadata = InstanceMetadata()
    try:
        watcher = subprocess.Popen([sys.executable, "-m", "synray.spotwatch", "--address", address,
                                    "--node-id", node_id, "--metadata-url", metadata.url, "--poll-s", "0.5"], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: metadata.reads >= 2, watcher, "the spot watcher polling", timeout_s=120)
        drained.update(node=node_id, step=last_step(runs), time=time.time(), deadline_s=DEADLINE_S)
        drained["notice"] = metadata.give_notice(time.time() + DEADLINE_S)
        out, _ = watcher.communicate(timeout=60)
        drained["watcher"] = out[-2000:]
        assert watcher.returncode == 0 and "draining Ray node" in out, out
    finally:
        metadata.close()


def _drain_target(address: str) -> str | None:
    """A node that holds a training worker and a preprocessing actor while another node holds the other actor."""
    pool = nodes_of(address, "RowPreprocessor")
    both = sorted(nodes_of(address, "RayTrainWorker") & pool)
    return both[0] if both and len(pool) > 1 else None


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
            # the stream renders again (a worker waiting for rows reads no preemption notice: the drain comes after)
            wait_until(lambda: node_of(address, "ProceduralRenderer") not in (None, renderer), proc,
                       "the renderer back on the other diffusion node")
            back = last_step(runs)
            wait_until(lambda: last_step(runs) >= max(back, report["lost"][-1]["step"]) + 3, proc,
                       "3 steps after the loss")
            # a node with a training worker and one of the two preprocessing actors (Ray Data spreads them over the
            # training nodes): Ray Data sends no rows to actors on a draining node, and the other actor feeds the
            # group until the deadline (one actor on the drained node would starve it: docs/cluster.md)
            trainer = wait_until(lambda: _drain_target(address), proc,
                                 "a training worker's node with one of the preprocessing actors")
            report["seen_before_second_loss"] = actors(address)
            report["drained"] = {}
            drain(address, trainer, runs, report["drained"])
            notice = lambda: reported_after(runs, report["drained"]["time"], "preemption")   # noqa: E731
            try:
                wait_until(notice, proc, "the preemption checkpoint", timeout_s=DEADLINE_S / 2)
            except AssertionError as e:   # keep the stacks of the wait, before the deadline takes the workers
                report["stacks_while_waiting"] = str(e)
                wait_until(notice, proc, "the preemption checkpoint", timeout_s=DEADLINE_S / 2)
            # the reclaim, just after the notice's deadline, when Ray Train has stopped the group (a preemption)
            time.sleep(max(0.0, report["drained"]["time"] + DEADLINE_S + 1 - time.time()))
            lose(cluster, nodes, trainer, runs, report["lost"])
            wait_until(lambda: reported_after(runs, report["lost"][-1]["time"], "world_size", 2), proc,
                       "the group going on at 2 workers")
            report["added"] = {"node": add_node(cluster, nodes, "train_gpu").node_id, "step": last_step(runs),
                               "time": time.time()}
            wait_until(lambda: reported_after(runs, report["added"]["time"], "world_size", 3), proc,
                       "the group grown back to 3 workers")
            try:
                proc.wait(timeout=420)
            except subprocess.TimeoutExpired:
                report["stacks"] = ray_stacks()
                raise
            report["seen_at_end"] = actors(address)
        except Exception as e:   # the whole message (with the Ray processes' stacks) for the test to show
            report["error"] = str(e)
            raise
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
    # Ray Train gives a worker group 20 s to start (60 by default): after the preemption it first tries the size it
    # saw before the drained node went, which cannot start
    os.environ.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="3",
                      RAY_health_check_timeout_ms="500", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
                      RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20")
    # this Ray's sessions (and the address file Ray's Cluster writes) in a folder of their own, with a short path:
    # a Unix socket's path is at most 107 bytes
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="synray-cluster-", dir="/tmp")
    sys.exit(main(Path(sys.argv[1])))
