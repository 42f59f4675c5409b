"""What `synray bench` measures, as ratios with goals: the records, the printed table and bench.json."""

from __future__ import annotations

import datetime as dt
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from synray.data.files import write_json

__all__ = ["Ratio", "BenchReport", "machine"]


@dataclass
class Ratio:
    """One figure measured side by side in this run: `value` = measured / reference, with its goal."""

    key: str                      # "a.trainer_vs_memory"
    what: str                     # one line saying what was divided by what
    value: float
    goal: float
    higher_is_better: bool = True  # goal is a minimum (>=) or a maximum (<=)
    detail: dict[str, Any] = field(default_factory=dict)  # the measured figures behind the ratio

    @property
    def holds(self) -> bool:
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    @property
    def goal_text(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.goal:g}"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__, "python": platform.python_version()}


@dataclass
class BenchReport:
    """Every ratio of one `synray bench` run, with the machine, the date and what was skipped (and why)."""

    mode: str                                   # "quick" or "full"
    config: str | None                          # the config whose models were used (None: tiny models)
    ratios: list[Ratio] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=machine)
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    elapsed_s: float = 0.0

    def add(self, ratios: list[Ratio]) -> None:
        self.ratios.extend(ratios)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for r, d in zip(self.ratios, out["ratios"]):
            d["holds"], d["goal_text"] = r.holds, r.goal_text
        return out

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    def table(self) -> str:
        """The Markdown table docs/benchmarks.md shows (and `synray bench` prints)."""
        gpu = self.machine.get("gpu") or "no GPU"
        lines = [f"`synray bench{' --quick' if self.mode == 'quick' else ''}` on {self.machine['cpu_cores']} CPU "
                 f"cores ({gpu}), {self.date}, {self.elapsed_s:.0f} s"
                 + (f", models of config `{self.config}`" if self.config else ", tiny models"), "",
                 "| | ratio | measured | goal | holds |", "|---|---|---|---|---|"]
        for r in self.ratios:
            lines.append(f"| {r.key} | {r.what} | {r.value:.3f} | {r.goal_text} | {'yes' if r.holds else 'no'} |")
        for key, why in self.skipped.items():
            lines.append(f"| {key} | skipped: {why} | | | |")
        return "\n".join(lines)
