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

After the split, :func:`refine_instances` can add SRM corrective clicks (:mod:`alignsam.refine`) on the union,
each given to the instance it corrects; the policy's validated ``refine_clicks`` says how many.

With fewer than two components the policy's own mask is kept. Whether a label uses this is chosen by validation
at training (:func:`alignsam.train.train` records it as the bundle's ``instances``): on single-region families
(mirror) it costs mIoU, on multi-object ones it gains it. The agent still matters: its points join each instance's
prompt (the w/o-RL ablation replaces them with random ones). One positive seed alone per instance scored a little
higher on ``semantic:circle`` but would make the agent irrelevant there; not done (a choice, see the benchmark).

Without an SRM there is no map to split: :func:`group_by_point_masks` groups the positive points by their own
masks instead. It is what the w/o-SRM ablation uses per instance (``AlignSAM.predict(grouping="points")``).

The map also has components on look-alikes of the target, which SAM draws as instances like the others.
:func:`filter_instances` drops those a per-label :class:`InstanceFilter` rejects: a logistic model over the colour
and shape of each instance's mask (:func:`instance_features`), fit on the label's training tasks
(:func:`fit_instance_filter`) and kept only where it validates better (``TrainConfig.instance_filter``).
Since a filter can drop what is not the target, it is also validated with the map's weak components as candidates
(:func:`with_weak_components`: a separate blob above :data:`WEAK_LOGIT` with no cell above 0, where the SRM was
unsure), fit on those too; that filter records the threshold and prediction splits with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alignsam import refine
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


WEAK_LOGIT = -2.0
"""The SRM logit above which :func:`with_weak_components` also proposes a component (probability 0.12), for a filter
to judge. On the multi-instance family (100 test scenes) 40 of 438 target objects had no SRM foreground at all
before the episode, and the filtered mIoU was 0.770 against 0.832 with every instance judged right. Weak
components at -1 / -2 / -3 / -5 gave val 0.777 / 0.801 / 0.786 / 0.699 and test 0.777 / 0.788 / 0.768 / 0.718
(0.779 / 0.770 without); merely lowering the threshold (every component at -2) merged neighbours: test 0.752
(benchmarks/results/instances_notes.md, "Weak components")."""


def with_weak_components(srm_logits: torch.Tensor, valid: torch.Tensor, weak: float) -> torch.Tensor:
    """``[N, g, g]`` SRM logits with every component of ``logits > weak`` (inside the image, 4-connected) that holds
    no cell above 0 raised by ``-weak``, so :func:`split_instances` and :func:`refine_instances` treat it as an
    instance of its own (seeded at its highest cell) beside the map's own components, which are left as they are
    (lowering the threshold everywhere would merge neighbouring instances instead). ``weak`` < 0."""
    out = srm_logits.clone()
    for i in range(len(srm_logits)):
        logits = srm_logits[i].float().cpu()
        inside = valid[i].cpu()
        strong = ((logits > 0) & inside).numpy()
        labels, count = grid_components(((logits > weak) & inside).numpy())
        if not count:
            continue
        has_strong = np.zeros(count + 1, bool)
        has_strong[labels[strong]] = True
        raise_cells = torch.from_numpy(~has_strong[labels] & (labels > 0)).to(out.device)
        out[i] = torch.where(raise_cells, out[i] - weak, out[i])
    return out


@dataclass
class InstanceResult:
    """One image's instances: ``probs`` ``[H, W]`` float32 (the union's probabilities: the per-pixel maximum over
    instances), ``masks`` one ``[H, W]`` bool per instance, ``points`` each instance's prompt points, and
    ``split`` (False: fewer than two instances, the policy's own mask was kept), and ``part_probs`` each instance's
    own ``[H, W]`` float32 probabilities (what :func:`filter_instances` rebuilds the union from)."""

    probs: np.ndarray
    masks: list[np.ndarray]
    points: list[list[Point]]
    split: bool
    part_probs: list[np.ndarray]
    boxes: list[tuple[float, float, float, float]] | None = None  # each instance's box prompt, where it had one


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


@torch.no_grad()
def refine_instances(
    sam: FrozenSam,
    embeddings: torch.Tensor,
    sizes: Sequence[Size],
    srm_logits: torch.Tensor,
    valid: torch.Tensor,
    results: Sequence[InstanceResult],
    clicks: int,
) -> list[InstanceResult]:
    """SRM corrective clicks (:mod:`alignsam.refine`) on the union of each split image's instances, each click
    given to the instance it corrects: a positive one (the union misses what the map calls foreground) to the
    instance of the map's component it falls in (else the instance most probable there), a negative one (the
    union covers what the map calls background) to every instance whose mask covers it (else the most probable).
    Each round re-decodes only the instances that got a click, all images in one batched call.

    Why not the episode's clicks (:func:`alignsam.rollout.srm_corrective_clicks`): those correct the single
    mask, and the split keeps only their positives that fall inside a component and their negatives that fall on
    none, so a spill of one instance onto its surroundings stays uncorrected.

    Arguments:
      embeddings, sizes, srm_logits, valid: as for :func:`split_instances` (the SRM's initial map: the one the
        instances were split by, and the one the union is compared with).
      results: :func:`split_instances`' results (images not split are returned as they are).
      clicks: the number of rounds (0: ``results`` unchanged).
    Returns one :class:`InstanceResult` per image (new objects where clicked).
    """
    out = list(results)
    split = [i for i, r in enumerate(out) if r.split]
    if clicks <= 0 or not split:
        return out
    g = srm_logits.shape[-1]
    frame = sam.embedding_size * refine.FRAME_SCALE
    sub_sizes = [sizes[i] for i in split]
    device = srm_logits.device
    inside = refine.inside_frame(sam, sub_sizes, frame, device)
    srm_map = refine.srm_map_on(srm_logits[split][:, None].float(), (frame, frame))
    components = [grid_components(((srm_logits[i].float() > 0) & valid[i]).cpu().numpy())[0] for i in split]

    def on_frame(i: int) -> torch.Tensor:  # image i's union on the error frame, > 0: foreground
        return sam.to_embedding_frame(torch.as_tensor(out[i].probs), sizes[i], frame).to(device) - 0.5

    union = torch.stack([on_frame(i) for i in split])
    for _ in range(clicks):
        cells, labels = refine.corrective_cells(union, srm_map, inside)
        xy = sam.grid_to_points(cells[:, None], sub_sizes, frame)[:, 0].tolist()
        jobs: list[tuple[int, list[Point]]] = []
        targets: list[tuple[int, int]] = []
        for j, i in enumerate(split):
            label = int(labels[j])
            if label < 0:
                continue
            x, y = float(xy[j][0]), float(xy[j][1])
            r = out[i]
            h, w = r.probs.shape
            row, col = min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)
            if label == 1:
                rc = sam.points_to_grid(torch.tensor([[[x, y]]]), [sizes[i]], g)[0, 0].tolist()
                k = int(components[j][rc[0], rc[1]])
                ks = [k - 1] if 0 < k <= len(r.points) else [int(np.argmax([p[row, col] for p in r.part_probs]))]
            else:  # the union is pooled onto the frame: the click's own pixel may fall just outside every mask
                ks = [k for k, p in enumerate(r.part_probs) if p[row, col] > 0.5] or \
                    [int(np.argmax([p[row, col] for p in r.part_probs]))]
            for k in ks:
                jobs.append((i, [*r.points[k], (x, y, label)]))
                targets.append((i, k))
        if not jobs:
            break
        boxes = None
        if any(out[i].boxes is not None for i, _ in targets):
            boxes = [out[i].boxes[k] for i, k in targets]  # type: ignore[index]
        decoded = _decode_jobs(sam, embeddings, sizes, jobs, boxes)
        changed: dict[int, InstanceResult] = {}
        for (i, k), (_, prompt), probs in zip(targets, jobs, decoded, strict=True):
            r = changed.setdefault(i, InstanceResult(out[i].probs, list(out[i].masks), list(out[i].points), True,
                                                      list(out[i].part_probs), out[i].boxes))
            r.points[k], r.part_probs[k], r.masks[k] = prompt, probs, probs > 0.5
        for i, r in changed.items():
            r.probs = np.max(np.stack(r.part_probs), axis=0)
            out[i] = r
        for j, i in enumerate(split):  # only the clicked images' unions moved
            if i in changed:
                union[j] = on_frame(i)
    return out


