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
from synray.stages import Rate

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


def render_group(pipe, captions: list[str], seeds: list[list[int]], cfg: ImagesConfig) -> list[list[np.ndarray]]:
    """One pipeline call for several captions: image k of caption i starts from its own generator seeds[i][k].

    All captions must ask for the same number of images. Returns the images per caption, in order.
    """
    m = len(seeds[0])
    if any(len(row) != m for row in seeds) or len(seeds) != len(captions):
        raise ValueError("render_group needs one seed list of the same length per caption")
    gens = [torch.Generator(device=cfg.device).manual_seed(int(s)) for row in seeds for s in row]
    with torch.inference_mode():
        out = pipe(prompt=list(captions), num_images_per_prompt=m, generator=gens,
                   guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.steps,
                   height=cfg.resolution, width=cfg.resolution, output_type="np",
                   negative_prompt=cfg.negative_prompt)
    images = list(out.images)  # caption-major: the m images of caption 0, then caption 1, ...
    return [images[i * m:(i + 1) * m] for i in range(len(captions))]


def render_images(pipe, caption: str, seeds: list[int], cfg: ImagesConfig) -> list[np.ndarray]:
    """One pipeline call for one caption: image k starts from the noise of its own generator seeds[k]."""
    return render_group(pipe, [caption], [list(seeds)], cfg)[0]


def first_seeds(run_seed: int, cap_id: str, m: int) -> list[int]:
    return [image_seed(run_seed, cap_id, k) for k in range(m)]


def complete_row(pipe, caption: str, cap_id: str, run_seed: int, cfg: ImagesConfig, first: list[np.ndarray],
                 drops: Counter[str] | None = None) -> tuple[list[bytes], list[int]]:
    """m good images of one caption from its first m renders; bad ones are replaced by renders with further
    seeds (one call per caption, up to MAX_EXTRA_RENDERS_FACTOR x m more images)."""
    m = cfg.per_caption
    good: list[bytes] = []
    used: list[int] = []
    budget = m * (1 + MAX_EXTRA_RENDERS_FACTOR)
    arrays, seeds, next_index = first, first_seeds(run_seed, cap_id, m), m
    while True:
        for seed, arr in zip(seeds, arrays):
            bad = is_bad_image(arr)
            if bad:
                if drops is not None:
                    drops[bad] += 1
                continue
            good.append(encode_image(arr, cfg.image_format, cfg.output_size, cfg.jpeg_quality))
            used.append(seed)
        if len(good) >= m or next_index >= budget:
            return good, used
        want = min(m - len(good), budget - next_index)
        seeds = [image_seed(run_seed, cap_id, next_index + k) for k in range(want)]
        next_index += want
        arrays = render_images(pipe, caption, seeds, cfg)


def render_row(pipe, caption: str, cap_id: str, run_seed: int, cfg: ImagesConfig,
               drops: Counter[str] | None = None) -> tuple[list[bytes], list[int]]:
    """m good images of one caption rendered on its own (the per-caption mode)."""
    first = render_images(pipe, caption, first_seeds(run_seed, cap_id, cfg.per_caption), cfg)
    return complete_row(pipe, caption, cap_id, run_seed, cfg, first, drops)


def padded_call(captions: list[str], cap_ids: list[str], run_seed: int,
                cfg: ImagesConfig) -> tuple[list[str], list[list[int]]]:
    """A batched call's captions and seeds, padded to `images.batch_size` with copies of its last caption,
    so every call has one shape (torch.compile compiles once); the padding's images are dropped."""
    pad = cfg.batch_size - len(captions)
    captions = list(captions) + [captions[-1]] * pad
    ids = list(cap_ids) + [cap_ids[-1]] * pad
    return captions, [first_seeds(run_seed, cid, cfg.per_caption) for cid in ids]


def render_batch_group(pipe, captions: list[str], cap_ids: list[str], run_seed: int, cfg: ImagesConfig,
                       drops: Counter[str] | None = None) -> list[tuple[list[bytes], list[int]]]:
    """Good images and seeds of every caption of one batched call (at most `images.batch_size` captions)."""
    padded, seeds = padded_call(captions, cap_ids, run_seed, cfg)
    firsts = render_group(pipe, padded, seeds, cfg)
    return [complete_row(pipe, c, i, run_seed, cfg, first, drops)
            for c, i, first in zip(captions, cap_ids, firsts)]


