"""Bench (b) the diffusion stage vs one bare diffusers call and (c) the caption stage vs bare `vllm.LLM.generate`.

(b) runs in one Ray task on the stage's resources: the renderer the stage's actors build, called on
`images.batch_size` caption rows as Ray Data calls it (rendering, bad-image checks, encoding), alternated
with one plain diffusers call on the same captions and per-image seeds. (c) runs the caption stage
(`ray.data.llm` processor with its engine pool) over planned rows and measures its output rate after
the first block (the engines' start-up excluded); the bare engine runs in a Ray task on the same
resources, with and without prefix caching, and (GPU engines) with and without vLLM's batch-invariant mode.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np
import ray
import torch

from synray.bench.report import Ratio
from synray.captions.llm import build_llm_processor, engine_kwargs
from synray.captions.rows import PLAN_COLUMNS, llm_sampling, vllm_postprocess, vllm_preprocess
from synray.captions.stage import PlanRows
from synray.config import ImagesConfig, RunConfig
from synray.images.diffusion import DiffusionRenderer, first_seeds

__all__ = ["bench_diffusion", "bench_captions"]

DIFFUSION_GOAL, CAPTIONS_GOAL = 0.95, 0.9
#: what batch-invariant captions may cost: at least half the default rate
INVARIANT_GOAL = 0.5


# ------------------------------------------------------------------------------------------- (b)
def bare_call(pipe: Any, captions: list[str], seeds: list[list[int]], cfg: ImagesConfig) -> None:
    """The reference: one diffusers call, n captions x m images, a generator per image."""
    gens = [torch.Generator(device=cfg.device).manual_seed(int(s)) for row in seeds for s in row]
    with torch.inference_mode():
        pipe(prompt=captions, num_images_per_prompt=len(seeds[0]), generator=gens, guidance_scale=cfg.guidance_scale,
             num_inference_steps=cfg.steps, height=cfg.resolution, width=cfg.resolution, output_type="np",
             negative_prompt=cfg.negative_prompt)
    if cfg.device == "cuda":
        torch.cuda.synchronize()


def diffusion_side_by_side(cfg: ImagesConfig, model_path: str, run_seed: int, rounds: int) -> dict[str, Any]:
    """Stage UDF vs bare call on the same `images.batch_size` captions and seeds, alternated; medians in images/s."""
    n, m = cfg.batch_size, cfg.per_caption
    captions = [f"a photo of object number {i} on a table" for i in range(n)]
    ids = [f"{i:016x}" for i in range(n)]
    batch = {"caption": np.asarray(captions, dtype=object), "caption_id": np.asarray(ids, dtype=object),
             "run_seed": np.full(n, run_seed, dtype=np.int64)}
    seeds = [first_seeds(run_seed, cid, m) for cid in ids]
    renderers = {mode: DiffusionRenderer(cfg.model_copy(update={"batch_mode": mode}), model_path, run_seed)
                 for mode in ("batched", "per_caption")}
    times: dict[str, list[float]] = {"stage": [], "bare": [], "per_caption": []}
    calls = {"stage": lambda: renderers["batched"](dict(batch)), "bare": lambda: bare_call(
        renderers["batched"].pipe, captions, seeds, cfg), "per_caption": lambda: renderers["per_caption"](dict(batch))}
    for r in range(rounds + 1):  # round 0 warms up (and compiles, where images.compile is on)
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: n * m / float(np.median(ts)) for name, ts in times.items()} | {"captions_per_call": n,
                                                                                   "images_per_caption": m}


def bench_diffusion(cfg: RunConfig, t2i_path: str, quick: bool) -> list[Ratio]:
    img = cfg.images
    task = ray.remote(num_cpus=img.num_cpus, num_gpus=img.num_gpus or 0, max_calls=1)(diffusion_side_by_side)
    rates = ray.get(task.remote(img, t2i_path, cfg.seed, 8 if quick else 20))
    rates["per_caption_vs_bare"] = rates["per_caption"] / rates["bare"]
    return [Ratio("b.diffusion", "diffusion stage images/s / one bare batched diffusers call, same captions and "
                  "seeds", rates["stage"] / rates["bare"], DIFFUSION_GOAL, detail=rates)]


# ------------------------------------------------------------------------------------------- (c)
def planned_rows(cfg: RunConfig, n: int) -> list[dict[str, Any]]:
    """The caption stage's input: n planned rows (prompt, prompt seed, ...), as the pipeline plans them."""
    planner = PlanRows(cfg)
    return [{k: planner.plan(i)[k] for k in PLAN_COLUMNS} for i in range(n)]