def _kept(base_probs: np.ndarray, points: Sequence[Point]) -> InstanceResult:
    """The policy's own mask, not split."""
    base = np.asarray(base_probs, np.float32)
    return InstanceResult(base, [base > 0.5], [list(points)], False, [base])


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
    per_image: dict[int, list[tuple[np.ndarray, list[Point], tuple[float, float, float, float] | None]]] = {}
    decoded = _decode_jobs(sam, embeddings, sizes, jobs, boxes)
    for row, ((i, prompt), probs) in enumerate(zip(jobs, decoded, strict=True)):
        per_image.setdefault(i, []).append((probs, prompt, boxes[row] if boxes is not None else None))
    for i, parts in per_image.items():
        probs = [p for p, _, _ in parts]
        out[i] = InstanceResult(np.max(np.stack(probs), axis=0), [p > 0.5 for p in probs], [q for _, q, _ in parts],
                                True, probs, [b for _, _, b in parts] if boxes is not None else None)  # type: ignore[misc]


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


# ---------------------------------------------------------------------------------------------------------------
# Which instances are the target: a per-label filter learned from the labelled tasks
# ---------------------------------------------------------------------------------------------------------------
#
# The SRM's map also has components on look-alikes (same colour, other shape; same shape, a near colour): on the
# multi-instance testbed family a third of the decoded instances lie on distractors, and dropping them (knowing the
# ground truth) would lift test mIoU from 0.63 to 0.84. The SRM sees the embedding grid (16 px cells); each
# decoded instance has SAM's full-resolution mask, whose colour and shape say what the grid cannot. So, beyond the
# paper, each label can learn a logistic filter over a few statistics of each instance (the colour of its mask's
# pixels, its shape) from its own labelled tasks. Whether a label uses it is chosen by
# validation like the other instance choices (benchmarks/results/instances_notes.md, "An instance filter").

