"""`synray generate`: execute a generation plan into a resumable Parquet store, with a summary of every stage."""

from __future__ import annotations

import logging
import time
from typing import Any

from synray.data.stats import rejections_text
from synray.data.store import SUMMARY_FILE, ParquetStore, StoreError
from synray.generation.pipeline import GenerationPlan, generation_stages, store_fingerprint, store_info
from synray.programs.session import session, stage_stats, stats_summary
from synray.stages import build

log = logging.getLogger(__name__)


def generate_to_store(plan: GenerationPlan, out: str) -> dict[str, Any]:
    """Run concepts -> captions -> images -> store; a store written by the same config is resumed.

    `plan` comes from `synray.plan.plan_generation(cfg, ParquetStore(out))`: it knows the rows the
    store holds already, and generates only the missing ones.
    """
    cfg = plan.cfg
    store = ParquetStore(out)
    store.open_for_writing(store_fingerprint(cfg), store_info(cfg))
    log.info("store %s holds %d rows; generating %d more", out, len(plan.skip_ids), plan.wanted)
    start = time.time()
    rows = 0
    stats: dict[str, Any] = {"stages": {}, "rejected": {}}
    if plan.wanted:
        with session(cfg.ray):
            actor = stage_stats()
            ds = build(generation_stages(cfg, plan, stats_actor=actor, store=out, passthrough=False))
            for batch in ds.iter_batches(batch_size=None):
                rows += int(sum(batch["rows"]))
            stats = stats_summary(actor)
    summary = {
        "store": str(store.root), "rows_written": rows, "rows_before": len(plan.skip_ids),
        "rows_total": store.num_rows(), "rows_wanted": cfg.data.num_captions,
        "images_per_row": cfg.images.per_caption, "elapsed_s": round(time.time() - start, 2), **stats,
    }
    store.write_summary(summary)
    if plan.wanted and not rows:
        rejected = rejections_text(stats.get("rejected", {}))
        raise StoreError(f"no row passed generation ({rejected or 'nothing generated'}); the store {out} has no "
                         "new rows: check the caption and image settings (summary: " + SUMMARY_FILE + ")")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"rows written: {summary['rows_written']} (store now holds {summary['rows_total']} of "
             f"{summary['rows_wanted']} wanted, {summary['rows_before']} were there before)",
             f"elapsed: {summary['elapsed_s']} s"]
    for stage, s in summary.get("stages", {}).items():
        lines.append(f"  {stage:>9}: {s['rows']} rows, {s['rows_per_s']} rows/s over {s['active_s']} s "
                     f"({s['steady_rows_per_s']} rows/s after start-up)")
    for stage, reasons in summary.get("rejected", {}).items():
        lines.append(f"  rejected in {stage}: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
    if summary["rows_total"] < summary["rows_wanted"]:
        lines.append("  note: fewer rows than wanted; raise captions.oversample or relax captions.cleanup")
    return "\n".join(lines)


def generate_command(plan: GenerationPlan, out: str) -> int:
    summary = generate_to_store(plan, out)
    print(format_summary(summary))
    print(f"summary: {ParquetStore(out).root.join(SUMMARY_FILE)}")
    return 0
