"""The diffusers backend: loads a text-to-image pipeline and renders m seeded images per caption."""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from synray.config import ImagesConfig
from synray.data.codecs import encode_uint8
from synray.data.schema import image_seed
from synray.images.base import Rendered, Renderer, RendererError
from synray.stages import Rate

if TYPE_CHECKING:
    import torch

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


#: what the stored bytes of a render depend on besides the settings: bumped when post-processing changes (2: resize
#: and quantisation on the device, replacements in one padded call, the safety check batched on the device)
OUTPUT_VERSION = 2


def t2i_params(cfg: ImagesConfig) -> dict[str, Any]:
    """The generation parameters recorded with every row (with its seeds they regenerate the images)."""
    return {"guidance_scale": cfg.guidance_scale, "steps": cfg.steps, "scheduler": cfg.scheduler,
            "resolution": cfg.resolution, "output_size": cfg.output_size, "dtype": cfg.dtype,
            "negative_prompt": cfg.negative_prompt, "image_format": cfg.image_format,
            "safety_checker": cfg.safety_checker, "output_version": OUTPUT_VERSION}


def load_pipeline(model_path: str, cfg: ImagesConfig):
    """A diffusers pipeline on the configured device and dtype (safetensors only). Its safety checker, if any, is
    taken out of the pipeline (which would run it on the CPU through PIL) and kept as `pipe.synray_checker`, a
    `SafetyCheck` run on the images' device, or None (none, or `images.safety_checker` off)."""
    import diffusers
    import torch

    check_t2i_model(model_path)
    dtype = getattr(torch, cfg.dtype)
    pipe = diffusers.DiffusionPipeline.from_pretrained(model_path, dtype=dtype, use_safetensors=True)
    if cfg.scheduler != "default":
        sched_cls = getattr(diffusers, SCHEDULERS[cfg.scheduler])
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
    checker = getattr(pipe, "safety_checker", None)
    extractor = getattr(pipe, "feature_extractor", None)
    if checker is not None:
        pipe.safety_checker = None
    pipe = pipe.to(cfg.device)
    pipe.synray_checker = (SafetyCheck(checker.to(cfg.device), extractor)
                           if checker is not None and cfg.safety_checker else None)
    pipe.set_progress_bar_config(disable=True)
    if cfg.device == "cuda":
        if cfg.compile and hasattr(pipe, "unet"):
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    return pipe


