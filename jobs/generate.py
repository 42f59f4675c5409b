"""`ray job submit` entrypoint for data generation: concepts -> captions -> images -> resumable Parquet store.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/generate.py stablerep-vitb16 --out /mnt/cluster_storage/synray/stablerep-store

A resubmitted job (after a preemption) generates only the rows the store is missing.
"""

from __future__ import annotations

import argparse
import sys

from synray.data.store import ParquetStore
from synray.plan import load_run_config, plan_generation
from synray.programs.errors import exit_status, job_logging
from synray.programs.generate import generate_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="built-in config name or YAML file")
    parser.add_argument("--out", default=None, help="store directory, on storage every node sees "
                                                    "(default: the config's data.store_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    job_logging()

    def job() -> int:
        cfg = load_run_config(args.config, args.overrides)
        out = args.out or cfg.data.store_dir
        if not out:
            parser.error("--out is needed: the config sets no data.store_dir")
        return generate_command(plan_generation(cfg, ParquetStore(out)), out)

    return exit_status(job)


if __name__ == "__main__":
    sys.exit(main())
