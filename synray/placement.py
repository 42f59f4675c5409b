"""Where a plan's stages land: node types (a cluster file, a KubeRay manifest or a running cluster), bin-packed.

A run holds its stages' actors in phases: while training, every generation stage of a stream, the
preprocessing pool and the training workers hold their resources at once (pools are fixed-size and
Ray Train gang-schedules its workers); evaluation comes after. `pack` places one phase's actors on
a cluster's node types, first-fit decreasing, opening nodes up to each type's maximum, and raises
`PlacementError` naming the stages and settings to change when a phase can never be placed. GPUs are
placed per device as Ray's raylet places them: a fraction (< 1) on one device that has that much left
(the best fit), a whole number on that many devices left whole; the rest of a bundle is node totals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synray.sharedfs import kuberay_shared_paths, launcher_shared_paths
from synray.stages import EVAL_PHASE, TRAINING_PHASE, StageResources

__all__ = ["StageResources", "NodeType", "ClusterSpec", "Placement", "PlacementError", "pack", "phase_totals",
           "load_cluster_file", "TRAINING_PHASE", "EVAL_PHASE"]

#: amounts below this are rounding (Ray keeps resources to 1e-4)
EPS = 1e-6


class PlacementError(ValueError):
    """A plan whose stages can never be placed on the cluster at once."""


@dataclass(frozen=True)
class NodeType:
    """A kind of node: its resources, how many run now and how many the autoscaler may have (None: no limit)."""

    name: str
    resources: Mapping[str, float]
    min_workers: int = 0
    max_workers: int | None = None
    existing: int = 0

    def fits(self, bundle: Mapping[str, float]) -> bool:
        return _Node(self, dict(self.resources), []).fits(bundle)


def _devices(gpus: float) -> list[float]:
    """A node's GPUs as devices, each with its free share (a node that declares a fraction has one device)."""
    whole = math.floor(gpus + EPS)
    return [1.0] * whole + ([gpus - whole] if gpus - whole > EPS else [])


def _gpu_slots(devices: Sequence[float], need: float) -> list[int] | None:
    """The devices Ray's raylet gives a GPU request (NodeResourceInstanceSet::TryAllocate): a fraction goes to the
    device it fits best, a whole number to as many whole free devices; None when it does not fit."""
    if need <= EPS:
        return []
    if need < 1:
        fitting = [i for i, free in enumerate(devices) if free + EPS >= need]
        return [min(fitting, key=lambda i: devices[i] - need)] if fitting else None
    whole = [i for i, free in enumerate(devices) if free >= 1 - EPS]
    return whole[:round(need)] if len(whole) >= round(need) else None


@dataclass(frozen=True)
class ClusterSpec:
    """The node types a plan may use, and where they were read from."""

    source: str
    node_types: tuple[NodeType, ...]
    shared_paths: tuple[str, ...] | None = None   # paths every node shares (None: not known, a running cluster)

    def max_total(self, key: str) -> float:
        """The most of one resource the cluster can ever hold (inf when a type carrying it has no maximum)."""
        total = 0.0
        for t in self.node_types:
            amount = t.resources.get(key, 0.0)
            if amount > 0:
                total += math.inf if t.max_workers is None else amount * t.max_workers
        return total


@dataclass(frozen=True)
class Placement:
    """A phase's actors on nodes: how many nodes of each type it needs at once."""

    phase: str
    nodes: Mapping[str, int]
    stages_on: Mapping[str, tuple[str, ...]]

    def describe(self) -> str:
        return ", ".join(f"{name} x{n} ({', '.join(self.stages_on[name])})" for name, n in self.nodes.items())


@dataclass
class _Node:
    type: NodeType
    free: dict[str, float]
    stages: list[str]
    gpus: list[float] = field(default_factory=list)   # each device's free share

    def __post_init__(self) -> None:
        self.gpus = self.gpus or _devices(self.free.get("GPU", 0.0))

    def fits(self, bundle: Mapping[str, float]) -> bool:
        totals = all(self.free.get(k, 0.0) + EPS >= v for k, v in bundle.items() if v > 0 and k != "GPU")
        return totals and _gpu_slots(self.gpus, bundle.get("GPU", 0.0)) is not None

    def take(self, bundle: Mapping[str, float], stage: str) -> None:
        need = bundle.get("GPU", 0.0)
        for i in _gpu_slots(self.gpus, need) or []:
            self.gpus[i] -= min(need, 1.0)
        for k, v in bundle.items():
            self.free[k] = self.free.get(k, 0.0) - v
        if stage not in self.stages:
            self.stages.append(stage)


def _gpu_waste(node_type: NodeType, bundle: Mapping[str, float]) -> bool:
    """A bundle that needs no GPU placed on a GPU node: allowed, but other nodes are preferred."""
    return not bundle.get("GPU") and node_type.resources.get("GPU", 0.0) > 0


