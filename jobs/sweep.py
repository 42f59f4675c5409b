"""`ray job submit` entrypoint for a Ray Tune sweep: data pools generated once, one trial per point of tune.space,
then the report (results table, scaling plots, power-law fits).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py scaling-supervised
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py --resume SWEEP_DIR
"""

from __future__ import annotations

import argparse
import logging
import sys

from synray.programs.errors import EXIT_BAD_INPUT, bad_input_message
from synray.programs.sweep import sweep_command
from synray.sweep.planning import plan_sweep_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="scaling-local", help="built-in config name or YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--out", default=None, help="sweep directory (default: tune.storage)")
    parser.add_argument("--resume", default=None, metavar="SWEEP_DIR", help="continue an interrupted sweep")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # validated and planned before any cluster resource is asked for
        plan = plan_sweep_command(args.config, args.overrides, out=args.out, resume=args.resume)
    except (FileNotFoundError, ValueError) as e:
        if bad_input_message(e) is None:
            raise
        print(bad_input_message(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    return sweep_command(plan, resume=bool(args.resume))


if __name__ == "__main__":
    sys.exit(main())
