"""The caption stage as Ray Data operators: plan rows, write captions (vLLM or templates), clean them up."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import ray

from synray.captions.cleanup import CaptionDeduper, RejectionCounter, clean_captions
from synray.captions.files import read_caption_file
from synray.concepts import load_bank, plan_row
from synray.config import CaptionsConfig, RunConfig
from synray.data.schema import caption_id, prompt_seed
from synray.data.stats import StatsClient
from synray.language.prompts import synclr_prompt
from synray.language.templates import template_caption

#: a vLLM completion ends at the first newline (SynCLR keeps the completion's first line)
STOP_STRINGS = ["\n"]


def llm_sampling(cfg: CaptionsConfig) -> dict[str, Any]:
    s = cfg.sampling
    return {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "stop": STOP_STRINGS}


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
        self.llm_model = cap.model if cap.backend == "vllm" else f"template:{cap.style}"
        self.file = read_caption_file(cap.source) if cap.style == "file" else None
        if self.file is not None:
            self.llm_model = f"file:{cap.source}"
        self.sampling_json = json.dumps(llm_sampling(cap) if cap.backend == "vllm" else {}, sort_keys=True)

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
        if cfg.captions.backend == "vllm":
            prompt = synclr_prompt(plan, seed, row_id, cfg.captions.num_examples)
        else:
            prompt = template_caption(plan, cfg.captions.style, seed, row_id)
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
        return _columns(rows, PLAN_COLUMNS)


PLAN_COLUMNS = ("row_id", "caption_id", "label", "concept", "kind", "template", "prompt", "prompt_seed",
                "run_seed", "llm_model", "llm_sampling")


def _columns(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        vals = [r[n] for r in rows]
        out[n] = np.asarray(vals, dtype=np.int64 if n in ("row_id", "label", "prompt_seed", "run_seed") else object)
    return out


def template_captions(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Template backend: the prompt already is the caption."""
    batch["raw_caption"] = batch["prompt"]
    return batch


def vllm_preprocess(cfg: CaptionsConfig):
    """A row -> vLLM request (prompt + per-request seeded sampling params), other columns carried along."""
    sampling = llm_sampling(cfg)

    def pre(row: dict[str, Any]) -> dict[str, Any]:
        out = dict(row)
        out["sampling_params"] = {**sampling, "seed": int(row["prompt_seed"])}
        out["t_llm_in"] = time.time()
        return out

    return pre


def vllm_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in PLAN_COLUMNS if k in row}
    out["raw_caption"] = row.get("generated_text") or ""
    out["t_llm_in"] = row.get("t_llm_in", time.time())
    return out


def stream_view(ledger: Any) -> Any:
    """The `StreamView` of a training stream's ledger actor (one snapshot per worker-group start)."""
    return ray.get(ledger.view.remote())


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
