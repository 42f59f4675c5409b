"""The feature pass's stages (the feature extractor actors, the sample-image tasks): declared from the config for
plans and placement, built with the models when a run evaluates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from synray.config import EvalConfig
from synray.eval.registry import outputs_for
from synray.stages import EVAL_PHASE, LIGHT_STAGE_CPUS, Stage, StageResources, map_stage

__all__ = ["extractor_stages", "keep_sample_images"]


def extractor_stages(cfg: EvalConfig, image_size: int, protocols: Sequence[str],
                     models: Mapping[str, str] | None = None, sample_fraction: float = 0.0) -> list[Stage]:
    """The feature pass over labelled rows: one pool of `eval.feature_actors` FeatureExtractor actors, each holding
    every model (``models``: name -> directory, needed only to build it; the outputs of model ``name`` get the
    columns ``name/output``), and with ``sample_fraction`` the tasks that keep the images of a seeded sample of
    rows (the rest leave the actors as features only)."""
    outputs = outputs_for(protocols)
    actors = StageResources("feature extractors", cfg.feature_actors, 1.0, 1.0 if cfg.use_gpu else 0.0,
                            cfg.resources, ("eval.feature_actors", "", "eval.use_gpu"), EVAL_PHASE,
                            udf="FeatureExtractor")
    keep = StageResources("sample images kept", 1, LIGHT_STAGE_CPUS, phase=EVAL_PHASE, tasks=True,
                          udf="keep_sample_images")

    def add_actors(ds: Any) -> Any:
        from synray.eval.features import FeatureExtractor   # torch: imported when the pass is built

        if models is None:
            raise ValueError("the feature pass is built with the models it encodes")
        return map_stage(ds, actors, FeatureExtractor, batch_format="numpy", batch_size=cfg.batch_size,
                         fn_constructor_kwargs={"model_dir": {f"{name}/": d for name, d in models.items()},
                                                "image_size": image_size, "batch_size": cfg.batch_size,
                                                "device": "cuda" if cfg.use_gpu else "cpu", "outputs": outputs,
                                                "drop_images": not sample_fraction})

    stages = [Stage((actors,), add_actors)]
    if sample_fraction:
        stages.append(Stage((keep,), lambda ds: map_stage(ds, keep, keep_sample_images, batch_format="numpy",
                                                          fn_kwargs={"fraction": sample_fraction})))
    return stages


def keep_sample_images(batch: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """Drop the images of all rows but a seeded sample of about `fraction` (drawn by caption id): the sample
    grid's rows reach the driver with their images, the rest as features only."""
    keep = [int(str(cid)[:8], 16) < fraction * 2**32 for cid in batch["caption_id"]]
    images = np.empty(len(keep), dtype=object)
    for i, k in enumerate(keep):
        images[i] = batch["images"][i] if k else np.asarray([], dtype=object)
    return {**batch, "images": images}
