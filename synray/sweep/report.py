"""`synray report SWEEP_DIR`: the results table of a sweep (CSV and Markdown), scaling-law fits of error against
data scale per swept method (PNG plots; the fits with their intervals, the law chosen and the extrapolation check in
fits.json and fits.md)."""

from __future__ import annotations

import csv
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from synray.config import ConfigError, RunConfig, load_config
from synray.data.files import atomic_write_text, write_json
from synray.data.storage import Location, copy_tree, local_file
from synray.eval.registry import LOSS_METRIC, headline_metrics, validation_figures
from synray.sweep.budget import write_allocation
from synray.sweep.fit import MIN_SCALES, WITH_C, ScalingFitError, fit_scaling
from synray.sweep.rules import SWEEP_CONFIG
from synray.sweep.space import SCALE_KEY, file_slug, method_name

__all__ = ["TRIALS_DIR", "TRIAL_FILE", "START_FILE", "SweepReport", "load_trials", "write_report", "group_name"]

TRIALS_DIR = "trials"
#: what each trial writes into its folder when it finishes: its parameters, config paths and figures
TRIAL_FILE = "trial.json"
#: what each trial writes when it starts (its parameters and data scale), so an unfinished one is reported too
START_FILE = "started.json"


@dataclass
class SweepReport:
    """What `write_report` wrote and found."""

    rows: list[dict[str, Any]]
    files: list[Path | str] = field(default_factory=list)
    fits: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] = field(default_factory=dict)
    allocation_lines: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    selection_lines: list[str] = field(default_factory=list)
    failed: int = 0                  # trials Tune reports as errored (set by the sweep program)

    def table_lines(self) -> list[str]:
        """The results table as Markdown (results.md), one row per trial."""
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        return lines + ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in self.rows]

    def fit_lines(self) -> list[str]:
        """Each group's law, intervals, choice of law and extrapolation check, as printed and in fits.md; then the
        allocation (as in allocation.md) where the sweep varies captions and images per caption."""
        lines = [line for name, g in self.fits.get("groups", {}).items() for line in describe_fit(name, g)]
        return lines + self.allocation_lines + self.selection_lines


def describe_fit(name: str, g: dict[str, Any]) -> list[str]:
    """The lines that say what one group's fit (`ScalingFit.to_dict`) found."""
    law, pct = g["law"], f"{100 * g['confidence']:.0f}%"
    floor = f" + {law['c']:.4f}" if g["form"] == WITH_C else ""
    lines = [f"{name}: error = {law['a']:.4g} * N^-{law['k']:.3f}{floor}  ({g['points']} trials, "
             f"{len(set(g['scales']))} data scales)"]
    if math.isfinite(g["k_low"]):
        c_part = f", c in [{g['c_low']:.4f}, {g['c_high']:.4f}]" if g["form"] == WITH_C else ""
        lines.append(f"  {pct} intervals: k in [{g['k_low']:.3f}, {g['k_high']:.3f}]{c_part} ({g['interval']})")
    lines.append(f"  law {g['form']}: {g['chosen']}")
    extrapolation = g.get("extrapolation")
    lines.append(f"  extrapolation check: {extrapolation['summary']}" if extrapolation
                 else "  " + "; ".join(n for n in g["notes"] if "extrapolation" in n))
    return lines


def load_trials(root: str | Path | Location) -> list[dict[str, Any]]:
    """Every trial's record, in trial-id order: finished ones from their TRIAL_FILE, the others (stopped early by
    the scheduler, failed or interrupted) from their START_FILE and the last step their training logged (when
    its log is on shared storage: a trial under a cloud URI keeps it on its driver's node)."""
    out = []
    for d in Location.of(root).join(TRIALS_DIR).children():
        if d.join(TRIAL_FILE).is_file():
            out.append({**json.loads(d.join(TRIAL_FILE).read_text()), "status": "finished"})
        elif d.join(START_FILE).is_file():
            log = d.join("train", "metrics.jsonl")
            logged = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] \
                if log.is_file() else []
            last = next((m for m in reversed(logged) if "loss" in m), {})
            out.append({**json.loads(d.join(START_FILE).read_text()), "status": "unfinished",
                        "steps": last.get("step", 0), "train": {"final_loss": last.get("loss")},
                        "trained": {}, "init": {}})
    return out


