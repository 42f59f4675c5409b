"""The procedural backend (the shapes world): draws a parsed caption into an image and a class mask, seeded per image."""

from __future__ import annotations

import colorsys
import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw

from synray.config import ImagesConfig
from synray.data.codecs import encode_image, encode_mask
from synray.data.schema import image_seed
from synray.images.base import Rendered, Renderer
from synray.language.shapes import (
    COLORS,
    SHAPE_CLASSES,
    SIZES,
    TEXTURES,
    ShapeObject,
    ShapeScene,
    parse_caption,
)

#: bump when the same (caption, seed, size) would render differently
RENDERER_VERSION = 2
T2I_MODEL = "procedural"
UNPARSABLE = "unparsable_caption"

#: object radius multiplier by group count (groups of several objects must fit their region)
COUNT_SCALE = (1.0, 0.8, 0.68)
RADIUS_JITTER = (0.9, 1.1)          # group radius factor
OBJECT_RADIUS_JITTER = (0.95, 1.05)  # per-object radius factor on top of the group's
EDGE_PAD = 0.01                      # fraction of the image side kept free at the border
RELATION_GAP = 0.04                  # fraction of the side between the primary and secondary regions
PRIMARY_SHARE = (0.56, 0.64)         # fraction of the side given to the primary group when there is a relation
PLACE_TRIES = 40                     # centre draws per object before the group shrinks
SHRINK = 0.88                        # radius factor after a failed placement
MAX_SHRINKS = 8
#: largest rotation (degrees) per shape; square/diamond/cross/heart stay upright so classes stay distinct
MAX_ROTATION_DEG: dict[str, float] = {"circle": 180, "ring": 180, "star": 180, "crescent": 180, "triangle": 180,
                                      "square": 15, "diamond": 15, "cross": 15, "heart": 25}
COLOR_JITTER_STD = 8.0               # per-channel Gaussian jitter of an object colour, 0..255 units
BRIGHTNESS_RANGE = (0.92, 1.06)      # object brightness factor
# Backgrounds are dark and muted and every named colour is bright, so an object stands out from the
# background by brightness whatever its colour (a tiny ViT then learns shapes, not colour edges).
BG_SATURATION = (0.0, 0.35)          # HSV saturation range of the background
BG_VALUE = (0.08, 0.3)               # HSV value range of the background's first tone
BG_CONTRAST = (0.03, 0.07)           # value difference of the texture's second tone
BG_VALUE_LIMITS = (0.03, 0.38)       # the second tone stays dark
LIGHTING_MAX = 0.12                  # lighting ramp amplitude: brightness 1 +- this across the image
PIXEL_NOISE_STD = (0.0, 5.0)         # Gaussian pixel noise, 0..255 units
NOISY_TEXTURE_STD = 12.0             # extra fine noise of the "noisy" texture, 0..255 units
SUPERSAMPLED_SIDE = 128              # shapes are drawn at about this side, then box-filtered (antialiasing)


# -------------------------------------------------------------------------------------- geometry
def _regular(n: int, r: float = 1.0, centre: tuple[float, float] = (0.0, 0.0), phase: float = np.pi / 2) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _cross(half_width: float = 0.3, extent: float = 0.92) -> np.ndarray:
    w, e = half_width, extent
    return np.array([[-w, e], [w, e], [w, w], [e, w], [e, -w], [w, -w], [w, -e], [-w, -e],
                     [-w, -w], [-e, -w], [-e, w], [-w, w]])


