"""The allocation part of a sweep report: device-seconds per unit of work (measured by the sweep's pools and trials,
or declared in `tune.costs`), the law error(N, m) per method where the sweep varies captions and images per caption,
and the best split of each budget (allocation.md / allocation.json, and an iso-cost plot)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from synray.config import RunConfig
from synray.data.files import atomic_write_text, write_json
from synray.data.storage import Location
from synray.sweep.allocation import (MIN_CAPTION_SCALES, MIN_PER_CAPTION, AllocationFit, Split, UnitCostRates,
                                     captions_within, fit_allocation, splits_for_budget)
from synray.sweep.fit import ScalingFitError
from synray.sweep.rules import PER_CAPTION_KEY, POOLS_DIR, steps_rule
from synray.sweep.space import file_slug, method_name

__all__ = ["measured_rates", "unit_rates", "allocation_groups", "plan_group", "describe_allocation", "iso_cost",
           "write_allocation"]

#: what a summary of a pool names its caption and image stages
CAPTION_STAGE, IMAGE_STAGE = "captions", "images"


def measured_rates(pool_summaries: list[dict[str, Any]], trials: list[dict[str, Any]],
                   device: str) -> UnitCostRates | None:
    """Device-seconds per unit as this sweep measured them: the caption and image stages' busy time over the rows
    and images its pools generated, and the training workers' time per view (workers / views per second, the
    median over finished trials). None where any of them was not measured."""
    busy = {s: sum(p["stages"][s]["busy_s"] for p in pool_summaries if s in p.get("stages", {}))
            for s in (CAPTION_STAGE, IMAGE_STAGE)}
    # the rows this summary's generation wrote (a resumed pool's summary times only its last invocation)
    captions = sum(p.get("rows_written", p.get("rows_total", 0)) for p in pool_summaries
                   if CAPTION_STAGE in p.get("stages", {}))
    images = sum(p["stages"][IMAGE_STAGE]["rows"] * p.get("images_per_row", 1) for p in pool_summaries
                 if IMAGE_STAGE in p.get("stages", {}))
    per_view = [t["workers"] / t["train"]["images_per_s"] for t in trials
                if t.get("status") == "finished" and t.get("workers") and (t["train"].get("images_per_s") or 0) > 0]
    if not captions or not images or not per_view:
        return None
    return UnitCostRates(busy[CAPTION_STAGE] / captions, busy[IMAGE_STAGE] / images, float(np.median(per_view)),
                         f"measured by this sweep on its {device}s (stage busy time of its pools over "
                         f"{captions} captions and {images} images; training time per view, median of "
                         f"{len(per_view)} trials)", device)


def unit_rates(cfg: RunConfig, where: Location, trials: list[dict[str, Any]]) -> UnitCostRates | None:
    """`tune.costs` where the config declares them, else what the sweep measured."""
    declared = cfg.tune.costs
    if declared is not None:
        return UnitCostRates(declared.caption_s, declared.image_s, declared.view_s,
                             f"declared in tune.costs ({declared.device}; not measured by this sweep)",
                             declared.device)
    summaries = []
    pools = where.join(POOLS_DIR)
    for pool in (pools.children() if pools.is_dir() else []):
        if pool.join("_summary.json").is_file():
            summaries.append(json.loads(pool.join("_summary.json").read_text()))
    device = "GPU" if cfg.images.num_gpus or cfg.train.use_gpu else "CPU"
    return measured_rates(summaries, trials, device)


def allocation_groups(trials: list[dict[str, Any]], errors: list[float | None],
                      replicates: tuple[str, ...]) -> dict[str, list[tuple[dict[str, Any], float]]]:
    """method -> its finished trials with their errors, for the methods whose trials vary both the captions (3
    counts or more) and the images per caption (2 values or more)."""
    groups: dict[str, list[tuple[dict[str, Any], float]]] = {}
    for t, e in zip(trials, errors):
        if e is not None and math.isfinite(e) and "work" in t:
            groups.setdefault(method_name(t["params"], (PER_CAPTION_KEY, *replicates)), []).append((t, e))
    return {name: g for name, g in groups.items()
            if len({t["captions"] for t, _ in g}) >= MIN_CAPTION_SCALES
            and len({t["images_per_caption"] for t, _ in g}) >= MIN_PER_CAPTION}


def _trial_cost(t: dict[str, Any], rates: UnitCostRates) -> dict[str, float]:
    w = t["work"]
    return rates.of(w["captions"], w["images"], w["views"])


def _budgets(cfg: RunConfig, costs: list[float]) -> list[float]:
    if cfg.tune.budgets:
        return sorted(cfg.tune.budgets)
    return sorted({round(min(costs), 1), round(float(np.median(costs)), 1), round(max(costs), 1)})


def plan_group(cfg: RunConfig, group: list[tuple[dict[str, Any], float]], rates: UnitCostRates,
                ) -> tuple[AllocationFit, dict[str, Any], dict[float, list[Split]]]:
    n = [t["captions"] for t, _ in group]
    m = [t["images_per_caption"] for t, _ in group]
    fit = fit_allocation(n, m, [e for _, e in group])
    views = {t["images_per_caption"]: t["views_per_step"] for t, _ in group}
    steps_of = steps_rule(cfg)
    costs = [_trial_cost(t, rates) for t, _ in group]
    plans = {b: splits_for_budget(fit, rates, b, sorted(views), steps_of, views, (min(n), max(n)))
             for b in _budgets(cfg, [c["total"] for c in costs])}
    record = {"fit": fit.to_dict(),
              "trials": [{"trial": t["trial_id"], "captions": t["captions"], "images_per_caption":
                          t["images_per_caption"], "steps": t["steps"], "views_per_step": t["views_per_step"],
                          "error": e, "cost": cost, "predicted": fit.predict(t["captions"], t["images_per_caption"])[0]}
                         for (t, e), cost in zip(group, costs)],
              "budgets": {f"{b:g}": [s.to_dict() for s in splits] for b, splits in plans.items()}}
    return fit, record, plans


def iso_cost(budget: float, rates: UnitCostRates, steps_of: Any, views: dict[int, float],
             points: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """The splits that cost `budget`: m from the least to the most swept images per caption (views per step between
    swept values interpolated linearly) and the most captions the budget pays for at each."""
    swept = sorted(views)
    ms = np.geomspace(swept[0], swept[-1], points)
    ns = []
    for m in ms:
        per_step = float(np.interp(m, swept, [views[v] for v in swept]))
        ns.append(captions_within(budget, lambda n, m=m, v=per_step: rates.of(n, n * m, steps_of(n) * v)["total"]))
    return ms, np.array(ns, dtype=float)


def describe_allocation(name: str, fit: AllocationFit, plans: dict[float, list[Split]], device: str) -> list[str]:
    lines = [f"{name}: {fit.summary()}"]
    for budget, splits in plans.items():
        if not splits:
            lines.append(f"  {budget:g} {device}-s: too small for one caption")
            continue
        best, *others = splits
        lines.append(f"  {budget:g} {device}-s: best {best.sentence()}")
        lines += [f"      then {s.sentence()}" for s in others]
    return lines


def write_allocation(cfg: RunConfig, where: Location, trials: list[dict[str, Any]], errors: list[float | None],
                     metric: str, error_name: str, out: Path, replicates: tuple[str, ...],
                     ) -> tuple[dict[str, Any], list[str], list[Path], list[str]]:
    """allocation.json, allocation.md and an iso-cost plot per method whose trials vary N and m; returns the record,
    the lines printed, the files and messages (why no allocation was made)."""
    from synray.viz import allocation_plot  # matplotlib only when a report is written

    groups = allocation_groups(trials, errors, replicates)
    if not groups:
        return {}, [], [], []
    rates = unit_rates(cfg, where, trials)
    if rates is None:
        return {}, [], [], ["allocation: the sweep's pools or trials do not say what their work cost (no stage "
                            "summary or training throughput); declare tune.costs"]
    record: dict[str, Any] = {"metric": metric, "error": error_name, "unit_costs": {
        "caption_s": rates.caption_s, "image_s": rates.image_s, "view_s": rates.view_s, "source": rates.source,
        "device": rates.device}, "groups": {}}
    lines = [f"unit costs ({rates.device}-seconds): {rates.caption_s:.3g} per caption, {rates.image_s:.3g} per "
             f"image, {rates.view_s:.3g} per trained view; {rates.source}"]
    files, messages = [], []
    for name, group in sorted(groups.items()):
        try:
            fit, record["groups"][name], plans = plan_group(cfg, group, rates)
        except ScalingFitError as e:
            messages.append(f"allocation {name}: {e}")
            continue
        lines += describe_allocation(name, fit, plans, rates.device)
        views = {t["images_per_caption"]: t["views_per_step"] for t, _ in group}
        files.append(allocation_plot(fit, record["groups"][name]["trials"], plans,
                                     {b: iso_cost(b, rates, steps_rule(cfg), views) for b in plans},
                                     out / f"allocation-{file_slug(name)}.png", error_name, rates.device,
                                     title=f"{cfg.name}: {name}"))
    write_json(out / "allocation.json", record)
    atomic_write_text(out / "allocation.md", "\n".join(lines) + "\n")
    return record, lines, [out / "allocation.json", out / "allocation.md", *files], messages
