"""A run, sweep or benchmark as the experiment tracker sees it: the run it opens, the training metrics it follows
while Ray Train runs, and what it logs at the end (figures, counters, files, the backbone)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from synray.config import RunConfig
from synray.tracking import NONE, Buffered, RunRef, flat_params, get_tracker, numeric

__all__ = ["MetricsFollower", "TRACKING_FILE", "TRAIN_PREFIX", "log_outcome", "open_run", "outcome_metrics",
           "tracked_run"]

log = logging.getLogger(__name__)

#: the training metrics' names in the tracker: train/loss, train/lr, train/world_size, ...
TRAIN_PREFIX = "train/"
#: report fields that are not metrics of the step
NOT_METRICS = ("step", "time", "checkpoint_score")


#: a run directory's (or a sweep directory's) run in the tracker (a RunRef): a continued run logs to the same one
TRACKING_FILE = "tracking.json"


def open_run(cfg: RunConfig, run_name: str, tags: Mapping[str, str], parent: RunRef | None = None,
             saved: Any = None, experiment: str | None = None) -> Buffered | None:
    """The config's tracker's run (None with tracking.backend=none), with the resolved config, flattened, as its
    parameters; the caller closes it. `saved` (a path or a Location): where the run's reference is kept, so that a
    continued run (the same run directory or sweep, resubmitted) goes on logging to the same tracked run when its
    config names the same tracker. `experiment`: the experiment when tracking.experiment is unset (default: the
    config's name)."""
    t = cfg.tracking
    if t.backend == NONE:
        return None
    cls = get_tracker(t.backend)
    ref = RunRef(**json.loads(saved.read_text())) if saved is not None and saved.is_file() else None
    if ref is not None and ref.backend == t.backend:
        log.info("tracking: continuing %s run %s at %s", ref.backend, ref.run_id, ref.where)
    else:   # a new run (or a continued run whose config now names another tracker)
        ref = cls.start(t, cfg.output_root, t.experiment or experiment or cfg.name, run_name, dict(tags), parent)
        log.info("tracking: %s run %s at %s", t.backend, ref.run_id, ref.where)
        if saved is not None:
            saved.write_text(json.dumps(ref.to_dict()))
    run = Buffered(cls(ref))
    run.log_params(flat_params(cfg.to_dict()))
    return run


@contextmanager
def tracked_run(cfg: RunConfig, run_name: str, tags: Mapping[str, str], parent: RunRef | None = None,
                saved: Any = None, experiment: str | None = None) -> Iterator[Buffered | None]:
    """`open_run` for the body: the run ends FINISHED, or FAILED when the body raises."""
    run = open_run(cfg, run_name, tags, parent, saved, experiment)
    if run is None:
        yield None
        return
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        run.close(status)


class MetricsFollower:
    """Follows the training metrics log that Ray Train's controller appends to (one line a report: its callback,
    `synray.train.trainer.MetricsLog`) and sends each report to the tracker as it comes, from the driver: no
    worker waits on the tracker, and a tracker that is down gets the reports it missed when it is back."""

    def __init__(self, path: Path, run: Buffered, every_s: float = 2.0) -> None:
        self.path, self.run, self.every_s = Path(path), run, every_s
        self.offset = self.path.stat().st_size if self.path.exists() else 0   # a continued run's earlier reports
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="synray-metrics-follower", daemon=True)

    def __enter__(self) -> "MetricsFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()   # the reports written since the last look

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]   # a line the controller is still writing waits
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            row = json.loads(line)
            if "loss" not in row:
                continue
            values = {f"{TRAIN_PREFIX}{k}": v for k, v in numeric(row).items() if k not in NOT_METRICS}
            self.run.log_metrics(values, int(row["step"]), row.get("time"))
            self.sent += 1
        self.run.flush()


def _prefixed(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in numeric(values).items()}


def outcome_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """A run's end figures as metrics: the evaluation of the trained and the initial network, the generation
    stages' counters and rejections, the training totals and the device-hours each stage held."""
    out: dict[str, float] = {}
    for side, figures in (summary.get("eval") or {}).items():
        if isinstance(figures, Mapping):
            out.update(_prefixed(f"eval/{side}/", figures))
    for stage, counters in (summary.get("stages") or {}).items():
        out.update(_prefixed(f"stages/{stage}/", counters))
    for stage, reasons in (summary.get("rejected") or {}).items():
        out.update(_prefixed(f"rejected/{stage}/", reasons))
    train = summary.get("train") or {}
    out.update(_prefixed(f"{TRAIN_PREFIX}summary/", train))
    for stage, used in (train.get("device_hours") or {}).items():
        out.update(_prefixed(f"device_hours/{stage}/", used))
    return out


#: the run directory's files a tracker keeps (those that exist)
RUN_FILES = ("summary.json", "config.yaml", "loss_curve.png", "samples.png", "metrics.csv")


def log_outcome(run: Buffered, run_dir: Path, summary: Mapping[str, Any], step: int,
                backbone: str | None, model_name: str) -> None:
    """The end of a run in the tracker: its figures (at the last step), the run directory's files, the exported
    backbone (registered as a version of `model_name` where the backend has a model registry)."""
    run.log_metrics(outcome_metrics(summary), step)
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            run.log_artifact(run_dir / name)
    if backbone and Path(backbone).is_dir():
        run.log_artifact(Path(backbone), "backbone")
        if run.tracker.has_registry:
            run.register_model(model_name, "backbone")