def _value(trial: dict[str, Any], metric: str) -> float | None:
    """A finished trial's figure: a probe's (trained), or its final training loss."""
    if trial.get("status") != "finished":
        return None
    if metric == LOSS_METRIC:
        return trial.get("train", {}).get("final_loss")
    return trial.get("trained", {}).get(metric)


#: swept keys whose values are replicates of one method (its trials at one scale are separate points of one fit)
REPLICATE_KEYS = ("seed",)


def group_name(params: dict[str, Any]) -> str:
    """A trial's method: its variant and swept values other than the data scale and the seed."""
    return method_name(params, REPLICATE_KEYS)


def _scale(trial: dict[str, Any], unit: str) -> float:
    return float(trial["captions"] * (trial["images_per_caption"] if unit == "images" else 1))


def _table_rows(trials: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    rows, validation = [], validation_figures()
    for t in trials:
        row: dict[str, Any] = {"trial": t["trial_id"], **{k: v for k, v in sorted(t["params"].items())},
                               "status": t["status"], "captions": t["captions"],
                               "images_per_caption": t["images_per_caption"], "steps": t.get("steps"),
                               "final_loss": t.get("train", {}).get("final_loss")}
        for m in dict.fromkeys((metric, *headline_metrics())):   # the figures the trials have
            if m in t.get("trained", {}):
                row[m] = t["trained"][m]
                row[f"{m} (init)"] = t.get("init", {}).get(m)
                if validation.get(m) in t["trained"]:
                    row[validation[m]] = t["trained"][validation[m]]
        rows.append(row)
    return rows


def selection(trials: list[dict[str, Any]], metric: str) -> list[str]:
    """The trial each method would be picked by, overall and per method: chosen on the metric's validation figure
    (a part of each trial's reference side), reporting its query figure, which takes no part in the choice."""
    validation = validation_figures()
    chosen_on = validation.get(metric, metric if metric == LOSS_METRIC else None)
    if chosen_on is None:
        return [f"selection: {metric} has no validation figure (only {', '.join(validation)} do); no trial "
                "is chosen here, to keep the query figures out of the choice"]
    sign = -1 if chosen_on == LOSS_METRIC else 1   # probe figures are maximised, the loss minimised
    scored = [(t, _value(t, chosen_on), _value(t, metric)) for t in trials]
    scored = [(t, v, q) for t, v, q in scored if v is not None and math.isfinite(v)]
    if not scored:
        return []
    groups: dict[str, list] = {}
    for item in scored:
        groups.setdefault(group_name(item[0]["params"]), []).append(item)
    if len(groups) > 1:
        groups = {"all trials": scored, **groups}
    lines = [f"selection on {chosen_on}" + (" (a validation part of each trial's reference side); the query "
                                            f"{metric} is reported, never used to choose:" if chosen_on != LOSS_METRIC
                                            else " (the final training loss):")]
    for name, items in groups.items():
        t, v, q = max(items, key=lambda item: sign * item[1])
        params = ", ".join(f"{k}={p}" for k, p in sorted(t["params"].items()))
        lines.append(f"  {name}: trial {t['trial_id']} ({params}): {chosen_on} {v:.4f}, {metric} {_fmt(q)}")
    return lines


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _write_tables(report: SweepReport, out: Path) -> list[Path]:
    keys = list(dict.fromkeys(k for r in report.rows for k in r))
    csv_path, md_path = out / "results.csv", out / "results.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(report.rows)
    atomic_write_text(md_path, "\n".join(report.table_lines()) + "\n")
    return [csv_path, md_path]


#: what a report writes into its folder (cleared first: a report of another metric leaves nothing behind)
REPORT_FILES = ("results.*", "selection.md", "fits.*", "scaling*.png", "allocation*")


def _check_metric(trials: list[dict[str, Any]], metric: str) -> None:
    """ConfigError when no finished trial has a value of `metric`, naming the figures they have."""
    finished = [t for t in trials if t.get("status") == "finished"]
    if finished and all(_value(t, metric) is None for t in finished):
        have = sorted({LOSS_METRIC, *(m for t in finished for m in t.get("trained", {}))})
        raise ConfigError(f"no finished trial has a value of {metric} (--metric, else tune.metric); "
                          f"they have: {', '.join(have)}")


def _error(value: float, mode: str) -> float:
    """The error a figure stands for: 1 - metric for accuracies (mode max), the metric itself for min."""
    return 1.0 - value if mode == "max" else value


def _groups(trials: list[dict[str, Any]], metric: str, unit: str, mode: str) -> dict[str, tuple[list, list]]:
    """method -> (data scales, errors)."""
    out: dict[str, tuple[list, list]] = {}
    for t in trials:
        value = _value(t, metric)
        if value is None or not math.isfinite(value):
            continue
        n, e = out.setdefault(group_name(t["params"]), ([], []))
        n.append(_scale(t, unit))
        e.append(_error(value, mode))
    return out


def write_report(root: str | Path | Location, metric: str | None = None) -> SweepReport:
    """Write results.csv/.md, scaling plots and fits.json under root/report (a sweep directory, or its cloud URI:
    the report is made in a local folder and uploaded); returns what was found."""
    where = Location.of(root)
    if where.is_local:
        return _write_report(where, Path(where.path) / "report", metric)
    with tempfile.TemporaryDirectory(prefix="synray-report-") as tmp:
        report = _write_report(where, Path(tmp), metric)
        copy_tree(tmp, where.join("report"))
    report.files = [where.join("report", Path(f).name).uri for f in report.files]
    return report


def _write_report(where: Location, out: Path, metric: str | None) -> SweepReport:
    with local_file(where.join(SWEEP_CONFIG)) as path:
        cfg: RunConfig = load_config(path)
    from synray.viz import scaling_plot  # matplotlib only when a report is written
    metric = metric or cfg.tune.metric
    trials = load_trials(where)
    _check_metric(trials, metric)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in REPORT_FILES:
        for stale in out.glob(pattern):
            stale.unlink()
    report = SweepReport(_table_rows(trials, metric))
    if not trials:
        report.messages.append(f"no finished trial under {where.join(TRIALS_DIR)}")
        return report
    report.files += _write_tables(report, out)
    report.selection_lines = selection(trials, metric)
    if report.selection_lines:
        atomic_write_text(out / "selection.md", "\n".join(report.selection_lines) + "\n")
        report.files.append(out / "selection.md")
    unit = cfg.tune.scale
    error = f"1 - {metric}" if cfg.tune.mode == "max" else metric
    inits = [t["init"][metric] for t in trials if metric in t.get("init", {})]
    reference = _error(float(np.mean(inits)), cfg.tune.mode) if inits else None
    curves = {}
    for name, (n, err) in sorted(_groups(trials, metric, unit, cfg.tune.mode).items()):
        scales = len(set(n))
        if scales < MIN_SCALES:
            report.messages.append(f"{name}: {scales} data scale(s); a power-law fit needs at least {MIN_SCALES} "
                                   f"(sweep {SCALE_KEY} over {MIN_SCALES} or more values); the table is written")
            continue
        try:
            fit = fit_scaling(n, err)
        except ScalingFitError as e:
            report.messages.append(f"{name}: {e}")
            continue
        curves[name] = fit
        report.files.append(scaling_plot({name: fit}, out / f"scaling-{file_slug(name)}.png", error, unit,
                                         reference=reference))
    if curves:
        report.files.append(scaling_plot(curves, out / "scaling.png", error, unit, title=cfg.name,
                                         reference=reference))
    report.fits = {"metric": metric, "error": error, "scale": unit,
                   "groups": {name: fit.to_dict() for name, fit in curves.items()}}
    write_json(out / "fits.json", report.fits)
    report.files.append(out / "fits.json")
    if curves:
        atomic_write_text(out / "fits.md", "\n".join(report.fit_lines()) + "\n")
        report.files.append(out / "fits.md")
    errors = [None if (v := _value(t, metric)) is None else _error(v, cfg.tune.mode) for t in trials]
    report.allocation, report.allocation_lines, files, messages = write_allocation(
        cfg, where, trials, errors, metric, error, out, REPLICATE_KEYS)
    report.files += files
    report.messages += messages
    return report
