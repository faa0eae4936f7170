"""Synthetic segmentation scenes with exact masks: an offline stand-in for the paper's datasets.

Real SAM / CLIP weights and the paper's datasets (Pascal VOC, DUTS, CUHK blur, SBU shadow, MSD
mirror) cannot be downloaded on the development and CI machines. This module draws small scenes
(numpy + PIL only, seeded, a few milliseconds each) whose target pixels mirror the paper's task
types. Each scene has several objects on a textured background, and one *task family* decides
which pixels are the target:

- ``semantic``: every object of one category. Categories differ by shape and colour
  (:data:`CATEGORIES`: red circles, blue squares, green triangles, yellow stars).
- ``saliency``: the one large, saturated object among small, dull distractors.
- ``blur``: regions rendered out of focus (a Gaussian-blurred copy of the scene inside them),
  surrounded by sharp texture.
- ``shadow``: dark, soft-edged regions cast beside objects (some thin crescents) or by unseen
  occluders.
- ``mirror``: a framed region showing a left-right flipped copy of another part of the image.

Every scene also lists its *promptable regions* (each object, blurred area, shadow area and mirror,
pairwise disjoint; touching blurred regions, or touching shadows, are one area) with their kind, so a
small SAM can be trained class-agnostically on them.

Splits use fixed, disjoint seed ranges: ``train`` seeds ``[0, 50)``, ``test`` seeds
``[10_000, 10_000 + n)``; SAM training uses seeds ``>= SAM_SEED_START`` (1_000_000).

    scene = make_scene("shadow", seed=3)      # Scene(image, mask, regions, region_kinds, text, ...)
    write_split("mirror", "test", "data/mirror_test")   # images/<stem>.png + masks/<stem>.png
"""

from __future__ import annotations

import colorsys
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from alignsam.synthetic.masks import dilate

FAMILIES: tuple[str, ...] = ("semantic", "saliency", "blur", "shadow", "mirror")
"""Task families, in the order of the paper's task types."""

EXTRA_FAMILIES: tuple[str, ...] = ("instances",)
"""Families beyond the paper's (not in the small SAM's training mix): ``instances``, 3-6 red circles per scene (the
target, every one of them) among red squares and triangles (same colour) and orange circles (same shape, a near
colour), like a project labelling every car or every cell."""

REGION_KINDS: tuple[str, ...] = ("object", "blur", "shadow", "mirror")
"""Kinds of promptable regions a scene lists."""

STUFF_KINDS: tuple[str, ...] = ("blur", "shadow")
"""Region kinds without instances: touching regions of one of these kinds are one promptable region."""

CATEGORIES: dict[str, tuple[float, float]] = {
    "circle": (-0.03, 0.03),  # red (hue range as a fraction of the colour wheel)
    "square": (0.57, 0.65),  # blue
    "triangle": (0.27, 0.38),  # green
    "star": (0.12, 0.17),  # yellow
}
"""Semantic categories: shape name -> characteristic hue range."""

FAMILY_TEXT: dict[str, str] = {
    "saliency": "saliency object",
    "blur": "blur",
    "shadow": "shadow",
    "mirror": "mirror",
    "instances": "red circle",
}
"""Text prompt per family (``semantic`` uses the category name)."""

TRAIN_SEED_START = 0
TRAIN_SIZE = 50
TEST_SEED_START = 10_000
TEST_SIZE = 200
SAM_SEED_START = 1_000_000
"""SAM-training scenes use seeds from here on, disjoint from every benchmark split."""

_MIN_REGION_FRACTION = 0.0012  # regions smaller than this share of the image are dropped (~80 px at 256)
_SHAPES = ("circle", "square", "triangle", "star", "ellipse", "hexagon")


