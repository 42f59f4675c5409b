"""`ray job submit` entrypoint for the main job: generate -> train -> evaluate on the cluster it runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py synclr-vitb16 --set output_root=/mnt/cluster_storage/synray/runs

It joins $RAY_ADDRESS (set by `ray job submit`), is planned and placed before anything starts, continues an
unfinished run of the same config (after a preemption: submit it again), prints its run directory, and exits
non-zero on failure (2 for bad input).
"""

from __future__ import annotations

import sys

from synray.cli import main as synray_main

#: the `synray` command this job runs, with the same arguments, defaults and exit statuses
COMMAND = "run"


def main(argv: list[str] | None = None) -> int:
    return synray_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
