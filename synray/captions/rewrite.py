"""LaCLIP rewrite mode: k LLM rewrites per caption of an existing image-text dataset; images untouched."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synray.captions.cleanup import clean_caption
from synray.captions.llm import build_llm_processor
from synray.config import RunConfig
from synray.language.prompts import laclip_prompt

#: column names accepted as the image / caption of a WebDataset sample
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WDS_CAPTION_KEYS = ("txt", "caption")


class RewriteError(ValueError):
    """A source dataset that cannot be rewritten."""


def _paths(source: str, suffix: str, given: str = "captions.rewrite.source") -> list[str]:
    p = Path(source)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        return sorted(str(f) for f in p.rglob(f"*{suffix}") if not f.name.startswith("."))
    raise RewriteError(f"{given}: {source} does not exist")


def source_key(image: bytes, caption: str) -> str:
    return hashlib.sha256(image + b"\x1f" + caption.encode()).hexdigest()[:16]


def _normalise(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """WebDataset or Parquet columns -> image (bytes), caption (str), source_key."""
    image_col = next((k for k in ("image", *WDS_IMAGE_KEYS) if k in batch), None)
    caption_col = next((k for k in ("caption", *WDS_CAPTION_KEYS) if k in batch), None)
    if image_col is None or caption_col is None:
        raise RewriteError(f"source rows need an image and a caption column; found {sorted(batch)}")
    images = [bytes(x) for x in batch[image_col]]
    captions = [x.decode() if isinstance(x, bytes) else str(x) for x in batch[caption_col]]
    return {"image": np.asarray(images, dtype=object), "caption": np.asarray(captions, dtype=object),
            "source_key": np.asarray([source_key(i, c) for i, c in zip(images, captions)], dtype=object)}


def read_image_text(source: str):
    """A Ray Dataset of image-text pairs from Parquet (`image`, `caption`) or WebDataset tar shards."""
    import ray.data

    tars = _paths(source, ".tar")
    if tars and all(t.endswith(".tar") for t in tars):
        ds = ray.data.read_webdataset(tars, decoder=None)
    else:
        files = _paths(source, ".parquet")
        if not files:
            raise RewriteError(f"captions.rewrite.source: {source} holds no .parquet or .tar files")
        names = set(pq.read_schema(files[0]).names)
        if not {"image", "caption"} <= names:
            raise RewriteError(f"{files[0]} needs columns image and caption (it has {sorted(names)})")
        ds = ray.data.read_parquet(files).select_columns(["image", "caption"])
    return ds.map_batches(_normalise, batch_format="numpy")


def explode(cfg: RunConfig):
    """One request row per (source row, rewrite index), with the LaCLIP prompt and a per-request seed."""
    k = cfg.captions.rewrite.num_rewrites
    seed = cfg.seed

    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"source_key": [], "rewrite_index": [], "prompt": [], "prompt_seed": []}
        for key, cap in zip(batch["source_key"], batch["caption"]):
            row = int(str(key)[:8], 16)
            for i in range(k):
                out["source_key"].append(key)
                out["rewrite_index"].append(i)
                out["prompt"].append(laclip_prompt(str(cap), seed, row, i))
                out["prompt_seed"].append(int(hashlib.sha256(f"{seed}:{key}:{i}".encode()).hexdigest()[:7], 16))
        return {c: np.asarray(v, dtype=np.int64 if c in ("rewrite_index", "prompt_seed") else object)
                for c, v in out.items()}
    return fn


def rewrite_processor(cfg: RunConfig, model_path: str):
    s = cfg.captions.rewrite.sampling
    sampling = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "stop": ["\n"]}

    def pre(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "sampling_params": {**sampling, "seed": int(row["prompt_seed"])}}

    def post(row: dict[str, Any]) -> dict[str, Any]:
        return {"source_key": row["source_key"], "rewrite_index": row["rewrite_index"],
                "rewrite": row.get("generated_text") or ""}

    return build_llm_processor(cfg.captions, model_path, pre, post), sampling


def check_source(source: str, given: str = "captions.rewrite.source") -> None:
    """RewriteError naming `given` (the flag or the config key) when the source does not exist (checked before Ray
    starts)."""
    if not any(f.endswith((".parquet", ".tar")) for f in _paths(source, "", given)):
        raise RewriteError(f"{given}: {source} holds no .parquet or .tar files")


def rewrite_fingerprint(cfg: RunConfig) -> str:
    """Store fingerprint of a rewrite run: the seed and what decides the prompts and their sampling."""
    captions = {k: v for k, v in cfg.captions.model_dump(mode="json").items() if k not in ("engine", "oversample")}
    keep = {"seed": cfg.seed, "captions": captions}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16] + "-rewrite"


def collect_rewrites(answers: list[dict[str, Any]], cfg: RunConfig) -> tuple[dict[str, dict[int, str]], Counter[str]]:
    """source key -> {rewrite index: cleaned rewrite ('' when rejected)}, and the rejections by reason."""
    cleanup = cfg.captions.cleanup.model_copy(update={"dedupe": False})
    reasons: Counter[str] = Counter()
    rewrites: dict[str, dict[int, str]] = {}
    for a in answers:
        text, why = clean_caption(a["rewrite"], cleanup)
        if text is None:
            reasons[why or "rejected"] += 1
        rewrites.setdefault(a["source_key"], {})[int(a["rewrite_index"])] = text or ""
    return rewrites, reasons


def rewrite_table(rows: list[dict[str, Any]], rewrites: dict[str, dict[int, str]], cfg: RunConfig,
                  sampling: dict[str, Any]) -> pa.Table:
    """(source_key, image, caption, rewrites[k], caption_id, provenance) for every source row."""
    k = cfg.captions.rewrite.num_rewrites
    keys = [r["source_key"] for r in rows]
    return pa.table({
        "source_key": keys, "image": [r["image"] for r in rows], "caption": [r["caption"] for r in rows],
        "rewrites": [[rewrites.get(r["source_key"], {}).get(i, "") for i in range(k)] for r in rows],
        "llm_model": [cfg.captions.model] * len(rows),
        "llm_sampling": [json.dumps({**sampling, "seed": "sha256(run seed, source key, index)"})] * len(rows),
        "run_seed": [cfg.seed] * len(rows),
        "caption_id": keys,
    })
