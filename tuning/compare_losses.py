"""Multi-positive (StableRep, m images per caption) vs SimCLR (m = 1) vs supervised cross-entropy at one step budget.

    python tuning/compare_losses.py shapes --out docs/shapes_losses.png

Every variant sees the same number of images (views) per step: SimCLR takes twice as many captions
per batch as the multi-positive loss takes images per caption / 2, and its stream twice as many rows.
Writes the figure, and `<figure>.json` with every run's evaluation and run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from synray.config import ConfigError, RunConfig, load_config, with_overrides
from synray.pipeline import run
from synray.viz import compare_bars

METRICS = {"knn_accuracy": "kNN accuracy", "linear_accuracy": "linear probe accuracy",
           "segmentation_miou": "segmentation mIoU"}


def variants(cfg: RunConfig) -> dict[str, dict[str, object]]:
    """Overrides per variant, keeping images per step equal to the multi-positive run's."""
    m, t = cfg.images.per_caption, cfg.train
    simclr_rows = t.captions_per_worker * m // 2  # 2 views per row
    return {
        f"multi-positive (m={m})": {"train.loss": "stablerep"},
        "SimCLR (m=1)": {"train.loss": "simclr", "images.per_caption": 1,
                         "train.captions_per_worker": simclr_rows,
                         "data.num_captions": cfg.data.num_captions * simclr_rows // t.captions_per_worker},
        "supervised CE": {"train.loss": "supervised"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="shapes", help="built-in config name or YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--out", default="docs/shapes_losses.png", help="figure path (a .json goes beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        base = load_config(args.config, args.overrides)
        configs = {name: with_overrides(base, o) for name, o in variants(base).items()}
    except ConfigError as e:
        print(f"compare_losses: {e}", file=sys.stderr)
        return 2
    report: dict[str, dict] = {}
    for name, cfg in configs.items():
        rd, summary = run(cfg)
        report[name] = {**summary["eval"], "run_dir": str(rd.path), "train": summary["train"]}
        print(f"{name}: " + ", ".join(f"{k} {summary['eval']['trained'].get(k, float('nan')):.3f} "
                                      f"(init {summary['eval']['init'].get(k, float('nan')):.3f})" for k in METRICS))
    out = Path(args.out)
    chance = next(iter(report.values()))["trained"].get("chance")
    title = (f"{base.name}: {base.train.steps} steps, {base.train.captions_per_worker * base.images.per_caption * "
             f"base.train.num_workers} images per step, held-out set of {base.eval.heldout_captions} captions")
    compare_bars(report, METRICS, out, title=title, chance=chance)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    print(f"figure: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
