"""Image-text (CLIP / LaCLIP) training parts: pair building, the model, its export, and set-up checks."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import small_config


def _png(value: int, size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _obj(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


@pytest.fixture(scope="module")
def text_tower(tiny_models: dict[str, str]):
    from synray.models.image_text import load_text_tower

    return load_text_tower(tiny_models["text"])


def _pairs(batch: dict, tok, image_size: int, max_length: int, rng: np.random.Generator):
    """Rows through the preprocessing half (CPU) and the per-step draw (worker), as training runs them."""
    from synray.train.batches import image_text_rows, pick_pairs

    ready = image_text_rows(batch, image_size, tok, max_length)
    return pick_pairs({k: torch.from_numpy(v) for k, v in ready.items()}, rng)


def test_pairs_draw_among_caption_and_rewrites(text_tower):
    _, tok = text_tower
    options = [["a red cube", "one red cube on grass", "a crimson block"], ["a dog", "x", "a small puppy"]]
    batch = {"image": _obj([_png(10), _png(200, size=24)]), "caption": _obj([o[0] for o in options]),
             "rewrites": _obj([o[1:] for o in options])}
    rng = np.random.default_rng(0)
    seen: list[set[str]] = [set(), set()]
    for _ in range(60):
        pairs = _pairs(batch, tok, 16, 16, rng)
        for i, c in enumerate(pairs.caption_index.tolist()):
            seen[i].add(options[i][c])
    assert seen[0] == {"a red cube", "one red cube on grass", "a crimson block"}
    assert seen[1] == {"a dog", "a small puppy"}  # the one-word rewrite falls back to the original
    assert pairs.images.shape == (2, 3, 16, 16) and pairs.images.dtype == torch.uint8  # 24px resized
    assert pairs.input_ids.shape == (2, 16)
    want = tok(options[1][int(pairs.caption_index[1])], padding="max_length", max_length=16)["input_ids"]
    assert pairs.input_ids[1].tolist() == want  # the drawn caption's own tokens


def test_pairs_from_generated_rows_pick_one_image_each(text_tower):
    _, tok = text_tower
    batch = {"images": _obj([[_png(0), _png(100)], [_png(50), _png(250)]]), "caption": _obj(["a b", "c d"])}
    rng = np.random.default_rng(1)
    firsts = {int(_pairs(batch, tok, 16, 8, rng).images[0, 0, 0, 0]) for _ in range(30)}
    assert firsts == {0, 100}


def _tiny_image_text(text_tower):
    from synray.config import BackboneConfig
    from synray.models.backbone import build_backbone
    from synray.models.image_text import ImageTextModel

    torch.manual_seed(0)
    return ImageTextModel(build_backbone(BackboneConfig(size="tiny", image_size=16, patch_size=8)),
                          text_tower[0], init_temperature=0.07)


def test_clip_training_matches_images_to_their_captions(text_tower):
    """A few steps of the CLIP loss on 8 fixed pairs make each image pick its own caption."""
    import copy

    from synray.models.image_text import tokenize
    from synray.train.losses import clip_loss

    model = _tiny_image_text((copy.deepcopy(text_tower[0]), text_tower[1]))
    g = torch.Generator().manual_seed(0)
    colors = torch.rand(8, 3, 1, 1, generator=g)  # two-colour ramps: distinct images
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16)
    images = ((colors * ramp + (1 - colors) * (1 - ramp)).expand(8, 3, 16, 16) - 0.5) / 0.25
    captions = ["a red cube", "a blue ball", "a green cone", "two cats", "a lighthouse at dusk",
                "a bowl of soup", "a kite over sand", "a yellow star"]
    tokens = tokenize(text_tower[1], captions, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(40):
        img, txt, scale = model(images, tokens["input_ids"])
        loss = clip_loss(img, txt, logit_scale=scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
    with torch.no_grad():
        img, txt, _ = model(images, tokens["input_ids"])
        sims = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    assert torch.equal(sims.argmax(dim=1), torch.arange(8))


def test_export_reloads_identically(text_tower, tmp_path: Path):
    from transformers import AutoModel

    from synray.models.image_text import is_image_text_dir, load_image_text, save_image_text, tokenize

    model = _tiny_image_text(text_tower).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    save_image_text(model, text_tower[1], tmp_path / "m", max_length=16)
    assert is_image_text_dir(tmp_path / "m") and not is_image_text_dir(tmp_path)
    loaded, tok, max_length = load_image_text(tmp_path / "m")
    assert max_length == 16 and float(loaded.logit_scale) == pytest.approx(2.5)
    x = torch.rand(2, 3, 16, 16)
    t = tokenize(tok, ["a red cube", "two cats"], 16)
    with torch.no_grad():
        for a, b in zip(model(x, t["input_ids"]),
                        loaded(x, t["input_ids"])):
            torch.testing.assert_close(a, b)
    assert AutoModel.from_pretrained(str(tmp_path / "m")).config.model_type == "vit"  # still a plain backbone


def test_plan_checks_the_text_tower(tiny_models: dict[str, str]):
    from synray.plan import plan_run
    from synray.train.objectives import TrainSetupError

    plan = plan_run(small_config("train.loss=clip"))
    assert plan.train.text_model == tiny_models["text"] and plan.train.columns == ("caption", "images")
    with pytest.raises(TrainSetupError, match="'llama' model; image-text training needs a CLIP text model"):
        plan_run(small_config("train.loss=clip", f"train.text.model={tiny_models['llm']}"))
    with pytest.raises(TrainSetupError, match="model path does not exist"):
        plan_run(small_config("train.loss=clip", "train.text.model=/nonexistent/text"))
    with pytest.raises(TrainSetupError, match="exceeds the text tower's 77 positions"):
        plan_run(small_config("train.loss=clip", "train.text.max_length=100"))


def test_clip_uses_the_laclip_crop_by_default():
    from synray.train.augment import build_augment
    from synray.train.objectives import get_objective

    cfg = small_config("train.loss=clip").train
    assert build_augment(cfg.augment, 32, get_objective(cfg.loss).default_augment).preset == "crop"
    assert build_augment(cfg.augment, 32, get_objective("stablerep").default_augment).preset == "strong"


def test_text_features_without_a_mask_equal_the_masked_forward(text_tower: Any) -> None:
    """The causal text tower pools at the end token: its features without a mask (what training passes) equal
    transformers' forward with the tokenizer's attention mask, for captions short, long and truncated."""
    from synray.models.image_text import tokenize

    model, tokenizer = text_tower
    texts = ["x", "a red circle", "two blue squares on a big green field beside a small house and a tall tree " * 3]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        masked = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds
        ours = _tiny_image_text((model, tokenizer)).encode_text(tokenize(tokenizer, texts, 16)["input_ids"])
    assert (enc["attention_mask"] == 0).any()  # some captions are padded
    torch.testing.assert_close(ours, masked)
