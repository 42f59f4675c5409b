"""Device-hours a run held, by stage: what its stages reserved of the cluster's GPUs and CPUs while training ran."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from synray.stages import TRAINING_PHASE, TRAINING_WORKERS, StageResources

__all__ = ["device_hours"]


def device_hours(stages: Sequence[StageResources], reports: Sequence[dict[str, Any]], fit_start: float,
                 fit_end: float) -> dict[str, dict[str, float]]:
    """{stage: {"GPU": hours, "CPU": hours}} held during the fit, from each stage's declared request (the plan's
    stages): the training group by its reported size between reports (`world_size`, the time from the fit's start
    or the last report to each report at that report's size), every other actor stage of the training phase for the
    fit's whole time (a stream's pools live as long as training reads them); short tasks hold nothing. Each device
    a stage asks for is listed, and "total" sums them."""
    out: dict[str, dict[str, float]] = {}
    span_h = max(0.0, fit_end - fit_start) / 3600
    for s in stages:
        if s.tasks or s.phase != TRAINING_PHASE:
            continue
        held = {"GPU": s.gpus, "CPU": s.cpus}
        if s.stage == TRAINING_WORKERS:
            worker_h = _worker_hours(reports, fit_start, fit_end, s.actors)
            out[s.stage] = {k: round(v * worker_h, 4) for k, v in held.items() if v}
        else:
            out[s.stage] = {k: round(v * s.actors * span_h, 4) for k, v in held.items() if v}
    total: dict[str, float] = {}
    for used in out.values():
        for k, v in used.items():
            total[k] = round(total.get(k, 0.0) + v, 4)
    return {**out, "total": total}


def _worker_hours(reports: Sequence[dict[str, Any]], fit_start: float, fit_end: float, default: int) -> float:
    """Worker-hours of the group during the fit: each interval between reports at the size of the report that ends
    it; the time after the last report at its size (`default`, the group's largest, when nothing was reported)."""
    timed = sorted((r["time"], int(r.get("world_size", default))) for r in reports
                   if "time" in r and fit_start <= r["time"] <= fit_end)
    seconds, last, size = 0.0, fit_start, default
    for when, size in timed:
        seconds += (when - last) * size
        last = when
    seconds += (fit_end - last) * size
    return seconds / 3600