@dataclass
class Scene:
    """One synthetic image with its family's target and every promptable region.

    Attributes:
      image: ``[H, W, 3]`` uint8 RGB.
      mask: ``[H, W]`` bool, the family's target pixels (a union of some ``regions``).
      regions: pairwise disjoint ``[H, W]`` bool masks of every promptable region (touching regions of a
        :data:`STUFF_KINDS` kind merged into one).
      region_kinds: kind of each region, one of :data:`REGION_KINDS`.
      text: the family's text prompt (the category name for ``semantic``).
      family: the task family.
      seed: the seed that reproduces this scene.
      target_regions: indices into ``regions`` whose union is ``mask``.
    """

    image: np.ndarray
    mask: np.ndarray
    regions: list[np.ndarray]
    region_kinds: list[str]
    text: str
    family: str
    seed: int
    target_regions: list[int] = field(default_factory=list)

    @property
    def stem(self) -> str:
        """File name stem used by :func:`write_split`."""
        return f"{self.family}_{self.seed:07d}"


# ---------------------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float, angle: float, aspect: float = 1.0) -> list[tuple[float, float]]:
    """Vertices of a named shape of radius ``r`` centred at ``(cx, cy)``, rotated by ``angle``."""
    if shape in ("circle", "ellipse"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        rad = np.ones_like(t)
    elif shape == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    else:
        n = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        rad = np.ones_like(t) * (1.15 if shape == "triangle" else 1.0)
    x = rad * np.cos(t) * r
    y = rad * np.sin(t) * r * aspect
    ca, sa = np.cos(angle), np.sin(angle)
    return [(float(cx + ca * a - sa * b), float(cy + sa * a + ca * b)) for a, b in zip(x, y, strict=True)]


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """An irregular smooth-ish closed polygon (a random star-convex blob)."""
    n = 14
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * np.clip(1 + 0.25 * rng.standard_normal(n), 0.55, 1.5)
    rad = (rad + np.roll(rad, 1) + np.roll(rad, -1)) / 3
    aspect = rng.uniform(0.6, 1.0)
    return [(float(cx + a * np.cos(b)), float(cy + a * aspect * np.sin(b))) for a, b in zip(rad, t, strict=True)]


def _raster(size: int, polygon: list[tuple[float, float]], ellipse: tuple[float, ...] | None = None) -> np.ndarray:
    """Rasterises a polygon (or an axis-aligned ellipse box) to a bool mask."""
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    if ellipse is not None:
        draw.ellipse(ellipse, fill=255)
    else:
        draw.polygon(polygon, fill=255)
    return np.asarray(im) > 127


def _soften(mask: np.ndarray, radius: float) -> np.ndarray:
    """Float alpha in [0, 1]: the mask with a Gaussian-blurred (soft) edge."""
    im = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(im, dtype=np.float32) / 255.0


def _blur_image(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [0, 1], ``[size, size, channels]`` (bicubic upsampled random grid)."""
    grid = (rng.uniform(0, 255, (cells, cells, channels))).astype(np.uint8)
    im = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid).resize((size, size), Image.BICUBIC)
    out = np.asarray(im, dtype=np.float32) / 255.0
    return out[:, :, None] if channels == 1 else out


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates ``[size, size]`` float32 (cached, read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _texture(rng: np.random.Generator, size: int, dull: bool = False) -> np.ndarray:
    """A textured background ``[size, size, 3]`` float32 in [0, 255].

    A low-frequency colour field plus a high-frequency pattern (stripes, checks, grain or dots),
    so that out-of-focus regions look different from sharp ones.
    """
    sat = rng.uniform(0.05, 0.25) if dull else rng.uniform(0.1, 0.6)
    c1 = _hsv(rng.uniform(), sat, rng.uniform(0.35, 0.8))
    c2 = _hsv(rng.uniform(), sat, rng.uniform(0.35, 0.8))
    field_ = _smooth_noise(rng, size, int(rng.integers(2, 6)), 1)
    img = c1 * field_ + c2 * (1 - field_)
    yy, xx = _grid(size)
    kind = rng.integers(0, 4)
    amp = rng.uniform(12, 30) if not dull else rng.uniform(8, 18)
    if kind == 0:  # stripes at a random angle
        period = rng.uniform(5, 14) * size / 256
        ang = rng.uniform(0, np.pi)
        pat = np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period)
    elif kind == 1:  # checks
        cell = max(2, int(rng.uniform(4, 10) * size / 256))
        pat = (((xx // cell) + (yy // cell)) % 2) * 2.0 - 1.0
    elif kind == 2:  # grain
        pat = _smooth_noise(rng, size, size // 3, 1)[:, :, 0] * 4.0 - 2.0
    else:  # dots
        period = rng.uniform(6, 12) * size / 256
        pat = np.cos(2 * np.pi * xx / period) * np.cos(2 * np.pi * yy / period)
    return np.clip(img + amp * pat[:, :, None], 0, 255)


def _shade(rng: np.random.Generator, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Object fill for the pixels of ``mask`` (``[n, 3]``): ``color`` with a gentle linear shading
    gradient and fine noise."""
    ys, xs = np.nonzero(mask)
    size = mask.shape[0]
    ang = rng.uniform(0, 2 * np.pi)
    grad = 1.0 + 0.36 * ((xs / size - 0.5) * np.cos(ang) + (ys / size - 0.5) * np.sin(ang))
    noise = rng.normal(0, 4, len(ys))
    return (color[None, :] * grad[:, None] + noise[:, None]).astype(np.float32)


class _Canvas:
    """A scene under construction: the image and a label map of disjoint regions (painter's order)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image  # float32 [S, S, 3]
        self.size = image.shape[0]
        self.labels = np.full((self.size, self.size), -1, dtype=np.int16)
        self.kinds: list[str] = []
        self.tags: list[str] = []  # e.g. the semantic category or 'salient'

    def add_region(self, mask: np.ndarray, kind: str, tag: str = "") -> int:
        idx = len(self.kinds)
        self.labels[mask] = idx
        self.kinds.append(kind)
        self.tags.append(tag)
        return idx

    def paint(self, mask: np.ndarray, fill: np.ndarray) -> None:
        """Sets the pixels of ``mask`` from ``fill``: a full ``[S, S, 3]`` image or ``[n, 3]`` values."""
        self.image[mask] = fill[mask] if fill.ndim == 3 else fill

    def free(self, mask: np.ndarray) -> float:
        """Share of ``mask`` not yet covered by any region."""
        n = mask.sum()
        return float((self.labels[mask] < 0).sum() / n) if n else 0.0


def _place(
    rng: np.random.Generator, canvas: _Canvas, r_range: tuple[float, float], shape: str, tries: int = 25
) -> tuple[np.ndarray, list[tuple[float, float]], tuple[float, float, float]]:
    """Finds a spot for a shape of radius in ``r_range`` that overlaps existing regions little."""
    s = canvas.size
    best = None
    for _ in range(tries):
        r = rng.uniform(*r_range) * s / 256
        cx, cy = rng.uniform(r * 0.6, s - r * 0.6, 2)
        aspect = rng.uniform(0.5, 0.8) if shape == "ellipse" else 1.0
        poly = _polygon(shape, cx, cy, r, rng.uniform(0, 2 * np.pi), aspect)
        m = _raster(s, poly)
        if m.sum() < 20:
            continue
        free = canvas.free(m)
        if best is None or free > best[0]:
            best = (free, m, poly, (cx, cy, r))
        if free > 0.97:
            break
    assert best is not None
    return best[1], best[2], best[3]


def _object_color(rng: np.random.Generator, shape: str, semantic: bool) -> np.ndarray:
    if semantic:
        lo, hi = CATEGORIES[shape]
        return _hsv(rng.uniform(lo, hi), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    return _hsv(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0))


def _draw_objects(
    rng: np.random.Generator, canvas: _Canvas, n: int, r_range: tuple[float, float]
) -> list[tuple[np.ndarray, list[tuple[float, float]], tuple[float, float, float]]]:
    placed = []
    for _ in range(n):
        shape = str(rng.choice(_SHAPES))
        m, poly, geo = _place(rng, canvas, r_range, shape)
        canvas.paint(m, _shade(rng, m, _object_color(rng, shape, False)))
        canvas.add_region(m, "object")
        placed.append((m, poly, geo))
    return placed


# ---------------------------------------------------------------------------------------- families
def _semantic(rng: np.random.Generator, size: int, category: str | None = None) -> tuple[_Canvas, str, list[int] | None]:
    canvas = _Canvas(_texture(rng, size))
    target = str(rng.choice(list(CATEGORIES)))
    if category is not None:  # a per-category split (one policy per label, as for a Pascal VOC class)
        target = category
    others = [c for c in CATEGORIES if c != target]
    shapes = [target] * int(rng.integers(1, 4)) + [str(rng.choice(others)) for _ in range(int(rng.integers(2, 6)))]
    for shape in rng.permutation(shapes):
        m, _, _ = _place(rng, canvas, (16, 36), str(shape))
        canvas.paint(m, _shade(rng, m, _object_color(rng, str(shape), True)))
        canvas.add_region(m, "object", str(shape))
    return canvas, target, None


def _saliency(rng: np.random.Generator, size: int) -> tuple[_Canvas, str, list[int] | None]:
    canvas = _Canvas(_texture(rng, size, dull=True))
    bg_mean = canvas.image.reshape(-1, 3).mean(0)
    n_small = int(rng.integers(4, 11))
    for _ in range(n_small):
        shape = str(rng.choice(_SHAPES))
        m, _, _ = _place(rng, canvas, (6, 13), shape)
        color = np.clip(bg_mean + rng.normal(0, 18, 3), 0, 255).astype(np.float32)  # dull, low contrast
        canvas.paint(m, _shade(rng, m, color))
        canvas.add_region(m, "object")
    shape = str(rng.choice(_SHAPES))
    m, _, _ = _place(rng, canvas, (34, 62), shape)
    bg_v = float(bg_mean.mean()) / 255
    color = _hsv(rng.uniform(), rng.uniform(0.75, 1.0), 0.95 if bg_v < 0.55 else rng.uniform(0.25, 0.45))
    canvas.paint(m, _shade(rng, m, color))
    idx = canvas.add_region(m, "object", "salient")
    return canvas, "", [idx]


def _blur(rng: np.random.Generator, size: int) -> tuple[_Canvas, str, list[int] | None]:
    canvas = _Canvas(_texture(rng, size))
    _draw_objects(rng, canvas, int(rng.integers(3, 8)), (12, 34))
    sharp = np.clip(canvas.image, 0, 255).astype(np.uint8)
    blurred = _blur_image(sharp, rng.uniform(2.5, 5.0) * size / 256).astype(np.float32)
    targets = []
    for _ in range(int(rng.integers(1, 3))):
        kind = rng.integers(0, 4)
        s = size
        if kind == 0:  # an ellipse
            w, h = rng.uniform(0.25, 0.6, 2) * s
            x0, y0 = rng.uniform(0, s - w), rng.uniform(0, s - h)
            m = _raster(s, [], (x0, y0, x0 + w, y0 + h))
        elif kind == 1:  # a blob
            m = _raster(s, _blob(rng, *rng.uniform(0.25, 0.75, 2) * s, rng.uniform(0.15, 0.3) * s))
        elif kind == 2:  # a band along one side ("defocused background")
            depth = rng.uniform(0.2, 0.45) * s
            side = rng.integers(0, 4)
            yy, xx = np.mgrid[0:s, 0:s]
            wave = depth + 0.06 * s * np.sin(2 * np.pi * (xx if side < 2 else yy) / s * rng.uniform(0.5, 2) + rng.uniform(0, 6))
            coord = [yy, s - 1 - yy, xx, s - 1 - xx][side]
            m = coord < wave
        else:  # a rounded rectangle
            w, h = rng.uniform(0.25, 0.55, 2) * s
            x0, y0 = rng.uniform(0, s - w), rng.uniform(0, s - h)
            im = Image.new("L", (s, s), 0)
            ImageDraw.Draw(im).rounded_rectangle((x0, y0, x0 + w, y0 + h), radius=rng.uniform(4, 20), fill=255)
            m = np.asarray(im) > 127
        canvas.paint(m, blurred)
        targets.append(canvas.add_region(m, "blur"))
    if rng.uniform() < 0.5:  # a sharp object in front of the defocused area
        _draw_objects(rng, canvas, 1, (12, 26))
    return canvas, "", None


def _cast_shadow(
    rng: np.random.Generator, canvas: _Canvas, poly: list[tuple[float, float]], geo: tuple[float, float, float],
    obj: np.ndarray, light: float,
) -> None:
    cx, cy, r = geo
    crescent = rng.uniform() < 0.35
    dist = r * (rng.uniform(0.22, 0.4) if crescent else rng.uniform(0.5, 1.1))
    dx, dy = dist * np.cos(light), dist * np.sin(light)
    scale = 1.0 if crescent else rng.uniform(1.0, 1.3)
    shifted = [(cx + (x - cx) * scale + dx, cy + (y - cy) * scale + dy) for x, y in poly]
    m = _raster(canvas.size, shifted)
    _darken(rng, canvas, m, obj)


def _darken(rng: np.random.Generator, canvas: _Canvas, m: np.ndarray, exclude: np.ndarray) -> None:
    alpha = _soften(m, rng.uniform(1.0, 2.5) * canvas.size / 256)
    strength = rng.uniform(0.45, 0.7)
    canvas.image *= (1 - strength * alpha)[:, :, None]
    region = (alpha > 0.5) & ~exclude
    canvas.add_region(region, "shadow")


def _shadow(rng: np.random.Generator, size: int) -> tuple[_Canvas, str, list[int] | None]:
    canvas = _Canvas(_texture(rng, size))
    light = rng.uniform(0, 2 * np.pi)
    n = int(rng.integers(2, 5))
    # Place the objects first (to know where they go), cast their shadows, then draw them on top.
    colors, placed = [], []
    for _ in range(n):
        shape = str(rng.choice(_SHAPES))
        m, poly, geo = _place(rng, canvas, (18, 42), shape)
        canvas.labels[m] = -2  # reserve the spot
        placed.append((m, poly, geo))
        colors.append(_object_color(rng, shape, False))
    canvas.labels[canvas.labels == -2] = -1
    objects = np.zeros((size, size), bool)
    for m, _, _ in placed:
        objects |= m
    for _ in range(int(rng.integers(0, 3))):  # shadows of unseen occluders
        m = _raster(size, _blob(rng, *rng.uniform(0.15, 0.85, 2) * size, rng.uniform(0.08, 0.2) * size))
        _darken(rng, canvas, m, objects)
    for _m, poly, geo in placed:
        if rng.uniform() < 0.85:
            _cast_shadow(rng, canvas, poly, geo, objects, light)
    for (m, _, _), color in zip(placed, colors, strict=True):
        canvas.paint(m, _shade(rng, m, color))
        canvas.add_region(m, "object")
    return canvas, "", None


def _mirror(rng: np.random.Generator, size: int) -> tuple[_Canvas, str, list[int] | None]:
    canvas = _Canvas(_texture(rng, size))
    _draw_objects(rng, canvas, int(rng.integers(4, 9)), (12, 34))
    s = size
    for _ in range(1 if rng.uniform() < 0.75 else 2):
        w, h = (rng.uniform(0.25, 0.5, 2) * s).astype(int)
        x0, y0 = int(rng.integers(0, s - w)), int(rng.integers(0, s - h))
        sx, sy = int(rng.integers(0, s - w)), int(rng.integers(0, s - h))
        src = np.clip(canvas.image[sy : sy + h, sx : sx + w], 0, 255)
        content = src[:, ::-1] * rng.uniform(0.8, 1.0) + _hsv(rng.uniform(0.5, 0.65), 0.3, 1.0) * rng.uniform(0.0, 0.12)
        full = np.zeros_like(canvas.image)
        full[y0 : y0 + h, x0 : x0 + w] = content
        box = (x0, y0, x0 + w - 1, y0 + h - 1)
        oval = rng.uniform() < 0.35
        outer = _raster(s, [], box) if oval else np.zeros((s, s), bool)
        if not oval:
            outer[y0 : y0 + h, x0 : x0 + w] = True
        t = max(2, int(rng.uniform(3, 7) * s / 256))
        inner_box = (x0 + t, y0 + t, x0 + w - 1 - t, y0 + h - 1 - t)
        inner = _raster(s, [], inner_box) if oval else np.zeros((s, s), bool)
        if not oval:
            inner[y0 + t : y0 + h - t, x0 + t : x0 + w - t] = True
        frame_color = _hsv(rng.uniform(), rng.uniform(0.0, 0.6), rng.uniform(0.1, 0.9))
        canvas.paint(outer & ~inner, np.broadcast_to(frame_color, canvas.image.shape))
        canvas.labels[outer & ~inner] = -1  # the frame is not a region
        canvas.paint(inner, full)
        canvas.add_region(inner, "mirror")
    return canvas, "", None


def _instances(rng: np.random.Generator, size: int) -> tuple[_Canvas, str, list[int] | None]:
    canvas = _Canvas(_texture(rng, size))
    red = CATEGORIES["circle"]
    items = [("circle", red, True)] * int(rng.integers(3, 7))
    items += [(str(rng.choice(["square", "triangle"])), red, False) for _ in range(int(rng.integers(2, 4)))]
    items += [("circle", (0.06, 0.10), False) for _ in range(int(rng.integers(1, 3)))]  # orange
    targets = []
    for n in rng.permutation(len(items)):
        shape, (lo, hi), is_target = items[int(n)]
        m, _, _ = _place(rng, canvas, (12, 24), shape)
        color = _hsv(rng.uniform(lo, hi) % 1.0, rng.uniform(0.7, 1.0), rng.uniform(0.65, 1.0))
        canvas.paint(m, _shade(rng, m, color))
        idx = canvas.add_region(m, "object", "target" if is_target else shape)
        if is_target:
            targets.append(idx)
    return canvas, "", sorted(targets)


_BUILDERS = {"semantic": _semantic, "saliency": _saliency, "blur": _blur, "shadow": _shadow, "mirror": _mirror,
             "instances": _instances}
_TARGET_KIND = {"blur": "blur", "shadow": "shadow", "mirror": "mirror"}


def _region_groups(canvas: _Canvas) -> list[list[int]]:
    """The canvas's regions as promptable regions: lists of label indices, one list per region.

    Regions of a *stuff* kind (:data:`STUFF_KINDS`) that touch are one region; every other region stands alone.
    Where two blurred regions touch, both show the same blurred copy of the scene, and where two shadows touch
    or overlap, they form one dark area: nothing in the image says where one ends, so the painter's-order split
    of the label map would be an arbitrary, unlearnable boundary for a click-prompted model. The paper's blur
    and shadow datasets (CUHK, SBU) label these kinds as binary masks, not instances, too. Objects keep their
    instances (they differ in colour and shape), and each mirror has a frame.
    """
    n = len(canvas.kinds)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for kind in STUFF_KINDS:
        idx = [i for i, k in enumerate(canvas.kinds) if k == kind]
        masks = {i: canvas.labels == i for i in idx}
        for a_pos, a in enumerate(idx):
            grown = dilate(masks[a])
            for b in idx[a_pos + 1 :]:
                if (grown & masks[b]).any():
                    parent[root(b)] = root(a)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def make_scene(family: str, seed: int, size: int = 256, category: str | None = None) -> Scene:
    """Draws the scene of ``family`` for ``seed`` (deterministic) at ``size`` x ``size`` pixels.

    ``category`` (semantic family only): the target category, one of :data:`CATEGORIES`; None draws one per
    scene (the SAM-training mix). A benchmark split of the semantic family fixes it, like one Pascal VOC class.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown task family {family!r}; choose one of: {', '.join(FAMILIES + EXTRA_FAMILIES)}")
    rng = np.random.default_rng([(FAMILIES + EXTRA_FAMILIES).index(family), int(seed)])
    if category is not None:
        if family != "semantic":
            raise ValueError(f"only the semantic family has categories, not {family!r}")
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; choose one of: {', '.join(CATEGORIES)}")
        canvas, category, target_idx = _semantic(rng, size, category)
    else:
        canvas, category, target_idx = _BUILDERS[family](rng, size)
    image = np.clip(canvas.image, 0, 255).astype(np.uint8)
    min_area = _MIN_REGION_FRACTION * size * size
    regions, kinds, old_to_new = [], [], {}
    for group in _region_groups(canvas):
        m = np.isin(canvas.labels, group)
        if m.sum() >= min_area:
            for i in group:
                old_to_new[i] = len(regions)
            regions.append(m)
            kinds.append(canvas.kinds[group[0]])
    if family == "semantic":
        old = [i for i, t in enumerate(canvas.tags) if t == category]
    elif target_idx is not None:
        old = target_idx
    else:
        old = [i for i, k in enumerate(canvas.kinds) if k == _TARGET_KIND[family]]
    targets = [old_to_new[i] for i in old if i in old_to_new]
    mask = np.zeros((size, size), bool)
    for i in targets:
        mask |= regions[i]
    text = category if family == "semantic" else FAMILY_TEXT[family]
    return Scene(image, mask, regions, kinds, text, family, int(seed), targets)


# ---------------------------------------------------------------------------------------- splits
def split_seeds(split: str, n: int | None = None) -> range:
    """Seeds of a benchmark split: ``train`` ``[0, 50)``, ``test`` ``[10_000, 10_000 + n)``."""
    if split == "train":
        n = TRAIN_SIZE if n is None else n
        if n > TEST_SEED_START - TRAIN_SEED_START:
            raise ValueError(f"train split holds at most {TEST_SEED_START} scenes")
        return range(TRAIN_SEED_START, TRAIN_SEED_START + n)
    if split == "test":
        n = TEST_SIZE if n is None else n
        if n > SAM_SEED_START - TEST_SEED_START:
            raise ValueError("test split too large: it would reach the SAM-training seeds")
        return range(TEST_SEED_START, TEST_SEED_START + n)
    raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")


def make_split(family: str, split: str, n: int | None = None, size: int = 256, category: str | None = None) -> list[Scene]:
    """The scenes of a benchmark split (50 train, 200 test by default); ``category``: see :func:`make_scene`."""
    return [make_scene(family, s, size, category) for s in split_seeds(split, n)]


def write_split(
    family: str, split: str, out_dir: str | os.PathLike, n: int | None = None, size: int = 256
) -> Path:
    """Writes a split as ``out_dir/images/<stem>.png`` and ``out_dir/masks/<stem>.png`` (0/255).

    Also writes ``out_dir/text.txt`` with the family's text prompt(s), one per line in the order of
    the scenes (semantic scenes differ in category). Returns ``out_dir``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    texts = []
    for seed in split_seeds(split, n):
        scene = make_scene(family, seed, size)
        Image.fromarray(scene.image).save(out / "images" / f"{scene.stem}.png")
        Image.fromarray(scene.mask.astype(np.uint8) * 255).save(out / "masks" / f"{scene.stem}.png")
        texts.append(f"{scene.stem}\t{scene.text}")
    (out / "text.txt").write_text("\n".join(texts) + "\n")
    return out
