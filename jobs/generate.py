"""`ray job submit` entrypoint for data generation: concepts -> captions -> images -> resumable Parquet store.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/generate.py gpu --out /mnt/cluster_storage/synray/gpu
"""

from __future__ import annotations

import argparse
import logging
import sys

from synray.config import ConfigError, load_config
from synray.data.generate import format_summary, generate_to_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="built-in config name or YAML file")
    parser.add_argument("--out", required=True, help="store directory (shared storage on a cluster)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"synray: {e}", file=sys.stderr)
        return 2
    print(format_summary(generate_to_store(cfg, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
