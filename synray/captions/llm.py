"""The vLLM caption engine pool through `ray.data.llm` (fixed pool size; CPU and GPU installs)."""

from __future__ import annotations

from typing import Any, Callable

from synray.config import CaptionsConfig

#: The CPU backend: the multiprocessing executor, and no chunked prefill. With chunked prefill a
#: seeded request that is mid-prefill has its sampled token discarded and vLLM rewinds its torch
#: generator, which CPU generators cannot do ("CPU Generator does not use offset").
CPU_ENGINE_KWARGS = {"distributed_executor_backend": "mp", "enable_chunked_prefill": False}

#: CPU helper stages around the engine (pre/post-processing) take this much of a CPU each
CPU_STAGE_CPUS = 0.25


def engine_kwargs(cfg: CaptionsConfig) -> dict[str, Any]:
    """vLLM engine arguments from the config; the CPU backend needs the multiprocessing executor."""
    e = cfg.engine
    kwargs: dict[str, Any] = {
        "max_model_len": e.max_model_len,
        "enable_prefix_caching": e.enable_prefix_caching,  # the prompts share their header
        "enforce_eager": e.enforce_eager,
        "gpu_memory_utilization": e.gpu_memory_utilization,
        "dtype": e.dtype,
        "tensor_parallel_size": e.tensor_parallel_size,
        "trust_remote_code": cfg.trust_remote_code,
        "load_format": "safetensors",  # never unpickle weights
    }
    if e.num_gpus == 0:
        kwargs.update(CPU_ENGINE_KWARGS)
        kwargs["max_num_batched_tokens"] = max(e.max_model_len, e.batch_size * e.max_model_len // 4)
    if e.kv_cache_memory_mb:
        kwargs["kv_cache_memory_bytes"] = e.kv_cache_memory_mb * 2**20
    kwargs.update(e.extra)
    return kwargs


def engine_env(cfg: CaptionsConfig) -> dict[str, str]:
    """Environment variables of the engine actors (vLLM reads some settings only from its environment)."""
    return {"VLLM_BATCH_INVARIANT": "1"} if cfg.engine.batch_invariant else {}


def placement_bundles(cfg: CaptionsConfig) -> list[dict[str, float]]:
    """One bundle per tensor-parallel rank of an engine."""
    e = cfg.engine
    bundle: dict[str, float] = {"CPU": e.num_cpus}
    if e.num_gpus:
        bundle["GPU"] = e.num_gpus
    bundle.update(e.resources)
    return [dict(bundle) for _ in range(e.tensor_parallel_size)]


def build_llm_processor(cfg: CaptionsConfig, model_path: str, preprocess: Callable, postprocess: Callable):
    """A ray.data.llm Processor: Dataset -> Dataset with the engine's completion in each row."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    e = cfg.engine
    proc_cfg = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(cfg),
        batch_size=e.batch_size,
        concurrency=e.pool_size,
        max_concurrent_batches=e.max_concurrent_batches,
        chat_template_stage=False,   # raw completion prompts (SynCLR / LaCLIP few-shot)
        tokenize_stage=False,
        detokenize_stage=False,
        log_engine_metrics=False,    # metrics export needs ray.serve
        placement_group_config={"bundles": placement_bundles(cfg)},
        **({"runtime_env": {"env_vars": env}} if (env := engine_env(cfg)) else {}),
    )
    cpu_stage = {"num_cpus": CPU_STAGE_CPUS}
    return build_processor(proc_cfg, preprocess=preprocess, postprocess=postprocess,
                           preprocess_map_kwargs=cpu_stage, postprocess_map_kwargs=cpu_stage)
