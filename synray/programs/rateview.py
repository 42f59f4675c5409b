"""`synray plan`'s rates: each stream stage's rows/s, the bottleneck, idle shares, a balanced GPU split, and
whether generating first would cost fewer GPU-hours; rates measured by an earlier run (`--rates RUN_DIR`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from synray.balance import TRAINING_STAGE, balanced_split, gpu_stages, stream_costs, stream_rates
from synray.config import RunConfig, load_config
from synray.data.store import SUMMARY_FILE as STORE_SUMMARY_FILE
from synray.programs.rundir import SUMMARY_FILE
from synray.stages import TRAINING_PHASE, StageResources, by_phase
from synray.train.objectives import get_objective

__all__ = ["rate_lines", "measured_rates"]


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def measured_rates(run_dir: str | Path) -> dict[str, float]:
    """Rates per actor that a finished run (or a `synray generate` store) measured: its renderers' rows per busy
    second (each actor's calls), and a run's training workers' row uses per second with the data wait taken out.
    Keys as in the `rates` section; what the run did not measure is left out."""
    run_dir = Path(run_dir)
    run, store = run_dir / SUMMARY_FILE, run_dir / STORE_SUMMARY_FILE
    if not run.is_file() and not store.is_file():
        raise FileNotFoundError(f"--rates {run_dir}: no {SUMMARY_FILE} (a finished run directory) or "
                                f"{STORE_SUMMARY_FILE} (a store `synray generate` wrote) there")
    summary = json.loads((run if run.is_file() else store).read_text())
    out: dict[str, float] = {}
    images = summary.get("stages", {}).get("images") or {}
    if images.get("rows") and images.get("busy_s"):
        out["images"] = images["rows"] / images["busy_s"]
    t = summary.get("train") or {}
    if t.get("images_per_s") and run.is_file():
        cfg = load_config(str(run_dir / "config.yaml"), [])
        busy = max(1e-9, 1.0 - float(t.get("data_wait_fraction") or 0.0))
        objective = get_objective(cfg.train.loss)
        images_per_row = objective.images_per_row(cfg.train.images_per_row or cfg.images.per_caption) * objective.views
        workers = t.get("world_size") or cfg.train.max_workers   # the group's size (an elastic one's last)
        out["train"] = t["images_per_s"] / busy / workers / images_per_row
    return out


def rate_lines(cfg: RunConfig, stages: Sequence[StageResources]) -> list[str]:
    """The rate section of `synray plan` for the stages that run while training."""
    phase = by_phase(stages).get(TRAINING_PHASE, ())
    replay = cfg.data.replay
    rates = stream_rates(phase, replay)
    if not rates.stages:
        return ["rates: no stage declares one (set rates.* or plan with --rates RUN_DIR)"]
    slowest = None if rates.unrated else rates.bottleneck
    out = [f"rates (rows/s of each stage while it never waits; training: its row uses / data.replay={replay}):"]
    for s in rates.stages:
        res, r = s.stage, s.stage.rate
        uses = f" ({_n(res.actors * r.rows_per_s)} row uses / {replay})" if res.stage == TRAINING_STAGE \
            and replay > 1 else ""
        state = "" if slowest is None else " <- bottleneck" if s is slowest else f", idle {100 * s.idle_share:.1f}%"
        out.append(f"  {res.stage}: {res.actors} x {_n(r.rows_per_s)} = {_n(s.rows_per_s)} rows/s{uses}{state}"
                   f"  [{r.source}]")
    if rates.unrated:
        out.append(f"  no rate declared: {', '.join(rates.unrated)}: the bottleneck is unknown until each has one "
                   "(set rates.* or plan with --rates RUN_DIR)")
        return out
    return out + _stream_lines(cfg, phase, rates)


def _stream_lines(cfg: RunConfig, phase: Sequence[StageResources], rates: Any) -> list[str]:
    """The stream's pace, a balanced GPU split, the replay that keeps training busy, and stream vs generate-first."""
    if cfg.data.mode == "stored":
        return []
    slowest, replay, t = rates.bottleneck, cfg.data.replay, cfg.train
    out = [f"  the stream: {_n(slowest.rows_per_s)} rows/s, {cfg.data.num_captions:,} captions in "
           f"{cfg.data.num_captions / slowest.rows_per_s / 3600:.3g} h"]
    train = rates.of(TRAINING_STAGE)
    if train is not None and slowest is not train and train.idle_share > 0.5:
        needed = math.ceil(replay / (1.0 - train.idle_share))
        out.append(f"  training waits {100 * train.idle_share:.1f}% of the time: data.replay={needed} would keep it "
                   "busy (each row used that many times), or generate first")
    gpu = gpu_stages(phase)
    budget = math.floor(sum(s.actors * s.gpus for s in gpu) + 1e-9)
    split = balanced_split(gpu, budget, replay)
    if split is not None and len(gpu) > 1:
        parts = ", ".join(f"{name} {n}" for name, n in split.gpus.items())
        keys = " ".join(f"{s.keys[0]}={max(1, round(split.gpus[s.stage] / s.gpus))}" for s in gpu if s.keys)
        out.append(f"  balanced split of these {budget} GPUs: {parts} -> {_n(split.rows_per_s)} rows/s "
                   f"({split.rows_per_s / slowest.rows_per_s:.2g}x now): {keys}")
    rows_per_step = t.step_rows
    costs = stream_costs(phase, cfg.data.num_captions, t.steps * rows_per_step, replay)
    if costs is not None:
        verdict = (f"generating first (`synray generate`, then data.mode=stored) costs "
                   f"{100 * (1 - costs.stored_gpu_h / costs.stream_gpu_h):.0f}% fewer GPU-hours"
                   if costs.stored_is_cheaper else "the stream costs no more GPU-hours than generating first")
        out.append(f"  GPU-hours: stream {_n(costs.stream_gpu_h)} ({costs.stream_h:.3g} h); generated on all its GPUs "
                   f"first, then trained: {_n(costs.stored_gpu_h)} ({costs.stored_h:.3g} h): {verdict}")
    return out
