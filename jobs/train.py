"""`ray job submit` entrypoint for training from a store that an earlier job wrote (jobs/generate.py, synray rewrite).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py stablerep-vitb16 --data /mnt/cluster_storage/synray/stablerep-store

Without --data it reads the config's data.store_dir. Evaluation follows as the config says; the run directory
(checkpoints, backbone, summary) is printed at the end. A resubmitted job continues its unfinished run.
"""

from __future__ import annotations

import argparse
import sys

from synray.plan import load_run_config, plan_run
from synray.programs.errors import exit_status, job_logging
from synray.programs.run import print_summary, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="built-in config name or YAML file")
    parser.add_argument("--data", default=None, help="store directory (default: the config's data.store_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--fresh", action="store_true", help="never continue an unfinished run of this config")
    args = parser.parse_args(argv)
    job_logging()

    def job() -> int:
        cfg = load_run_config(args.config, args.overrides + ([] if args.data else ["data.mode=stored"]))
        rd, summary = run(plan_run(cfg, data_dir=args.data, fresh=args.fresh))
        print_summary(rd, summary)
        return 0

    return exit_status(job)


if __name__ == "__main__":
    sys.exit(main())
