"""`ray job submit` entrypoint for the main job: generate -> train -> evaluate on the cluster it runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py synclr-vitb16 --set output_root=/mnt/cluster_storage/synray/runs

It joins $RAY_ADDRESS (set by `ray job submit`), is planned and placed before anything starts, continues an
unfinished run of the same config (after a preemption: submit it again), prints its run directory, and exits
non-zero on failure (2 for bad input).
"""

from __future__ import annotations

import argparse
import sys

from synray.plan import load_run_config, plan_run
from synray.programs.errors import exit_status, job_logging
from synray.programs.run import print_summary, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="local", help="built-in config name or YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--fresh", action="store_true", help="never continue an unfinished run of this config")
    args = parser.parse_args(argv)
    job_logging()

    def job() -> int:
        plan = plan_run(load_run_config(args.config, args.overrides), fresh=args.fresh)
        rd, summary = run(plan)
        print_summary(rd, summary)
        return 0

    return exit_status(job)


if __name__ == "__main__":
    sys.exit(main())
