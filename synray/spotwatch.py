"""The spot interruption watcher of an AWS node: drains the node's Ray node for preemption when EC2 announces its end.

EC2 gives a spot instance two minutes' notice through its instance metadata (IMDSv2:
`/latest/meta-data/spot/instance-action`, 404 until then, then `{"action": "terminate", "time": ...}`). Ray does not
read it on VMs; this watcher, started by cluster.yaml on every worker node after `ray start`, polls it and asks the
GCS to drain the node with reason preemption and the notice's time as the deadline (what `ray drain-node` does).
Ray Train then tells the training workers (`ray.train.get_preemption_info`), which checkpoint before the node goes,
and Ray schedules nothing new there. On an on-demand instance it exits at once.

Run: `python -m synray.spotwatch` (after `ray start` on the node; it waits for Ray). On Kubernetes the pod's SIGTERM
drains the node instead (Ray's own handler, `RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`; see k8s/rayjob.yaml).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Notice", "Metadata", "local_node_id", "drain_for_preemption", "watch", "main"]

log = logging.getLogger("synray.spotwatch")

METADATA_URL = "http://169.254.169.254"
#: IMDSv2 session tokens live this long (seconds); a new one is asked for before it ends
TOKEN_TTL_S = 21600


@dataclass(frozen=True)
class Notice:
    """An interruption notice: what EC2 will do and when (epoch seconds)."""

    action: str
    time_s: float


class Metadata:
    """EC2's instance metadata service through IMDSv2 (a session token on every request)."""

    def __init__(self, url: str = METADATA_URL, timeout_s: float = 2.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self._token, self._token_until = "", 0.0

    def _token_header(self) -> dict[str, str]:
        if time.time() > self._token_until:
            request = urllib.request.Request(f"{self.url}/latest/api/token", method="PUT",
                                             headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                self._token = response.read().decode()
            self._token_until = time.time() + TOKEN_TTL_S - 60
        return {"X-aws-ec2-metadata-token": self._token}

    def get(self, path: str) -> str | None:
        """The text at a metadata path, or None where the service answers 404."""
        request = urllib.request.Request(f"{self.url}/latest/meta-data/{path}", headers=self._token_header())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if e.code == 401:   # the token expired early: ask for another next time
                self._token_until = 0.0
            raise

    def is_spot(self) -> bool:
        return (self.get("instance-life-cycle") or "").strip() == "spot"

    def notice(self) -> Notice | None:
        """The interruption notice, once EC2 has given one."""
        text = self.get("spot/instance-action")
        if text is None:
            return None
        body = json.loads(text)
        when = datetime.fromisoformat(body["time"].replace("Z", "+00:00")).timestamp()
        return Notice(body["action"], when)


def local_node_id(gcs_address: str, node_ip: str) -> str | None:
    """The hex id of the alive Ray node of this host (one Ray node per host on a cluster)."""
    import ray._raylet

    nodes = ray._raylet.GcsClient(address=gcs_address).get_all_node_info()
    for node_id, info in nodes.items():
        if info.node_manager_address == node_ip and info.state == 0:   # ALIVE
            return node_id.hex()
    return None


def drain_for_preemption(gcs_address: str, node_id: str, notice: Notice) -> bool:
    """Ask the GCS to drain the node for preemption with the notice's time as its deadline; True when accepted."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    client = ray._raylet.GcsClient(address=gcs_address)
    accepted, why = client.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                      f"spot interruption notice: {notice.action} at {notice.time_s:.0f}",
                                      int(notice.time_s * 1000))
    if not accepted:
        log.error("the GCS refused to drain node %s: %s", node_id, why)
    return bool(accepted)


def watch(metadata: Metadata, gcs_address: str, node_id: str, poll_s: float = 5.0,
          stop_after_s: float | None = None) -> Notice | None:
    """Poll for a notice and drain the node once it comes; the notice (None when `stop_after_s` passed first).
    A metadata error is logged and polled again: the watcher never stops on its own before a notice."""
    start = time.time()
    while stop_after_s is None or time.time() - start < stop_after_s:
        try:
            notice = metadata.notice()
        except (OSError, ValueError, KeyError) as e:
            log.warning("instance metadata unreadable (%s); asking again in %g s", e, poll_s)
            notice = None
        if notice is not None:
            log.warning("spot interruption notice: %s at %s; draining Ray node %s", notice.action,
                        datetime.fromtimestamp(notice.time_s).isoformat(), node_id)
            drain_for_preemption(gcs_address, node_id, notice)
            return notice
        time.sleep(poll_s)
    return None


def wait_for_node(gcs_address: str, node_ip: str, wait_s: float) -> str:
    """This host's Ray node id, once `ray start` has registered it."""
    deadline = time.time() + wait_s
    while True:
        try:
            node_id = local_node_id(gcs_address, node_ip)
        except Exception as e:   # the GCS not up yet
            node_id, why = None, e
        else:
            why = "no alive Ray node at this address"
        if node_id:
            return node_id
        if time.time() > deadline:
            raise SystemExit(f"synray.spotwatch: no Ray node on {node_ip} after {wait_s:g} s ({why})")
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synray.spotwatch", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="auto", help="the Ray cluster's GCS (default: this node's Ray)")
    parser.add_argument("--node-id", help="the Ray node to drain (default: the one on this host's IP)")
    parser.add_argument("--metadata-url", default=METADATA_URL)
    parser.add_argument("--poll-s", type=float, default=5.0)
    parser.add_argument("--wait-for-ray-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    metadata = Metadata(args.metadata_url)
    try:
        spot = metadata.is_spot()
    except OSError as e:
        log.info("no instance metadata here (%s): not an EC2 instance, nothing to watch", e)
        return 0
    if not spot:
        log.info("an on-demand instance: nothing to watch")
        return 0
    from ray._private import services

    address = services.canonicalize_bootstrap_address_or_die(args.address)
    node_id = args.node_id or wait_for_node(address, services.get_node_ip_address(), args.wait_for_ray_s)
    log.info("watching for a spot interruption notice; Ray node %s", node_id)
    watch(metadata, address, node_id, args.poll_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
