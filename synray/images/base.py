"""The renderer interface of the image stage: one Ray Data UDF base that every `images.backend` extends.

A backend renders m images for one caption; the base turns a batch of caption rows into rows with
`images`, `seeds` (and `masks` where the backend draws them) plus the provenance columns
(`image_format`, `t2i_model`, `t2i_params`), drops the rows it could not render, and counts both.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from synray.config import ImagesConfig
from synray.data.codecs import object_array
from synray.data.stats import StatsClient
from synray.stages import Rate

__all__ = ["Rendered", "Renderer", "RendererError"]

#: ImagesConfig fields a row records in its own columns (`t2i_model`, the number of `seeds`), not in `t2i_params`
ROW_IDENTITY = ("backend", "model", "per_caption")


#: a renderer that drops this many captions before rendering any stops the run (a broken model)
FAIL_FAST_ROWS = 8


class RendererError(ValueError):
    """Image settings or a model that a backend cannot render with."""


@dataclass
class Rendered:
    """What a backend made of one caption: m encoded images, their seeds, and class masks if it draws them."""

    images: list[bytes]
    seeds: list[int]
    masks: list[bytes] | None = None
    render_group: str | None = None   # JSON: the batched call the images came from (see the diffusers backend)


class Renderer:
    """Base of the image backends (a Ray Data callable class, one instance per actor).

    Subclasses set the class attributes and implement :meth:`render_caption`, :meth:`params`,
    :meth:`claims` and :meth:`regenerate`; they may override :meth:`check` (settings and model
    checks before any resource is requested) and :meth:`render_batch`.
    """

    #: the `images.backend` value that selects this renderer
    name: ClassVar[str]
    #: the ImagesConfig fields that change what this backend renders: they make its store fingerprint
    reads: ClassVar[tuple[str, ...]]
    #: whether `images.model` names weights to load (resolved by the run's plan)
    needs_model: ClassVar[bool] = False
    #: whether rows get a `masks` column (per-pixel class masks, for the segmentation probe)
    writes_masks: ClassVar[bool] = False
    #: the version of what turns a render into stored bytes (part of a store's fingerprint): bump it when they change
    output_version: ClassVar[int] = 1

    def __init__(self, cfg: ImagesConfig, model_path: str | None, run_seed: int,
                 stats_actor: Any | None = None) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.run_seed = run_seed
        self.stats = StatsClient(stats_actor)
        self.params_json = json.dumps(self.params(cfg), sort_keys=True)
        self.rows_done = 0      # rows this actor rendered
        self.rows_failed = 0    # rows it dropped (no m good images) before rendering any
        self.early_drops: Counter[str] = Counter()   # images dropped by reason meanwhile

    # ------------------------------------------------------------------ what a backend declares
    @classmethod
    def expected_rate(cls, cfg: ImagesConfig) -> Rate | None:
        """Captions one actor renders per second (all their images) when it never waits; None: no reference."""
        return None

    @classmethod
    def check(cls, cfg: ImagesConfig) -> None:
        """RendererError for settings this backend cannot use (no Ray, no model loading)."""

    @classmethod
    def model_name(cls, cfg: ImagesConfig) -> str:
        """The `t2i_model` provenance value of the rows it writes."""
        return cfg.model

    @classmethod
    def params(cls, cfg: ImagesConfig) -> dict[str, Any]:
        """The `t2i_params` recorded with every row: with the caption and seeds they regenerate its images."""
        raise NotImplementedError

    @classmethod
    def row_settings(cls, row: dict[str, Any]) -> dict[str, Any]:
        """The ImagesConfig fields (besides backend, model, per_caption) a row was rendered with: those of
        its recorded `t2i_params`."""
        params = json.loads(row["t2i_params"])
        return {k: v for k, v in params.items() if k in ImagesConfig.model_fields and k not in ROW_IDENTITY}

    @classmethod
    def claims(cls, row: dict[str, Any]) -> bool:
        """Whether a stored row was rendered by this backend (from its provenance)."""
        raise NotImplementedError

    @classmethod
    def regenerate(cls, row: dict[str, Any], cfg: ImagesConfig, model_path: str | None) -> list[bytes]:
        """The encoded images of a stored row rendered again from its provenance."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ rendering
    def render_caption(self, caption: str, cap_id: str, drops: Counter[str]) -> Rendered | None:
        """m images of one caption, or None (counting the reason in `drops`) when it cannot be rendered."""
        raise NotImplementedError

    def render_batch(self, captions: list[str], cap_ids: list[str], drops: Counter[str]) -> list[Rendered | None]:
        """Every caption of a batch; one call per caption unless a backend batches them."""
        return [self.render_caption(c, i, drops) for c, i in zip(captions, cap_ids)]

    def check_not_broken(self, failed: int, done: int, drops: Counter[str]) -> None:
        """RendererError when the first FAIL_FAST_ROWS captions this actor rendered all failed: a model that
        returns only black or non-finite images stops the run instead of writing an empty dataset."""
        self.rows_done += done
        if self.rows_done == 0:
            self.rows_failed += failed
            self.early_drops.update(drops)
        if self.rows_done == 0 and self.rows_failed >= FAIL_FAST_ROWS:
            raise RendererError(
                f"images.model={self.cfg.model!r} gave no usable image for any of the first {self.rows_failed} "
                f"captions (dropped images by reason: {dict(self.early_drops)}, every seed of each); check the model "
                f"and images.dtype={self.cfg.dtype!r} (float16 on a model that needs float32 gives NaN)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        start = time.time()
        drops: Counter[str] = Counter()
        results = self.render_batch([str(c) for c in batch["caption"]], [str(i) for i in batch["caption_id"]], drops)
        keep = [i for i, r in enumerate(results) if r is not None]
        done = [r for r in results if r is not None]
        self.check_not_broken(len(results) - len(keep), len(keep), drops)
        out = {k: np.asarray(v)[keep] for k, v in batch.items()}
        n = len(keep)
        out["images"] = object_array([r.images for r in done])
        if self.writes_masks:
            out["masks"] = object_array([r.masks for r in done])
        out["seeds"] = object_array([np.asarray(r.seeds, dtype=np.int64) for r in done])
        out["render_group"] = np.asarray([r.render_group for r in done], dtype=object)
        out["image_format"] = np.asarray([self.cfg.image_format] * n, dtype=object)
        out["t2i_model"] = np.asarray([self.model_name(self.cfg)] * n, dtype=object)
        out["t2i_params"] = np.asarray([self.params_json] * n, dtype=object)
        self.stats.reject("images", dict(drops))
        self.stats.record("images", n, start)
        return out
