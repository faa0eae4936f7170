"""Prompts of the small SAM's training and evaluation that both scripts draw the same way
(``benchmarks/train_small_sam.py``, ``benchmarks/eval_small_sam.py``): AlignSAM-like grid point sets, boxes, and the
seeds of the in-training validation scenes."""

from __future__ import annotations

import math

import numpy as np

from alignsam.synthetic import dilate

VAL_SEED_START = 500_000
"""Seeds of the in-training validation scenes (disjoint from train/test splits and SAM training)."""


def grid_point_set(
    rng: np.random.Generator, region: np.ndarray, n: int, grid: int = 10, jitter: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """An AlignSAM-like prompt for one region: ``n`` distinct patch centres of a ``grid`` x ``grid`` map over
    the scene, labelled by the region (1 inside, 0 outside). Returns ``[n, 2]`` (x, y) points in scene pixels
    and ``[n]`` labels.

    At least one point is positive: 1 .. max(1, n // 3) positive cells, the rest negatives, negatives near the
    region (centre within one cell of it) three times as likely as the others. A region with no cell centre
    inside gets a positive at its pixel nearest the centre of the cell it covers most (the agent's positive
    click snapped onto the region). ``jitter`` moves each point by up to that fraction of a cell (its label
    follows the moved point, the snapped positive stays on the region).
    """
    h, w = region.shape
    ch, cw = h / grid, w / grid
    cy = np.minimum(((np.arange(grid) + 0.5) * ch).astype(int), h - 1)
    cx = np.minimum(((np.arange(grid) + 0.5) * cw).astype(int), w - 1)
    gy, gx = np.meshgrid(cy, cx, indexing="ij")
    gy, gx = gy.ravel(), gx.ravel()
    inside = region[gy, gx]
    near = dilate(region, math.ceil(max(ch, cw)))[gy, gx] & ~inside
    pos_cells = np.flatnonzero(inside)
    n_pos = int(rng.integers(1, max(1, min(len(pos_cells), n // 3)) + 1))
    pts: list[tuple[float, float]] = []
    if len(pos_cells):
        for c in rng.choice(pos_cells, size=min(n_pos, len(pos_cells)), replace=False):
            pts.append((float(gx[c]), float(gy[c])))
        snapped = None
    else:
        cover = [region[int(r * ch) : int((r + 1) * ch), int(c * cw) : int((c + 1) * cw)].sum()
                 for r in range(grid) for c in range(grid)]
        c = int(np.argmax(cover))
        ys, xs = np.nonzero(region)
        i = int(np.argmin((ys - gy[c]) ** 2 + (xs - gx[c]) ** 2))
        snapped = (float(xs[i]), float(ys[i]))
        pts.append(snapped)
    neg_cells = np.flatnonzero(~inside)
    wn = np.where(near[neg_cells], 3.0, 1.0)
    k = min(n - len(pts), len(neg_cells))
    for c in rng.choice(neg_cells, size=k, replace=False, p=wn / wn.sum()):
        pts.append((float(gx[c]), float(gy[c])))
    xy = np.array(pts, np.float32)
    if jitter > 0:
        shift = rng.uniform(-jitter, jitter, xy.shape) * np.array([cw, ch], np.float32)
        if snapped is not None:
            shift[0] = 0.0
        xy = np.clip(xy + shift, 0, [w - 1, h - 1]).astype(np.float32)
    labels = region[xy[:, 1].astype(int), xy[:, 0].astype(int)].astype(np.int64)
    if snapped is not None:
        labels[0] = 1
    return xy, labels


def region_box(region: np.ndarray) -> np.ndarray:
    """Tight box ``[4]`` (x0, y0, x1, y1) of a region in scene pixels (x1, y1: one past the last pixel)."""
    ys, xs = np.nonzero(region)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def jittered_box(rng: np.random.Generator, region: np.ndarray, jitter: float) -> np.ndarray:
    """The region's tight box with each side moved independently by up to ``jitter`` times the box's width
    (x sides) or height (y sides), inwards or outwards, clipped to the scene and at least 2 px wide and high."""
    h, w = region.shape
    x0, y0, x1, y1 = region_box(region)
    bw, bh = x1 - x0, y1 - y0
    d = rng.uniform(-jitter, jitter, 4) * np.array([bw, bh, bw, bh])
    x0, y0, x1, y1 = x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3]
    x0, x1 = np.clip(x0, 0, w - 2), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h - 2), np.clip(y1, 0, h)
    x1, y1 = max(x1, x0 + 2), max(y1, y0 + 2)
    return np.array([x0, y0, x1, y1], np.float32)


def validation_seeds(family_index: int, n: int) -> range:
    """Seeds of the first ``n`` validation scenes of family ``FAMILIES[family_index]`` (at most 1000)."""
    if n > 1000:
        raise ValueError("at most 1000 validation scenes per family")
    start = VAL_SEED_START + 1000 * family_index
    return range(start, start + n)
