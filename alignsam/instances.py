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
        base = np.asarray(base_probs[i], np.float32)
        logits = srm_logits[i].float().cpu()
        fg = ((logits > 0) & valid[i].cpu()).numpy()
        labels, count = grid_components(fg)
        if count < 2 or (present is not None and not present[i]):
            out[i] = InstanceResult(base, [base > 0.5], [list(points[i])], False)
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
    if jobs:
        width = max(len(p) for _, p in jobs)
        coords = torch.zeros(len(jobs), width, 2)
        labels_t = torch.full((len(jobs), width), -1, dtype=torch.int64)
        for row, (_, prompt) in enumerate(jobs):
            for j, (x, y, lab) in enumerate(prompt):
                coords[row, j, 0], coords[row, j, 1] = x, y
                labels_t[row, j] = lab
        index = torch.tensor([i for i, _ in jobs], device=embeddings.device)
        box_t = torch.tensor(job_boxes, dtype=torch.float32) if boxes else None
        decoded = sam.decode(embeddings[index], coords, labels_t, [sizes[i] for i, _ in jobs], boxes=box_t)
        probs = decoded.probs if decoded.probs is not None else []
        per_image: dict[int, list[tuple[np.ndarray, list[Point]]]] = {}
        for row, (i, prompt) in enumerate(jobs):
            per_image.setdefault(i, []).append((probs[row].float().cpu().numpy(), prompt))
        for i, parts in per_image.items():
            union = np.max(np.stack([p for p, _ in parts]), axis=0)
            out[i] = InstanceResult(union, [p > 0.5 for p, _ in parts], [q for _, q in parts], True)
    return [r for r in out if r is not None]