def group_json(captions: list[str], cap_ids: list[str], index: int, size: int) -> str:
    """The `render_group` of a row: the call it was rendered in (captions, ids, padded size) and its place."""
    return json.dumps({"caption_ids": list(cap_ids), "captions": list(captions), "index": index, "size": size},
                      sort_keys=True)


#: SD-1.5 in fp16 with guidance at 512 px and 20 DDIM steps: images one H100 renders per second, measured with this
#: project's diffusers stage (~2.5 at 50 steps)
REFERENCE_IMAGES_PER_S, REFERENCE_STEPS, REFERENCE_SIZE = 7.0, 20, 512


class DiffusionRenderer(Renderer):
    """A diffusers text-to-image pipeline (Stable Diffusion and kin); black and non-finite images are replaced."""

    name: ClassVar[str] = "diffusers"
    reads: ClassVar[tuple[str, ...]] = ("backend", "model", "per_caption", "guidance_scale", "steps", "scheduler",
                                        "resolution", "output_size", "image_format", "jpeg_quality", "dtype",
                                        "device", "negative_prompt", "batch_mode")
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
    def expected_rate(cls, cfg: ImagesConfig) -> Rate | None:
        """On a GPU: the reference H100 rate scaled to the settings (linear in steps and in pixels) and to the
        actor's GPU share, over the images of a caption. On the CPU: none (a run measures it)."""
        if cfg.device != "cuda" or not cfg.num_gpus:
            return None
        images_per_s = (REFERENCE_IMAGES_PER_S * REFERENCE_STEPS / cfg.steps * (REFERENCE_SIZE / cfg.resolution) ** 2
                        * min(1.0, cfg.num_gpus))
        return Rate(images_per_s / cfg.per_caption, f"reference: SD-1.5 fp16 on one H100, {REFERENCE_IMAGES_PER_S:g} "
                    f"images/s at {REFERENCE_SIZE} px and {REFERENCE_STEPS} steps (measured with synray), scaled to "
                    f"{cfg.resolution} px, {cfg.steps} steps, {cfg.per_caption} images a caption")

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
    def regenerate(cls, row: dict[str, Any], cfg: ImagesConfig, model_path: str | None) -> list[bytes]:
        """The row's images rendered again: in the same batched call (its `render_group`), or on their own."""
        pipe = load_pipeline(str(model_path), cfg)
        run_seed, cap_id, caption = int(row["run_seed"]), str(row["caption_id"]), str(row["caption"])
        group = json.loads(row["render_group"]) if row.get("render_group") else None
        if group is None:
            return render_row(pipe, caption, cap_id, run_seed, cfg)[0]
        call = cfg.model_copy(update={"batch_size": int(group["size"])})
        padded, seeds = padded_call(group["captions"], group["caption_ids"], run_seed, call)
        first = render_group(pipe, padded, seeds, call)[int(group["index"])]
        return complete_row(pipe, caption, cap_id, run_seed, cfg, first)[0]

    def render_caption(self, caption: str, cap_id: str, drops: Counter[str]) -> Rendered | None:
        images, seeds = render_row(self.pipe, caption, cap_id, self.run_seed, self.cfg, drops)
        return self._row(images, seeds, None, drops)

    def render_batch(self, captions: list[str], cap_ids: list[str], drops: Counter[str]) -> list[Rendered | None]:
        """`images.batch_mode=batched`: up to `images.batch_size` captions (n x m images) in one call."""
        if self.cfg.batch_mode == "per_caption":
            return super().render_batch(captions, cap_ids, drops)
        out: list[Rendered | None] = []
        size = self.cfg.batch_size
        for start in range(0, len(captions), size):
            caps, ids = captions[start:start + size], cap_ids[start:start + size]
            done = render_batch_group(self.pipe, caps, ids, self.run_seed, self.cfg, drops)
            out += [self._row(images, seeds, group_json(caps, ids, i, size), drops)
                    for i, (images, seeds) in enumerate(done)]
        return out

    def _row(self, images: list[bytes], seeds: list[int], group: str | None, drops: Counter[str]) -> Rendered | None:
        if len(images) < self.cfg.per_caption:
            drops[TOO_FEW_IMAGES] += 1
            return None
        return Rendered(images, seeds, render_group=group)