FEATURES_V1 = ("hue cos", "hue sin", "saturation", "value", "pixel hue cos", "pixel hue sin", "red std", "green std",
               "blue std", "area", "box fill", "compactness")
"""The features of the first filters (bundles made before 2026-12-04 carry filters over these; they still load)."""

FEATURES = (*FEATURES_V1, "radial spread", "radial range")
"""What :func:`instance_features` measures, in order. The two radial ones (the boundary's distances to the centroid:
their std over their mean, and log max over min) tell a rotated square or triangle from a circle where box fill
does not (it changes with the rotation): on the multi-instance family, 100 test scenes, they lifted the filtered
mIoU from 0.744 to 0.770 (benchmarks/results/instances_notes.md, "Radial shape features")."""


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[..., 3]`` RGB in [0, 1] -> hue in [0, 1), saturation, value (as :func:`colorsys.rgb_to_hsv`)."""
    hi, lo = rgb.max(-1), rgb.min(-1)
    span = hi - lo
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(span > 0, span, 1.0)
    hue = np.where(hi == r, (g - b) / safe, np.where(hi == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(span > 0, (hue / 6.0) % 1.0, 0.0)
    return hue, np.where(hi > 0, span / np.where(hi > 0, hi, 1.0), 0.0), hi


def instance_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Colour and shape statistics of one instance (:data:`FEATURES`): ``[F]`` float64.

    Arguments:
      image: ``[H, W, 3]`` uint8 RGB (``[H, W]`` grey is read as RGB). mask: ``[H, W]`` bool, the instance.

    Hue enters as a point on the circle (red wraps around 0). Area is the fraction of the image; box fill the
    fraction of the mask's bounding box it covers; compactness ``4 pi area / boundary^2`` in boundary pixels; radial
    spread and range the std / mean and ``log(max / min)`` (min at least half a pixel) of the boundary pixels'
    distances to the mask's centroid (0 for a disc; they do not change when the shape turns). An empty mask gives
    zeros.
    """
    m = np.asarray(mask, bool)
    if not m.any():
        return np.zeros(len(FEATURES))
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    px = img[m][..., :3].astype(np.float64) / 255.0
    mean = px.mean(0)
    hue, sat, val = _hsv(mean)
    pixel_hue = _hsv(px)[0] * 2 * np.pi
    ys, xs = np.nonzero(m)
    area = float(m.sum())
    box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    padded = np.pad(m, 1)
    interior = padded[2:, 1:-1] & padded[:-2, 1:-1] & padded[1:-1, 2:] & padded[1:-1, :-2]
    edge = m & ~interior
    boundary = float(edge.sum())
    by, bx = np.nonzero(edge)
    dist = np.hypot(by - ys.mean(), bx - xs.mean())
    spread = float(dist.std() / max(float(dist.mean()), 1e-6))
    reach = float(np.log(max(float(dist.max()), 0.5) / max(float(dist.min()), 0.5)))
    return np.array([np.cos(2 * np.pi * hue), np.sin(2 * np.pi * hue), sat, val, np.cos(pixel_hue).mean(),
                     np.sin(pixel_hue).mean(), *px.std(0), area / m.size, area / box,
                     4 * np.pi * area / max(boundary, 1.0) ** 2, spread, reach])


