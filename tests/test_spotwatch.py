"""The spot interruption watcher (synray.spotwatch) against a local IMDSv2 and a real two-node Ray: it reads
nothing without a session token, drains nothing before a notice, and at the notice drains its node for preemption
with the notice's time as the deadline, as Ray Train's preemption watcher reads Ray's drains; on an on-demand instance
or off EC2 it exits at once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from imds import InstanceMetadata
from procs import wait_until


@pytest.fixture
def metadata():
    served = InstanceMetadata()
    yield served
    served.close()


def test_the_metadata_client_uses_a_session_token_and_reads_the_notice_as_ec2_writes_it(metadata):
    from synray.spotwatch import Metadata

    client = Metadata(metadata.url)
    assert client.is_spot() and client.notice() is None
    assert metadata.tokens == 1 and metadata.refused == 0     # one token for both reads
    when = time.time() + 120
    text = metadata.give_notice(when)
    notice = client.notice()
    assert notice.action == "terminate" and notice.time_s == int(when), (text, notice)
    assert text.endswith("Z") and "T" in text


#: a driver of the rehearsed cluster: an actor busy on the watched node (an idle node drained for preemption ends at
#: once), then the cluster's drains as Ray Train's preemption watcher reads them, a JSON line every 0.2 s
OBSERVER = """
import json, sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=1)
class Busy:
    def ready(self):
        return True

busy = Busy.options(scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[2], soft=False)).remote()
ray.get(busy.ready.remote())
while True:
    print(json.dumps(ray._private.state.state.get_draining_nodes()), flush=True)
    time.sleep(0.2)
"""


@pytest.mark.slow   # a two-node Ray of its own
def test_a_notice_drains_the_watched_node_for_preemption_with_its_deadline(metadata):
    import json

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    observer = None
    try:
        node = cluster.add_node(num_cpus=1)
        observer = subprocess.Popen([sys.executable, "-c", OBSERVER, cluster.address, node.node_id],
                                    stdout=subprocess.PIPE, text=True)
        assert json.loads(observer.stdout.readline()) == {}
        watcher = subprocess.Popen([sys.executable, "-m", "synray.spotwatch", "--address", cluster.gcs_address,
                                    "--node-id", node.node_id, "--metadata-url", metadata.url, "--poll-s", "0.2"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: metadata.reads >= 5, watcher, "the watcher polling", timeout_s=60)
        assert json.loads(observer.stdout.readline()) == {}          # polled, no notice: no drain
        deadline = time.time() + 90
        metadata.give_notice(deadline)
        out, _ = watcher.communicate(timeout=60)
        assert watcher.returncode == 0 and "spot interruption notice: terminate" in out, out
        drained, until = {}, time.time() + 30
        while not drained and time.time() < until:    # lines the observer printed before the drain come first
            drained = json.loads(observer.stdout.readline())
        assert drained == {node.node_id: int(deadline) * 1000}, out   # that node only, at the notice's time
    finally:
        if observer:
            observer.kill()
        cluster.shutdown()


@pytest.mark.parametrize("life_cycle", ["on-demand", None])
def test_an_on_demand_instance_or_no_ec2_is_not_watched(life_cycle):
    served = InstanceMetadata(life_cycle) if life_cycle else None
    url = served.url if served else "http://127.0.0.1:9"    # nothing listens there
    try:
        out = subprocess.run([sys.executable, "-m", "synray.spotwatch", "--metadata-url", url], capture_output=True,
                             text=True, timeout=60)
    finally:
        if served:
            served.close()
    assert out.returncode == 0, out.stderr
    assert ("an on-demand instance" if life_cycle else "not an EC2 instance") in out.stderr


@pytest.mark.slow   # a two-node Ray of its own
def test_sigterm_to_ray_start_block_drains_for_preemption_for_the_rayjobs_drain_time():
    """The RayJob's training pods rely on Ray's own SIGTERM handler: `ray start --block` (the pod's main process),
    given SIGTERM with the pod's RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, drains its node for preemption with a
    deadline that far ahead, which Ray Train's preemption watcher reads, and stops once the node is idle."""
    import json
    import os
    import signal

    import psutil
    import ray._raylet
    import yaml
    from ray.cluster_utils import Cluster

    from test_cluster_files import RAYJOB

    job = next(d for d in yaml.safe_load_all(RAYJOB.read_text()) if d and d["kind"] == "RayJob")
    (train,) = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "train-gpu"]
    env = {e["name"]: e["value"] for e in train["template"]["spec"]["containers"][0]["env"] if "value" in e}
    drain_s = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    gcs = ray._raylet.GcsClient(address=cluster.gcs_address)
    before = {n.hex() for n in gcs.get_all_node_info()}
    node = observer = None
    try:
        node = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--address", cluster.gcs_address,
                                 "--num-cpus", "1", "--block"], env={**os.environ, **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        new = lambda: {n.hex() for n, i in gcs.get_all_node_info().items() if i.state == 0} - before  # noqa: E731
        wait_until(new, node, "the pod's Ray node joining", timeout_s=60)
        (node_id,) = new()
        observer = subprocess.Popen([sys.executable, "-c", OBSERVER, cluster.address, node_id],
                                    stdout=subprocess.PIPE, text=True)
        assert json.loads(observer.stdout.readline()) == {}
        sent = time.time()
        node.send_signal(signal.SIGTERM)
        drained, until = {}, time.time() + 30
        while not drained and time.time() < until:
            drained = json.loads(observer.stdout.readline())
        assert set(drained) == {node_id}
        assert abs(drained[node_id] / 1000 - (sent + drain_s)) < 5, (drained, sent, drain_s)
        observer.kill()                      # the node goes idle: Ray's handler stops it before the deadline
        assert node.wait(timeout=60) != 0 and time.time() < sent + drain_s
    finally:
        for proc in (observer, node):
            if proc and proc.poll() is None:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
        cluster.shutdown()
