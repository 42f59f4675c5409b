"""`ray job submit` entrypoint for evaluating a saved backbone: kNN, linear, zero-shot and segmentation probes.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py /mnt/cluster_storage/synray/runs/<run>/backbone \
        --dataset /mnt/cluster_storage/imagenet-val --config stablerep-vitb16 --protocol linear

Writes eval.json and eval.md (to --out, else <output_root>/eval-<UTC time>) and prints where they went.
"""

from __future__ import annotations

import sys

from synray.cli import main as synray_main

#: the `synray` command this job runs, with the same arguments, defaults and exit statuses
COMMAND = "eval"


def main(argv: list[str] | None = None) -> int:
    return synray_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
