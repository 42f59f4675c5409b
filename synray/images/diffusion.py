"""The diffusers backend: loads a text-to-image pipeline and renders m seeded images per caption."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from synray.config import ImagesConfig
from synray.data.codecs import encode_image
from synray.data.schema import image_seed
from synray.images.base import Rendered, Renderer, RendererError

log = logging.getLogger(__name__)

#: an image whose brightest pixel is below this (of 255) counts as black (SD's safety checker output)
BLACK_MAX_LEVEL = 2
#: replacement renders allowed per caption, as a multiple of m, when images are dropped
MAX_EXTRA_RENDERS_FACTOR = 1
#: a row that keeps fewer than m good images is dropped and counted under this reason
TOO_FEW_IMAGES = "row_without_enough_images"

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


class T2IModelError(RendererError):
    """A text-to-image model that cannot be used."""


def check_t2i_model(path_or_name: str) -> None:
    """Fail early when a local model path is missing or is not a diffusers text-to-image pipeline."""
    p = Path(path_or_name).expanduser()
    looks_local = p.exists() or path_or_name.startswith(("/", ".", "~")) or path_or_name.count("/") > 1
    if not looks_local:
        return  # a hub name, resolved on the cluster
    if not p.is_dir():
        raise T2IModelError(f"images.model: path does not exist: {path_or_name}")
    index = p / "model_index.json"
    if not index.exists():
        raise T2IModelError(f"images.model: {path_or_name} is not a diffusers pipeline (no model_index.json)")
    comps = json.loads(index.read_text())
    if not ({"unet", "transformer"} & comps.keys()) or "text_encoder" not in comps:
        raise T2IModelError(f"images.model: {path_or_name} is a {comps.get('_class_name')}, "
                            "not a text-to-image pipeline (needs a text encoder and a unet/transformer)")


def t2i_params(cfg: ImagesConfig) -> dict[str, Any]:
    """The generation parameters recorded with every row (with its seeds they regenerate the images)."""
    return {"guidance_scale": cfg.guidance_scale, "steps": cfg.steps, "scheduler": cfg.scheduler,
            "resolution": cfg.resolution, "output_size": cfg.output_size, "dtype": cfg.dtype,
            "negative_prompt": cfg.negative_prompt, "image_format": cfg.image_format}


def load_pipeline(model_path: str, cfg: ImagesConfig):
    """A diffusers pipeline on the configured device and dtype (safetensors only)."""
    import diffusers

    check_t2i_model(model_path)
    dtype = getattr(torch, cfg.dtype)
    pipe = diffusers.DiffusionPipeline.from_pretrained(model_path, dtype=dtype, use_safetensors=True)
    if cfg.scheduler != "default":
        sched_cls = getattr(diffusers, SCHEDULERS[cfg.scheduler])
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
    pipe = pipe.to(cfg.device)
    pipe.set_progress_bar_config(disable=True)
    if cfg.device == "cuda":
        if cfg.compile and hasattr(pipe, "unet"):
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    return pipe


def is_bad_image(arr: np.ndarray) -> str | None:
    """'nonfinite' / 'black' for images to drop, else None."""
    if not np.isfinite(arr).all():
        return "nonfinite"
    if float(arr.max()) * 255 < BLACK_MAX_LEVEL:
        return "black"
    return None


def render_images(pipe, caption: str, seeds: list[int], cfg: ImagesConfig) -> list[np.ndarray]:
    """One pipeline call for one caption: image k starts from the noise of its own generator seeds[k]."""

    gens = [torch.Generator(device=cfg.device).manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        out = pipe(prompt=caption, num_images_per_prompt=len(seeds), generator=gens,
                   guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.steps,
                   height=cfg.resolution, width=cfg.resolution, output_type="np",
                   negative_prompt=cfg.negative_prompt)
    return list(out.images)


def render_row(pipe, caption: str, cap_id: str, run_seed: int, cfg: ImagesConfig,
               drops: Counter[str] | None = None) -> tuple[list[bytes], list[int]]:
    """m good images of one caption with their seeds; bad images are replaced by renders with further seeds."""
    m = cfg.per_caption
    good: list[bytes] = []
    used: list[int] = []
    next_index = 0
    budget = m * (1 + MAX_EXTRA_RENDERS_FACTOR)
    while len(good) < m and next_index < budget:
        want = min(m - len(good), budget - next_index)
        seeds = [image_seed(run_seed, cap_id, next_index + k) for k in range(want)]
        next_index += want
        for seed, arr in zip(seeds, render_images(pipe, caption, seeds, cfg)):
            bad = is_bad_image(arr)
            if bad:
                if drops is not None:
                    drops[bad] += 1
                continue
            good.append(encode_image(arr, cfg.image_format, cfg.output_size, cfg.jpeg_quality))
            used.append(seed)
    return good, used


class DiffusionRenderer(Renderer):
    """A diffusers text-to-image pipeline (Stable Diffusion and kin); black and non-finite images are replaced."""

    name: ClassVar[str] = "diffusers"
    reads: ClassVar[tuple[str, ...]] = ("backend", "model", "per_caption", "guidance_scale", "steps", "scheduler",
                                        "resolution", "output_size", "image_format", "jpeg_quality", "dtype",
                                        "device", "negative_prompt")
    needs_model: ClassVar[bool] = True

    def __init__(self, cfg: ImagesConfig, model_path: str | None, run_seed: int,
                 stats_actor: Any | None = None) -> None:
        super().__init__(cfg, model_path, run_seed, stats_actor)
        if cfg.device == "cpu":
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        if model_path is None:
            raise RendererError("the diffusers backend needs a model path (images.model)")
        self.pipe = load_pipeline(model_path, cfg)

    @classmethod
    def check(cls, cfg: ImagesConfig) -> None:
        check_t2i_model(cfg.model)

    @classmethod
    def params(cls, cfg: ImagesConfig) -> dict[str, Any]:
        return t2i_params(cfg)

    @classmethod
    def claims(cls, row: dict[str, Any]) -> bool:
        return "guidance_scale" in json.loads(row["t2i_params"] or "{}")

    @classmethod
    def regenerate(cls, caption: str, seeds: list[int], cfg: ImagesConfig, model_path: str | None) -> list[bytes]:
        pipe = load_pipeline(str(model_path), cfg)
        return [encode_image(arr, cfg.image_format, cfg.output_size, cfg.jpeg_quality)
                for arr in render_images(pipe, caption, seeds, cfg)]

    def render_caption(self, caption: str, cap_id: str, drops: Counter[str]) -> Rendered | None:
        images, seeds = render_row(self.pipe, caption, cap_id, self.run_seed, self.cfg, drops)
        if len(images) < self.cfg.per_caption:
            drops[TOO_FEW_IMAGES] += 1
            return None
        return Rendered(images, seeds)
