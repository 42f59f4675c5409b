"""Actors that keep a run's bookkeeping: created on the job driver's node, so that they share its fate only."""

from __future__ import annotations

from typing import Any


def driver_actor(cls: type, *args: Any) -> Any:
    """An actor of `cls` (no CPU) pinned to the driver's node. Left to Ray's scheduler it may land on any node,
    a spot GPU node included, and go with it; the driver's node (the head, under `ray job submit`) is the one whose
    loss ends the run anyway. Ray Train pins its controller there for the same reason."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(cls).remote(*args)
