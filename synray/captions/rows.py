"""Row-level functions of the caption stages: the plan columns, vLLM requests and answers, template captions."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from synray.config import CaptionsConfig

__all__ = ["STOP_STRINGS", "PLAN_COLUMNS", "llm_sampling", "plan_columns", "template_captions", "vllm_preprocess",
           "vllm_postprocess", "stream_view"]

#: a vLLM completion ends at the first newline (SynCLR keeps the completion's first line)
STOP_STRINGS = ["\n"]


def llm_sampling(cfg: CaptionsConfig) -> dict[str, Any]:
    s = cfg.sampling
    return {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "stop": STOP_STRINGS}


PLAN_COLUMNS = ("row_id", "caption_id", "label", "concept", "kind", "template", "prompt", "prompt_seed",
                "run_seed", "llm_model", "llm_sampling")


def plan_columns(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
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
    import ray

    return ray.get(ledger.view.remote())
