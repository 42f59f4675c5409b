"""Check a sweep's allocation against measured runs: every split its report made of one budget (the predicted best
and the best with each other number of images per caption) is run as a trial of a second sweep on the same world,
and each measured error is set beside its prediction and interval.

    python tuning/check_allocation.py SWEEP_DIR --budget 150 --out /tmp/allocation-check

The second sweep is the first one's saved config with its search space replaced by one variant per split (N and m
of the split; steps from the same budget rule), so its trials share a pool and are scored on the same held-out set.
Writes check.md (a table and a verdict) and check.json into --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from synray.data.files import atomic_write_text, write_json
from synray.plan import derive_config, load_run_config
from synray.programs.sweep import sweep
from synray.sweep.planning import plan_sweep
from synray.sweep.report import SWEEP_CONFIG, load_trials


def splits_of(sweep_dir: Path, budget: str, group: str | None) -> tuple[str, list[dict], dict]:
    """The splits the report made of `budget` for one method (the only one, or `group`)."""
    allocation = json.loads((sweep_dir / "report" / "allocation.json").read_text())
    groups = allocation.get("groups", {})
    if not groups:
        sys.exit(f"{sweep_dir}/report/allocation.json has no allocation (run `synray report {sweep_dir}`)")
    name = group or next(iter(groups))
    if name not in groups:
        sys.exit(f"no method {name!r} in the allocation; it has {', '.join(groups)}")
    budgets = groups[name]["budgets"]
    if budget not in budgets:
        sys.exit(f"no budget {budget} in the allocation; it has {', '.join(budgets)} (set tune.budgets and rerun "
                 "`synray report`)")
    return name, budgets[budget], allocation


def _verdict(split: dict) -> str:
    if split.get("vs_best") is None:
        return "best"
    ratio, low, high = split["vs_best"]
    return f"{ratio:.3f}x [{low:.3f}, {high:.3f}]: " + ("worse" if split["worse_than_best"] else "not told apart")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--budget", required=True, help="a budget of the report's allocation.json, as written there")
    ap.add_argument("--group", help="the method (default: the allocation's only or first one)")
    ap.add_argument("--out", type=Path, required=True, help="the checking sweep's directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name, splits, allocation = splits_of(args.sweep_dir, args.budget, args.group)
    base = load_run_config(str(args.sweep_dir / SWEEP_CONFIG))
    label = {f"N={s['captions']} m={s['per_caption']}": s for s in splits}
    cfg = derive_config(base, {"tune.space": {}, "tune.variants": {
        key: {"data.num_captions": s["captions"], "images.per_caption": s["per_caption"]}
        for key, s in label.items()}})
    if not (args.out / "report" / "results.csv").is_file():
        sweep(plan_sweep(cfg, str(args.out)))
    metric, mode, error = allocation["metric"], cfg.tune.mode, allocation["error"]
    rows = []
    for t in load_trials(args.out):
        s = label[t["params"]["variant"]]
        value = t.get("trained", {}).get(metric)
        measured = None if value is None else (1 - value if mode == "max" else value)
        rows.append({**s, "measured": measured, "covered": measured is not None and s["low"] <= measured <= s["high"],
                     "trial": t["trial_id"], "steps_run": t.get("steps")})
    rows.sort(key=lambda r: r["predicted"])
    best_measured = min((r for r in rows if r["measured"] is not None), key=lambda r: r["measured"])
    lines = [f"Allocation check of {args.sweep_dir.name} ({name}), budget {args.budget} device-seconds; error = "
             f"{error}", "",
             "| split (predicted order) | steps | cost (device-s) | predicted [95% interval] | the report's verdict | "
             "measured | in interval |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| N = {r['captions']}, m = {r['per_caption']} | {r['steps']} | {r['cost']['total']:.1f} | "
                     f"{r['predicted']:.4f} [{r['low']:.4f}, {r['high']:.4f}] | {_verdict(r)} | "
                     f"{'-' if r['measured'] is None else format(r['measured'], '.4f')} | "
                     f"{'yes' if r['covered'] else 'no'} |")
    same = best_measured is rows[0]
    lines += ["", f"predicted best: N = {rows[0]['captions']}, m = {rows[0]['per_caption']}; measured best: "
              f"N = {best_measured['captions']}, m = {best_measured['per_caption']} "
              f"({'the same split' if same else 'another split'}); "
              f"{sum(r['covered'] for r in rows)} of {len(rows)} measured errors inside their intervals"]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "check.md", "\n".join(lines) + "\n")
    write_json(args.out / "check.json", {"group": name, "budget": args.budget, "error": error, "rows": rows})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
