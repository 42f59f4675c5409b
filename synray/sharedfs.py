"""Shared storage: the paths a cluster file mounts on every node (and into its containers), and the check that a plan
spanning several nodes keeps its runs, stores, sweeps and evaluation sets there or at a cloud URI.

A Ray cluster-launcher file shares a path when a network filesystem is mounted on every host in
`initialization_commands` (`mount -t nfs4|nfs|efs|lustre ... /host/path`) and, with Docker, bound into the container
(`-v /host/path:/container/path` in `docker.run_options`). A KubeRay manifest shares a path when every Ray pod (head
and each worker group) mounts, at that path, a volume that is an `nfs` volume, an EFS CSI volume, or a
PersistentVolumeClaim the manifest declares `ReadWriteMany`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["launcher_shared_paths", "kuberay_shared_paths", "is_uri", "storage_problems", "storage_keys"]

NETWORK_FS = ("nfs", "nfs4", "efs", "lustre")
#: CSI drivers of network filesystems a pod may mount on every node at once
SHARED_CSI = ("efs.csi.aws.com", "filestore.csi.storage.gke.io", "nfs.csi.k8s.io")


def is_uri(value: str) -> bool:
    """A cloud location (s3://, gs://, ...): shared by nature, reached with each node's credentials."""
    return re.match(r"^[a-z][a-z0-9+.-]*://", value) is not None


def _mount_points(commands: Iterable[str]) -> list[str]:
    """The mount points of network filesystems the commands mount (`mount -t nfs4 ... SOURCE /path`)."""
    out = []
    for command in commands:
        for part in re.split(r"&&|\|\||;", str(command)):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            words = [w for w in words if w not in ("sudo", "(", ")")]
            if "mount" not in words or "-t" not in words:
                continue
            kind = words[words.index("-t") + 1] if words.index("-t") + 1 < len(words) else ""
            paths = [w for w in words[words.index("mount") + 1:] if w.startswith("/")]
            if kind in NETWORK_FS and paths:
                out.append(paths[-1].rstrip("/") or "/")
    return out


def _bind_mounts(options: Iterable[str]) -> list[tuple[str, str]]:
    """(host, container) of the `-v`/`--volume` and `--mount type=bind` options of a docker run."""
    words = [w for option in options for w in shlex.split(str(option))]
    out = []
    for i, w in enumerate(words):
        spec = words[i + 1] if w in ("-v", "--volume") and i + 1 < len(words) else (
            w.split("=", 1)[1] if w.startswith("--volume=") else None)
        if spec is not None and ":" in spec:
            host, container = spec.split(":")[:2]
            out.append((host.rstrip("/"), container.rstrip("/")))
        mount = words[i + 1] if w == "--mount" and i + 1 < len(words) else None
        if mount is not None:
            fields = dict(f.split("=", 1) for f in mount.split(",") if "=" in f)
            if fields.get("type") == "bind":
                out.append((fields.get("source", fields.get("src", "")).rstrip("/"),
                            fields.get("target", fields.get("dst", fields.get("destination", ""))).rstrip("/")))
    return out


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def launcher_shared_paths(doc: dict[str, Any]) -> tuple[str, ...]:
    """The paths every node of a cluster-launcher file sees on one shared filesystem (inside its containers when
    it runs Docker)."""
    hosts = _mount_points(doc.get("initialization_commands") or [])
    docker = doc.get("docker") or {}
    if not docker.get("image"):
        return tuple(hosts)
    binds = _bind_mounts(docker.get("run_options") or [])
    return tuple(container for host, container in binds if any(_under(host, h) for h in hosts))


def kuberay_shared_paths(docs: Sequence[dict[str, Any]], cluster: dict[str, Any]) -> tuple[str, ...]:
    """The mount paths every Ray pod of a RayCluster spec has on a shared volume (see the module's docstring)."""
    rwx = {d.get("metadata", {}).get("name") for d in docs if d.get("kind") == "PersistentVolumeClaim"
           and "ReadWriteMany" in (d.get("spec", {}).get("accessModes") or [])}
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    per_group = []
    for group in groups:
        pod = group.get("template", {}).get("spec", {})
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        containers = pod.get("containers") or [{}]
        shared = set()
        for mount in containers[0].get("volumeMounts") or []:
            v = volumes.get(mount.get("name"), {})
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if "nfs" in v or (v.get("csi") or {}).get("driver") in SHARED_CSI or claim in rwx:
                shared.add(str(mount.get("mountPath", "")).rstrip("/"))
        per_group.append(shared)
    return tuple(sorted(set.intersection(*per_group))) if per_group else ()


def storage_keys(cfg: Any) -> list[tuple[str, str]]:
    """(key, value) of every path a run on several nodes must share: run directories, the store it reads or
    writes, the sweep directory, the evaluation set."""
    out = [("output_root", cfg.output_root)]
    if cfg.data.mode != "stream" and cfg.data.store_dir:
        out.append(("data.store_dir", cfg.data.store_dir))
    if cfg.tune.space and cfg.tune.storage:
        out.append(("tune.storage", cfg.tune.storage))
    if cfg.eval.enabled and cfg.eval.dataset:
        out.append(("eval.dataset", cfg.eval.dataset))
    return out


def storage_problems(cfg: Any, shared: Sequence[str], source: str, nodes: int) -> list[str]:
    """What a plan on `nodes` nodes keeps where some node would not see it: a relative path, or an absolute one that
    the cluster file does not mount as shared (cloud URIs pass)."""
    problems = []
    where = (f"a path under {', '.join(shared)} (shared by {source})" if shared
             else f"a shared filesystem mounted on every node (none in {source})")
    for key, value in storage_keys(cfg):
        if is_uri(value):
            continue
        if not value.startswith("/"):
            problems.append(f"{key}={value} is a relative path: on a plan of {nodes} nodes each node would write "
                            f"and read its own folder. Use {where}, or a cloud URI (s3://...)")
        elif not any(_under(value.rstrip("/"), s) for s in shared):
            problems.append(f"{key}={value} is not on storage {source} shares between its nodes: the {nodes} nodes "
                            f"of this plan would each see their own. Use {where}, or a cloud URI (s3://...)")
    return problems
