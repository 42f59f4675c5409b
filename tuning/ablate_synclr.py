"""SynCLR's settings ablated on the shapes world: one run per variant, student and teacher scored on one held-out set.

    python tuning/ablate_synclr.py --work runs/synclr-ablations --out tuning/reports/synclr-ablations

Each variant is a built-in config (`shapes-synclr`, or `shapes` for the StableRep reference) with the overrides
declared in VARIANTS, trained at the config's step budget. Every network is scored on one stored held-out set
(the base config's held-out rows, `--heldout-captions` of them, generated once and reused): the network at
step 0, and for SynCLR both the teacher and the student of the final checkpoint, whichever of them the run
exported. A variant's run lands in `<work>/<loss>-<hash of its config>`; a rerun reuses every variant whose run
finished there, the held-out set, and the scores kept in each run folder (`--rescore` scores again). Writes
`<out>/ablations.md` (the table) and `<out>/ablations.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch

from synray.config import ConfigError, RunConfig
from synray.data.store import ParquetStore
from synray.generation.pipeline import store_fingerprint
from synray.models.backbone import save_backbone
from synray.plan import derive_config, heldout_config, load_run_config, plan_generation, plan_run
from synray.programs.generate import generate_to_store
from synray.programs.run import evaluate, run
from synray.programs.session import session
from synray.train.objectives import get_objective

METRICS = {"knn_accuracy": "kNN", "linear_accuracy": "linear probe", "segmentation_miou": "segmentation mIoU"}
VALIDATION = ("val_knn_accuracy", "val_linear_accuracy")
#: the settings the SynCLR rows ablate, as the published runs set them per step (pinned, so that a row's meaning
#: and its reused run stay put when the built-in's defaults move)
PUBLISHED = {"train.synclr.ema_horizon": None, "train.synclr.ema_momentum": 0.994, "train.synclr.prototypes": 1024,
             "train.synclr.local_own_key": True, "train.synclr.teacher_temperature_warmup": 0.05,
             "train.synclr.head_norm": "bn", "train.synclr.export": "teacher"}
#: the plan's two warnings answered (a teacher horizon of 2% of the run, prototypes below the masked tokens)
ANSWERED = {**PUBLISHED, "train.synclr.ema_horizon": 0.02, "train.synclr.prototypes": 128}


class Variant(NamedTuple):
    name: str
    config: str                  # the built-in it starts from
    overrides: dict[str, Any]
    again: bool = False          # a second run of a setting (its own folder)


#: A without masked image modelling: the contrastive terms alone (global and local crops, EMA teacher)
NO_IBOT = {**ANSWERED, "train.synclr.ibot_weight": 0.0}


#: each SynCLR row changes one thing from the row it names
VARIANTS: list[Variant] = [Variant(*v) for v in [
    ("StableRep (multi-positive), the reference", "shapes", {}),
    ("SynCLR, published per-step settings: momentum 0.994, 1,024 prototypes", "shapes-synclr", PUBLISHED),
    ("A: teacher horizon 2% of the run, 128 prototypes (the plan's warnings answered)", "shapes-synclr", ANSWERED),
    ("A, a second run (run-to-run spread)", "shapes-synclr", ANSWERED, True),
    ("A with 1,024 prototypes", "shapes-synclr", {**ANSWERED, "train.synclr.prototypes": 1024}),
    ("A with a horizon of 0.2% of the run (the paper's share: 167 of 85k steps)", "shapes-synclr",
     {**ANSWERED, "train.synclr.ema_horizon": 0.002}),
    ("A with local crops leaving their own key out", "shapes-synclr",
     {**ANSWERED, "train.synclr.local_own_key": False}),
    ("A with the teacher temperature warming up over 30% of the run", "shapes-synclr",
     {**ANSWERED, "train.synclr.teacher_temperature_warmup": 0.3}),
    ("B: A without the iBOT term", "shapes-synclr", NO_IBOT),
    ("B with local crops leaving their own key out", "shapes-synclr", {**NO_IBOT, "train.synclr.local_own_key": False}),
    ("`shapes-synclr` as shipped", "shapes-synclr", {}),
]]


def config_hash(cfg: RunConfig) -> str:
    """What decides a variant's training (not its description, where it writes, how it is scored, or which network
    it exports)."""
    d = cfg.to_dict()
    for key in ("description", "output_root", "eval"):
        d.pop(key, None)
    d["train"]["synclr"].pop("export", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def finished_run(root: Path) -> Path | None:
    done = sorted(p.parent for p in root.glob("*/summary.json"))
    return done[-1] if done else None


def export_both(cfg: RunConfig, checkpoint: Path, into: Path) -> dict[str, str]:
    """The teacher's and the student's backbones of a SynCLR checkpoint, saved under ``into``."""
    tag = (checkpoint / "latest").read_text().strip()   # DeepSpeed's pointer to the tag folder
    states = torch.load(checkpoint / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]   # our own checkpoint: the full module, teacher included
    model = get_objective("synclr").build(cfg, 0, None).model
    model.load_state_dict(states)
    out = {}
    for side in ("teacher", "student"):
        out[side] = str(into / f"final_{side}")
        save_backbone(getattr(model, side).encoder, Path(out[side]))
    return out


def score(cfg: RunConfig, models: dict[str, str], run_dir: Path, rescore: bool) -> dict[str, Any]:
    """The figures of each network on the held-out set; kept in the run folder per eval settings (a rerun reads
    them unless `rescore`)."""
    key = hashlib.sha256(json.dumps([cfg.eval.model_dump(mode="json"), sorted(models)],
                                    sort_keys=True).encode()).hexdigest()[:10]
    cached = run_dir / f"ablation-scores-{key}.json"
    if cached.exists() and not rescore:
        return json.loads(cached.read_text())
    with session(cfg.ray):
        figures, _ = evaluate(plan_run(cfg), models)
    cached.write_text(json.dumps(figures, default=str))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/synclr-ablations", help="folder of the runs and the held-out set")
    parser.add_argument("--out", default="tuning/reports/synclr-ablations", help="folder of the table")
    parser.add_argument("--heldout-captions", type=int, default=600, help="held-out rows (m images each) scored")
    parser.add_argument("--rescore", action="store_true", help="score every network again (after a change to the "
                        "evaluation code; a change of eval settings or held-out set rescores by itself)")
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX",
                        help="run only the variants whose name starts with this (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        configs = [(v, derive_config(load_run_config(v.config), v.overrides)) for v in VARIANTS
                   if not args.only or any(v.name.startswith(p) for p in args.only)]
        ref = derive_config(load_run_config("shapes"), {"eval.heldout_captions": args.heldout_captions})
    except ConfigError as e:
        print(f"ablate_synclr: {e}", file=sys.stderr)
        return 2
    heldout_cfg = heldout_config(ref)
    heldout = work / f"heldout-{store_fingerprint(heldout_cfg)}-{args.heldout_captions}"
    generate_to_store(plan_generation(heldout_cfg, ParquetStore(heldout)), str(heldout))  # a rerun reuses it
    results: dict[str, Any] = {}
    for variant, cfg in configs:
        name = variant.name
        root = work / f"{cfg.train.loss}-{config_hash(cfg)}{'-again' if variant.again else ''}"
        cfg = derive_config(cfg, {"output_root": str(root), "eval.dataset": str(heldout),
                                  "eval.heldout_captions": args.heldout_captions})
        run_dir = finished_run(root)
        if run_dir is None:
            run_dir = Path(run(plan_run(derive_config(cfg, {"eval.enabled": False})))[0].path)
        summary = json.loads((run_dir / "summary.json").read_text())
        models = {"init": summary["init_backbone_dir"]}
        if cfg.train.loss != "synclr":
            models["trained"] = summary["backbone_dir"]
        elif args.rescore or not all((run_dir / f"final_{side}").is_dir() for side in ("teacher", "student")):
            models.update(export_both(cfg, Path(summary["train"]["checkpoint"]), run_dir))
        else:
            models.update({side: str(run_dir / f"final_{side}") for side in ("teacher", "student")})
        figures = score(cfg, models, run_dir, args.rescore)
        results[name] = {"run_dir": str(root.relative_to(work) / run_dir.name), "config": cfg.name,
                         "overrides": variant.overrides,
                         "scores": {k: v for k, v in figures.items() if isinstance(v, dict)},
                         "final_loss_parts": summary["train"].get("final_loss_parts"),
                         "train_s": summary["train"].get("elapsed_s"), "heldout_rows": figures["heldout_rows"]}
        print(f"{name}: " + json.dumps({m: {k: round(v.get(k, float('nan')), 3) for k in METRICS}
                                        for m, v in results[name]["scores"].items()}))
    (out / "ablations.json").write_text(json.dumps(results, indent=1, default=str) + "\n")   # rows in table order
    (out / "ablations.md").write_text(table(results, ref))
    print(f"table: {out / 'ablations.md'}")
    return 0


def _cell(scores: dict[str, float], keys: tuple[str, ...] = tuple(METRICS)) -> str:
    return " / ".join(f"{scores.get(k, float('nan')):.3f}" for k in keys)


def table(results: dict[str, Any], ref: RunConfig) -> str:
    """The markdown table: per variant the exported network's figures and the other one's, and the loss parts."""
    per_step = ref.train.captions_per_worker * ref.images.per_caption * ref.train.num_workers
    rows = next(iter(results.values()))["heldout_rows"] if results else 0
    lines = [f"{ref.train.steps} steps of {per_step} images; one run each; scored on {rows} held-out captions x "
             f"{ref.images.per_caption} images (half of the captions the probes' query side; a fifth of the "
             f"reference side's captions the validation part). Query cells: {' / '.join(METRICS.values())}; "
             "validation cells: kNN / linear probe.", "",
             "| variant | teacher | student | StableRep's network | at step 0 | validation: teacher; student | "
             "loss parts at the end: global / local / iBOT |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        s = r["scores"]
        parts = r.get("final_loss_parts") or {}
        loss = " / ".join(f"{parts[k]:.2f}" for k in ("loss_global", "loss_local", "loss_ibot") if k in parts)
        val = "; ".join(_cell(s[m], keys=VALIDATION) for m in ("teacher", "student", "trained") if m in s)
        lines.append(f"| {name} | {_cell(s['teacher']) if 'teacher' in s else ''} | "
                     f"{_cell(s['student']) if 'student' in s else ''} | "
                     f"{_cell(s['trained']) if 'trained' in s else ''} | {_cell(s['init'])} | {val} | {loss} |")
    lines.append("")
    for label, rows in (("all rows", results), ("the full objective (iBOT on)", {
            n: r for n, r in results.items() if r["overrides"].get("train.synclr.ibot_weight", 1.0) > 0})):
        best = chosen(rows)
        if best:
            lines.append(f"Best on the validation kNN accuracy (never the query figures), {label}: {best}.")
    lines.append(f"Run-to-run spread (A and its second run, teacher): {spread(results)}.")
    return "\n".join(lines) + "\n"


def spread(results: dict[str, Any]) -> str:
    """How far two runs of one setting land apart: what a difference between single runs must exceed."""
    runs = [r["scores"]["teacher"] for n, r in results.items() if n.startswith("A:") or n.startswith("A, a second")]
    if len(runs) < 2:
        return "not measured"
    return " / ".join(f"{abs(runs[0][k] - runs[1][k]):.3f}" for k in METRICS)


def chosen(results: dict[str, Any]) -> str | None:
    """The SynCLR row and network with the best validation kNN accuracy (the validation linear probe breaks ties)."""
    options = {(name, m): tuple(r["scores"][m].get(k, float("-inf")) for k in VALIDATION)
               for name, r in results.items() for m in ("teacher", "student") if m in r["scores"]}
    if not options:
        return None
    (name, network), (knn, linear) = max(options.items(), key=lambda item: item[1])
    return f"{name}, its {network} (validation kNN {knn:.3f}, linear {linear:.3f})"


if __name__ == "__main__":
    sys.exit(main())
