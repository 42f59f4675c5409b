"""`ray job submit` entrypoint for a Ray Tune sweep: data pools generated once, one trial per point of tune.space,
then the report (results table, scaling plots, power-law fits).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py scaling-supervised
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py --resume SWEEP_DIR
"""

from __future__ import annotations

import sys

from synray.cli import main as synray_main

#: the `synray` command this job runs, with the same arguments, defaults and exit statuses
COMMAND = "sweep"


def main(argv: list[str] | None = None) -> int:
    return synray_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
