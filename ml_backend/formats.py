"""Label Studio region formats <-> binary masks, and prediction results built from masks.

Conventions (all masks here are 2-D ``bool`` arrays of shape ``(original_height, original_width)``, in the
image's natural orientation):

- **Brush** results carry Label Studio's RLE (``value.rle``): a run-length encoding of the RGBA canvas, of which
  the alpha channel is the mask (``label_studio_sdk.converter.brush.decode_rle`` ->
  ``reshape(H, W, 4)[:, :, 3]``). We encode with ``mask2rle`` (0/255, one channel repeated four times).
- **Polygon** results carry ``value.points``: ``[[x%, y%], ...]``, percent of the image width / height, in
  continuous image coordinates (``0`` is the left/top edge of the first pixel, ``100`` the right/bottom edge of
  the last). A pixel belongs to a polygon when its *centre* is inside it (even-odd rule). This is exact for
  polygons traced from a mask along pixel edges, so mask -> polygons -> mask returns the same mask (holes are
  filled: Label Studio polygons have none). We rasterize with numpy instead of ``PIL.ImageDraw.polygon``
  because ImageDraw includes the right/bottom boundary pixels, which would grow every round trip by a pixel.
- **Rotation**: ``original_width``/``original_height`` are the natural image size; ``image_rotation`` (degrees,
  clockwise, multiples of 90) is the rotation the annotator had applied in the editor, and region coordinates
  / RLE canvases are taken as relative to that rotated view. We decode in the rotated frame and rotate back, so
  masks are always in the natural orientation. Predictions are emitted with ``image_rotation: 0``.
- The union of all regions of a label in one annotation is that label's mask; a target without regions has an
  empty mask (a valid "nothing here" label).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from ml_backend.errors import FormatError
from ml_backend.label_config import LabelConfig

Mask = np.ndarray  # 2-D bool array, (height, width)

# Edge directions in image coordinates (x right, y down), and the right-turn-first preference used when a
# vertex has two outgoing edges (two pixels touching only at a corner are then traced as separate polygons).
_DIRS: tuple[tuple[int, int], ...] = ((1, 0), (0, 1), (-1, 0), (0, -1))


# ---------------------------------------------------------------------------------------------------------
# Rotation helpers
# ---------------------------------------------------------------------------------------------------------
def rotation_steps(image_rotation: float | int | None) -> int:
    """Number of clockwise quarter turns in ``image_rotation`` (0..3); other angles raise FormatError."""
    degrees = float(image_rotation or 0)
    if degrees % 90:
        raise FormatError(
            f"image_rotation={degrees} is not a multiple of 90 degrees; reset the image rotation in the "
            "Label Studio editor and save the annotation again."
        )
    return int(degrees // 90) % 4


def _view_size(width: int, height: int, steps: int) -> tuple[int, int]:
    """(width, height) of the image as displayed after ``steps`` clockwise quarter turns."""
    return (height, width) if steps % 2 else (width, height)


def _unrotate(view_mask: Mask, steps: int) -> Mask:
    """Undo ``steps`` clockwise quarter turns (``np.rot90`` turns counter-clockwise)."""
    return np.ascontiguousarray(np.rot90(view_mask, steps)) if steps else view_mask


def _check_size(width: Any, height: Any) -> tuple[int, int]:
    try:
        w, h = int(width), int(height)
    except (TypeError, ValueError) as exc:
        raise FormatError(
            f"original_width/original_height must be integers, got {width!r}/{height!r}."
        ) from exc
    if w <= 0 or h <= 0:
        raise FormatError(f"original_width/original_height must be positive, got {w}x{h}.")
    return w, h


# ---------------------------------------------------------------------------------------------------------
# Brush RLE
# ---------------------------------------------------------------------------------------------------------
def brush_rle_to_mask(rle: Sequence[int], width: int, height: int, image_rotation: float = 0) -> Mask:
    """Decode a Label Studio brush RLE into a mask of shape ``(height, width)`` (natural orientation)."""
    width, height = _check_size(width, height)
    steps = rotation_steps(image_rotation)
    view_w, view_h = _view_size(width, height, steps)
    if not rle:
        return np.zeros((height, width), dtype=bool)
    try:
        flat = decode_rle(list(rle))
    except Exception as exc:  # the SDK decoder raises IndexError/ValueError on truncated input
        raise FormatError(f"The brush RLE cannot be decoded ({exc}); re-save the annotation.") from exc
    expected = view_w * view_h * 4
    if flat.size != expected:
        raise FormatError(
            f"The brush RLE holds {flat.size} values but original_width x original_height x 4 = {expected}; "
            "the annotation was made on a different image size."
        )
    alpha = flat.reshape(view_h, view_w, 4)[:, :, 3]
    return _unrotate(alpha > 127, steps)


def mask_to_brush_rle(mask: Mask) -> list[int]:
    """Encode a 2-D mask as Label Studio brush RLE."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise FormatError(f"A mask must be 2-D (height, width), got shape {mask.shape}.")
    return [int(v) for v in mask2rle((mask > 0).astype(np.uint8) * 255)]


