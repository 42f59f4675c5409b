"""Batched on-device training augmentation: SimCLR/StableRep (strong), LaCLIP crop, and resize-only.

Every random choice is drawn per image on the images' device and every op runs on the whole batch (a `torch.where`
keeps the images an op does not apply to), so a step never waits for the device: kornia's augmentation modules
branch on device values in Python (`.tolist()`, `bool()`) and crop image by image, which is why the presets are
composed here from torch and kornia's batched functions (colour adjustments, separable blur, grayscale).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synray.config import AugmentConfig
from synray.models.preprocess import imagenet_normalize, to_float_images

__all__ = ["DEFAULT_CROP_SCALE_MIN", "PRESETS", "Augment", "build_augment", "blur_kernel_size", "crop_boxes",
           "resized_crops", "colour_jitter", "jitter_steps", "gaussian_blur",
           "grayscale"]

# Lower bound of the random-resized-crop area when AugmentConfig.crop_scale_min is unset:
# SimCLR/StableRep use 0.08, LaCLIP (CLIP training) 0.5.
DEFAULT_CROP_SCALE_MIN = {"strong": 0.08, "crop": 0.5}
PRESETS = ("strong", "crop", "none")


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's blur kernel: about 10% of the image side, odd, at least 3."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


#: SimCLR's colour jitter (brightness, contrast, saturation, hue) and the probabilities of the strong preset
JITTER = (0.4, 0.4, 0.4, 0.1)
P_JITTER, P_GRAY, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
#: torchvision's RandomResizedCrop: aspect ratios and draws per image before the centre-crop fallback
CROP_RATIO, CROP_ATTEMPTS = (3 / 4, 4 / 3), 10


def _uniform(n: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], device: torch.device,
               ratio: tuple[float, float] = CROP_RATIO, attempts: int = CROP_ATTEMPTS) -> Tensor:
    """torchvision's RandomResizedCrop boxes for n images, drawn on the device without a host sync: `attempts`
    draws of area and log-uniform aspect ratio per image, the first that fits, else the centre crop at the
    nearest allowed ratio. Returns float [n, 4] (top, left, h, w) in pixels."""
    area = height * width * _uniform(n * attempts, *scale, device).view(n, attempts)
    log_ratio = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), device).view(n, attempts)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)          # the first draw that fits (0 when none does)
    any_fit = fits.any(dim=1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    top = torch.floor(torch.rand(n, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(n, device=device) * (width - w + 1))
    # torchvision's fallback: the whole image cut to the nearest allowed aspect ratio, centred
    ch, cw = _centre_crop(height, width, ratio)
    box = torch.stack([top, left, h, w], dim=1)
    centre = torch.tensor([(height - ch) // 2, (width - cw) // 2, ch, cw], dtype=box.dtype)
    centre = centre.to(device, non_blocking=True)
    return torch.where(any_fit[:, None], box, centre[None])


def _centre_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def resized_crops(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Each image's box resampled (bilinear) to size x size in one batched warp, mirrored where `flip`."""
    n, _, height, width = x.shape
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w / width
    theta[:, 1, 1] = h / height
    theta[:, 0, 2] = (2 * left + w) / width - 1       # the box centre in [-1, 1] (align_corners=False)
    theta[:, 1, 2] = (2 * top + h) / height - 1
    if flip is not None:
        theta[:, 0, 0] = torch.where(flip, -theta[:, 0, 0], theta[:, 0, 0])
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter_steps() -> tuple[Callable[[Tensor, Tensor], Tensor], ...]:
    """torchvision's colour adjustments with one factor per image: brightness (x f), contrast (blend with the mean
    grey), saturation (blend with the grey image), hue (a rotation by f turns, in HSV)."""
    from kornia import enhance

    return (lambda y, f: y * f.view(-1, 1, 1, 1),
            enhance.adjust_contrast_with_mean_subtraction,
            enhance.adjust_saturation_with_gray_subtraction,
            lambda y, f: enhance.adjust_hue(y, f * 2 * math.pi))


