"""Interactive correction: SAM on an annotator's clicks (and box), starting from what the pre-label found.

Label Studio's own SAM backends answer a click with SAM on the clicks alone. Here the correction can also start
from the pre-label of the task (its prompt points and SAM's mask logits, a :class:`Start`), and the annotator's
clicks always win. How the two are combined is the ``strategy`` (:data:`STRATEGIES`):

``clicks``
    SAM on the clicks (and box) only; what a backend without a policy does.
``policy``
    the pre-label's prompt points, then the clicks.
``policy-drop-near``
    the pre-label's points minus those within ``radius`` of a click of the other sign, then the clicks: the
    obvious ``policy`` lets the policy's mostly negative points fight a correction made next to them.
``policy-positive``
    only the pre-label's positive points, then the clicks.
``mask-input``
    the clicks, with the pre-label's logits as SAM's ``mask_input`` (SAM's own way to refine a mask).
``positive-mask-input``
    the pre-label's positive points and the clicks, with its logits as ``mask_input``.
``per-instance``
    for a pre-label made of instances (:mod:`alignsam.instances`): each click goes to the instance it falls in
    (else, within ``radius``, the nearest one; a positive click far from all starts a new instance), only the
    instances that got clicks are decoded again (their own prompt, ``policy-drop-near``, plus their clicks) and the
    answer is the union with the others unchanged. Every other strategy decodes *one* mask, so its first click
    drops the instances it does not reach. A start without instances (or a box) is ``policy-drop-near``.

Which strategy needs the fewest clicks is measured by ``benchmarks/noc.py`` (NoC@85 / NoC@90 on every synthetic
family); the backend uses the one that benchmark picked (``INTERACTIVE_STRATEGY``), and ``clicks`` for a label
without a policy.

Every call is stateless: the answer depends on the start and on *all* clicks so far, never on an earlier answer,
so a repeated or reordered request gets the same mask. One decode per call on a cached embedding.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alignsam.errors import AlignSamError
from alignsam.sam import FrozenSam, ImageEmbedding

Point = tuple[float, float, int]
"""``(x, y, label)`` in image pixels; label 1 positive, 0 negative."""
Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in image pixels."""

STRATEGIES: tuple[str, ...] = (
    "clicks",
    "policy",
    "policy-drop-near",
    "policy-positive",
    "mask-input",
    "positive-mask-input",
    "per-instance",
)
DEFAULT_RADIUS = 0.08
"""``policy-drop-near``'s radius as a fraction of the image's long side (8 %: a policy point that close to a click
of the other sign is on the region the annotator just corrected)."""


class InteractiveError(AlignSamError, ValueError):
    """The prompts cannot be used (no click and no box, an unknown strategy, a start of another image size)."""


