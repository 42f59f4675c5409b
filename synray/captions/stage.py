"""The caption stage's actors: plan rows (prompts from the caption backend), clean up the captions written."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from synray.captions.backends import get_caption_backend
from synray.captions.cleanup import CaptionDeduper, RejectionCounter, clean_captions
from synray.captions.files import read_caption_file
from synray.captions.rows import PLAN_COLUMNS, plan_columns, stream_view
from synray.concepts import load_bank, plan_row
from synray.config import CaptionsConfig, RunConfig
from synray.data.schema import caption_id, prompt_seed
from synray.data.stats import StatsClient


class PlanRows:
    """Row ids -> concept, template, prompt, prompt seed and the stable caption id of each row."""

    def __init__(self, cfg: RunConfig, skip_ids: set[str] | None = None, stats_actor: Any | None = None,
                 ledger: Any | None = None) -> None:
        self.cfg = cfg
        self.concepts = load_bank(cfg.concepts.bank, cfg.concepts.kinds, cfg.concepts.max_concepts)
        self.skip = skip_ids or set()
        self.skip_rows = set(stream_view(ledger).skip_rows.tolist()) if ledger is not None else set()
        self.stats = StatsClient(stats_actor)
        cap = cfg.captions
        self.backend = get_caption_backend(cap.backend)
        self.llm_model = self.backend.model_label(cap)
        self.file = read_caption_file(cap.source) if cap.style == "file" else None
        if self.file is not None:
            self.llm_model = f"file:{cap.source}"
        self.sampling_json = self.backend.sampling_json(cap)

    def plan(self, row_id: int) -> dict[str, Any] | None:
        cfg, seed = self.cfg, self.cfg.seed
        if self.file is not None:  # row i renders the file's caption i; no concept, no label
            if row_id >= len(self.file):
                return None
            prompt = self.file[row_id]
            return {"row_id": row_id, "caption_id": caption_id(seed, row_id, prompt), "label": -1, "concept": "",
                    "kind": "caption", "template": "file", "prompt": prompt, "prompt_seed": prompt_seed(seed, row_id),
                    "run_seed": seed, "llm_model": self.llm_model, "llm_sampling": self.sampling_json}
        plan = plan_row(self.concepts, cfg.concepts, seed, row_id)
        prompt = self.backend.prompt(plan, cfg.captions, seed, row_id)
        return {
            "row_id": row_id, "caption_id": caption_id(seed, row_id, prompt), "label": plan.label,
            "concept": plan.concept.name, "kind": plan.concept.kind, "template": plan.template,
            "prompt": prompt, "prompt_seed": prompt_seed(seed, row_id), "run_seed": seed,
            "llm_model": self.llm_model, "llm_sampling": self.sampling_json,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.time()
        rows = [self.plan(int(i)) for i in batch["id"] if int(i) not in self.skip_rows]
        rows = [r for r in rows if r is not None and r["caption_id"] not in self.skip]
        self.stats.record("plan", len(rows), start)
        return plan_columns(rows, PLAN_COLUMNS)


class CleanCaptions:
    """Keeps valid, new captions; counts rejections by reason. Run as ONE actor so dedupe is global.

    With a ledger (a training stream), the stored captions join the de-duplication and at most the rows still
    missing of `wanted` pass (the count is exact here, where `Dataset.limit` only bounds a fresh run).
    """

    def __init__(self, cfg: CaptionsConfig, existing: list[str] | None = None, stats_actor: Any | None = None,
                 stage: str = "captions", ledger: Any | None = None, wanted: int | None = None) -> None:
        self.cfg = cfg.cleanup
        self.dedupe = CaptionDeduper()
        self.left: int | None = None
        if ledger is not None:
            view = stream_view(ledger)
            existing = list(existing or []) + list(view.stored_captions)
            self.left = view.remaining(wanted) if wanted is not None else None
        for cap in existing or []:
            self.dedupe.seen(cap)
        self.stats = StatsClient(stats_actor)
        self.stage = stage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        now = time.time()
        reasons = RejectionCounter()
        cleaned = clean_captions([str(raw) for raw in batch["raw_caption"]], self.cfg, self.dedupe, reasons)
        keep = [i for i, cap in enumerate(cleaned) if cap is not None]
        if self.left is not None:
            keep = keep[:self.left]
            self.left -= len(keep)
        captions = [cleaned[i] for i in keep]
        start = float(np.min(batch["t_llm_in"])) if "t_llm_in" in batch and len(batch["t_llm_in"]) else now
        out = {k: np.asarray(v)[keep] for k, v in batch.items() if k not in ("raw_caption", "t_llm_in")}
        out["caption"] = np.asarray(captions, dtype=object)
        self.stats.reject(self.stage, dict(reasons))
        self.stats.record(self.stage, len(keep), start)
        return out
