"""`ray job submit` entrypoint for the main job: generate -> train -> evaluate on the cluster it runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py gpu --set train.steps=1000
"""

from __future__ import annotations

import argparse
import logging
import sys

from synray.config import ConfigError, load_config
from synray.pipeline import print_summary, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="local", help="built-in config name or YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--data", default=None, help="train from this store instead of generating")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)  # validated before any cluster resource is asked for
    except ConfigError as e:
        print(f"synray: {e}", file=sys.stderr)
        return 2
    rd, summary = run(cfg, data_dir=args.data)
    print_summary(rd, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
