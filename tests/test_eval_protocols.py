"""Tests for the evaluation protocols on extracted arrays: mIoU, the segmentation probe, zero-shot, kNN/linear."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synray.config import EvalConfig
from synray.data.codecs import decode_class_mask
from synray.eval.errors import EvalError
from synray.eval.evaluate import resolve_image_text
from synray.eval.protocols import EvalArrays, label_names, reference_query, run_protocols
from synray.eval.segmentation import (
    confusion_matrix,
    infer_num_classes,
    iou_per_class,
    miou,
    segmentation_probe,
)
from synray.eval.zeroshot import (
    average_template_embeddings,
    build_prompts,
    class_text_embeddings,
    zeroshot_accuracy,
    zeroshot_logits,
)

from eval_models import save_tiny_image_text, score_rows, tiny_backbone


def _clusters(n_per_class: int, num_classes: int, dim: int = 16, spread: float = 0.1,
              seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    noise = torch.randn(labels.numel(), dim, generator=torch.Generator().manual_seed(seed))
    return centres[labels] + spread * noise, labels.numpy()


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr.astype(np.uint8))
    if mode == "P":
        img = img.convert("P")
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- mIoU
def test_miou_hand_computed() -> None:
    pred = np.array([[0, 0, 1], [1, 2, 2]])
    target = np.array([[0, 1, 1], [1, 2, 0]])
    # class 0: TP 1, FP 1 (target 1), FN 1 (predicted 2) -> 1/3; class 1: TP 2, FN 1 -> 2/3;
    # class 2: TP 1, FP 1 -> 1/2; mean = (1/3 + 2/3 + 1/2) / 3 = 0.5
    assert miou(pred, target, num_classes=3) == pytest.approx(0.5)
    # a class absent from both target and prediction does not count
    assert miou(pred, target, num_classes=4) == pytest.approx(0.5)
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 0, 1], [1, 2, 0], [0, 0, 1]]
    assert iou_per_class(conf).tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    # ignored pixels drop out: without the (target 0, pred 2) pixel class 0 is 1/2 and class 2 is 1
    target_ignored = target.copy()
    target_ignored[1, 2] = 255
    assert miou(pred, target_ignored, 3, ignore_index=255) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_miou_counts_a_class_only_predicted_and_checks_ranges() -> None:
    # class 1 is only predicted: IoU 0; class 0: TP 1, FN 1 -> 1/2
    assert miou([0, 1], [0, 0], num_classes=2) == pytest.approx(0.25)
    assert miou([1, 1], [1, 1], num_classes=5) == 1.0
    with pytest.raises(ValueError, match="out of range"):
        miou([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="differ in size"):
        miou([0, 1, 2], [0, 1], num_classes=3)


def test_class_masks_decode_from_grey_and_palette_pngs() -> None:
    mask = np.array([[0, 1, 2, 3]] * 4, np.uint8)
    assert decode_class_mask(_png(mask)).tolist() == mask.tolist()
    assert decode_class_mask(_png(mask, "P")).tolist() == mask.tolist()
    assert decode_class_mask(_png(mask), size=8).shape == (8, 8)
    assert np.array_equal(decode_class_mask(_png(mask), size=8)[::2, ::2], mask)  # nearest
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 200
    with pytest.raises(ValueError, match="single-channel"):
        decode_class_mask(_png(colour))
    assert infer_num_classes(np.array([0, 4, 255]), ignore_index=255) == 5


# ------------------------------------------------------------------------------- segmentation
def _patch_world(n: int, grid: int = 8, patch: int = 4, dim: int = 16, num_classes: int = 4,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose class is linearly decodable (class centre + noise); masks = the patch classes upsampled.

    Each image has up to three rectangular regions aligned with the patch grid.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    tokens, masks = [], []
    for _ in range(n):
        a, b = (int(v) for v in torch.randint(1, grid, (2,), generator=g))
        c1, c2, c3 = torch.randperm(num_classes, generator=g)[:3].tolist()
        classes = torch.full((grid, grid), c1)
        classes[:, a:] = c2
        classes[b:, a:] = c3
        tokens.append(centres[classes.reshape(-1)] + 0.3 * torch.randn(grid * grid, dim, generator=g))
        masks.append(classes.repeat_interleave(patch, 0).repeat_interleave(patch, 1))
    return torch.stack(tokens), torch.stack(masks)


def test_segmentation_probe_decodes_linearly_separable_patches() -> None:
    tokens, masks = _patch_world(32)
    out = segmentation_probe(tokens[:16], masks[:16], tokens[16:], masks[16:], epochs=30, lr=1e-2,
                             batch_size=8, seed=0)
    assert out["miou"] > 0.9 and out["pixel_accuracy"] > 0.95 and out["train_miou"] > 0.9
    assert out["num_classes"] == 4 and len(out["iou_per_class"]) == 4 and out["steps"] == 60
    again = segmentation_probe(tokens[:16], masks[:16], tokens[16:], masks[16:], epochs=30, lr=1e-2,
                               batch_size=8, seed=0)
    assert again == out


def test_segmentation_probe_on_random_tokens_is_poor_and_rejects_bad_shapes() -> None:
    tokens, masks = _patch_world(16)
    noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(5))
    out = segmentation_probe(noise[:8], masks[:8], noise[8:], masks[8:], epochs=5, batch_size=8)
    assert out["miou"] < 0.6
    with pytest.raises(ValueError, match="square grid"):
        segmentation_probe(tokens[:4, :60], masks[:4], tokens[4:8, :60], masks[4:8])
    with pytest.raises(ValueError, match="out of range"):
        segmentation_probe(tokens[:4], masks[:4] + 10, tokens[4:8], masks[4:8], num_classes=4)


# ---------------------------------------------------------------------------------- zero-shot
def test_prompts_and_template_averaging() -> None:
    assert build_prompts(["golden_retriever", "cat"], ["a photo of a {}.", "{}!"]) == [
        "a photo of a golden retriever.", "golden retriever!", "a photo of a cat.", "cat!"]
    with pytest.raises(ValueError, match="exactly one"):
        build_prompts(["cat"], ["no slot"])
    e = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, -3.0], [0.0, -1.0]])  # 2 classes x 2 templates
    avg = average_template_embeddings(e, 2)
    torch.testing.assert_close(avg, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]]))


def test_zeroshot_scoring_with_image_embeddings_equal_to_class_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    classes = torch.randn(5, 12, generator=g)
    labels = torch.tensor([3, 0, 4, 4, 1, 2])
    images = classes[labels] * torch.rand(6, 1, generator=g).add(0.5)  # the scale does not matter (cosine)
    assert zeroshot_accuracy(images, classes, labels) == 1.0
    assert zeroshot_logits(images, classes).shape == (6, 5)
    assert zeroshot_accuracy(images, classes, (labels + 1) % 5) == 0.0
    with pytest.raises(ValueError):
        zeroshot_accuracy(images, classes[:, :4], labels)


@pytest.fixture(scope="module")
def image_text_dir(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_image_text(tiny_models["text"], tmp_path_factory.mktemp("image_text"))


def test_zeroshot_through_a_saved_image_text_model(image_text_dir: Path) -> None:
    from synray.models.image_text import load_image_text

    model, tokenizer, max_length = load_image_text(image_text_dir)
    names = {0: "circle", 1: "square", 2: "triangle"}
    cfg = EvalConfig(zeroshot_templates=["a photo of a {}.", "a drawing of a {}."])
    classifier = class_text_embeddings(model, tokenizer, list(names.values()), cfg.zeroshot_templates, max_length)
    assert classifier.shape == (3, model.image_projection.out_features)
    torch.testing.assert_close(classifier.norm(dim=1), torch.ones(3))
    labels = np.repeat([0, 1, 2], 4)
    arrays = EvalArrays(labels=labels, groups=np.arange(12), image_embeds=classifier[labels].clone(),
                        class_names=names)
    out = run_protocols(arrays, ["zeroshot"], cfg, image_text=(model, tokenizer, max_length))
    assert out["zeroshot_accuracy"] == 1.0 and out["zeroshot_num_classes"] == 3
    arrays.class_names = {0: "circle", 1: "square"}
    with pytest.raises(EvalError, match="class name"):
        run_protocols(arrays, ["zeroshot"], cfg, image_text=(model, tokenizer, max_length))


# ------------------------------------------------------------------------------ kNN and linear
def test_run_protocols_on_separable_features_is_perfect() -> None:
    feats, labels = _clusters(10, 4, spread=0.1)
    groups = np.arange(labels.size)
    cfg = EvalConfig(knn_k=5, linear_epochs=30, linear_batch_size=16)
    out = run_protocols(EvalArrays(labels=labels + 7, groups=groups, features=feats), ["knn", "linear"], cfg)
    assert out["knn_accuracy"] == 1.0 and out["linear_accuracy"] == 1.0
    assert out["num_classes"] == 4 and out["num_reference"] + out["num_query"] == 40
    no_bn = run_protocols(EvalArrays(labels=labels, groups=groups, features=feats), ["linear"],
                          cfg.model_copy(update={"linear_bn": False, "linear_lr": 0.5}))
    assert no_bn["linear_accuracy"] == 1.0


def test_split_column_decides_reference_and_query() -> None:
    labels = np.array([0, 1, 0, 1, 0, 1])
    split = np.array(["train", "train", "test", "test", "train", "val"], dtype=object)
    ref, query, how = reference_query(EvalArrays(labels=labels, groups=np.arange(6), split=split))
    assert ref.tolist() == [0, 1, 4] and query.tolist() == [2, 3, 5] and how == "split column"
    with pytest.raises(EvalError, match="not understood"):
        reference_query(EvalArrays(labels=labels, groups=np.arange(6), split=np.array(["train"] * 5 + ["dev"])))
    with pytest.raises(EvalError, match="both need"):
        reference_query(EvalArrays(labels=labels, groups=np.arange(6), split=np.array(["train"] * 6)))
    with pytest.raises(EvalError, match="two class names"):
        label_names([0, 0], ["cat", "dog"])


# ------------------------------------------------------------------- the evaluation path, in process
def _mask_rows(n: int, size: int = 32, per_row: int = 2) -> list[dict]:
    """Rows of images whose bright square (class 1 + label) sits on a dark background, with its mask."""
    rows = []
    for i in range(n):
        label = i % 2
        images, masks = [], []
        for j in range(per_row):
            img = np.full((size, size, 3), 20, np.uint8)
            mask = np.zeros((size, size), np.uint8)
            lo = 4 + 4 * ((i + j) % 3)
            img[lo:lo + 12, lo:lo + 12] = (230, 60, 60) if label == 0 else (60, 60, 230)
            mask[lo:lo + 12, lo:lo + 12] = 1 + label
            images.append(_png(img))
            masks.append(_png(mask))
        rows.append({"caption_id": f"{i:016x}", "label": label, "class_name": ["red", "blue"][label],
                     "images": images, "masks": masks})
    return rows


def test_all_four_protocols_score_shares_of_the_query_images(image_text_dir: Path) -> None:
    cfg = EvalConfig(protocols=["knn", "linear", "zeroshot", "segmentation"], knn_k=3, linear_epochs=5,
                     segmentation_epochs=3, zeroshot_templates=["a photo of a {}."])
    rows = _mask_rows(8)
    out = score_rows(image_text_dir, rows, cfg.protocols, cfg, image_text=resolve_image_text(image_text_dir))
    assert out["segmentation_num_classes"] == 3 and out["zeroshot_num_classes"] == 2
    assert out["num_reference"] + out["num_query"] == 16
    shares = {"knn_accuracy": out["num_query"], "linear_accuracy": out["num_query"],
              "zeroshot_accuracy": out["num_query"], "segmentation_pixel_accuracy": out["num_query"] * 32 * 32}
    for key, of in shares.items():   # each a whole number of the query images (or of their pixels)
        assert out[key] * of == pytest.approx(round(out[key] * of), abs=1e-3), key
    present = [v for v in out["segmentation_iou_per_class"] if v is not None]
    assert out["segmentation_miou"] == pytest.approx(sum(present) / len(present), abs=1e-5)


def test_each_protocol_says_what_it_needs(tmp_path: Path) -> None:
    from synray.models.backbone import save_backbone

    model_dir = save_backbone(tiny_backbone(), tmp_path / "backbone")
    rows = [{k: v for k, v in r.items() if k != "masks"} for r in _mask_rows(4)]
    with pytest.raises(ValueError, match="image-text model"):
        score_rows(model_dir, rows, ["zeroshot"], EvalConfig())
    with pytest.raises(ValueError, match="masks"):
        score_rows(model_dir, rows, ["segmentation"], EvalConfig())
    with pytest.raises(ValueError, match="holds none"):
        resolve_image_text("/nonexistent")
    with pytest.raises(ValueError, match="not supported"):
        score_rows(model_dir, rows, ["detection"], EvalConfig())
