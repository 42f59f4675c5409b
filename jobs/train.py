"""`ray job submit` entrypoint for training from a store that an earlier job wrote (jobs/generate.py, synray rewrite).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py stablerep-vitb16 --data /mnt/cluster_storage/synray/stablerep-store

Without --data it reads the config's data.store_dir. Evaluation follows as the config says; the run directory
(checkpoints, backbone, summary) is printed at the end. A resubmitted job continues its unfinished run.
"""

from __future__ import annotations

import sys

from synray.cli import main as synray_main

#: the `synray` command this job runs, with the same arguments, defaults and exit statuses
COMMAND = "train"


def main(argv: list[str] | None = None) -> int:
    return synray_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
