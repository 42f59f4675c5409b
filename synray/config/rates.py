"""The `rates` section: expected stage rates that override the reference figures `synray plan` balances with."""

from __future__ import annotations

from pydantic import Field

from synray.config.base import Section

__all__ = ["RatesConfig"]


class RatesConfig(Section):
    """Expected rows/s of one actor of a stream stage while it never waits, where you know better than the reference
    figures (a run's measured figures: `synray plan --rates RUN_DIR`). `synray plan` prints each stage's rate, the
    bottleneck, the other stages' idle share and a balanced GPU split from them."""

    captions: float | None = Field(None, gt=0, description="captions one engine writes per second")
    images: float | None = Field(None, gt=0, description="captions one renderer renders per second (all their images)")
    preprocess: float | None = Field(None, gt=0, description="rows one preprocessing actor decodes per second")
    train: float | None = Field(None, gt=0, description="rows one training worker trains on per second")
