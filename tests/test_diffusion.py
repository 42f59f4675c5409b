"""The diffusers backend without Ray: batched calls padded to one shape, per-caption calls, post-processing on the
images' device (resize, quantisation, the safety check) against diffusers' and PIL's own, and regeneration of each
row from its provenance (the batched call it was rendered in, or its own call)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synray.config import ImagesConfig
from synray.data.codecs import encode_image
from synray.generation.regenerate import regenerate_images
from synray.images.diffusion import DiffusionRenderer, padded_call

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


def _bare_call(pipe, captions: list[str], seeds: list[list[int]], cfg: ImagesConfig) -> list[np.ndarray]:
    """One plain diffusers call (numpy output, a generator per image), caption-major."""
    import torch

    gens = [torch.Generator().manual_seed(int(s)) for row in seeds for s in row]
    return list(pipe(prompt=captions, num_images_per_prompt=len(seeds[0]), generator=gens,
                     guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.steps, height=cfg.resolution,
                     width=cfg.resolution, output_type="np").images)


def test_a_batched_row_is_the_padded_call_of_its_group(batched):
    """Each row's bytes are its images of one plain diffusers call of the padded group, encoded by PIL."""
    renderer, rows = batched
    cfg = renderer.cfg
    padded, seeds = padded_call(CAPTIONS, [r["caption_id"] for r in rows], RUN_SEED, cfg)
    assert len(padded) == 4 and padded[3] == CAPTIONS[-1]
    bare = _bare_call(renderer.pipe, padded, seeds, cfg)
    for i, r in enumerate(rows):
        assert list(r["images"]) == [encode_image(a, cfg.image_format, cfg.output_size) for a in bare[2 * i:2 * i + 2]]
        assert list(r["seeds"]) == seeds[i]


def test_images_are_resized_on_the_device_as_pil_resizes_them(tiny_models: dict[str, str]):
    """Rendered at 64 px and stored at 32: the stored images are the plain call's images resized (PIL's bicubic
    of the float render), to within a few levels of 255."""
    import io

    from PIL import Image

    cfg = _cfg("batched").model_copy(update={"resolution": 64, "output_size": 32})
    renderer = DiffusionRenderer(cfg, tiny_models["sd"], RUN_SEED)
    rows = _render(renderer)
    padded, seeds = padded_call(CAPTIONS, [r["caption_id"] for r in rows], RUN_SEED, cfg)
    bare = _bare_call(renderer.pipe, padded, seeds, cfg)
    for i, r in enumerate(rows):
        for data, full in zip(r["images"], bare[2 * i:2 * i + 2]):
            got = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)
            want = np.stack([np.asarray(Image.fromarray(full[..., c].astype(np.float32), mode="F").resize(
                (32, 32), Image.Resampling.BICUBIC, reducing_gap=None)) for c in range(3)], -1) * 255
            assert got.shape == (32, 32, 3) and np.abs(got - np.clip(want, 0, 255)).mean() < 2.0


def test_a_batched_row_regenerates_byte_identically(batched):
    for row in batched[1]:
        assert regenerate_images(row) == list(row["images"])


def test_per_caption_rows_regenerate_on_their_own(tiny_models: dict[str, str]):
    rows = _render(DiffusionRenderer(_cfg("per_caption"), tiny_models["sd"], RUN_SEED))
    assert [r["caption"] for r in rows] == CAPTIONS and all(r["render_group"] is None for r in rows)
    assert regenerate_images(rows[1]) == list(rows[1]["images"])


class _Recorder:
    """A pipeline that records the shape of each call (prompts, images per prompt) and passes it on."""

    def __init__(self, pipe, calls: list[tuple[int, int]]) -> None:
        self.pipe, self.calls = pipe, calls

    def __call__(self, **kwargs):
        self.calls.append((len(kwargs["prompt"]), kwargs["num_images_per_prompt"]))
        return self.pipe(**kwargs)

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)


def test_a_model_that_gives_nan_for_every_seed_stops_the_run(tiny_models: dict[str, str], tmp_path):
    """A real pipeline whose VAE decoder weights are NaN: every image of every seed is non-finite. The renderer
    drops and counts them, renders the replacements in one call of the same shape (a compiled UNet is not
    compiled again), and after FAIL_FAST_ROWS captions without one usable image it raises a clear error instead of
    writing an empty dataset."""
    import shutil

    from safetensors.torch import load_file, save_file

    from synray.images.base import FAIL_FAST_ROWS, RendererError

    broken = tmp_path / "sd-nan"
    shutil.copytree(tiny_models["sd"], broken)
    (weights,) = (broken / "vae").glob("*.safetensors")
    state = load_file(weights)
    save_file({k: v.fill_(float("nan")) if "decoder.conv_out" in k else v for k, v in state.items()}, weights)
    renderer = DiffusionRenderer(_cfg("batched"), str(broken), RUN_SEED)
    calls: list[tuple[int, int]] = []
    renderer.pipe = _Recorder(renderer.pipe, calls)
    assert _render(renderer) == []              # the first 3 captions: dropped, not failed yet
    assert renderer.rows_failed == 3 and renderer.early_drops["nonfinite"] == 3 * 2 * 2   # m first + m extra seeds
    assert calls == [(4, 2), (4, 2)]   # the replacements: one call of the first call's shape (4 captions x 2)
    with pytest.raises(RendererError, match=f"no usable image for any of the first {FAIL_FAST_ROWS + 1} captions"):
        for _ in range(3):
            _render(renderer)