def phase_totals(stages: Sequence[StageResources]) -> dict[str, float]:
    """What one phase's stages ask for at once, per resource."""
    keys = sorted({k for s in stages if not s.tasks for k in s.bundle()}, key=lambda k: (k not in ("CPU", "GPU"), k))
    return {k: sum(s.total(k) for s in stages) for k in keys}


def pack(stages: Sequence[StageResources], cluster: ClusterSpec, phase: str = TRAINING_PHASE) -> Placement:
    """Place one phase's actors on the cluster's nodes (running ones first, then new ones of the smallest type
    that fits); PlacementError, naming the stages and the settings that size them, when they cannot all fit."""
    _check_totals(stages, cluster, phase)
    nodes = [_Node(t, dict(t.resources), []) for t in cluster.node_types for _ in range(t.existing)]
    opened = {t.name: t.existing for t in cluster.node_types}
    for s in (s for s in stages if s.tasks):
        if not any(t.fits(s.bundle()) for t in cluster.node_types):
            raise PlacementError(_cannot_place(s, stages, cluster, phase))
    order = sorted((s for s in stages if not s.tasks), key=lambda s: (-s.gpus, -len(s.custom), -s.cpus))
    for s in order:
        bundle = s.bundle()
        for placed in range(s.actors):
            node = min((n for n in nodes if n.fits(bundle)), key=lambda n: _gpu_waste(n.type, bundle), default=None)
            if node is None or _gpu_waste(node.type, bundle):  # a new node, unless only a GPU node would do
                new = _open(cluster, opened, bundle, avoid_gpus=node is not None)
                if new is not None:
                    nodes.append(new)
                    node = new
            if node is None:
                raise PlacementError(_cannot_place(s, stages, cluster, phase, placed))
            node.take(bundle, s.stage)
    counts: dict[str, int] = {}
    on: dict[str, list[str]] = {}
    for n in nodes:
        if n.stages:
            counts[n.type.name] = counts.get(n.type.name, 0) + 1
            on.setdefault(n.type.name, [])
            on[n.type.name] += [x for x in n.stages if x not in on[n.type.name]]
    return Placement(phase, counts, {k: tuple(v) for k, v in on.items()})


def _open(cluster: ClusterSpec, opened: dict[str, int], bundle: Mapping[str, float],
          avoid_gpus: bool = False) -> _Node | None:
    """A new node of the smallest type that fits the bundle and is below its maximum (with `avoid_gpus`, only a
    type that spares GPUs the bundle does not use), or None."""
    room = [t for t in cluster.node_types
            if t.fits(bundle) and (t.max_workers is None or opened[t.name] < t.max_workers)
            and not (avoid_gpus and _gpu_waste(t, bundle))]
    if not room:
        return None
    t = min(room, key=lambda t: (_gpu_waste(t, bundle), t.resources.get("GPU", 0.0), t.resources.get("CPU", 0.0)))
    opened[t.name] += 1
    return _Node(t, dict(t.resources), [])


def _check_totals(stages: Sequence[StageResources], cluster: ClusterSpec, phase: str) -> None:
    """PlacementError when a phase asks for more of a resource at once than the whole cluster can ever hold."""
    for key, need in phase_totals(stages).items():
        have = cluster.max_total(key)
        if need > have + EPS:
            users = [s for s in stages if s.total(key) > 0]
            parts = "; ".join(f"{s.stage}: {s.actors} x {s.bundle()[key]:g}"
                              + (f" ({', '.join(s.keys_for(key))})" if s.keys_for(key) else "") for s in users)
            raise PlacementError(
                f"the {phase} phase holds {need:g} {key} at once ({parts}), but {cluster.source} has at most "
                f"{have:g} {key}. {_advice(key, users, have)}")


def _cannot_place(stage: StageResources, stages: Sequence[StageResources], cluster: ClusterSpec, phase: str,
                  placed: int = 0) -> str:
    bundle = stage.bundle()
    if not any(t.fits(bundle) for t in cluster.node_types):
        shapes = "; ".join(f"{t.name}: {_fmt(t.resources)}" for t in cluster.node_types)
        keys = ", ".join(k for k in stage.keys if k)
        return (f"{stage.stage}: one actor asks for {_fmt(bundle)} ({keys}), which no node of {cluster.source} holds "
                f"({shapes}). Lower the per-actor amounts, or add a node type that has them.")
    keys = ", ".join(k for k in stage.keys if k)
    hosts = ", ".join(f"{t.name} (at most {t.max_workers})" for t in cluster.node_types if t.fits(bundle))
    share = bundle.get("GPU", 0.0)
    fit = math.floor(1 / share + EPS) if 0 < share < 1 else 0
    per_device = (f" A GPU share stays on one device: a GPU holds {fit} share{'s' if fit > 1 else ''} of {share:g},"
                  " whatever the node's GPUs add up to." if fit else "")
    return (f"the {phase} phase does not fit the nodes of {cluster.source}: {placed} of the {stage.actors} "
            f"{stage.stage} ({keys}) found room on the nodes that can hold one ({hosts}) next to the stages placed "
            f"before them.{per_device} Lower the count or the per-actor amounts, or raise those nodes' maximum.")


