"""`ray job submit` entrypoint for the main job: generate -> train -> evaluate on the cluster it runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py gpu --set train.steps=1000
"""

from __future__ import annotations

import argparse
import logging
import sys

from synray.plan import load_run_config, plan_run
from synray.programs.errors import EXIT_BAD_INPUT, bad_input_message
from synray.programs.run import print_summary, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="local", help="built-in config name or YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--data", default=None, help="train from this store instead of generating")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # validated and planned before any cluster resource is asked for
        plan = plan_run(load_run_config(args.config, args.overrides), data_dir=args.data)
    except (FileNotFoundError, ValueError) as e:
        if bad_input_message(e) is None:
            raise
        print(bad_input_message(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    rd, summary = run(plan)
    print_summary(rd, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