# --------------------------------------------------------------------- an image the model withholds
def _with_safety_checker(sd_dir: str, out: Path, flagged_image: np.ndarray) -> Path:
    """The tiny SD pipeline plus diffusers' own StableDiffusionSafetyChecker (tiny CLIP vision tower, random
    weights) whose one concept embedding is the embedding of `flagged_image`, at threshold 0.999: the pipeline
    returns that image black, as SD's checker does for the images it flags, and every other image as it is (when
    diffusers runs it)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, use_safetensors=True)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8}, projection_dim=16)).eval()
    features = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip_input = features(pipe.image_processor.numpy_to_pil(flagged_image[None]), return_tensors="pt").pixel_values
    with torch.no_grad():
        embed = checker.visual_projection(checker.vision_model(clip_input)[1])[0]
        checker.concept_embeds.copy_(embed.expand_as(checker.concept_embeds))
        checker.concept_embeds_weights.fill_(0.999)
        checker.special_care_embeds_weights.fill_(2.0)   # cosines never exceed 1: no "special care" concept
    StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                            scheduler=pipe.scheduler, safety_checker=checker, feature_extractor=features,
                            requires_safety_checker=True).save_pretrained(out, safe_serialization=True)
    return out


def test_an_image_the_safety_checker_flags_is_replaced_by_the_next_seed(tiny_models: dict[str, str], tmp_path):
    """Image 0 of a caption is one the pipeline's safety checker flags (diffusers' own call blacks it out); the
    renderer runs the checker on the images' device: the row keeps images 1 and 2, whose seeds it records, the
    flagged one is counted, and the row regenerates from its provenance. With images.safety_checker off, image 0
    is kept."""
    import io

    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    from synray.data.schema import image_seed

    caption, cap_id = "a lighthouse at night", "00000000000000ab"
    cfg = _cfg("per_caption")
    seeds = [image_seed(RUN_SEED, cap_id, k) for k in range(3)]
    plain = DiffusionPipeline.from_pretrained(tiny_models["sd"], use_safetensors=True)

    def direct(pipe, seed: int) -> np.ndarray:   # one bare diffusers call per seed
        return pipe(caption, generator=[torch.Generator().manual_seed(seed)], num_inference_steps=cfg.steps,
                    guidance_scale=cfg.guidance_scale, height=32, width=32, output_type="np").images[0]

    checked_dir = _with_safety_checker(tiny_models["sd"], tmp_path / "checked", direct(plain, seeds[0]))
    checked = DiffusionPipeline.from_pretrained(checked_dir, use_safetensors=True)
    cfg = cfg.model_copy(update={"model": str(checked_dir)})
    assert direct(checked, seeds[0]).max() == 0 and all(direct(checked, s).max() > 0.1 for s in seeds[1:])

    renderer = DiffusionRenderer(cfg, str(checked_dir), RUN_SEED)
    out = renderer({"caption": np.asarray([caption], dtype=object), "caption_id": np.asarray([cap_id], dtype=object),
                    "run_seed": np.asarray([RUN_SEED])})
    row = {k: v[0] for k, v in out.items()}
    assert list(row["seeds"]) == seeds[1:]
    for img, seed in zip(row["images"], seeds[1:]):
        got = np.asarray(Image.open(io.BytesIO(img)), dtype=np.float64) / 255
        assert np.abs(got - direct(plain, seed)).max() <= 1 / 255 + 1e-6
    assert renderer.stats.local.rejected["images"] == {"nsfw": 1}
    assert regenerate_images(row) == list(row["images"])
    unchecked = DiffusionRenderer(cfg.model_copy(update={"safety_checker": False}), str(checked_dir), RUN_SEED)
    out = unchecked({"caption": np.asarray([caption], dtype=object), "caption_id": np.asarray([cap_id], dtype=object),
                     "run_seed": np.asarray([RUN_SEED])})
    assert list(out["seeds"][0]) == seeds[:2] and not unchecked.stats.local.rejected.get("images")
