"""The diffusers backend without Ray: batched calls padded to one shape, per-caption calls, and regeneration of
each row from its provenance (the batched call it was rendered in, or its own call)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synray.config import ImagesConfig
from synray.data.codecs import encode_image
from synray.generation.regenerate import regenerate_images
from synray.images.diffusion import DiffusionRenderer, padded_call, render_group

CAPTIONS = ["a red kayak on a lake", "a cat on a sofa", "a lighthouse at night"]
RUN_SEED = 3


def _cfg(mode: str) -> ImagesConfig:
    return ImagesConfig(model="tiny:sd", per_caption=2, steps=2, resolution=32, output_size=32, batch_size=4,
                        batch_mode=mode)


def _render(renderer: DiffusionRenderer) -> list[dict]:
    n = len(CAPTIONS)
    batch = {"caption": np.asarray(CAPTIONS, dtype=object),
             "caption_id": np.asarray([f"{i:016x}" for i in range(n)], dtype=object),
             "run_seed": np.full(n, RUN_SEED, dtype=np.int64)}
    out = renderer(batch)
    return [{k: v[i] for k, v in out.items()} for i in range(len(out["caption_id"]))]


@pytest.fixture(scope="module")
def batched(tiny_models: dict[str, str]) -> tuple[DiffusionRenderer, list[dict]]:
    renderer = DiffusionRenderer(_cfg("batched"), tiny_models["sd"], RUN_SEED)
    return renderer, _render(renderer)


def test_padded_last_batch_yields_exactly_the_rows_asked_for(batched):
    renderer, rows = batched
    assert [r["caption"] for r in rows] == CAPTIONS and all(len(r["images"]) == 2 for r in rows)
    for i, r in enumerate(rows):
        group = json.loads(r["render_group"])
        assert group["size"] == 4 and group["index"] == i and group["captions"] == CAPTIONS
    assert renderer.stats.local.rows["images"] == 3


def test_a_batched_row_is_the_padded_call_of_its_group(batched):
    renderer, rows = batched
    cfg = renderer.cfg
    padded, seeds = padded_call(CAPTIONS, [r["caption_id"] for r in rows], RUN_SEED, cfg)
    assert len(padded) == 4 and padded[3] == CAPTIONS[-1]
    bare = render_group(renderer.pipe, padded, seeds, cfg)  # one plain diffusers call
    for r, images in zip(rows, bare):
        assert list(r["images"]) == [encode_image(a, cfg.image_format, cfg.output_size) for a in images]
        assert list(r["seeds"]) == seeds[rows.index(r)]


def test_a_batched_row_regenerates_byte_identically(batched):
    for row in batched[1]:
        assert regenerate_images(row) == list(row["images"])


def test_per_caption_rows_regenerate_on_their_own(tiny_models: dict[str, str]):
    rows = _render(DiffusionRenderer(_cfg("per_caption"), tiny_models["sd"], RUN_SEED))
    assert [r["caption"] for r in rows] == CAPTIONS and all(r["render_group"] is None for r in rows)
    assert regenerate_images(rows[1]) == list(rows[1]["images"])


def test_a_model_that_gives_nan_for_every_seed_stops_the_run(tiny_models: dict[str, str], tmp_path):
    """A real pipeline whose VAE decoder weights are NaN: every image of every seed is non-finite. The renderer
    drops and counts them, and after FAIL_FAST_ROWS captions without one usable image it raises a clear error
    instead of writing an empty dataset."""
    import shutil

    from safetensors.torch import load_file, save_file

    from synray.images.base import FAIL_FAST_ROWS, RendererError

    broken = tmp_path / "sd-nan"
    shutil.copytree(tiny_models["sd"], broken)
    (weights,) = (broken / "vae").glob("*.safetensors")
    state = load_file(weights)
    save_file({k: v.fill_(float("nan")) if "decoder.conv_out" in k else v for k, v in state.items()}, weights)
    renderer = DiffusionRenderer(_cfg("batched"), str(broken), RUN_SEED)
    assert _render(renderer) == []              # the first 3 captions: dropped, not failed yet
    assert renderer.rows_failed == 3 and renderer.early_drops["nonfinite"] == 3 * 2 * 2   # m first + m extra seeds
    with pytest.raises(RendererError, match=f"no usable image for any of the first {FAIL_FAST_ROWS + 1} captions"):
        for _ in range(3):
            _render(renderer)
