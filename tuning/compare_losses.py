"""SynCLR vs multi-positive (StableRep, m per caption) vs SimCLR (m = 1) vs supervised cross-entropy, one step budget.

    python tuning/compare_losses.py shapes --out docs/shapes_losses.png

Every variant sees the same number of images per step: SimCLR (two views of one image per
caption) takes m/2 times as many captions per batch, and its stream as many more rows. SynCLR reads the
same rows as multi-positive training and takes its crops, heads and schedules from the `train.synclr`
section of `--synclr` (default: the `shapes-synclr` built-in); its local crops are extra views. A second
SynCLR variant keeps only the EMA teacher (one crop, no masking: the paper's "+EMA" ablation step). All variants
are scored on one held-out store (the base config's held-out set, m images per caption), generated
once under `output_root`. Writes the figure, and `<figure>.json` with every run's evaluation; prints the variants
ranked on the validation kNN figure (never on the query figures it plots).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from synray.config import ConfigError, RunConfig
from synray.data.store import ParquetStore
from synray.generation.pipeline import store_fingerprint
from synray.plan import derive_config, heldout_config, load_run_config, plan_generation, plan_run
from synray.programs.generate import generate_to_store
from synray.programs.run import run
from synray.viz import compare_bars

METRICS = {"knn_accuracy": "kNN accuracy", "linear_accuracy": "linear probe accuracy",
           "segmentation_miou": "segmentation mIoU"}


def variants(cfg: RunConfig, synclr: RunConfig) -> dict[str, dict[str, object]]:
    """Overrides per variant, keeping images per step equal to the multi-positive run's; SynCLR's settings come
    from the `synclr` config's train.synclr section and contrastive temperature."""
    m, t = cfg.images.per_caption, cfg.train
    simclr_rows = t.captions_per_worker * m // 2  # 2 views per row
    synclr_settings = {f"train.synclr.{k}": v for k, v in synclr.train.synclr.model_dump().items()}
    synclr_base = {"train.loss": "synclr", "train.temperature": synclr.train.temperature, **synclr_settings}
    return {
        f"SynCLR (m={m})": synclr_base,
        # SynCLR's ablation step between StableRep and the full objective: the EMA teacher's keys, one crop, no iBOT
        f"SynCLR, EMA teacher only (m={m})": {**synclr_base, "train.synclr.local_crops": 0,
                                              "train.synclr.mask_image_share": 0.0, "train.synclr.ibot_weight": 0.0},
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
    parser.add_argument("--synclr", default="shapes-synclr", help="config whose train.synclr settings the SynCLR "
                        "variant takes")
    parser.add_argument("--only", action="append", default=[], metavar="LOSS",
                        help="run only the variants of these train.loss values (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        base = load_run_config(args.config, args.overrides)
        configs = {name: derive_config(base, o) for name, o in variants(base, load_run_config(args.synclr)).items()
                   if not args.only or o["train.loss"] in args.only}
    except ConfigError as e:
        print(f"compare_losses: {e}", file=sys.stderr)
        return 2
    heldout_cfg = heldout_config(base)
    heldout = Path(base.output_root) / f"{base.name}-heldout-{store_fingerprint(heldout_cfg)}"
    generate_to_store(plan_generation(heldout_cfg, ParquetStore(heldout)), str(heldout))  # a rerun reuses it
    report: dict[str, dict] = {}
    for name, cfg in configs.items():
        rd, summary = run(plan_run(derive_config(cfg, {"eval.dataset": str(heldout)})))
        report[name] = {**summary["eval"], "run_dir": str(rd.path), "train": summary["train"]}
        print(f"{name}: " + ", ".join(f"{k} {summary['eval']['trained'].get(k, float('nan')):.3f} "
                                      f"(init {summary['eval']['init'].get(k, float('nan')):.3f})" for k in METRICS))
    ranked = sorted(report, key=lambda n: -report[n]["trained"].get("val_knn_accuracy", float("-inf")))
    print("ranked on val_knn_accuracy (a validation part of the reference side; the query figures above take no "
          "part): " + ", ".join(f"{n} {report[n]['trained'].get('val_knn_accuracy', float('nan')):.3f}"
                               for n in ranked))
    out = Path(args.out)
    chance = next(iter(report.values()))["trained"].get("chance")
    per_step = base.train.captions_per_worker * base.images.per_caption * base.train.num_workers
    title = (f"{base.name}: {base.train.steps} steps of {per_step} images, "
             f"held-out set of {base.eval.heldout_captions} captions")
    compare_bars(report, METRICS, out, title=title, chance=chance)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    print(f"figure: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
