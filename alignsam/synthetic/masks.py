"""Binary-mask helpers shared by the testbed, the benchmarks and simulated annotators: 3x3 dilation and erosion,
the interior-most point of a region, and the next corrective click of the NoC protocol."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """``steps`` steps of 3x3 (8-neighbour) binary dilation; pixels outside the image count as background (so,
    unlike ``~erode(~mask)``, the image border is not switched on)."""
    out = mask
    for _ in range(steps):
        m = out
        out = m.copy()
        out[1:, :] |= m[:-1, :]
        out[:-1, :] |= m[1:, :]
        out[:, 1:] |= m[:, :-1]
        out[:, :-1] |= m[:, 1:]
        out[1:, 1:] |= m[:-1, :-1]
        out[:-1, :-1] |= m[1:, 1:]
        out[1:, :-1] |= m[:-1, 1:]
        out[:-1, 1:] |= m[1:, :-1]
    return out


def erode(mask: np.ndarray) -> np.ndarray:
    """One step of 3x3 (8-neighbour) binary erosion; pixels outside the image count as background."""
    m = mask
    out = m.copy()
    out[1:, :] &= m[:-1, :]
    out[:-1, :] &= m[1:, :]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    out[1:, 1:] &= m[:-1, :-1]
    out[:-1, :-1] &= m[1:, 1:]
    out[1:, :-1] &= m[:-1, 1:]
    out[:-1, 1:] &= m[1:, :-1]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def interior_point(mask: np.ndarray) -> tuple[int, int] | None:
    """The pixel of ``mask`` farthest from its boundary (chessboard distance), as ``(x, y)``.

    Erodes until nothing is left and returns the point of the last non-empty set that lies
    closest to that set's centroid; ``None`` for an empty mask. Costs about one pass per pixel of
    depth (a few ms at 256 px).
    """
    cur = np.asarray(mask, dtype=bool)
    if not cur.any():
        return None
    while True:
        nxt = erode(cur)
        if not nxt.any():
            break
        cur = nxt
    ys, xs = np.nonzero(cur)
    cy, cx = ys.mean(), xs.mean()
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[i]), int(ys[i])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool mask (flood fill via PIL, small masks fast)."""
    if not mask.any():
        return mask
    im = Image.fromarray(mask.astype(np.uint8)).copy()  # a writable copy (fromarray may share memory)
    ys, xs = np.nonzero(mask)
    remaining = mask.copy()
    best, best_n = mask, -1
    label = 2
    while remaining.any() and label < 250:
        ys, xs = np.nonzero(remaining)
        ImageDraw.floodfill(im, (int(xs[0]), int(ys[0])), label)
        comp = np.asarray(im) == label
        n = int(comp.sum())
        if n > best_n:
            best, best_n = comp, n
        remaining &= ~comp
        label += 1
        if best_n > remaining.sum():
            break
    return best


def corrective_click(pred: np.ndarray, target: np.ndarray) -> tuple[tuple[int, int], int] | None:
    """The next simulated click (NoC-style): the interior-most point of the largest error region.

    Returns ``((x, y), label)`` with label 1 on missed foreground and 0 on a false positive, or
    ``None`` when the prediction is exact.
    """
    fn = target & ~pred
    fp = pred & ~target
    if not fn.any() and not fp.any():
        return None
    fn_c = _largest_component(fn)
    fp_c = _largest_component(fp)
    if fn_c.sum() >= fp_c.sum():
        return interior_point(fn_c), 1  # type: ignore[return-value]
    return interior_point(fp_c), 0  # type: ignore[return-value]