TRAINING = "training workers"


def _advice(key: str, users: Sequence[StageResources], have: float) -> str:
    keys = ", ".join(k for s in users for k in s.keys_for(key))
    text = f"Change {keys}, or add nodes." if keys else "Add nodes."
    names = {s.stage for s in users}
    if key == "GPU" and TRAINING in names and len(names) > 1:
        text += (" Generation and training run at the same time in the stream modes: "
                 f"{_gpu_split(users, have)}, or generate first (`synray generate`) and train with data.mode=stored.")
    return text


def _gpu_split(users: Sequence[StageResources], have: float) -> str:
    """A split of `have` GPUs that Ray can place: training workers on whole GPUs (NCCL refuses two ranks on one
    device; a single worker may share), the other GPU actors sharing the GPUs left, each share on one device."""
    train = next(s for s in users if s.stage == TRAINING)
    others = [s for s in users if s.stage != TRAINING]
    actors = sum(s.actors for s in others)
    gpu_keys = [s.keys[2] for s in others if len(s.keys) > 2]
    whole = math.floor(have + EPS)
    if whole >= 2:
        workers = min(train.actors, whole - 1)
        free = whole - workers
        per_gpu = math.ceil(actors / free)
        share = " and ".join(f"{k}={math.floor(100 / per_gpu) / 100:g}" for k in gpu_keys)
        return (f"{train.keys[0]}={workers} on whole GPUs, and {share} ({per_gpu} actor(s) on each of the other "
                f"{free} GPU(s))")
    share = math.floor(100 / (actors + 1)) / 100
    fractions = " and ".join(f"{k}={share:g}" for k in (*gpu_keys, train.keys[2]))
    return (f"one training worker may share a GPU ({train.keys[0]}=1 with {fractions} puts {actors + 1} actors on "
            "it; two workers on one GPU are refused by NCCL)")


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items() if v)


# ------------------------------------------------------------------------------ cluster files
def load_cluster_file(path: str | Path) -> ClusterSpec:
    """Node types from a Ray cluster-launcher YAML (available_node_types) or a KubeRay RayJob/RayCluster manifest."""
    if not Path(path).is_file():
        raise PlacementError(f"cluster file {path} (--cluster) does not exist")
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if isinstance(d, dict)]
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise PlacementError(f"cluster file {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    for doc in docs:
        if "available_node_types" in doc:
            return _from_launcher(doc, str(path))
        if doc.get("kind") in ("RayJob", "RayCluster"):
            return _from_kuberay(doc, str(path), docs)
    raise PlacementError(f"{path}: neither a Ray cluster-launcher file (available_node_types) nor a KubeRay "
                         "RayJob/RayCluster manifest")


def _from_launcher(doc: dict[str, Any], source: str) -> ClusterSpec:
    head = doc.get("head_node_type")
    types = []
    for name, spec in doc["available_node_types"].items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if "CPU" not in resources:
            raise PlacementError(f"{source}: node type {name} declares no CPU in resources; declare CPU and GPU "
                                 "so that plans can be checked without launching it")
        if name == head:
            types.append(NodeType(name, resources, 1, 1, existing=1))
        else:
            types.append(NodeType(name, resources, int(spec.get("min_workers", 0)), spec.get("max_workers")))
    return ClusterSpec(source, tuple(types), launcher_shared_paths(doc))


def _from_kuberay(doc: dict[str, Any], source: str, docs: list[dict[str, Any]]) -> ClusterSpec:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    head = spec["headGroupSpec"]
    types = [NodeType("head", _ray_start_resources(head), 1, 1, existing=1)]
    for group in spec.get("workerGroupSpecs", []):
        types.append(NodeType(group["groupName"], _ray_start_resources(group), int(group.get("minReplicas", 0)),
                              group.get("maxReplicas")))
    return ClusterSpec(source, tuple(types), kuberay_shared_paths(docs, spec))


def _ray_start_resources(group: dict[str, Any]) -> dict[str, float]:
    """A KubeRay group's resources: rayStartParams (num-cpus, num-gpus, resources), else the container's limits."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    cpus = params.get("num-cpus", limits.get("cpu", 0))
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    out = {"CPU": float(cpus), **({"GPU": float(gpus)} if float(gpus) else {})}
    custom: Any = params.get("resources")
    while isinstance(custom, str) and custom:  # KubeRay wants a quoted JSON string: '"{\"train_node\": 1}"'
        custom = json.loads(custom)
    out.update({k: float(v) for k, v in (custom or {}).items()})
    return out
