"""`synray rewrite` (LaCLIP): k LLM rewrites of every caption of an image-text dataset, into a Parquet store."""

from __future__ import annotations

import time
from typing import Any

from synray.captions.rewrite import collect_rewrites, explode, read_image_text, rewrite_processor, rewrite_table
from synray.data.store import ParquetStore
from synray.plan import RewritePlan
from synray.programs.session import session


def rewrite_to_store(plan: RewritePlan) -> dict[str, Any]:
    """Write Parquet shards of (image, caption, rewrites[k], source_key, provenance) to `plan.out`."""
    cfg = plan.cfg
    start = time.time()
    with session(cfg.ray):
        src = read_image_text(plan.source).materialize()
        proc, sampling = rewrite_processor(cfg, plan.model_path)
        answers = proc(src.select_columns(["source_key", "caption"]).map_batches(explode(cfg))).take_all()
        rows = src.take_all()
    rewrites, reasons = collect_rewrites(answers, cfg)
    table = rewrite_table(rows, rewrites, cfg, sampling)
    store = ParquetStore(plan.out)
    store.open_for_writing(plan.fingerprint, {"config_name": cfg.name, "source": plan.source})
    for i in range(0, table.num_rows, cfg.data.rows_per_shard):
        store.write_shard(table.slice(i, cfg.data.rows_per_shard))
    summary = {"rows": table.num_rows, "rewrites_per_caption": cfg.captions.rewrite.num_rewrites,
               "rejected": dict(reasons), "elapsed_s": round(time.time() - start, 2)}
    store.write_summary(summary)
    return summary


def rewrite_command(plan: RewritePlan) -> int:
    summary = rewrite_to_store(plan)
    print(f"rows: {summary['rows']} with {summary['rewrites_per_caption']} rewrites each; "
          f"rejected rewrites: {summary['rejected']}")
    return 0
