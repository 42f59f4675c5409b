"""Experiment tracking: the registry of trackers (`tracking.backend`), and what a run, a sweep and a benchmark log."""

from __future__ import annotations

from synray.tracking.base import Buffered, RunRef, Tracker, TrackerError, flat_params, numeric
from synray.tracking.mlflow_backend import MlflowTracker
from synray.tracking.tensorboard_backend import TensorBoardTracker
from synray.tracking.wandb_backend import WandbTracker

__all__ = ["TRACKERS", "NONE", "Buffered", "RunRef", "Tracker", "TrackerError", "check_tracking",
           "flat_params", "get_tracker", "numeric", "tracker_names"]

#: tracking.backend: no tracker, only the run directory
NONE = "none"
#: tracking.backend -> tracker class; a new backend is one entry here (a Tracker subclass)
TRACKERS: dict[str, type[Tracker]] = {cls.name: cls for cls in (MlflowTracker, TensorBoardTracker, WandbTracker)}


def tracker_names() -> tuple[str, ...]:
    return (NONE, *TRACKERS)


def get_tracker(name: str) -> type[Tracker]:
    try:
        return TRACKERS[name]
    except KeyError:
        raise TrackerError(f"tracking.backend {name!r} is not available; allowed: "
                           f"{', '.join(tracker_names())}") from None


def check_tracking(cfg, output_root: str) -> str | None:
    """Reach the config's tracker once (TrackerError when it cannot be used); where its runs go, or None."""
    if cfg.backend == NONE:
        return None
    return get_tracker(cfg.backend).check(cfg, output_root)