def bare_generate(model_path: str, kwargs: dict[str, Any], prompts: list[str], seeds: list[int],
                  sampling: dict[str, Any], repeats: int = 3,
                  caching_modes: tuple[bool, ...] = (True, False)) -> dict[bool, dict[str, Any]]:
    """The reference: `vllm.LLM.generate` on every prompt, with prefix caching on and then off (one engine
    after the other, in one process). Each: a small warm-up call, then the median of `repeats` calls."""
    from vllm import LLM, SamplingParams

    params = [SamplingParams(**sampling, seed=int(s)) for s in seeds]
    out: dict[bool, dict[str, Any]] = {}
    for caching in caching_modes:
        llm = LLM(model=model_path, **{**kwargs, "enable_prefix_caching": caching})
        llm.generate(prompts[:8], params[:8], use_tqdm=False)
        times = []
        for _ in range(repeats):  # warm, as an engine of the stage is after its first batch (header cached)
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        elapsed = float(np.median(times))
        out[caching] = {"rows_per_s": len(prompts) / elapsed, "elapsed_s": elapsed, "repeats": repeats,
                        "tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}
        llm.llm_engine.engine_core.shutdown()  # the next engine starts on a free machine
        del llm
        gc.collect()
    return out


def batch_invariant_cost(cfg: RunConfig, llm_path: str, prompts: list[str], seeds: list[int]) -> dict[str, Any]:
    """Bare captions/s with vLLM's batch-invariant mode on and off (GPU engines; one fresh process each, as
    the mode is read when vLLM starts), at the config's prefix caching."""
    c = cfg.captions
    out = {}
    for flag in ("1", "0"):
        task = ray.remote(num_cpus=c.engine.num_cpus, num_gpus=c.engine.num_gpus, max_calls=1,
                          runtime_env={"env_vars": {"VLLM_BATCH_INVARIANT": flag}})(bare_generate)
        caching = c.engine.enable_prefix_caching
        out[flag] = ray.get(task.remote(llm_path, engine_kwargs(c), prompts, seeds, llm_sampling(c),
                                        caching_modes=(caching,)))[caching]
    return {"invariant": out["1"], "default": out["0"]}


def stage_rate(cfg: RunConfig, llm_path: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows/s the caption stage delivers after its first output block (engine start-up excluded)."""
    proc = build_llm_processor(cfg.captions, llm_path, vllm_preprocess(cfg.captions), vllm_postprocess)
    arrivals: list[tuple[float, int]] = []
    for batch in proc(ray.data.from_items(rows)).iter_batches(batch_size=None):
        arrivals.append((time.perf_counter(), len(batch["row_id"])))
    if len(arrivals) < 2:
        raise RuntimeError("the caption stage returned one block; give it more rows to measure a rate")
    span = arrivals[-1][0] - arrivals[0][0]
    return {"rows_per_s": sum(n for _, n in arrivals[1:]) / span, "blocks": len(arrivals), "span_s": span}


def bench_captions(cfg: RunConfig, llm_path: str, quick: bool) -> list[Ratio]:
    c = cfg.captions
    rows = planned_rows(cfg, 384 if quick else 2048)
    stage = stage_rate(cfg, llm_path, rows)
    task = ray.remote(num_cpus=c.engine.num_cpus, num_gpus=c.engine.num_gpus or 0, max_calls=1)(bare_generate)
    prompts, seeds = [r["prompt"] for r in rows], [r["prompt_seed"] for r in rows]
    bare = ray.get(task.remote(llm_path, engine_kwargs(c), prompts, seeds, llm_sampling(c)))
    with_cache = bare[c.engine.enable_prefix_caching]
    detail = {"stage": stage, "bare_prefix_caching": bare[True], "bare_no_prefix_caching": bare[False],
              "engines": c.engine.pool_size}
    per_engine = stage["rows_per_s"] / c.engine.pool_size
    return [Ratio("c.captions", "caption stage captions/s per engine / bare vllm.LLM.generate, same prompts and "
                  "sampling", per_engine / with_cache["rows_per_s"], CAPTIONS_GOAL, detail=detail),
            Ratio("c.prefix_caching", "bare vllm.LLM.generate captions/s with / without prefix caching (gain)",
                  bare[True]["rows_per_s"] / bare[False]["rows_per_s"], 1.0, detail=detail)] + \
        (_invariant_ratio(cfg, llm_path, prompts, seeds) if c.engine.num_gpus else [])


def _invariant_ratio(cfg: RunConfig, llm_path: str, prompts: list[str], seeds: list[int]) -> list[Ratio]:
    cost = batch_invariant_cost(cfg, llm_path, prompts, seeds)
    return [Ratio("c.batch_invariant", "bare vllm.LLM.generate captions/s with / without batch-invariant mode "
                  "(its cost)", cost["invariant"]["rows_per_s"] / cost["default"]["rows_per_s"],
                  INVARIANT_GOAL, detail=cost)]
