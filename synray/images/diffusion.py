"""The diffusion stage: loads a diffusers text-to-image pipeline and renders m seeded images per caption."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from synray.config import ImagesConfig
from synray.data.schema import image_seed
from synray.data.stats import StatsClient

log = logging.getLogger(__name__)

#: an image whose brightest pixel is below this (of 255) counts as black (SD's safety checker output)
BLACK_MAX_LEVEL = 2
#: replacement renders allowed per caption, as a multiple of m, when images are dropped
MAX_EXTRA_RENDERS_FACTOR = 1

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


class T2IModelError(ValueError):
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
    import torch

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


def encode_image(arr: np.ndarray, fmt: str, size: int, quality: int = 95) -> bytes:
    """float [H,W,3] in [0,1] -> resized, encoded image bytes."""
    from PIL import Image

    img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if fmt == "png":
        img.save(out, format="PNG", optimize=False)
    elif fmt == "jpeg":
        img.save(out, format="JPEG", quality=quality)
    else:
        img.save(out, format="WEBP", quality=quality)
    return out.getvalue()


def is_bad_image(arr: np.ndarray) -> str | None:
    """'nonfinite' / 'black' for images to drop, else None."""
    if not np.isfinite(arr).all():
        return "nonfinite"
    if float(arr.max()) * 255 < BLACK_MAX_LEVEL:
        return "black"
    return None


def render_images(pipe, caption: str, seeds: list[int], cfg: ImagesConfig) -> list[np.ndarray]:
    """One pipeline call for one caption: image k starts from the noise of its own generator seeds[k]."""
    import torch

    gens = [torch.Generator(device=cfg.device).manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        out = pipe(prompt=caption, num_images_per_prompt=len(seeds), generator=gens,
                   guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.steps,
                   height=cfg.resolution, width=cfg.resolution, output_type="np",
                   negative_prompt=cfg.negative_prompt)
    return list(out.images)


def render_row(pipe, caption: str, cap_id: str, run_seed: int, cfg: ImagesConfig,
               drops: dict[str, int] | None = None) -> tuple[list[bytes], list[int]]:
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
                    drops[bad] = drops.get(bad, 0) + 1
                continue
            good.append(encode_image(arr, cfg.image_format, cfg.output_size, cfg.jpeg_quality))
            used.append(seed)
    return good, used


class DiffusionRenderer:
    """Ray Data UDF (one per actor): adds `images`, `seeds` and image provenance to caption rows."""

    def __init__(self, cfg: ImagesConfig, model_path: str, run_seed: int, stats_actor: Any | None = None) -> None:
        import torch

        if cfg.device == "cpu":
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.cfg = cfg
        self.run_seed = run_seed
        self.model_path = model_path
        self.pipe = load_pipeline(model_path, cfg)
        self.stats = StatsClient(stats_actor)
        self.params_json = json.dumps(t2i_params(cfg), sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        start = time.time()
        drops: dict[str, int] = {}
        keep, images, seeds = [], [], []
        for i, (caption, cap_id) in enumerate(zip(batch["caption"], batch["caption_id"])):
            imgs, used = render_row(self.pipe, str(caption), str(cap_id), self.run_seed, self.cfg, drops)
            if len(imgs) < self.cfg.per_caption:
                drops["row_without_enough_images"] = drops.get("row_without_enough_images", 0) + 1
                continue
            keep.append(i)
            images.append(imgs)
            seeds.append(used)
        out = {k: np.asarray(v)[keep] for k, v in batch.items()}
        n = len(keep)
        out["images"] = _object_array(images)
        out["seeds"] = _object_array([np.asarray(s, dtype=np.int64) for s in seeds])
        out["image_format"] = np.asarray([self.cfg.image_format] * n, dtype=object)
        out["t2i_model"] = np.asarray([self.cfg.model] * n, dtype=object)
        out["t2i_params"] = np.asarray([self.params_json] * n, dtype=object)
        self.stats.reject("images", drops)
        self.stats.record("images", n, start)
        return out


def _object_array(items: list[Any]) -> np.ndarray:
    """A 1-D object array holding each item as one element (lists of image bytes stay whole)."""
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr
