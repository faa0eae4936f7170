"""Every instance of the target: the SRM's foreground map split into instances, SAM prompted once per instance.

SAM answers scattered positive clicks on separate objects with one mask, and the policy's positive points land on
one instance in most multi-object scenes (measured on ``semantic:circle``: 1.05 of 1.95 target objects get a
positive point, while the SRM's foreground map has 2.1 connected components; ``benchmarks/results/instances.md``).
So, after the policy's episode:

1. the SRM's initial map (before any prompt) is thresholded at 0 inside the image and split into 4-connected
   components on its grid: one per instance;
2. each instance is prompted on its own: its seed (the component's highest SRM cell) plus the policy's positive
   points that fall in it, plus the policy's negative points that fall on no instance (background);
3. all instances of all images are decoded in one batched call; the target is their union (semantic labels), and
   each instance's mask is kept (one Label Studio region per instance, for instance-style projects).

Optionally (``boxes=True``) each instance's prompt also carries a box: the component's bounding cells on the SRM's
grid, in image pixels. SAM is trained on boxes, so a box tells it the instance's extent where a few points do not;
whether a label uses it is chosen by validation too (the bundled small SAM answers boxes badly, so on the testbed
it is rejected; see ``benchmarks/results/choices.md``).

With fewer than two components the policy's own mask is kept. Whether a label uses this is chosen by validation
at training (:func:`alignsam.train.train` records it as the bundle's ``instances``): on single-region families
(mirror) it costs mIoU, on multi-object ones it gains it. The agent still matters: its points join each instance's
prompt (the w/o-RL ablation replaces them with random ones). One positive seed alone per instance scored a little
higher on ``semantic:circle`` but would make the agent irrelevant there; not done (a choice, see the benchmark).

Without an SRM there is no map to split: :func:`group_by_point_masks` groups the positive points by their own
masks instead. It is what the w/o-SRM ablation uses per instance (``AlignSAM.predict(grouping="points")``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alignsam.sam import FrozenSam, Size

Point = tuple[float, float, int]


def grid_components(foreground: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean ``[g, g]`` map: ``(labels [g, g] int, 0 background / 1..n, n)``."""
    fg = np.asarray(foreground, bool)
    labels = np.zeros(fg.shape, dtype=np.int64)
    n = 0
    h, w = fg.shape
    for r0, c0 in zip(*np.nonzero(fg), strict=True):
        if labels[r0, c0]:
            continue
        n += 1
        labels[r0, c0] = n
        stack = [(int(r0), int(c0))]
        while stack:
            r, c = stack.pop()
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < h and 0 <= cc < w and fg[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = n
                    stack.append((rr, cc))
    return labels, n


def component_box(sam: FrozenSam, cells: np.ndarray, size: Size) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` image pixels covering the ``True`` cells of a ``[g, g]`` map on SAM's embedding grid
    (the outer edges of its bounding cells, clipped to the image of ``size = (H, W)``)."""
    rows, cols = np.nonzero(cells)
    g = cells.shape[-1]
    corners = torch.tensor([[[int(rows.min()), int(cols.min())], [int(rows.max()), int(cols.max())]]])
    (x0, y0), (x1, y1) = sam.grid_to_points(corners, [size], g)[0].tolist()
    half = max(size) / g / 2  # the grid covers the resized long side: one cell is max(H, W) / g pixels
    h, w = size
    return (max(0.0, x0 - half), max(0.0, y0 - half), min(float(w), x1 + half), min(float(h), y1 + half))


@dataclass
class InstanceResult:
    """One image's instances: ``probs`` ``[H, W]`` float32 (the union's probabilities: the per-pixel maximum over
    instances), ``masks`` one ``[H, W]`` bool per instance, ``points`` each instance's prompt points, and
    ``split`` (False: fewer than two instances, the policy's own mask was kept)."""

    probs: np.ndarray
    masks: list[np.ndarray]
    points: list[list[Point]]
    split: bool


@torch.no_grad()
def split_instances(
    sam: FrozenSam,
    embeddings: torch.Tensor,
    sizes: Sequence[Size],
    srm_logits: torch.Tensor,
    valid: torch.Tensor,
    points: Sequence[Sequence[Point]],
    base_probs: Sequence[np.ndarray],
    present: Sequence[bool] | None = None,
    boxes: bool = False,
) -> list[InstanceResult]:
    """Per image, the target as its instances (see the module docstring).

    Arguments:
      embeddings: ``[N, C, h, w]`` SAM image embeddings; sizes: each image's ``(H, W)``.
      srm_logits: ``[N, g, g]`` the SRM's initial logits; valid: ``[N, g, g]`` bool, the cells inside each image.
      points: each image's policy prompt points ``(x, y, label)`` in pixels (label -1 entries are ignored).
      base_probs: each image's ``[H, W]`` probabilities from the policy (kept where it is not split).
      present: per image, whether the SRM found the target at all (absent images are never split).
      boxes: also give SAM each instance's box (its component's bounding cells, :func:`component_box`).
    Returns one :class:`InstanceResult` per image.
    """
    n = len(points)
    g = srm_logits.shape[-1]
    out: list[InstanceResult | None] = [None] * n
    jobs: list[tuple[int, list[Point]]] = []  # (image, prompt) per instance
    job_boxes: list[tuple[float, float, float, float]] = []
    for i in range(n):
        logits = srm_logits[i].float().cpu()
        fg = ((logits > 0) & valid[i].cpu()).numpy()
        labels, count = grid_components(fg)
        if count < 2 or (present is not None and not present[i]):
            out[i] = _kept(base_probs[i], points[i])
            continue
        pts = [p for p in points[i] if p[2] in (0, 1)]
        cells = (sam.points_to_grid(torch.tensor([[p[:2] for p in pts]], dtype=torch.float32), [sizes[i]], g)[0]
                 .tolist() if pts else [])
        in_component = [int(labels[r, c]) for r, c in cells]
        masked = np.where(labels[None] == np.arange(1, count + 1)[:, None, None], logits.numpy()[None], -np.inf)
        seeds_flat = masked.reshape(count, -1).argmax(axis=1)
        seed_cells = torch.tensor([[[int(f // g), int(f % g)] for f in seeds_flat]])
        seed_xy = sam.grid_to_points(seed_cells, [sizes[i]], g)[0].tolist()
        background_negatives = [p for p, k in zip(pts, in_component, strict=True) if p[2] == 0 and k == 0]
        for k in range(1, count + 1):
            prompt: list[Point] = [(float(seed_xy[k - 1][0]), float(seed_xy[k - 1][1]), 1)]
            prompt += [p for p, kk in zip(pts, in_component, strict=True) if p[2] == 1 and kk == k]
            prompt += background_negatives
            jobs.append((i, prompt))
            if boxes:
                job_boxes.append(component_box(sam, labels == k, sizes[i]))
    _decode_instances(sam, embeddings, sizes, jobs, job_boxes if boxes else None, out)
    return [r for r in out if r is not None]


def _kept(base_probs: np.ndarray, points: Sequence[Point]) -> InstanceResult:
    """The policy's own mask, not split."""
    base = np.asarray(base_probs, np.float32)
    return InstanceResult(base, [base > 0.5], [list(points)], False)


def _decode_jobs(sam: FrozenSam, embeddings: torch.Tensor, sizes: Sequence[Size], jobs: Sequence[tuple[int, list[Point]]],
                 boxes: Sequence[tuple[float, float, float, float]] | None = None) -> list[np.ndarray]:
    """One batched SAM call for ``jobs`` ``(image index, prompt points)``: each prompt's ``[H, W]`` float32 probabilities
    (padded with label -1 to the longest prompt; ``boxes``: one per job)."""
    if not jobs:
        return []
    width = max(len(p) for _, p in jobs)
    coords = torch.zeros(len(jobs), width, 2)
    labels_t = torch.full((len(jobs), width), -1, dtype=torch.int64)
    for row, (_, prompt) in enumerate(jobs):
        for j, (x, y, lab) in enumerate(prompt):
            coords[row, j, 0], coords[row, j, 1] = x, y
            labels_t[row, j] = lab
    index = torch.tensor([i for i, _ in jobs], device=embeddings.device)
    box_t = torch.tensor(list(boxes), dtype=torch.float32) if boxes is not None else None
    decoded = sam.decode(embeddings[index], coords, labels_t, [sizes[i] for i, _ in jobs], boxes=box_t)
    probs = decoded.probs if decoded.probs is not None else []
    return [probs[row].float().cpu().numpy() for row in range(len(jobs))]


def _decode_instances(sam: FrozenSam, embeddings: torch.Tensor, sizes: Sequence[Size],
                      jobs: Sequence[tuple[int, list[Point]]],
                      boxes: Sequence[tuple[float, float, float, float]] | None,
                      out: list[InstanceResult | None]) -> None:
    """Decode one prompt per instance and fill ``out[i]`` with image i's union and instance masks."""
    per_image: dict[int, list[tuple[np.ndarray, list[Point]]]] = {}
    for (i, prompt), probs in zip(jobs, _decode_jobs(sam, embeddings, sizes, jobs, boxes), strict=True):
        per_image.setdefault(i, []).append((probs, prompt))
    for i, parts in per_image.items():
        union = np.max(np.stack([p for p, _ in parts]), axis=0)
        out[i] = InstanceResult(union, [p > 0.5 for p, _ in parts], [q for _, q in parts], True)


def _root(parent: list[int], k: int) -> int:
    """Union-find: the root of ``k`` (halving the path)."""
    while parent[k] != k:
        parent[k] = parent[parent[k]]
        k = parent[k]
    return k


def _inside(mask: np.ndarray, point: Point) -> bool:
    h, w = mask.shape
    return bool(mask[min(max(int(point[1]), 0), h - 1), min(max(int(point[0]), 0), w - 1)])


@torch.no_grad()
def group_by_point_masks(
    sam: FrozenSam,
    embeddings: torch.Tensor,
    sizes: Sequence[Size],
    points: Sequence[Sequence[Point]],
    base_probs: Sequence[np.ndarray],
    present: Sequence[bool] | None = None,
) -> list[InstanceResult]:
    """Per image, the target as instances grouped without the SRM: by each positive point's own mask.

    The SRM-free counterpart of :func:`split_instances`, for the w/o-SRM ablation (there is no foreground map to
    split without an SRM; using the trained SRM's there would credit the ablation with the SRM's work):

    1. every positive point is decoded alone (one batched call for all images);
    2. two positive points are one instance when either lies inside the other's mask (union-find);
    3. each instance is prompted with its positive points plus the negative points that lie in no point's mask,
       all instances of all images in one second batched call; the target is their union.

    With fewer than two groups (or an absent target) the policy's own mask is kept. Costs P + G extra decodes per
    image (P positive points, G groups) against :func:`split_instances`' G.

    Arguments and returns as :func:`split_instances` (``points`` label -1 entries are ignored).
    """
    n = len(points)
    out: list[InstanceResult | None] = [None] * n
    singles: list[tuple[int, list[Point]]] = []
    positives: list[list[Point]] = []
    for i in range(n):
        pos = [p for p in points[i] if p[2] == 1]
        positives.append(pos)
        if len(pos) < 2 or (present is not None and not present[i]):
            continue
        singles += [(i, [(p[0], p[1], 1)]) for p in pos]
    masks_per_image: dict[int, list[np.ndarray]] = {}
    for (i, _), probs in zip(singles, _decode_jobs(sam, embeddings, sizes, singles), strict=True):
        masks_per_image.setdefault(i, []).append(probs > 0.5)
    jobs: list[tuple[int, list[Point]]] = []
    for i, masks in masks_per_image.items():
        pos = positives[i]
        parent = list(range(len(pos)))
        for a in range(len(pos)):
            for b in range(a + 1, len(pos)):
                if _inside(masks[a], pos[b]) or _inside(masks[b], pos[a]):
                    parent[_root(parent, b)] = _root(parent, a)
        groups: dict[int, list[Point]] = {}
        for k, p in enumerate(pos):
            groups.setdefault(_root(parent, k), []).append(p)
        if len(groups) < 2:
            continue
        covered = np.logical_or.reduce(masks)
        background = [p for p in points[i] if p[2] == 0 and not _inside(covered, p)]
        jobs += [(i, [*g, *background]) for g in groups.values()]
    _decode_instances(sam, embeddings, sizes, jobs, None, out)
    return [r if r is not None else _kept(base_probs[i], points[i]) for i, r in enumerate(out)]
