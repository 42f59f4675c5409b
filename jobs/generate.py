"""`ray job submit` entrypoint for data generation: concepts -> captions -> images -> resumable Parquet store.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/generate.py gpu --out /mnt/cluster_storage/synray/gpu
"""

from __future__ import annotations

import argparse
import logging
import sys

from synray.data.store import ParquetStore
from synray.plan import load_run_config, plan_generation
from synray.programs.errors import EXIT_BAD_INPUT, bad_input_message
from synray.programs.generate import format_summary, generate_to_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="built-in config name or YAML file")
    parser.add_argument("--out", required=True, help="store directory (shared storage on a cluster)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # validated and planned before any cluster resource is asked for
        plan = plan_generation(load_run_config(args.config, args.overrides), ParquetStore(args.out))
    except (FileNotFoundError, ValueError) as e:
        if bad_input_message(e) is None:
            raise
        print(bad_input_message(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_summary(generate_to_store(plan, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