def _heart(n: int = 48) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    pts = np.stack([16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max() * 0.95


#: unit shapes (circumradius about 1, y up): (filled polygons, hole polygons)
GEOMETRY: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {
    "circle": ([_regular(40, 0.92)], []),
    "square": ([np.array([[-0.72, -0.72], [0.72, -0.72], [0.72, 0.72], [-0.72, 0.72]])], []),
    "triangle": ([_regular(3, 1.0)], []),
    "star": ([_star()], []),
    "cross": ([_cross()], []),
    "ring": ([_regular(40, 0.95)], [_regular(40, 0.55)]),
    "diamond": ([np.array([[0.0, 1.0], [0.7, 0.0], [0.0, -1.0], [-0.7, 0.0]])], []),
    "heart": ([_heart()], []),
    "crescent": ([_regular(40, 0.95)], [_regular(40, 0.74, (0.34, 0.12))]),
}
if set(GEOMETRY) != set(SHAPE_CLASSES):
    raise RuntimeError("every shape class needs a geometry")


# ---------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Placed:
    """One object to draw: class, colour (RGB 0..255), centre and radius (fractions of the side), rotation."""

    shape: str
    rgb: np.ndarray
    cx: float
    cy: float
    r: float
    angle: float


Region = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the side (y down)


def _regions(relation: str | None, rng: np.random.Generator) -> tuple[Region, Region]:
    """(primary region, secondary region) consistent with the relation; the whole image without one."""
    share = float(rng.uniform(*PRIMARY_SHARE))
    side_flip = rng.random() < 0.5
    full: Region = (0.0, 0.0, 1.0, 1.0)
    if relation is None:
        return full, full
    first_is_primary = relation in ("left of", "above") or (relation == "next to" and side_flip)
    split = share if first_is_primary else 1.0 - share
    lo, hi = split - RELATION_GAP / 2, split + RELATION_GAP / 2
    if relation in ("above", "below"):
        a, b = (0.0, 0.0, 1.0, lo), (0.0, hi, 1.0, 1.0)
    else:
        a, b = (0.0, 0.0, lo, 1.0), (hi, 0.0, 1.0, 1.0)
    return (a, b) if first_is_primary else (b, a)


def _place_group(count: int, radius: float, region: Region,
                 rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """`count` non-overlapping circles (cx, cy, r) inside the region; shrinks the group until they fit."""
    x0, y0, x1, y1 = region
    jitter = rng.uniform(*OBJECT_RADIUS_JITTER, size=count)
    draws = rng.random((MAX_SHRINKS + 1, count, PLACE_TRIES, 2))
    for attempt in range(MAX_SHRINKS + 1):
        placed: list[tuple[float, float, float]] = []
        for k in range(count):
            r = radius * float(jitter[k])
            lx, hx = x0 + r + EDGE_PAD, x1 - r - EDGE_PAD
            ly, hy = y0 + r + EDGE_PAD, y1 - r - EDGE_PAD
            if lx > hx or ly > hy:
                break
            for u, v in draws[attempt, k]:
                cx, cy = lx + u * (hx - lx), ly + v * (hy - ly)
                if all(np.hypot(cx - px, cy - py) >= 1.04 * (r + pr) for px, py, pr in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break
        if len(placed) == count:
            return placed
        radius *= SHRINK
    # give up on separation: centre the objects in the region at the smallest radius
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return [(cx, cy, min(radius, (x1 - x0) / 2, (y1 - y0) / 2))] * count


def _object_color(obj: ShapeObject, rng: np.random.Generator) -> np.ndarray:
    name = obj.color if obj.color is not None else list(COLORS)[int(rng.integers(len(COLORS)))]
    base = np.asarray(COLORS[name], dtype=np.float32)
    rgb = (base + rng.normal(0.0, COLOR_JITTER_STD, 3)) * rng.uniform(*BRIGHTNESS_RANGE)
    return np.clip(rgb, 0, 255).astype(np.float32)


def layout(scene: ShapeScene, rng: np.random.Generator) -> list[Placed]:
    """Every object of the scene with its colour, position, size and rotation (secondary objects first)."""
    primary_region, secondary_region = _regions(scene.relation, rng)
    groups = [(scene.primary, primary_region)]
    if scene.secondary is not None:
        groups.insert(0, (scene.secondary, secondary_region))
    out: list[Placed] = []
    for obj, region in groups:
        size = obj.size if obj.size is not None else list(SIZES)[int(rng.integers(len(SIZES)))]
        radius = SIZES[size] * COUNT_SCALE[obj.count - 1] * float(rng.uniform(*RADIUS_JITTER))
        rgb = _object_color(obj, rng)
        max_rot = np.deg2rad(MAX_ROTATION_DEG[obj.shape])
        for cx, cy, r in _place_group(obj.count, radius, region, rng):
            out.append(Placed(obj.shape, rgb, cx, cy, r, float(rng.uniform(-max_rot, max_rot))))
    return out


# ------------------------------------------------------------------------------------- drawing
@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (u right, v down) as fractions of the side, each [size, size]."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c)


def _bg_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, s, v = rng.random(), rng.uniform(*BG_SATURATION), rng.uniform(*BG_VALUE)
    dv = rng.uniform(*BG_CONTRAST) * (1 if rng.random() < 0.5 else -1)
    v2 = float(np.clip(v + dv, BG_VALUE_LIMITS[0], BG_VALUE_LIMITS[1]))
    s2 = float(np.clip(s + rng.normal(0, 0.05), 0, BG_SATURATION[1]))
    c1 = np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255
    c2 = np.asarray(colorsys.hsv_to_rgb(h, s2, v2), dtype=np.float32) * 255
    return c1, c2


def _rotated(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    ca, sa = np.cos(angle), np.sin(angle)
    return u * ca + v * sa, -u * sa + v * ca


def _smooth_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    cells = int(rng.integers(3, 9))
    coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def background(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [size, size, 3] background in 0..255: two muted tones in a texture with a random phase/frequency."""
    c1, c2 = _bg_colors(rng)
    u, v = _grid(size)
    angle, period = float(rng.uniform(0, np.pi)), float(rng.uniform(0.1, 0.25))
    pu, pv = rng.random(2)
    a, b = _rotated(u, v, angle)
    if texture == "plain":
        t = np.zeros_like(u)
    elif texture == "striped":
        t = (np.mod(a / period + pu, 1.0) < 0.5).astype(np.float32)
    elif texture == "dotted":
        radius = rng.uniform(0.18, 0.3)
        du, dv = np.mod(a / period + pu, 1.0) - 0.5, np.mod(b / period + pv, 1.0) - 0.5
        t = (np.hypot(du, dv) < radius).astype(np.float32)
    elif texture == "checkered":
        a, b = _rotated(u, v, angle * 0.2 - 0.1 * np.pi)  # nearly axis-aligned checks
        t = np.mod(np.floor(a / period + pu) + np.floor(b / period + pv), 2).astype(np.float32)
    elif texture == "noisy":
        t = _smooth_noise(size, rng)
    elif texture == "gradient":
        t = np.clip((a - a.mean()) * rng.uniform(0.8, 1.4) + 0.5, 0, 1)
    else:
        raise ValueError(f"unknown texture {texture!r}; allowed: {', '.join(TEXTURES)}")
    img = c1 + t[..., None] * (c2 - c1)
    if texture == "noisy":
        img = img + rng.normal(0, NOISY_TEXTURE_STD, img.shape).astype(np.float32)
    return img


def _coverage(obj: Placed, size: int, ss: int) -> np.ndarray:
    """float32 [size, size] fraction of each pixel covered by the object (drawn ss x supersampled, box-filtered)."""
    big = size * ss
    margin = obj.r * 1.1
    x0, y0 = max(int(np.floor((obj.cx - margin) * size)), 0), max(int(np.floor((obj.cy - margin) * size)), 0)
    x1, y1 = min(int(np.ceil((obj.cx + margin) * size)), size), min(int(np.ceil((obj.cy + margin) * size)), size)
    cov = np.zeros((size, size), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return cov
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(canvas)
    ca, sa = np.cos(obj.angle), np.sin(obj.angle)
    rot = np.array([[ca, -sa], [sa, ca]]) * (obj.r * big)
    ox, oy = obj.cx * big - x0 * ss, obj.cy * big - y0 * ss
    filled, holes = GEOMETRY[obj.shape]
    for polys, value in ((filled, 255), (holes, 0)):
        for poly in polys:
            p = poly @ rot.T
            draw.polygon([(ox + x, oy - y) for x, y in p], fill=value)  # y up -> image y down
    block = np.asarray(canvas, dtype=np.float32).reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    cov[y0:y1, x0:x1] = block / 255.0
    return cov


def _lighting(size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _grid(size)
    phi, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0, LIGHTING_MAX)
    return (1.0 + amp * 2 * ((u - 0.5) * np.cos(phi) + (v - 0.5) * np.sin(phi)))[..., None]


def render(scene: ShapeScene, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [size, size, 3], mask uint8 [size, size]) of a scene; all that the caption leaves open
    (positions, rotation, jitter, background tones and phase, lighting, noise) comes from `seed`.

    Mask: 0 = background, 1 + shape-class index where an object covers at least half of the pixel.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    rng = np.random.default_rng(int(seed))
    texture = scene.background if scene.background is not None else TEXTURES[int(rng.integers(len(TEXTURES)))]
    img = background(texture, size, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    ss = max(1, min(4, SUPERSAMPLED_SIDE // size))
    for obj in layout(scene, rng):
        a = _coverage(obj, size, ss)
        img = img * (1.0 - a[..., None]) + obj.rgb * a[..., None]
        mask[a >= 0.5] = 1 + SHAPE_CLASSES.index(obj.shape)
    img = img * _lighting(size, rng)
    img = img + rng.normal(0, rng.uniform(*PIXEL_NOISE_STD), img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def regenerate(caption: str, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image and mask a row's caption and image seed stand for (ValueError if the caption does not parse)."""
    return render(parse_caption(caption), seed, size)


def procedural_params(cfg: ImagesConfig) -> dict[str, Any]:
    """What is recorded with every row (with the caption and seeds it regenerates images and masks)."""
    return {"renderer": T2I_MODEL, "version": RENDERER_VERSION, "resolution": cfg.resolution,
            "output_size": cfg.output_size, "image_format": cfg.image_format}


def encode_pair(img: np.ndarray, mask: np.ndarray, cfg: ImagesConfig) -> tuple[bytes, bytes]:
    """A rendered uint8 image and its mask, encoded at the output size."""
    return (encode_image(img.astype(np.float32) / 255.0, cfg.image_format, cfg.output_size, cfg.jpeg_quality),
            encode_mask(mask, cfg.output_size))


# -------------------------------------------------------------------------------------- the UDF
class ProceduralRenderer(Renderer):
    """Seeded numpy drawing of the shape language, with per-pixel class masks; unparsable captions are dropped."""

    name: ClassVar[str] = "procedural"
    reads: ClassVar[tuple[str, ...]] = ("backend", "per_caption", "resolution", "output_size", "image_format",
                                        "jpeg_quality")
    writes_masks: ClassVar[bool] = True

    @classmethod
    def model_name(cls, cfg: ImagesConfig) -> str:
        return T2I_MODEL

    @classmethod
    def params(cls, cfg: ImagesConfig) -> dict[str, Any]:
        return procedural_params(cfg)

    @classmethod
    def claims(cls, row: dict[str, Any]) -> bool:
        return row["t2i_model"] == T2I_MODEL

    @classmethod
    def regenerate(cls, row: dict[str, Any], cfg: ImagesConfig, model_path: str | None) -> list[bytes]:
        return [encode_pair(*regenerate(str(row["caption"]), int(seed), cfg.resolution), cfg)[0]
                for seed in row["seeds"]]

    def render_caption(self, caption: str, cap_id: str, drops: Counter[str]) -> Rendered | None:
        try:
            scene = parse_caption(caption)
        except ValueError:
            drops[UNPARSABLE] += 1
            return None
        seeds = [image_seed(self.run_seed, cap_id, k) for k in range(self.cfg.per_caption)]
        pairs = [encode_pair(*render(scene, seed, self.cfg.resolution), self.cfg) for seed in seeds]
        return Rendered([p[0] for p in pairs], seeds, [p[1] for p in pairs])