# ---------------------------------------------------------------------------------------------------------
# Polygons
# ---------------------------------------------------------------------------------------------------------
def rasterize_polygon(points_px: np.ndarray | Sequence[Sequence[float]], width: int, height: int) -> Mask:
    """Pixels whose centre lies inside the polygon (even-odd rule); ``points_px`` is ``(N, 2)`` of (x, y)."""
    pts = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros((height, width), dtype=bool)
    if len(pts) < 3:
        return mask
    x0, y0 = pts[:, 0], pts[:, 1]
    nxt = np.roll(pts, -1, axis=0)
    x1, y1 = nxt[:, 0], nxt[:, 1]
    keep = y0 != y1
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    # Rows whose centre r + 0.5 lies in [ymin, ymax): half-open, so a shared vertex counts once.
    r_start = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, height).astype(np.int64)
    r_stop = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, height).astype(np.int64)
    counts = np.maximum(r_stop - r_start, 0)
    if counts.sum() == 0:
        return mask
    edge = np.repeat(np.arange(len(counts)), counts)
    rows = r_start[edge] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    yc = rows + 0.5
    xc = x0[edge] + (yc - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    # A crossing toggles every pixel whose centre is at or right of it.
    cols = np.clip(np.ceil(xc - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(toggles, (rows, cols), 1)
    return (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)


def polygon_to_mask(
    points_percent: Sequence[Sequence[float]], width: int, height: int, image_rotation: float = 0
) -> Mask:
    """Rasterize Label Studio polygon points (percent) into a mask of shape ``(height, width)``."""
    width, height = _check_size(width, height)
    steps = rotation_steps(image_rotation)
    view_w, view_h = _view_size(width, height, steps)
    try:
        pts = np.asarray(points_percent, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"Polygon points must be [[x%, y%], ...], got {points_percent!r:.200}.") from exc
    if not np.isfinite(pts).all():
        raise FormatError("Polygon points contain NaN or infinity; redraw the polygon.")
    pts = pts * np.array([view_w / 100.0, view_h / 100.0])
    return _unrotate(rasterize_polygon(pts, view_w, view_h), steps)


def _trace_boundary_loops(mask: Mask) -> list[np.ndarray]:
    """Closed loops along pixel edges with the foreground on the right (outer loops: positive area).

    Returns each loop as an ``(N, 2)`` int array of (x, y) pixel-corner vertices, collinear runs merged.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    above, below = m[:-1, 1:-1], m[1:, 1:-1]  # (H+1, W): rows above / below the horizontal line y
    left, right = m[1:-1, :-1], m[1:-1, 1:]  # (H, W+1): columns left / right of the vertical line x
    starts: list[np.ndarray] = []
    dirs: list[int] = []
    ys, xs = np.nonzero(below & ~above)  # top edge of a foreground pixel: walk +x
    starts.append(np.stack([xs, ys], 1))
    dirs += [0] * len(xs)
    ys, xs = np.nonzero(left & ~right)  # right edge: walk +y
    starts.append(np.stack([xs, ys], 1))
    dirs += [1] * len(xs)
    ys, xs = np.nonzero(above & ~below)  # bottom edge: walk -x from the right corner
    starts.append(np.stack([xs + 1, ys], 1))
    dirs += [2] * len(xs)
    ys, xs = np.nonzero(right & ~left)  # left edge: walk -y from the lower corner
    starts.append(np.stack([xs, ys + 1], 1))
    dirs += [3] * len(xs)
    start = np.concatenate(starts).astype(np.int64)
    if len(start) == 0:
        return []
    direction = np.asarray(dirs, dtype=np.int64)
    dvec = np.asarray(_DIRS, dtype=np.int64)
    end = start + dvec[direction]

    outgoing: dict[tuple[int, int], dict[int, int]] = {}
    for i, (x, y) in enumerate(start.tolist()):
        outgoing.setdefault((x, y), {})[int(direction[i])] = i
    n = len(start)
    successor = np.empty(n, dtype=np.int64)
    end_list = end.tolist()
    dir_list = direction.tolist()
    for i in range(n):
        options = outgoing[(end_list[i][0], end_list[i][1])]
        d = dir_list[i]
        for turn in (1, 0, 3):  # right turn, straight on, left turn
            j = options.get((d + turn) % 4)
            if j is not None:
                successor[i] = j
                break
        else:  # pragma: no cover - boundaries of a binary image always continue
            raise FormatError("Internal error while tracing a mask boundary.")

    visited = np.zeros(n, dtype=bool)
    loops: list[np.ndarray] = []
    succ = successor.tolist()
    for first in range(n):
        if visited[first]:
            continue
        chain: list[int] = []
        i = first
        while not visited[i]:
            visited[i] = True
            chain.append(i)
            i = succ[i]
        idx = np.asarray(chain)
        turns = direction[idx] != direction[np.roll(idx, 1)]
        loops.append(start[idx[turns]])
    return loops


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _douglas_peucker(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Simplify an open polyline; keeps both end points."""
    if len(points) < 3 or tolerance <= 0:
        return points
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    pts = points.astype(np.float64)
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        seg = pts[b] - pts[a]
        rel = pts[a + 1 : b] - pts[a]
        length = float(np.hypot(*seg))
        if length == 0:
            dist = np.hypot(rel[:, 0], rel[:, 1])
        else:
            dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / length
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            keep[a + 1 + k] = True
            stack += [(a, a + 1 + k), (a + 1 + k, b)]
    return points[keep]


def _simplify_loop(loop: np.ndarray, tolerance: float) -> np.ndarray:
    if tolerance <= 0 or len(loop) <= 4:
        return loop
    far = int(np.argmax(np.hypot(*(loop - loop[0]).T)))
    first = _douglas_peucker(np.vstack([loop[: far + 1]]), tolerance)
    second = _douglas_peucker(np.vstack([loop[far:], loop[:1]]), tolerance)
    return np.vstack([first[:-1], second[:-1]])


def mask_to_polygons(mask: Mask, simplify_px: float = 0.0, min_area_px: float = 0.0) -> list[np.ndarray]:
    """Outer boundaries of the mask's 4-connected components, as ``(N, 2)`` float arrays of (x, y) pixels.

    Holes are not returned (Label Studio polygons cannot have holes). ``simplify_px`` > 0 applies
    Douglas-Peucker with that tolerance; polygons with an area below ``min_area_px`` are dropped.
    """
    polygons: list[np.ndarray] = []
    for loop in _trace_boundary_loops(mask):
        area = _signed_area(loop)
        if area <= 0 or area < min_area_px:
            continue
        simplified = _simplify_loop(loop, simplify_px)
        if len(simplified) >= 3 and _signed_area(simplified) > 0:
            polygons.append(simplified.astype(np.float64))
    return polygons


def polygon_px_to_percent(points_px: np.ndarray, width: int, height: int) -> list[list[float]]:
    """Pixel (x, y) points -> Label Studio percent points, rounded to 1e-4 %."""
    scale = np.array([100.0 / width, 100.0 / height])
    return [[round(float(x), 4), round(float(y), 4)] for x, y in np.asarray(points_px) * scale]


# ---------------------------------------------------------------------------------------------------------
# Results <-> masks
# ---------------------------------------------------------------------------------------------------------
def result_labels(result: Mapping[str, Any]) -> list[str]:
    """Label values a brush/polygon result carries (``value.brushlabels`` / ``value.polygonlabels``)."""
    value = result.get("value") or {}
    rtype = str(result.get("type", "")).lower()
    labels = value.get(rtype) if rtype else None
    if labels is None:
        labels = value.get("brushlabels") or value.get("polygonlabels") or []
    return [str(label) for label in labels]


def result_to_mask(result: Mapping[str, Any]) -> Mask:
    """Decode one brush or polygon result into a mask in the natural image orientation."""
    rtype = str(result.get("type", "")).lower()
    value = result.get("value")
    if not isinstance(value, Mapping):
        raise FormatError(f"Result {result.get('id')!r} has no `value` object.")
    width, height = result.get("original_width"), result.get("original_height")
    rotation = result.get("image_rotation") or 0
    if rtype in ("brushlabels", "brush"):
        if value.get("format", "rle") != "rle":
            raise FormatError(f"Brush format {value.get('format')!r} is not supported; only 'rle' is.")
        return brush_rle_to_mask(value.get("rle") or [], width, height, rotation)
    if rtype in ("polygonlabels", "polygon"):
        return polygon_to_mask(value.get("points") or [], width, height, rotation)
    raise FormatError(f"Result type {rtype!r} is not a brush or polygon result.")


def annotation_to_masks(
    results: Iterable[Mapping[str, Any]],
    config: LabelConfig,
    width: int | None = None,
    height: int | None = None,
) -> dict[str, Mask]:
    """Union of all regions per target label of one annotation's ``result`` list.

    Only results of ``config``'s control (``from_name``) count. Every target gets a mask; targets without a
    region get an empty one. The image size comes from the results (``original_width``/``original_height``),
    else from ``width``/``height``; with neither (an empty annotation and no size), returns ``{}``.
    """
    relevant = [
        r
        for r in results
        if isinstance(r, Mapping)
        and r.get("from_name") == config.control_name
        and str(r.get("type", "")).lower() in ("brushlabels", "polygonlabels", "brush", "polygon")
    ]
    sizes = {_check_size(r.get("original_width"), r.get("original_height")) for r in relevant}
    if len(sizes) > 1:
        raise FormatError(f"Regions of one annotation disagree on the image size: {sorted(sizes)}.")
    if sizes:
        w, h = sizes.pop()
    elif width and height:
        w, h = int(width), int(height)
    else:
        return {}
    masks = {t.label: np.zeros((h, w), dtype=bool) for t in config.targets}
    for result in relevant:
        region = result_to_mask(result)
        for label in result_labels(result):
            target = config.target_for(label)
            if target is not None:
                masks[target.label] |= region
    return masks


def brush_result(
    mask: Mask, label: str, config: LabelConfig, score: float, region_id: str | None = None
) -> dict[str, Any]:
    """A Label Studio ``brushlabels`` prediction result for one label's mask."""
    height, width = mask.shape
    return {
        "id": region_id or uuid.uuid4().hex[:10],
        "from_name": config.control_name,
        "to_name": config.image_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]},
        "score": float(score),
        "readonly": False,
    }


def polygon_results(
    mask: Mask,
    label: str,
    config: LabelConfig,
    score: float,
    simplify_px: float = 0.0,
    min_area_px: float = 0.0,
) -> list[dict[str, Any]]:
    """One Label Studio ``polygonlabels`` result per connected component of one label's mask."""
    height, width = mask.shape
    results = []
    for polygon in mask_to_polygons(mask, simplify_px=simplify_px, min_area_px=min_area_px):
        results.append(
            {
                "id": uuid.uuid4().hex[:10],
                "from_name": config.control_name,
                "to_name": config.image_name,
                "type": "polygonlabels",
                "original_width": int(width),
                "original_height": int(height),
                "image_rotation": 0,
                "value": {
                    "points": polygon_px_to_percent(polygon, width, height),
                    "closed": True,
                    "polygonlabels": [label],
                },
                "score": float(score),
                "readonly": False,
            }
        )
    return results


def masks_to_results(
    masks: Mapping[str, Mask],
    config: LabelConfig,
    scores: Mapping[str, float] | float = 1.0,
    simplify_px: float = 0.0,
    min_area_px: float = 0.0,
    instances: Mapping[str, Sequence[Mask]] | None = None,
) -> list[dict[str, Any]]:
    """Prediction results for ``{label: mask}``: brush results, or polygons when the config uses PolygonLabels.

    ``instances``: per label, its instances' masks; a label with more than one becomes one brush region per
    instance when :meth:`LabelConfig.regions_per_instance` says so. Empty masks produce no region. Labels not in
    the config raise :class:`FormatError`.
    """
    results: list[dict[str, Any]] = []
    for label, mask in masks.items():
        if config.target_for(label) is None:
            raise FormatError(f"Label {label!r} is not in the labelling config ({config.labels}).")
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            continue
        score = scores if isinstance(scores, float | int) else scores.get(label, 1.0)
        parts = [np.asarray(m, dtype=bool) for m in (instances or {}).get(label, ())]
        if config.control_type == "PolygonLabels":
            results += polygon_results(mask, label, config, score, simplify_px, min_area_px)
        elif len(parts) > 1 and config.regions_per_instance(label, True):
            results += [brush_result(m, label, config, score) for m in parts if m.any()]
        else:
            results.append(brush_result(mask, label, config, score))
    return results


def task_prediction(
    results: list[dict[str, Any]], model_version: str, score: float | None = None
) -> dict[str, Any]:
    """One entry of ``/predict``'s ``results``: the task's regions, an overall score and the model version."""
    if score is None:
        score = float(np.mean([r.get("score", 0.0) for r in results])) if results else 0.0
    return {"result": results, "score": float(score), "model_version": model_version}


def empty_prediction(model_version: str) -> dict[str, Any]:
    """The prediction of a task we could not (or need not) segment: no regions, score 0."""
    return {"result": [], "score": 0, "model_version": model_version}