class SafetyCheck:
    """SD's safety checker on a batch of images on their device: the CLIP preprocessing of its feature extractor
    (bicubic resize to its crop size, its mean and std) as tensor ops, then the checker's vectorised forward
    (`forward_onnx`): no PIL, no host round trip."""

    def __init__(self, checker: Any, extractor: Any) -> None:
        import torch

        self.checker = checker
        crop = getattr(extractor, "crop_size", None) or {"height": 224, "width": 224}
        self.size = (int(crop["height"]), int(crop["width"]))
        mean = getattr(extractor, "image_mean", None) or [0.48145466, 0.4578275, 0.40821073]
        std = getattr(extractor, "image_std", None) or [0.26862954, 0.26130258, 0.27577711]
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def clip_input(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> the checker's normalised input."""
        import torch

        x = images.float()
        if tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((x.clamp(0, 1) - mean) / std).to(next(self.checker.parameters()).dtype)

    def flags(self, images: torch.Tensor) -> torch.Tensor:
        """bool [N]: the images the checker flags (a device tensor)."""
        import torch

        with torch.no_grad():
            _, flagged = self.checker.forward_onnx(self.clip_input(images), images.clone())
        return flagged


def finish_images(images: torch.Tensor, cfg: ImagesConfig, checker: SafetyCheck | None) -> tuple[np.ndarray, list]:
    """A call's images [N, 3, H, W] in [0, 1], on their device: each image's reason to drop it ('nonfinite',
    'nsfw', 'black', or None), then resized to `output_size` (bicubic, antialiased) and quantised there; one copy of
    uint8 [N, S, S, 3] to the host."""
    import torch

    x = images.float()
    nonfinite = ~torch.isfinite(x).flatten(1).all(dim=1)
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    nsfw = checker.flags(x) if checker is not None else torch.zeros_like(nonfinite)
    black = x.flatten(1).amax(dim=1) * 255 < BLACK_MAX_LEVEL
    if tuple(x.shape[-2:]) != (cfg.output_size, cfg.output_size):
        x = torch.nn.functional.interpolate(x, size=(cfg.output_size, cfg.output_size), mode="bicubic",
                                            antialias=True, align_corners=False).clamp(0, 1)
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    flags = torch.stack([nonfinite, nsfw.to(nonfinite.device), black], dim=1)
    host, flags = pixels.cpu().numpy(), flags.cpu().numpy()     # the call's one device-to-host copy
    reasons = [next((name for name, bad in zip(("nonfinite", "nsfw", "black"), row) if bad), None) for row in flags]
    return host, reasons


def render_group(pipe, captions: list[str], seeds: list[list[int]], cfg: ImagesConfig) -> list[list[tuple]]:
    """One pipeline call for several captions: image k of caption i starts from its own generator seeds[i][k].

    All captions must ask for the same number of images. Returns, per caption in order, its images as (uint8
    [S, S, 3] at `output_size`, the reason to drop it or None).
    """
    import torch

    m = len(seeds[0])
    if any(len(row) != m for row in seeds) or len(seeds) != len(captions):
        raise ValueError("render_group needs one seed list of the same length per caption")
    gens = [torch.Generator(device=cfg.device).manual_seed(int(s)) for row in seeds for s in row]
    with torch.inference_mode():
        out = pipe(prompt=list(captions), num_images_per_prompt=m, generator=gens,
                   guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.steps,
                   height=cfg.resolution, width=cfg.resolution, output_type="pt",
                   negative_prompt=cfg.negative_prompt)
        pixels, reasons = finish_images(out.images, cfg, getattr(pipe, "synray_checker", None))
    images = list(zip(pixels, reasons))  # caption-major: the m images of caption 0, then caption 1, ...
    return [images[i * m:(i + 1) * m] for i in range(len(captions))]


def first_seeds(run_seed: int, cap_id: str, m: int) -> list[int]:
    return [image_seed(run_seed, cap_id, k) for k in range(m)]


def replacement_seeds(run_seed: int, cap_id: str, m: int) -> list[int]:
    """The seeds a caption's replacements start from: the m after its first m (at most m extra images a caption)."""
    return [image_seed(run_seed, cap_id, m + k) for k in range(m * MAX_EXTRA_RENDERS_FACTOR)]


def _padded(captions: list[str], seeds: list[list[int]], size: int) -> tuple[list[str], list[list[int]]]:
    """A call's captions and seeds padded to `size` with copies of the last caption (its images are dropped), so
    every call has one shape and torch.compile compiles once."""
    pad = size - len(captions)
    return list(captions) + [captions[-1]] * pad, list(seeds) + [seeds[-1]] * pad


def padded_call(captions: list[str], cap_ids: list[str], run_seed: int, cfg: ImagesConfig,
                size: int | None = None) -> tuple[list[str], list[list[int]]]:
    """A call's captions and first seeds, padded to `size` captions (default: `images.batch_size`)."""
    return _padded(captions, [first_seeds(run_seed, cid, cfg.per_caption) for cid in cap_ids],
                   cfg.batch_size if size is None else size)


def complete_group(pipe, captions: list[str], cap_ids: list[str], run_seed: int, cfg: ImagesConfig,
                   firsts: list[list[tuple]], call_size: int,
                   drops: Counter[str] | None = None) -> list[tuple[list[np.ndarray], list[int]]]:
    """m good images and their seeds per caption of one call, from its first renders: the captions that lost images
    get their replacement seeds in one more call of the same shape (`call_size` captions x m images)."""
    m = cfg.per_caption
    kept: list[list[tuple[np.ndarray, int]]] = []
    for cid, first in zip(cap_ids, firsts):
        kept.append(_good(first, first_seeds(run_seed, cid, m), drops))
    short = [i for i, k in enumerate(kept) if len(k) < m]
    if short and MAX_EXTRA_RENDERS_FACTOR:
        extra = [replacement_seeds(run_seed, cap_ids[i], m) for i in short]
        caps, seeds = _padded([captions[i] for i in short], extra, call_size)
        again = render_group(pipe, caps, seeds, cfg)
        for i, renders, s in zip(short, again, extra):
            kept[i] += _good(renders, s, drops)[:m - len(kept[i])]
    return [([a for a, _ in k[:m]], [s for _, s in k[:m]]) for k in kept]


def _good(renders: list[tuple], seeds: list[int], drops: Counter[str] | None) -> list[tuple[np.ndarray, int]]:
    out = []
    for (pixels, reason), seed in zip(renders, seeds):
        if reason is None:
            out.append((pixels, seed))
        elif drops is not None:
            drops[reason] += 1
    return out


def render_captions(pipe, captions: list[str], cap_ids: list[str], run_seed: int, cfg: ImagesConfig,
                    call_size: int, drops: Counter[str] | None = None) -> list[tuple[list[np.ndarray], list[int]]]:
    """Good images and seeds of every caption of one call (at most `call_size` captions, padded to it)."""
    caps, seeds = padded_call(captions, cap_ids, run_seed, cfg, call_size)
    firsts = render_group(pipe, caps, seeds, cfg)[:len(captions)]
    return complete_group(pipe, captions, cap_ids, run_seed, cfg, firsts, call_size, drops)


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
                                        "device", "negative_prompt", "batch_mode", "safety_checker")
    needs_model: ClassVar[bool] = True
    output_version: ClassVar[int] = OUTPUT_VERSION

    def __init__(self, cfg: ImagesConfig, model_path: str | None, run_seed: int,
                 stats_actor: Any | None = None) -> None:
        import torch

        super().__init__(cfg, model_path, run_seed, stats_actor)
        if cfg.device == "cpu":
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        if model_path is None:
            raise RendererError("the diffusers backend needs a model path (images.model)")
        self.pipe = load_pipeline(model_path, cfg)
        # PIL's encoders release the GIL: the images of a call are encoded on the actor's CPUs at once
        self.encoder = ThreadPoolExecutor(max_workers=max(1, int(cfg.num_cpus)), thread_name_prefix="encode")

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
        """The row's images rendered again: its batched call (its `render_group`) with that call's replacements,
        or its own call."""
        pipe = load_pipeline(str(model_path), cfg)
        run_seed, cap_id, caption = int(row["run_seed"]), str(row["caption_id"]), str(row["caption"])
        group = json.loads(row["render_group"]) if row.get("render_group") else None
        if group is None:
            images, _ = render_captions(pipe, [caption], [cap_id], run_seed, cfg, 1)[0]
        else:
            done = render_captions(pipe, group["captions"], group["caption_ids"], run_seed, cfg, int(group["size"]))
            images, _ = done[int(group["index"])]
        return [encode_uint8(a, cfg.image_format, cfg.jpeg_quality) for a in images]

    def render_caption(self, caption: str, cap_id: str, drops: Counter[str]) -> Rendered | None:
        return self.render_batch([caption], [cap_id], drops)[0]

    def render_batch(self, captions: list[str], cap_ids: list[str], drops: Counter[str]) -> list[Rendered | None]:
        """`images.batch_mode=batched`: up to `images.batch_size` captions (n x m images) in one call, padded to it;
        `per_caption`: one call per caption. The images are encoded on the actor's thread pool."""
        size = self.cfg.batch_size if self.cfg.batch_mode == "batched" else 1
        out: list[tuple[list[np.ndarray], list[int], str | None]] = []
        for start in range(0, len(captions), size):
            caps, ids = captions[start:start + size], cap_ids[start:start + size]
            done = render_captions(self.pipe, caps, ids, self.run_seed, self.cfg, size, drops)
            out += [(images, seeds, group_json(caps, ids, i, size) if size > 1 or self.cfg.batch_mode == "batched"
                     else None) for i, (images, seeds) in enumerate(done)]
        encoded = iter(self.encoder.map(self._encode, [a for images, _, _ in out for a in images]))
        return [self._row([next(encoded) for _ in images], seeds, group, drops) for images, seeds, group in out]

    def _encode(self, pixels: np.ndarray) -> bytes:
        return encode_uint8(pixels, self.cfg.image_format, self.cfg.jpeg_quality)

    def _row(self, images: list[bytes], seeds: list[int], group: str | None, drops: Counter[str]) -> Rendered | None:
        if len(images) < self.cfg.per_caption:
            drops[TOO_FEW_IMAGES] += 1
            return None
        return Rendered(images, seeds, render_group=group)
