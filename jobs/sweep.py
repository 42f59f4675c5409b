"""`ray job submit` entrypoint for a Ray Tune sweep: data pools generated once, one trial per point of tune.space,
then the report (results table, scaling plots, power-law fits).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py scaling-supervised
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py --resume SWEEP_DIR
"""

from __future__ import annotations

import argparse
import sys

from synray.programs.errors import exit_status, job_logging
from synray.programs.sweep import sweep_command
from synray.sweep.planning import plan_sweep_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="scaling-local", help="built-in config name or YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--out", default=None, help="sweep directory (default: tune.storage)")
    parser.add_argument("--resume", default=None, metavar="SWEEP_DIR", help="continue an interrupted sweep")
    args = parser.parse_args(argv)
    job_logging()

    def job() -> int:  # validated and planned before any cluster resource is asked for
        plan = plan_sweep_command(args.config, args.overrides, out=args.out, resume=args.resume)
        return sweep_command(plan, resume=bool(args.resume))

    return exit_status(job)


if __name__ == "__main__":
    sys.exit(main())
