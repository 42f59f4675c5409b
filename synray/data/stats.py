"""Pipeline counters: a small Ray actor that stages report to (rows, busy time, rejections by reason)."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any


class StageStats:
    """Counters of one generation run. Used as a Ray actor (`ray.remote(StageStats)`) by the pipeline."""

    def __init__(self) -> None:
        self.rows: Counter[str] = Counter()
        self.busy_s: Counter[str] = Counter()
        self.first_start: dict[str, float] = {}
        self.last_end: dict[str, float] = {}
        self.first_end: dict[str, tuple[float, int]] = {}
        self.rejected: dict[str, Counter[str]] = defaultdict(Counter)

    def record(self, stage: str, rows: int, start: float, end: float, busy_s: float | None = None) -> None:
        self.rows[stage] += rows
        self.busy_s[stage] += (end - start) if busy_s is None else busy_s
        self.first_start[stage] = min(self.first_start.get(stage, start), start)
        self.last_end[stage] = max(self.last_end.get(stage, end), end)
        if stage not in self.first_end or end < self.first_end[stage][0]:
            self.first_end[stage] = (end, rows)

    def reject(self, stage: str, reasons: dict[str, int]) -> None:
        self.rejected[stage].update(reasons)

    def summary(self) -> dict[str, Any]:
        stages = {}
        for stage, rows in self.rows.items():
            span = max(self.last_end[stage] - self.first_start[stage], 1e-9)
            first_end, first_rows = self.first_end[stage]
            steady_s = self.last_end[stage] - first_end
            stages[stage] = {
                "rows": rows,
                "busy_s": round(self.busy_s[stage], 3),
                "active_s": round(span, 3),
                "rows_per_s": round(rows / span, 3),
                # after the first output (so engine/model start-up is left out); null with one batch
                "steady_rows_per_s": round((rows - first_rows) / steady_s, 3) if steady_s > 0 else None,
            }
        return {"stages": stages, "rejected": {k: dict(v) for k, v in self.rejected.items()}}


class StatsClient:
    """What a stage UDF holds: forwards counts to the actor without waiting (or keeps them locally)."""

    def __init__(self, actor: Any | None) -> None:
        self.actor = actor
        self.local = StageStats() if actor is None else None

    def record(self, stage: str, rows: int, start: float, end: float | None = None) -> None:
        end = time.time() if end is None else end
        if self.actor is not None:
            self.actor.record.remote(stage, rows, start, end)
        else:
            self.local.record(stage, rows, start, end)

    def reject(self, stage: str, reasons: dict[str, int]) -> None:
        if not reasons:
            return
        if self.actor is not None:
            self.actor.reject.remote(stage, dict(reasons))
        else:
            self.local.reject(stage, reasons)


def rejections_text(rejected: dict[str, dict[str, int]]) -> str:
    """`{"captions": {"too_short": 3}}` -> "captions: too_short=3" (stages with rejections only)."""
    return "; ".join(f"{stage}: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items()))
                     for stage, reasons in rejected.items() if reasons)
