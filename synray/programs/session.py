"""The one place that talks to the Ray runtime: connect (RAY_ADDRESS or a local Ray) and shut down."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from synray.config import RayConfig
from synray.data.driver import driver_actor
from synray.data.stats import StageStats
from synray.placement import ClusterSpec, NodeType

log = logging.getLogger(__name__)

#: a local Ray gets at least this many logical CPUs, so that stage actors and training workers
#: can all be placed on a 2-core laptop (they time-share the cores).
MIN_LOCAL_CPUS = 4
#: how long a connection to a configured Ray address may take before the address counts as unreachable
CONNECT_TIMEOUT_S = 5.0
#: Ray Data reads a Parquet dataset's footers on a pool of actors that it starts for every read (32 by default,
#: sized for object storage on a cluster): on one machine each is a Python process started for a few tiny
#: footers, some 30 CPU-seconds a read on a laptop. A local Ray starts this many unless the variable is set.
LOCAL_FOOTER_ACTORS = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}


def ray_address(cfg: RayConfig) -> str | None:
    """The cluster to join: the config's address, else $RAY_ADDRESS, else None (start a local Ray)."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def address_source(cfg: RayConfig) -> str:
    """Where `ray_address(cfg)` came from, as an error message names it."""
    return "ray.address" if cfg.address else "$RAY_ADDRESS"


def local_init_kwargs(cfg: RayConfig) -> dict[str, Any]:
    """Arguments for ray.init() when synray starts its own local Ray."""
    kwargs: dict[str, Any] = {
        "num_cpus": cfg.num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_CPUS),
        "dashboard_host": cfg.dashboard_host,
    }
    if cfg.include_dashboard is not None:
        kwargs["include_dashboard"] = cfg.include_dashboard
    if cfg.include_dashboard:
        kwargs["dashboard_port"] = cfg.dashboard_port
    if cfg.num_gpus is not None:
        kwargs["num_gpus"] = cfg.num_gpus
    if cfg.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
    return kwargs


def runtime_env() -> dict[str, Any]:
    """Environment every Ray worker needs (quiet tokenizers, no telemetry, synray's model cache)."""
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key in ("SYNRAY_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS",
                *LOCAL_FOOTER_ACTORS):
        if key in os.environ:
            env[key] = os.environ[key]
    return {"env_vars": env}


class RayAddressError(ValueError):
    """The configured Ray cluster cannot be reached."""


def check_reachable(address: str, source: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """RayAddressError, quickly, when nothing listens at a host:port address (ray.init would retry for minutes)."""
    if address == "auto" or address.startswith("local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayAddressError(f"Ray address {address!r} (from {source}) is not host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayAddressError(f"cannot reach Ray at {address} (from {source}): {e.strerror or e}; start the cluster "
                              "(`ray start --head` or `ray up cluster.yaml`), fix the address, or unset it to run "
                              "a local Ray") from None


def init(cfg: RayConfig) -> bool:
    """Connect to Ray; returns True when this call started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address(cfg)
    if address:
        check_reachable(address, address_source(cfg))
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env())
    else:
        kwargs = local_init_kwargs(cfg)
        for key, value in LOCAL_FOOTER_ACTORS.items():   # in the environment the local Ray and its jobs inherit
            os.environ.setdefault(key, value)
        log.info("starting a local Ray with %s logical CPUs", kwargs["num_cpus"])
        ray.init(runtime_env=runtime_env(), **kwargs)
    return True


@contextlib.contextmanager
def session(cfg: RayConfig) -> Iterator[None]:
    """`with session(cfg.ray):` connects to Ray and always shuts down what it started."""
    import ray

    started = init(cfg)
    try:
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


def stage_stats() -> Any:
    """A StageStats actor that the pipeline's stages report their counts to."""
    return driver_actor(StageStats)


def cluster_resources() -> dict[str, float]:
    """The connected cluster's total resources (CPU, GPU, custom ones)."""
    import ray

    return dict(ray.cluster_resources())


def local_spec(cfg: RayConfig, count_gpus: bool = True) -> ClusterSpec:
    """This machine as the local Ray that synray would start for `cfg` sees it (its CPUs, at least 4 logical ones,
    and the GPUs Ray detects, or the config's counts): what `synray plan` checks with no cluster file or address.
    Without `count_gpus` (no stage asks for one) the GPUs are not looked for, and Ray is not imported."""
    cpus = local_init_kwargs(cfg)["num_cpus"]
    if cfg.num_gpus is not None or not count_gpus:
        gpus = cfg.num_gpus or 0
    else:
        from ray._private.accelerators import get_accelerator_manager_for_resource   # how ray.init counts GPUs

        gpus = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    found = f", {gpus:g} GPU" if count_gpus or cfg.num_gpus is not None else ""
    return ClusterSpec(f"this machine (a local Ray with {cpus:g} CPU{found}; --cluster FILE or --address checks a "
                       "cluster)", (NodeType("this machine", {"CPU": cpus, "GPU": gpus}, existing=1, max_workers=1),))


def cluster_spec() -> ClusterSpec:
    """The connected cluster as node types: each running node, plus the node groups its autoscaler may add (up to
    their maximum counts; Ray publishes them in the GCS). A local Ray has no autoscaler: its nodes are all it has."""
    import ray
    from ray._private.state import state  # Ray Train reads the autoscaler's limits the same way

    types = [NodeType(_live_node_name(n),
                      {k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}, existing=1,
                      max_workers=1)
             for n in ray.nodes() if n["Alive"]]
    config = state.get_cluster_config()
    for group in (config.node_group_configs if config is not None else []):
        if group.max_count != 0:
            types.append(NodeType(f"node group {group.name}", dict(group.resources), group.min_count,
                                  None if group.max_count < 0 else group.max_count))
    return ClusterSpec(f"the Ray cluster at {ray.get_runtime_context().gcs_address}", tuple(types))


def _live_node_name(node: dict[str, Any]) -> str:
    """A running node as a plan names it: its address and the custom resources it declares (the node type of a
    cluster file, `diffusion_node` say), which tell apart the node types of one host too."""
    builtin = ("CPU", "GPU", "memory", "object_store_memory")
    custom = sorted(k for k in node["Resources"]
                    if k not in builtin and not k.startswith(("node:", "accelerator_type:")))
    return f"node {node['NodeManagerAddress']}" + (f" ({', '.join(custom)})" if custom else "")


def stats_summary(actor: Any) -> dict[str, Any]:
    """Rows, rates and rejections the stages reported to a StageStats actor."""
    import ray

    return ray.get(actor.summary.remote())


class ObjectStoreProbe:
    """Bytes held in the object stores of every node (what `ray memory --stats-only` prints), for polling."""

    def __init__(self) -> None:
        import ray
        from ray._private.internal_api import get_state_from_address  # no public API reports plasma usage

        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)

    def used_bytes(self) -> int:
        from ray._private.internal_api import get_memory_info_reply

        return int(get_memory_info_reply(self._state).store_stats.object_store_bytes_used)