def colour_jitter(x: Tensor, apply: Tensor, strength: tuple[float, float, float, float] = JITTER) -> Tensor:
    """SimCLR's colour jitter where `apply`: brightness, contrast, saturation and hue factors drawn per image (the
    neutral factor elsewhere), applied in one random order per batch (drawn on the host, as kornia's ColorJitter)."""
    n, device = x.shape[0], x.device
    b, c, s, hue = strength
    factors = [_uniform(n, 1 - b, 1 + b, device), _uniform(n, 1 - c, 1 + c, device),
               _uniform(n, 1 - s, 1 + s, device), _uniform(n, -hue, hue, device)]
    neutral = (1.0, 1.0, 1.0, 0.0)
    factors = [torch.where(apply, f, torch.full_like(f, v)) for f, v in zip(factors, neutral)]
    steps = jitter_steps()
    for i in torch.randperm(4).tolist():                # a host tensor: no sync
        x = steps[i](x, factors[i]).clamp(0, 1)
    return x


def gaussian_blur(x: Tensor, apply: Tensor, kernel_size: int, sigma: tuple[float, float] = BLUR_SIGMA) -> Tensor:
    """SimCLR's Gaussian blur where `apply`, with sigma drawn per image; one separable convolution for the batch."""
    from kornia.filters import filter2d_separable, get_gaussian_kernel1d

    sig = _uniform(x.shape[0], *sigma, x.device)[:, None]
    kernel = get_gaussian_kernel1d(kernel_size, sig)
    blurred = filter2d_separable(x, kernel, kernel, border_type="reflect")
    return torch.where(apply.view(-1, 1, 1, 1), blurred, x)


def grayscale(x: Tensor, apply: Tensor) -> Tensor:
    from kornia.color import rgb_to_grayscale

    return torch.where(apply.view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)


class Augment(nn.Module):
    """Random (or, for ``none``, fixed) view of a batch, normalised with ImageNet statistics.

    ``strong`` (SimCLR, StableRep): random resized crop and horizontal flip, colour jitter (p 0.8), grayscale
    (p 0.2), Gaussian blur (p 0.5); ``crop`` (LaCLIP): the random resized crop only; ``none``: an antialiased resize.

    Input: [B, 3, H, W] uint8 or float in [0, 1], on any device; output float32
    [B, 3, image_size, image_size]. Randomness comes from torch's global generator
    (``torch.manual_seed``); ``forward(images, seed=s)`` draws from a private generator seeded
    with ``s`` instead, leaving the global one untouched.
    """

    def __init__(self, preset: str, image_size: int, crop_scale_min: float | None = None,
                 crop_scale_max: float = 1.0) -> None:
        super().__init__()
        if crop_scale_min is None:
            crop_scale_min = DEFAULT_CROP_SCALE_MIN.get(preset, 1.0)
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r} ({', '.join(PRESETS)})")
        self.preset, self.image_size = preset, image_size
        self.crop_scale_min, self.crop_scale_max = crop_scale_min, crop_scale_max
        self.blur_kernel = blur_kernel_size(image_size)
        if preset == "none":
            from kornia import augmentation as K   # here: importing kornia costs seconds

            self.resize = K.Resize((image_size, image_size), antialias=True)
        self.normalize = imagenet_normalize()

    def forward(self, images: Tensor, seed: int | None = None) -> Tensor:
        x = to_float_images(images)
        if seed is None:
            return self._run(x)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self._run(x)

    def _run(self, x: Tensor) -> Tensor:
        if self.preset == "none":
            return self.normalize(self.resize(x).clamp(0.0, 1.0))
        n, _, height, width = x.shape
        boxes = crop_boxes(n, height, width, (self.crop_scale_min, self.crop_scale_max), x.device)
        if self.preset == "crop":
            return self.normalize(resized_crops(x, boxes, self.image_size).clamp(0.0, 1.0))
        x = resized_crops(x, boxes, self.image_size, flip=torch.rand(n, device=x.device) < P_FLIP).clamp(0.0, 1.0)
        x = colour_jitter(x, torch.rand(n, device=x.device) < P_JITTER)
        x = grayscale(x, torch.rand(n, device=x.device) < P_GRAY)
        x = gaussian_blur(x, torch.rand(n, device=x.device) < P_BLUR, self.blur_kernel)
        return self.normalize(x.clamp(0.0, 1.0))


def build_augment(cfg: AugmentConfig, image_size: int, default_preset: str = "strong") -> Augment:
    """The training augmentation of ``cfg.preset`` (unset: ``default_preset``, the objective's own)."""
    return Augment(cfg.preset or default_preset, image_size, cfg.crop_scale_min)
