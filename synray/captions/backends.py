"""The registry of caption backends: `captions.backend` names an entry of `CAPTION_BACKENDS` here, and nowhere else.

A backend says whether it needs a language model (resolved when a run is planned), what a row's provenance records
of it, how a row's prompt is written, and the pipeline stages that turn prompts into raw captions (with their
resources, read by `synray plan` and the placement check). A new backend is one entry here plus its settings in
`CaptionsConfig`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from synray.captions.llm import CPU_STAGE_CPUS, build_llm_processor
from synray.captions.rows import llm_sampling, template_captions, vllm_postprocess, vllm_preprocess
from synray.concepts import RowPlan
from synray.config import CaptionsConfig
from synray.language.prompts import synclr_prompt
from synray.language.templates import template_caption
from synray.stages import LIGHT_STAGE_CPUS, Rate, Stage, StageResources, map_stage

__all__ = ["CaptionBackend", "CAPTION_BACKENDS", "caption_backend_names", "get_caption_backend"]


@dataclass(frozen=True)
class CaptionBackend:
    """How captions are written from planned rows."""

    name: str
    needs_model: bool                                           # captions.model is resolved and loaded
    prompt: Callable[[RowPlan, CaptionsConfig, int, int], str]  # (row plan, settings, run seed, row id) -> prompt
    stages: Callable[[CaptionsConfig, Callable[[], str | None], str, str], list[Stage]]
    # (settings, the resolved model path when built, phase, stage-name prefix) -> its stages
    styles: tuple[str, ...] | None = None                       # the captions.style values it writes (None: all)
    describe: Callable[[CaptionsConfig], str] = lambda cfg: ""  # `synray plan`'s data flow: what writes captions

    def check(self, cfg: CaptionsConfig) -> None:
        """ValueError naming the backends that write cfg.style, when this one does not."""
        if self.styles is not None and cfg.style not in self.styles:
            others = [b.name for b in CAPTION_BACKENDS.values() if b.styles is None or cfg.style in b.styles]
            raise ValueError(f"captions.style={cfg.style} needs captions.backend={' or '.join(others)}; "
                             f"captions.backend={self.name} writes the styles {', '.join(self.styles)}")

    def model_label(self, cfg: CaptionsConfig) -> str:
        """What a row's provenance records as the caption model."""
        return cfg.model if self.needs_model else f"template:{cfg.style}"

    def sampling_json(self, cfg: CaptionsConfig) -> str:
        """A row's provenance record of the sampling settings (empty for a backend that samples nothing)."""
        return json.dumps(llm_sampling(cfg) if self.needs_model else {}, sort_keys=True)


#: published: vLLM serving Llama-3-8B on one H100, 256 tokens in and 256 out: ~6,200 output tokens/s
REFERENCE_OUTPUT_TOKENS_PER_S = 6200.0


def vllm_rate(cfg: CaptionsConfig) -> Rate | None:
    """Captions one engine writes per second on GPUs: the reference throughput over its GPUs, each caption taking
    `sampling.max_tokens` tokens (an upper bound: captions stop at a newline earlier)."""
    e = cfg.engine
    if not e.num_gpus:
        return None
    gpus = e.num_gpus * e.tensor_parallel_size
    return Rate(REFERENCE_OUTPUT_TOKENS_PER_S * gpus / cfg.sampling.max_tokens,
                f"reference: vLLM Llama-3-8B on one H100, ~{REFERENCE_OUTPUT_TOKENS_PER_S:,.0f} output tokens/s "
                f"(published), {cfg.sampling.max_tokens} tokens a caption at most")


def _vllm_stages(cfg: CaptionsConfig, model_path: Callable[[], str | None], phase: str, prefix: str) -> list[Stage]:
    """ray.data.llm's processor: pre-processing tasks, the engine pool (an engine's tensor-parallel bundles counted as
    one request: they go on one node), post-processing tasks."""
    e, engine, tp = cfg.engine, "captions.engine.", cfg.engine.tensor_parallel_size
    resources = (
        StageResources(f"{prefix}caption pre-processing", 1, CPU_STAGE_CPUS, phase=phase, tasks=True, udf="pre"),
        StageResources(f"{prefix}vLLM engines", e.pool_size, e.num_cpus * tp, e.num_gpus * tp,
                       {k: v * tp for k, v in e.resources.items()},
                       (f"{engine}pool_size", f"{engine}num_cpus", f"{engine}num_gpus"), phase,
                       udf="vLLMEngineStageUDF", rate=vllm_rate(cfg), rate_key="rates.captions"),
        StageResources(f"{prefix}caption post-processing", 1, CPU_STAGE_CPUS, phase=phase, tasks=True,
                       udf="vllm_postprocess"))

    def add(ds: Any) -> Any:
        return build_llm_processor(cfg, model_path(), vllm_preprocess(cfg), vllm_postprocess)(ds)

    return [Stage(resources, add)]


def _template_stages(cfg: CaptionsConfig, model_path: Callable[[], str | None], phase: str,
                     prefix: str) -> list[Stage]:
    res = StageResources(f"{prefix}template captions", 1, LIGHT_STAGE_CPUS, phase=phase, tasks=True,
                         udf="template_captions")
    return [Stage((res,), lambda ds: map_stage(ds, res, template_captions))]


CAPTION_BACKENDS: dict[str, CaptionBackend] = {b.name: b for b in (
    CaptionBackend("vllm", True, lambda plan, cfg, seed, row: synclr_prompt(plan, seed, row, cfg.num_examples),
                   _vllm_stages, describe=lambda c: f"vLLM {c.model}, engines: {c.engine.pool_size}"),
    CaptionBackend("template", False, lambda plan, cfg, seed, row: template_caption(plan, cfg.style, seed, row),
                   _template_stages, styles=("classname", "clip_templates", "concept_background", "shapes", "file"),
                   describe=lambda c: f"{c.style} templates"),
)}


def caption_backend_names() -> tuple[str, ...]:
    return tuple(CAPTION_BACKENDS)


def get_caption_backend(name: str) -> CaptionBackend:
    try:
        return CAPTION_BACKENDS[name]
    except KeyError:
        raise ValueError(f"captions.backend {name!r} is not available; allowed: "
                         f"{', '.join(CAPTION_BACKENDS)}") from None
