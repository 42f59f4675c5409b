"""`ray job submit` entrypoint for data generation: concepts -> captions -> images -> resumable Parquet store.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/generate.py stablerep-vitb16 --out /mnt/cluster_storage/synray/stablerep-store

A resubmitted job (after a preemption) generates only the rows the store is missing.
"""

from __future__ import annotations

import sys

from synray.cli import main as synray_main

#: the `synray` command this job runs, with the same arguments, defaults and exit statuses
COMMAND = "generate"


def main(argv: list[str] | None = None) -> int:
    return synray_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