@dataclass(frozen=True, eq=False)
class Start:
    """What the pre-label of one task and label found: where the correction starts.

    Attributes:
      points: the pre-label's prompt points ``(x, y, label)`` in image pixels.
      low_res: ``[4h, 4w]`` float32 SAM logits of the pre-label's mask (SAM's padded input frame), or None
        (no mask: the pre-label found no target, or it was split into instances).
      size: ``(H, W)`` of the image the start belongs to.
      instance_points: when the pre-label was split into instances, each instance's prompt points; else empty.
      instance_masks: ``[K, H, W]`` bool, each instance's mask (same order), or None.
    """

    points: tuple[Point, ...]
    low_res: np.ndarray | None
    size: tuple[int, int]
    instance_points: tuple[tuple[Point, ...], ...] = ()
    instance_masks: np.ndarray | None = None

    @property
    def split(self) -> bool:
        """Whether the pre-label is two or more instances (what ``per-instance`` needs)."""
        return self.instance_masks is not None and len(self.instance_points) >= 2

    def to_bytes(self) -> bytes:
        """The start as a compressed ``.npz`` (points, logits as float16, size, instances' points and bit-packed
        masks): a few KB to cache per task."""
        buf = io.BytesIO()
        pts = np.asarray(self.points, dtype=np.float32).reshape(-1, 3)
        low = np.zeros((0, 0), np.float16) if self.low_res is None else self.low_res.astype(np.float16)
        inst = np.asarray([(k, *p) for k, group in enumerate(self.instance_points) for p in group],
                          dtype=np.float32).reshape(-1, 4)
        masks = np.zeros((0,), np.uint8) if self.instance_masks is None else np.packbits(self.instance_masks.ravel())
        n_masks = 0 if self.instance_masks is None else len(self.instance_masks)
        np.savez_compressed(buf, points=pts, low_res=low, size=np.asarray(self.size, dtype=np.int64),
                            instance_points=inst, instance_count=np.asarray(len(self.instance_points)),
                            instance_masks=masks, instance_mask_count=np.asarray(n_masks))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Start:
        """Inverse of :meth:`to_bytes` (caches written before instances existed read with none). Raises
        :class:`InteractiveError` on anything else."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                pts = z["points"].astype(np.float64).reshape(-1, 3)
                low = z["low_res"]
                size = tuple(int(v) for v in z["size"].reshape(2))
                groups: tuple[tuple[Point, ...], ...] = ()
                masks = None
                if "instance_points" in z.files:
                    inst = z["instance_points"].astype(np.float64).reshape(-1, 4)
                    count = int(z["instance_count"])
                    groups = tuple(tuple((float(x), float(y), int(lab)) for k, x, y, lab in inst if int(k) == g)
                                   for g in range(count))
                    n_masks = int(z["instance_mask_count"])
                    if n_masks:
                        bits = np.unpackbits(z["instance_masks"])[: n_masks * size[0] * size[1]]
                        masks = bits.reshape(n_masks, size[0], size[1]).astype(bool)
        except Exception as exc:
            raise InteractiveError(f"not a cached pre-label start ({type(exc).__name__}: {exc})") from exc
        points = tuple((float(x), float(y), int(lab)) for x, y, lab in pts)
        return cls(points, None if low.size == 0 else low.astype(np.float32), (size[0], size[1]), groups, masks)


def start_of(prediction: object, size: tuple[int, int] | None = None) -> Start:
    """A pre-label (an :class:`alignsam.predict.Prediction`) as the start of a correction, its instances included
    when it was split into two or more."""
    p: Any = prediction
    size = size or (int(p.mask.shape[0]), int(p.mask.shape[1]))
    groups = tuple(tuple(g) for g in getattr(p, "instance_points", []) or [])
    masks = None
    if len(groups) >= 2 and len(p.instances) == len(groups):
        masks = np.stack([np.asarray(m, bool) for m in p.instances])
    else:
        groups = ()
    return Start(tuple(p.points), p.low_res, size, groups, masks)


@dataclass
class Correction:
    """SAM's answer to one interactive request.

    Attributes:
      mask: ``HxW`` bool; probs: ``HxW`` float32 probabilities.
      score: SAM's predicted IoU of the mask, in [0, 1].
      points: the prompt points SAM was given, in order.
      low_res: ``[4h, 4w]`` float32 logits of the mask.
    """

    mask: np.ndarray
    probs: np.ndarray
    score: float
    points: list[Point] = field(default_factory=list)
    low_res: np.ndarray | None = None


def combine(
    strategy: str, clicks: Sequence[Point], start: Start | None, size: tuple[int, int], radius: float = DEFAULT_RADIUS
) -> tuple[list[Point], np.ndarray | None]:
    """The prompt points and the ``mask_input`` logits (or None) ``strategy`` gives for ``clicks`` on ``start``.

    Without a start, every strategy is ``clicks``. ``radius`` is a fraction of the long side of ``size``.
    """
    if strategy not in STRATEGIES:
        raise InteractiveError(f"unknown interactive strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    clicks = [(float(x), float(y), int(lab)) for x, y, lab in clicks]
    if start is None or strategy == "clicks":
        return clicks, None
    if tuple(start.size) != tuple(size):
        raise InteractiveError(f"the pre-label start is for a {start.size} image, this one is {size}")
    policy = list(start.points)
    mask_input = start.low_res if strategy in ("mask-input", "positive-mask-input") else None
    if strategy == "policy":
        return policy + clicks, None
    if strategy in ("policy-drop-near", "per-instance"):  # per-instance: one prompt set when not split
        r2 = (radius * max(size)) ** 2
        kept = [p for p in policy
                if not any(c[2] != p[2] and (c[0] - p[0]) ** 2 + (c[1] - p[1]) ** 2 <= r2 for c in clicks)]
        return kept + clicks, None
    if strategy == "mask-input":
        return clicks, mask_input
    positives = [p for p in policy if p[2] == 1]
    return positives + clicks, mask_input  # policy-positive, positive-mask-input


@torch.no_grad()
def correct_many(
    sam: FrozenSam,
    embeddings: Sequence[ImageEmbedding],
    clicks: Sequence[Sequence[Point]],
    starts: Sequence[Start | None] | None = None,
    strategy: str = "clicks",
    boxes: Sequence[Box | None] | None = None,
    radius: float = DEFAULT_RADIUS,
) -> list[Correction]:
    """One correction per image, in one batched decode per group of equal kind (with / without box and mask).

    Arguments:
      embeddings: the images' cached SAM embeddings (:meth:`FrozenSam.embed`): nothing is re-encoded.
      clicks: per image, the annotator's clicks so far, in order.
      starts: per image, its pre-label's :class:`Start` or None.
      strategy: see :data:`STRATEGIES`.
      boxes: per image, the annotator's box or None.
    Returns one :class:`Correction` per image. A prompt set of exactly one point (no box, no mask) is decoded
    with SAM's three ambiguity masks and the best-scored one is kept, as SAM's own predictor recommends.
    Raises :class:`InteractiveError` when an image has neither a click nor a box, or on an unknown strategy.
    """
    n = len(embeddings)
    starts = list(starts) if starts is not None else [None] * n
    boxes = list(boxes) if boxes is not None else [None] * n
    if not (len(clicks) == len(starts) == len(boxes) == n):
        raise InteractiveError(f"{n} embeddings, {len(clicks)} click lists, {len(starts)} starts, {len(boxes)} boxes")
    if strategy == "per-instance" and any(s is not None and s.split and b is None for s, b in zip(starts, boxes,
                                                                                                   strict=True)):
        return _per_instance(sam, embeddings, clicks, starts, boxes, radius)
    prompts: list[tuple[list[Point], np.ndarray | None]] = []
    for emb, c, s, b in zip(embeddings, clicks, starts, boxes, strict=True):
        pts, mask_input = combine(strategy, c, s, emb.original_size, radius)
        if not pts and b is None:
            raise InteractiveError("an interactive request needs at least one click or a box")
        prompts.append((pts, mask_input))
    groups: dict[tuple[bool, bool, bool], list[int]] = {}
    for i, ((pts, mask_input), b) in enumerate(zip(prompts, boxes, strict=True)):
        single = len(pts) == 1 and b is None and mask_input is None
        groups.setdefault((b is not None, mask_input is not None, single), []).append(i)
    out: list[Correction | None] = [None] * n
    for (has_box, has_mask, single), idx in groups.items():
        width = max(len(prompts[i][0]) for i in idx)  # 0 only for boxes alone
        coords = torch.zeros(len(idx), width, 2)
        labels = torch.full((len(idx), width), -1, dtype=torch.int64)
        for row, i in enumerate(idx):
            for j, (x, y, lab) in enumerate(prompts[i][0]):
                coords[row, j] = torch.tensor([x, y])
                labels[row, j] = lab
        box_t = torch.tensor([boxes[i] for i in idx], dtype=torch.float32) if has_box else None
        mask_t = None
        if has_mask:
            mask_t = torch.stack([torch.from_numpy(np.asarray(prompts[i][1], np.float32)) for i in idx])[:, None]
        res = sam.decode([embeddings[i] for i in idx], coords, labels, [embeddings[i].original_size for i in idx],
                         mask_input=mask_t, multimask=single, boxes=box_t)
        best = res.iou_predictions.argmax(dim=1)
        rows = torch.arange(len(idx), device=best.device)
        probs = res.probs if res.probs is not None else []
        for row, i in enumerate(idx):
            p = probs[row].float().cpu().numpy()
            out[i] = Correction(
                mask=p > 0.5,
                probs=p,
                score=float(res.iou_predictions[row, best[row]].clamp(0, 1)),
                points=list(prompts[i][0]),
                low_res=res.low_res_logits[rows[row], best[row]].float().cpu().numpy(),
            )
    return [c for c in out if c is not None]


def route_clicks(clicks: Sequence[Point], start: Start, radius: float = DEFAULT_RADIUS) -> dict[int, list[Point]]:
    """Which instance of a split ``start`` each click corrects: ``{instance: its clicks in order}``, with new
    instances numbered from ``len(start.instance_points)`` on.

    A click inside an instance's mask goes to it (the first, where they overlap). A click outside every mask goes to
    the nearest instance whose mask is within ``radius`` (a fraction of the image's long side); failing that, a
    positive click starts a new instance (or joins a new one with a positive click within ``radius``) and a negative
    one goes to the nearest instance or new instance at any distance (it can only matter to one that grew there).
    """
    assert start.instance_masks is not None
    masks = start.instance_masks
    h, w = start.size
    reach = radius * max(h, w)
    coords = [np.argwhere(m) for m in masks]  # (row, col) of each instance's pixels

    def distance(k: int, x: float, y: float) -> float:
        c = coords[k]
        return float(np.sqrt(((c[:, 1] + 0.5 - x) ** 2 + (c[:, 0] + 0.5 - y) ** 2).min())) if len(c) else np.inf

    routed: dict[int, list[Point]] = {}
    new_positives: dict[int, list[Point]] = {}
    for x, y, lab in ((float(a), float(b), int(c)) for a, b, c in clicks):
        col, row = min(max(int(x), 0), w - 1), min(max(int(y), 0), h - 1)
        inside = [k for k in range(len(masks)) if masks[k, row, col]]
        if inside:
            routed.setdefault(inside[0], []).append((x, y, lab))
            continue
        near = {k: distance(k, x, y) for k in range(len(masks))}
        for k, pts in new_positives.items():
            near[k] = min(np.hypot(px - x, py - y) for px, py, _ in pts)
        k = min(near, key=lambda key: near[key]) if near else None
        if k is not None and (near[k] <= reach or lab == 0):
            routed.setdefault(k, []).append((x, y, lab))
            if k in new_positives and lab == 1:
                new_positives[k].append((x, y, lab))
        elif lab == 1:
            k = len(masks) + len(new_positives)
            new_positives[k] = [(x, y, lab)]
            routed[k] = [(x, y, lab)]
    return routed


def _per_instance(sam: FrozenSam, embeddings: Sequence[ImageEmbedding], clicks: Sequence[Sequence[Point]],
                  starts: Sequence[Start | None], boxes: Sequence[Box | None], radius: float) -> list[Correction]:
    """:func:`correct_many` for ``per-instance``: the clicked instances of each split start decoded again in one
    batched call (each with ``policy-drop-near`` on its own prompt), united with the others unchanged."""
    jobs: list[tuple[int, int]] = []  # (image, instance) per sub-prompt
    job_emb: list[ImageEmbedding] = []
    job_clicks: list[list[Point]] = []
    job_starts: list[Start | None] = []
    plain: list[int] = []
    for i, (emb, c, s, b) in enumerate(zip(embeddings, clicks, starts, boxes, strict=True)):
        if s is None or not s.split or b is not None:
            plain.append(i)
            continue
        if tuple(s.size) != tuple(emb.original_size):
            raise InteractiveError(f"the pre-label start is for a {s.size} image, this one is {emb.original_size}")
        if not c:
            raise InteractiveError("an interactive request needs at least one click or a box")
        for k, pts in route_clicks(c, s, radius).items():
            own = s.instance_points[k] if k < len(s.instance_points) else None
            jobs.append((i, k))
            job_emb.append(emb)
            job_clicks.append(pts)
            job_starts.append(Start(tuple(own), None, s.size) if own is not None else None)
    out: list[Correction | None] = [None] * len(embeddings)
    if plain:
        for i, corr in zip(plain, correct_many(sam, [embeddings[i] for i in plain], [clicks[i] for i in plain],
                                               [starts[i] for i in plain], "policy-drop-near",
                                               [boxes[i] for i in plain], radius), strict=True):
            out[i] = corr
    answers = correct_many(sam, job_emb, job_clicks, job_starts, "policy-drop-near", None, radius) if jobs else []
    by_image: dict[int, dict[int, Correction]] = {}
    for (i, k), corr in zip(jobs, answers, strict=True):
        by_image.setdefault(i, {})[k] = corr
    for i, decoded in by_image.items():
        s = starts[i]
        assert s is not None and s.instance_masks is not None
        kept = [m.astype(np.float32) for k, m in enumerate(s.instance_masks) if k not in decoded]
        probs = np.max(np.stack(kept + [c.probs for c in decoded.values()]), axis=0)
        points = [p for c in decoded.values() for p in c.points]
        out[i] = Correction(mask=probs > 0.5, probs=probs, score=min(c.score for c in decoded.values()),
                            points=points, low_res=None)
    return [c for c in out if c is not None]


def correct(
    sam: FrozenSam,
    embedding: ImageEmbedding,
    clicks: Sequence[Point],
    start: Start | None = None,
    strategy: str = "clicks",
    box: Box | None = None,
    radius: float = DEFAULT_RADIUS,
) -> Correction:
    """:func:`correct_many` for one image."""
    return correct_many(sam, [embedding], [clicks], [start], strategy, [box], radius)[0]