def instance_examples(image: np.ndarray, masks: Sequence[np.ndarray],
                      gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training examples for :func:`fit_instance_filter` from one labelled image: each instance's features
    ``[K, F]`` and whether it is the target ``[K]`` bool (at least half of its pixels are in ``gt``: then adding it
    to the union gains at least as many true pixels as it adds false ones)."""
    gt = np.asarray(gt, bool)
    x = np.stack([instance_features(image, m) for m in masks]) if len(masks) else np.zeros((0, len(FEATURES)))
    y = np.array([(m & gt).sum() * 2 >= max(int(m.sum()), 1) for m in masks], bool)
    return x, y


FILTER_CLIP = 5.0
"""Standardised features are clipped to +-this before scoring: an outlying mask (one far from every training
instance) is then scored like the most extreme one seen, not by an unbounded square."""


def _filter_terms(z: np.ndarray, squares: bool) -> np.ndarray:
    """``[K, F]`` standardised features -> the filter's terms: ``[K, F]`` (linear) or ``[K, 2F]`` (with squares)."""
    z = np.clip(z, -FILTER_CLIP, FILTER_CLIP)
    return np.concatenate([z, z**2], axis=1) if squares else z


@dataclass
class InstanceFilter:
    """A logistic model over :func:`instance_features`: an instance is kept when its score is >= 0.

    ``mean`` / ``std`` standardise the features; ``weight`` / ``bias`` score the standardised features ``z`` and,
    when ``weight`` has ``2F`` entries, their squares ``z**2`` too (then a label's instances can be a band of a
    feature, not only one side of it: circles lie between triangles and squares in box fill). Lists: the bundle's
    JSON; a linear filter (``F`` weights, bundles before squares) still loads and scores. ``features`` names what
    the weights read: :data:`FEATURES`, or :data:`FEATURES_V1` for a filter of an older bundle (scored on those
    columns of today's features, which begin with them)."""

    mean: list[float]
    std: list[float]
    weight: list[float]
    bias: float
    features: tuple[str, ...] = FEATURES
    weak: float | None = None  # fit on (and judging) the split's weak components too (with_weak_components)

    @property
    def squares(self) -> bool:
        return len(self.weight) == 2 * len(self.mean)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``[K, F]`` features (:func:`instance_features`, all of :data:`FEATURES`) -> ``[K]`` logits."""
        x = np.asarray(features, np.float64)[:, : len(self.features)]  # FEATURES_V1 is FEATURES' prefix
        z = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return _filter_terms(z, self.squares) @ np.asarray(self.weight) + self.bias

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"features": list(self.features), "mean": self.mean, "std": self.std,
                                  "weight": self.weight, "bias": self.bias}
        if self.weak is not None:
            out["weak"] = self.weak
        return out

    @classmethod
    def from_dict(cls, d: dict) -> InstanceFilter:
        """Raises ValueError when ``d`` is not a filter over :data:`FEATURES` or :data:`FEATURES_V1`."""
        names = tuple(d.get("features") or []) if isinstance(d, dict) else ()
        if names not in (FEATURES, FEATURES_V1):
            raise ValueError("the instance filter was made for other features; retrain the label")
        try:
            flt = cls([float(v) for v in d["mean"]], [float(v) for v in d["std"]], [float(v) for v in d["weight"]],
                      float(d["bias"]), names)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed instance filter: {exc}") from None
        n = len(names)
        if not len(flt.mean) == len(flt.std) == n or len(flt.weight) not in (n, 2 * n) or min(flt.std) <= 0:
            raise ValueError("malformed instance filter: wrong sizes or a zero scale")
        weak = d.get("weak")
        if weak is not None:  # filters before weak components have none: they judge the map's own components only
            if isinstance(weak, bool) or not isinstance(weak, int | float) or not -20.0 <= float(weak) < 0.0:
                raise ValueError(f"malformed instance filter: weak threshold {weak!r} is not a logit in [-20, 0)")
            flt.weak = float(weak)
        return flt


FILTER_L2 = 1e-3
"""L2 penalty of the filter's logistic fit (on standardised terms). Of 1e-4 .. 1e-1 on the multi-instance family
(50 train / 60 test scenes, linear terms) 1e-4 .. 1e-3 kept test accuracy at 0.82 and 1e-1 dropped it to 0.77;
with squares (50 train / 80 test scenes, every object prompted) 1e-4 .. 1e-2 gave 0.84-0.86."""


def fit_instance_filter(features: np.ndarray, keep: np.ndarray, l2: float = FILTER_L2,
                        squares: bool = True) -> InstanceFilter | None:
    """L2-regularised logistic regression of ``keep`` ``[K]`` bool on ``features`` ``[K, F]`` (L-BFGS, deterministic),
    over the standardised features and, with ``squares``, their squares (see :class:`InstanceFilter`).

    Squares by default: on the multi-instance family, every object prompted (50 train / 80 test scenes), they lift
    the filter's test accuracy from 0.79 to 0.85 and the filtered mIoU from 0.643 to 0.685
    (benchmarks/results/instances_notes.md, "Squared terms").

    Returns None when there is nothing to learn: fewer than 8 examples, or all of one class.
    Raises ValueError when ``F`` is neither :data:`FEATURES`' length nor :data:`FEATURES_V1`'.
    """
    x, y = np.asarray(features, np.float64), np.asarray(keep, bool)
    names = {len(FEATURES): FEATURES, len(FEATURES_V1): FEATURES_V1}.get(x.shape[1] if x.ndim == 2 else -1)
    if names is None:
        raise ValueError(f"features must be [K, {len(FEATURES)}] (instance_features), not {list(x.shape)}")
    if len(y) < 8 or y.all() or not y.any():
        return None
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-9, std, 1.0)
    xt = torch.tensor(_filter_terms((x - mean) / std, squares), dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return InstanceFilter(mean.tolist(), std.tolist(), w.detach().tolist(), float(b.detach()), names)


def fit_filter_on(labelled: Iterable[tuple[np.ndarray, Sequence[np.ndarray], np.ndarray]],
                  squares: bool = True, weak: float | None = None) -> tuple[InstanceFilter | None, np.ndarray]:
    """:func:`fit_instance_filter` on labelled images ``(image [H, W, 3], instance masks [H, W] bool each, ground
    truth [H, W] bool)``, each read by :func:`instance_examples`; ``weak``: the instances were split with
    :func:`with_weak_components` at that threshold (the filter records it, and prediction splits so again).

    Returns the filter (None when there is nothing to learn) and whether each instance it saw is the target ``[K]``
    bool (the counts a report shows)."""
    examples = [instance_examples(image, masks, gt) for image, masks, gt in labelled if len(masks)]
    if not examples:
        return None, np.zeros(0, bool)
    keep = np.concatenate([y for _, y in examples])
    flt = fit_instance_filter(np.concatenate([x for x, _ in examples]), keep, squares=squares)
    if flt is not None:
        flt.weak = weak
    return flt, keep


def filter_instances(result: InstanceResult, image: np.ndarray, flt: InstanceFilter) -> InstanceResult:
    """``result`` with the instances ``flt`` scores below 0 dropped and the union rebuilt from the others.

    An unsplit result is returned as it is. When every instance scores below 0 the best-scoring one is kept: the SRM
    found the target present, and one likely instance is a better pre-label to correct than none.
    """
    if not result.split:
        return result
    scores = flt.scores(np.stack([instance_features(image, m) for m in result.masks]))
    keep = [k for k, s in enumerate(scores) if s >= 0] or [int(np.argmax(scores))]
    probs = [result.part_probs[k] for k in keep]
    return InstanceResult(np.max(np.stack(probs), axis=0), [result.masks[k] for k in keep],
                          [result.points[k] for k in keep], True, probs,
                          [result.boxes[k] for k in keep] if result.boxes is not None else None)
