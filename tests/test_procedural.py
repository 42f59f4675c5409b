"""Tests for the procedural shapes world: caption language, renderer, masks, the Ray Data UDF and the shapes style."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from synray.captions.cleanup import clean_caption
from synray.language.templates import template_caption, template_styles
from synray.concepts import Concept, RowPlan, load_bank, plan_rows
from synray.config import CleanupConfig, ConceptsConfig, ImagesConfig
from synray.data.schema import ROW_SCHEMA, image_seed
from synray.data.codecs import decode_class_mask
from synray.images.registry import get_renderer
from synray.images.procedural import (
    T2I_MODEL,
    UNPARSABLE,
    ProceduralRenderer,
    regenerate,
    render,
)
from synray.language.shapes import (
    COLORS,
    RELATIONS,
    SHAPE_CLASSES,
    SIZES,
    TEXTURES,
    ShapeObject,
    ShapeScene,
    describe,
    parse_caption,
    random_scene,
)

SIZE = 64  # pixels


def _maybe(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str | None:
    return None if rng.random() < 0.3 else options[int(rng.integers(len(options)))]


def _random_object(rng: np.random.Generator) -> ShapeObject:
    return ShapeObject(SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))], int(rng.integers(1, 4)),
                       _maybe(rng, tuple(SIZES)), _maybe(rng, tuple(COLORS)))


def _random_full_scene(rng: np.random.Generator) -> ShapeScene:
    relation = _maybe(rng, tuple(RELATIONS))
    return ShapeScene(_random_object(rng), relation, _random_object(rng) if relation else None,
                      _maybe(rng, TEXTURES))


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _interior(mask: np.ndarray, cls: int) -> np.ndarray:
    """Pixels of class `cls` whose 4 neighbours are of that class too (no outline/antialiased edge)."""
    m = mask == cls
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return inner


# --------------------------------------------------------------------------------------- language
def test_parse_describe_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        scene = _random_full_scene(rng)
        caption = describe(scene)
        assert parse_caption(caption) == scene, caption


def test_parse_example_and_variants():
    scene = parse_caption("two small red triangles above a large blue circle on a striped background")
    assert scene == ShapeScene(ShapeObject("triangle", 2, "small", "red"), "above",
                               ShapeObject("circle", 1, "large", "blue"), "striped")
    assert scene.label == "triangle" and scene.mask_classes() == {1 + SHAPE_CLASSES.index("triangle"),
                                                                  1 + SHAPE_CLASSES.index("circle")}
    assert parse_caption("One  RED Star, left of an orange cross.") == ShapeScene(
        ShapeObject("star", 1, None, "red"), "left of", ShapeObject("cross", 1, None, "orange"))
    assert parse_caption("three crosses beside a ring").relation == "next to"
    assert describe(parse_caption("an orange heart")) == "an orange heart"
    assert describe(parse_caption("a ring to the right of three hearts on a dotted background")) == \
        "a ring to the right of three hearts on a dotted background"


@pytest.mark.parametrize("caption, part", [
    ("a purple elephant", "'elephant'"),
    ("two red circle", "'circle'"),
    ("a red circle under a star", "'under a star'"),
    ("a red circle on a wavy background", "'on a wavy background'"),
    ("a red circle on a plain background please", "'on a plain background please'"),
    ("a dog sitting on a sofa", "'dog sitting on a sofa'"),
    ("", "empty"),
    ("four stars", "'four stars'"),
])
def test_parse_errors_name_the_part(caption, part):
    with pytest.raises(ValueError, match=part):
        parse_caption(caption)


def test_scene_validation():
    with pytest.raises(ValueError, match="relation"):
        ShapeScene(ShapeObject("circle"), relation="above")
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeObject("blob")
    with pytest.raises(ValueError, match="count"):
        ShapeObject("circle", count=4)


# ---------------------------------------------------------------------------------------- renderer
def test_render_is_deterministic_per_seed():
    scene = parse_caption("two small red triangles above a large blue circle on a striped background")
    a_img, a_mask = render(scene, 123, SIZE)
    b_img, b_mask = render(scene, 123, SIZE)
    assert a_img.shape == (SIZE, SIZE, 3) and a_img.dtype == np.uint8
    assert a_mask.shape == (SIZE, SIZE) and a_mask.dtype == np.uint8
    assert a_img.tobytes() == b_img.tobytes() and a_mask.tobytes() == b_mask.tobytes()
    c_img, c_mask = render(scene, 124, SIZE)
    assert a_img.tobytes() != c_img.tobytes() and a_mask.tobytes() != c_mask.tobytes()
    img, mask = regenerate(describe(scene), 123, SIZE)
    assert np.array_equal(img, a_img) and np.array_equal(mask, a_mask)


def test_mask_classes_match_the_caption():
    rng = np.random.default_rng(1)
    for seed in range(300):
        scene = _random_full_scene(rng)
        _, mask = render(scene, seed, SIZE)
        present = set(np.unique(mask).tolist()) - {0}
        assert present == scene.mask_classes(), describe(scene)
        assert (mask == 0).mean() > 0.2  # there is background left


def test_mask_separates_objects_from_a_plain_background():
    for seed in range(60):
        shape, color = SHAPE_CLASSES[seed % len(SHAPE_CLASSES)], list(COLORS)[seed % len(COLORS)]
        img, mask = render(ShapeScene(ShapeObject(shape, 1, "large", color), background="plain"), seed, SIZE)
        obj = np.median(img[_interior(mask, 1 + SHAPE_CLASSES.index(shape))], axis=0)
        bg = img[_interior(mask, 0)].astype(np.float64)
        assert np.linalg.norm(bg.mean(axis=0) - obj) > 40
        # background pixels are close to their own mean, i.e. not object-coloured
        assert np.percentile(np.linalg.norm(bg - obj, axis=1), 1) > 25


def test_object_pixels_have_the_named_colour():
    names = list(COLORS)
    table = np.asarray([COLORS[n] for n in names], dtype=np.float64)
    rng = np.random.default_rng(2)
    for seed in range(200):
        color = names[seed % len(names)]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        scene = ShapeScene(ShapeObject(SHAPE_CLASSES[seed % len(SHAPE_CLASSES)], int(rng.integers(1, 4)),
                                       "large", color), background=texture)
        img, mask = render(scene, seed, SIZE)
        px = img[_interior(mask, 1 + scene.primary.class_index)].astype(np.float64)
        assert len(px) > 10, describe(scene)
        nearest = names[int(np.argmin(np.linalg.norm(table - np.median(px, axis=0), axis=1)))]
        assert nearest == color, (describe(scene), np.median(px, axis=0))


def test_sizes_order_mask_area():
    areas = {}
    for size in SIZES:
        total = 0
        for seed in range(60):
            shape = SHAPE_CLASSES[seed % len(SHAPE_CLASSES)]
            _, mask = render(ShapeScene(ShapeObject(shape, 1 + seed % 3, size)), seed, SIZE)
            total += int((mask > 0).sum())
        areas[size] = total
    assert areas["small"] < areas["medium"] < areas["large"]


@pytest.mark.parametrize("relation, axis, primary_first", [
    ("left of", 1, True), ("right of", 1, False), ("above", 0, True), ("below", 0, False)])
def test_positions_follow_the_relation(relation, axis, primary_first):
    for seed in range(30):
        scene = ShapeScene(ShapeObject("star", 1 + seed % 3), relation, ShapeObject("ring"))
        _, mask = render(scene, seed, SIZE)
        p = np.argwhere(mask == 1 + SHAPE_CLASSES.index("star"))[:, axis]
        s = np.argwhere(mask == 1 + SHAPE_CLASSES.index("ring"))[:, axis]
        if primary_first:
            assert p.max() < s.min()
        else:
            assert s.max() < p.min()


# ---------------------------------------------------------------------------------------- the UDF
def test_udf_renders_rows_and_drops_unparsable_captions():
    cfg = ImagesConfig(backend="procedural", resolution=64, output_size=32, per_caption=3, image_format="png")
    assert get_renderer("procedural") is ProceduralRenderer
    udf = ProceduralRenderer(cfg, None, run_seed=5)
    captions = ["a red circle on a plain background", "a dog on a sofa", "two stars next to a large green ring"]
    batch = {"caption": np.asarray(captions, dtype=object), "caption_id": np.asarray(["c0", "c1", "c2"], dtype=object),
             "label": np.asarray([0, 1, 3], dtype=np.int64)}
    out = udf(batch)
    assert list(out["caption_id"]) == ["c0", "c2"] and list(out["label"]) == [0, 3]
    assert udf.stats.local.rejected["images"] == {UNPARSABLE: 1}
    assert udf.stats.local.rows["images"] == 2
    for caption, cap_id, images, masks, seeds in zip(out["caption"], out["caption_id"], out["images"],
                                                     out["masks"], out["seeds"]):
        assert len(images) == len(masks) == len(seeds) == 3
        assert list(seeds) == [image_seed(5, cap_id, k) for k in range(3)]
        allowed = {0} | parse_caption(caption).mask_classes()
        for img_bytes, mask_bytes in zip(images, masks):
            assert _decode(img_bytes).shape == (32, 32, 3)
            mask = decode_class_mask(mask_bytes)
            assert mask.shape == (32, 32) and set(np.unique(mask).tolist()) <= allowed
    assert set(out["t2i_model"]) == {T2I_MODEL} and set(out["image_format"]) == {"png"}
    assert '"version"' in out["t2i_params"][0] and '"resolution": 64' in out["t2i_params"][0]


def test_udf_images_regenerate_from_caption_and_seed():
    cfg = ImagesConfig(backend="procedural", resolution=32, output_size=32, per_caption=2, image_format="png")
    out = ProceduralRenderer(cfg, None, run_seed=1)({"caption": np.asarray(["three yellow hearts"], dtype=object),
                                                    "caption_id": np.asarray(["abc"], dtype=object)})
    for img_bytes, mask_bytes, seed in zip(out["images"][0], out["masks"][0], out["seeds"][0]):
        img, mask = regenerate("three yellow hearts", int(seed), 32)
        assert np.array_equal(_decode(img_bytes), img) and np.array_equal(decode_class_mask(mask_bytes), mask)


def test_schema_has_a_nullable_masks_column_last():
    field = ROW_SCHEMA.field("masks")
    assert ROW_SCHEMA.names[-1] == "masks" and field.nullable


# ------------------------------------------------------------------------------ bank and caption style
def test_shapes_bank_lists_the_shape_classes():
    bank = load_bank("builtin:shapes")
    assert tuple(c.name for c in bank) == SHAPE_CLASSES and {c.kind for c in bank} == {"shape"}


def test_shapes_style_captions_parse_with_the_plan_concept():
    assert "shapes" in template_styles()
    bank = load_bank("builtin:shapes")
    plans = plan_rows(bank, ConceptsConfig(kinds=["shape"]), 4, 0, 400)
    captions = [template_caption(p, "shapes", 4, i) for i, p in enumerate(plans)]
    again = [template_caption(p, "shapes", 4, i) for i, p in reversed(list(enumerate(plans)))][::-1]
    assert captions == again
    scenes = [parse_caption(c) for c in captions]
    for plan, scene in zip(plans, scenes):
        assert scene.primary.shape == plan.concept.name and SHAPE_CLASSES[plan.label] == plan.concept.name
        assert scene.secondary is None or scene.secondary.shape != scene.primary.shape
    with_secondary = sum(s.secondary is not None for s in scenes) / len(scenes)
    assert 0.25 < with_secondary < 0.55
    assert len(set(captions)) > 0.7 * len(captions)
    # every caption passes the default caption clean-up (at least 3 words and 8 characters)
    cleanup = CleanupConfig()
    assert all(clean_caption(c, cleanup) == (c, None) for c in captions)
    # colour, size and background are often left open, so the images of a caption share mostly the shape
    named_colour = sum(s.primary.color is not None for s in scenes) / len(scenes)
    assert 0.3 < named_colour < 0.7


def test_shapes_style_rejects_non_shape_concepts():
    with pytest.raises(ValueError, match="builtin:shapes"):
        template_caption(RowPlan(Concept("dog", "object"), 0, "c"), "shapes", 0, 0)


def test_random_scene_is_deterministic():
    a = random_scene("heart", np.random.default_rng(9))
    b = random_scene("heart", np.random.default_rng(9))
    assert a == b and a.primary.shape == "heart"
