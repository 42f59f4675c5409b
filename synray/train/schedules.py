"""SynCLR's schedules and mask counts as plain arithmetic (the teacher's momentum and temperature, how many tokens
iBOT masks): read by the plan's checks without torch, and by `synray.train.synclr` on the device."""

from __future__ import annotations

import math

__all__ = ["ema_momentum", "teacher_temperature", "mim_shape", "mim_count"]


def ema_momentum(step: int, total_steps: int, base: float = 0.994, final: float = 1.0) -> float:
    """The teacher's momentum at `step`: `base` at step 0, rising on a half cosine to `final` at `total_steps`."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """The teacher's prototype temperature: linear from `start` to `end` over `warmup_steps`, then `end`."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def mim_shape(batch: int, patches: int, image_share: float, patch_share: float) -> tuple[int, int]:
    """(images masked, tokens masked in each of them)."""
    return round(batch * image_share), round(patches * patch_share)


def mim_count(batch: int, patches: int, image_share: float = 0.5, patch_share: float = 0.5) -> int:
    """How many tokens `mim_masks` masks: round(batch x image_share) images x round(patches x patch_share) tokens."""
    n_images, n_tokens = mim_shape(batch, patches, image_share, patch_share)
    return n_images * n_tokens
