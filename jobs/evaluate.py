"""`ray job submit` entrypoint for evaluating a saved backbone: kNN, linear, zero-shot and segmentation probes.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py /mnt/cluster_storage/synray/runs/<run>/backbone \
        --dataset /mnt/cluster_storage/imagenet-val --config stablerep-vitb16 --protocol linear

Writes eval.json and eval.md (to --out, else <output_root>/eval-<UTC time>) and prints where they went.
"""

from __future__ import annotations

import argparse
import sys

from synray.config import EVAL_PROTOCOLS
from synray.plan import load_run_config, plan_eval
from synray.programs.errors import exit_status, job_logging
from synray.programs.evaluate import eval_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a saved backbone, e.g. <run directory>/backbone")
    parser.add_argument("--dataset", required=True, help="Parquet, a synray store or an image folder")
    parser.add_argument("--protocol", dest="protocols", action="append", choices=EVAL_PROTOCOLS, default=[])
    parser.add_argument("--config", default="local", help="config for ray/eval settings (default: local)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--out", default=None, help="output directory")
    args = parser.parse_args(argv)
    job_logging()

    def job() -> int:
        cfg = load_run_config(args.config, args.overrides)
        return eval_command(plan_eval(cfg, args.model_dir, args.dataset, args.protocols), cfg, args.out)

    return exit_status(job)


if __name__ == "__main__":
    sys.exit(main())
