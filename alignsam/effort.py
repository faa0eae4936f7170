"""Annotator effort: NoC@IoU, the number of clicks a simulated annotator needs to bring a mask over an IoU threshold.

The simulated annotator is the standard one of click-based interactive segmentation (and of
:func:`alignsam.synthetic.corrective_click`): each click goes to the interior-most point (distance-transform
maximum) of the largest error region of the current mask, positive on missed foreground, negative on a false
positive. The annotator stops when the mask is over the threshold, when it is exact, or after ``max_clicks``.

A correction starts from the pre-label (its mask, and a :class:`~alignsam.interactive.Start` of its prompt points
and logits) or from nothing (an empty mask, ``start=None``: SAM on the clicks alone, what Label Studio's own SAM
backend does). After every click SAM answers statelessly through :func:`alignsam.interactive.correct_many`: the
start and *all* clicks so far, combined by the ``strategy``.

    curves = simulate(sam, embeddings, gts, start_masks, starts, "mask-input")   # [N, 21] IoU after k clicks
    summarize(curves)  # {"noc@85": ..., "noc@90": ..., "accepted_at_0@85": ..., "failed@90": ..., "n": N}
    best, scores = choose_strategy(sam, embeddings, gts, start_masks, starts)    # on a validation split

Used by ``benchmarks/noc.py``; ``choose_strategy`` is what a training job can run on a label's validation split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alignsam.errors import AlignSamError
from alignsam.interactive import STRATEGIES, InteractiveError, Point, Start, correct_many
from alignsam.sam import FrozenSam, ImageEmbedding
from alignsam.synthetic.masks import corrective_click

DEFAULT_MAX_CLICKS = 20
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.85, 0.90)


class EffortError(AlignSamError, ValueError):
    """The simulation's inputs do not fit together (lengths, mask shapes, thresholds, strategies)."""


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two bool masks of the same shape; 1.0 when both are empty."""
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def _key(threshold: float) -> str:
    """0.85 -> "85", 0.9 -> "90", 0.875 -> "87.5"."""
    pct = round(threshold * 100, 6)
    return f"{pct:g}"


def simulate(
    sam: FrozenSam,
    embeddings: Sequence[ImageEmbedding],
    gts: Sequence[np.ndarray],
    start_masks: Sequence[np.ndarray | None],
    starts: Sequence[Start | None] | None,
    strategy: str = "clicks",
    max_clicks: int = DEFAULT_MAX_CLICKS,
    thresholds: Sequence[float] | None = DEFAULT_THRESHOLDS,
    batch_size: int = 64,
) -> np.ndarray:
    """IoU curves of the simulated annotator correcting each image, batched over images.

    Arguments:
      sam: the frozen SAM that answers the clicks.
      embeddings: per image its SAM embedding (:meth:`FrozenSam.embed_many`); nothing is re-encoded.
      gts: per image the ``HxW`` ground-truth mask (any dtype, nonzero = foreground).
      start_masks: per image the mask the annotator starts from (the pre-label's mask), ``HxW``; None = an empty
        mask ("no prediction").
      starts: per image the pre-label's :class:`Start` given to SAM with the clicks, or None (SAM on the clicks
        only; then every strategy is ``clicks``); None for the whole argument = no starts at all.
      strategy: one of :data:`alignsam.interactive.STRATEGIES`.
      max_clicks: the annotator gives up after this many clicks.
      thresholds: the IoU thresholds that matter; an image stops being clicked once it reaches the highest of
        them (which leaves NoC at every one of them exact). None: click up to ``max_clicks`` (or until exact).
      batch_size: images per batched decode.

    Returns:
      ``[N, max_clicks + 1]`` float64: entry ``[i, k]`` is image i's IoU after k clicks (k = 0: the start mask's
      IoU). Once an image stops (over the highest threshold, or exact: the corrective click is None), the rest
      of its row repeats its last IoU: the annotator accepted that mask. So ``curves[:, k] >= t`` is exactly
      "reached t within k clicks" for every t up to the highest threshold.

    Raises:
      EffortError: lengths or shapes disagree, ``max_clicks`` < 0, a threshold outside (0, 1].
      InteractiveError: an unknown strategy, or a start for another image size.

    Clicks are at pixel centres (``x + 0.5, y + 0.5``) of :func:`~alignsam.synthetic.corrective_click`'s pixel.
    Deterministic: same inputs, same curves.
    """
    n = len(embeddings)
    starts_l: list[Start | None] = list(starts) if starts is not None else [None] * n
    if not (len(gts) == len(start_masks) == len(starts_l) == n):
        raise EffortError(f"{n} embeddings, {len(gts)} ground truths, {len(start_masks)} start masks, "
                          f"{len(starts_l)} starts")
    if max_clicks < 0:
        raise EffortError(f"max_clicks must be >= 0, not {max_clicks}")
    if strategy not in STRATEGIES:
        raise InteractiveError(f"unknown interactive strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    stop_at = float("inf")
    if thresholds is not None:
        if not thresholds or any(not 0.0 < float(t) <= 1.0 for t in thresholds):
            raise EffortError(f"thresholds must be in (0, 1], not {list(thresholds)}")
        stop_at = max(float(t) for t in thresholds)
    gt_l = [np.asarray(g).astype(bool) for g in gts]
    current: list[np.ndarray] = []
    for i, (emb, g, m) in enumerate(zip(embeddings, gt_l, start_masks, strict=True)):
        if tuple(g.shape) != tuple(emb.original_size):
            raise EffortError(f"image {i}: ground truth {g.shape} for an image of {tuple(emb.original_size)}")
        mask = np.zeros_like(g) if m is None else np.asarray(m).astype(bool)
        if mask.shape != g.shape:
            raise EffortError(f"image {i}: start mask {mask.shape} for a ground truth of {g.shape}")
        current.append(mask)
    curves = np.zeros((n, max_clicks + 1), dtype=np.float64)
    clicks: list[list[Point]] = [[] for _ in range(n)]
    active: list[int] = []
    for i in range(n):
        curves[i, :] = mask_iou(current[i], gt_l[i])
        if curves[i, 0] < stop_at:
            active.append(i)
    for k in range(1, max_clicks + 1):
        todo = []
        for i in active:
            click = corrective_click(current[i], gt_l[i])
            if click is None:  # exact: nothing left to correct (IoU 1, already carried forward)
                continue
            (x, y), label = click
            clicks[i].append((float(x) + 0.5, float(y) + 0.5, int(label)))
            todo.append(i)
        if not todo:
            break
        for lo in range(0, len(todo), batch_size):
            idx = todo[lo : lo + batch_size]
            answers = correct_many(sam, [embeddings[i] for i in idx], [clicks[i] for i in idx],
                                   [starts_l[i] for i in idx], strategy)
            for i, ans in zip(idx, answers, strict=True):
                current[i] = ans.mask
                curves[i, k:] = mask_iou(ans.mask, gt_l[i])
        active = [i for i in todo if curves[i, k] < stop_at]
    return curves


def reached(curves: np.ndarray, threshold: float) -> np.ndarray:
    """``[N]`` bool: which images reach ``threshold`` within the curves' clicks."""
    return (np.asarray(curves) >= threshold).any(axis=1)


def noc(curves: np.ndarray, threshold: float, max_clicks: int | None = None) -> np.ndarray:
    """Per image the number of clicks to reach IoU ``threshold``: the first k with ``curves[:, k] >= threshold``.

    Arguments:
      curves: ``[N, K + 1]`` IoU after k clicks (:func:`simulate`).
      threshold: the IoU to reach.
      max_clicks: the click budget (default K); an image that does not reach the threshold within it counts
        ``max_clicks``, the standard convention (see :func:`reached` / ``failed@`` in :func:`summarize`).
    Returns ``[N]`` int64 in ``[0, max_clicks]``.
    Raises EffortError when ``curves`` is not 2-D or ``max_clicks`` exceeds K.
    """
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 1:
        raise EffortError(f"curves must be [N, K + 1], not {c.shape}")
    k_max = c.shape[1] - 1
    max_clicks = k_max if max_clicks is None else int(max_clicks)
    if not 0 <= max_clicks <= k_max:
        raise EffortError(f"max_clicks {max_clicks} outside the curves' 0..{k_max}")
    hit = c[:, : max_clicks + 1] >= threshold
    return np.where(hit.any(axis=1), hit.argmax(axis=1), max_clicks).astype(np.int64)


def summarize(
    curves: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, max_clicks: int | None = None
) -> dict[str, float]:
    """NoC statistics of a set of curves.

    Returns, per threshold t (key ``85`` for 0.85): ``noc@85`` the mean NoC (failures count ``max_clicks``),
    ``accepted_at_0@85`` the share of images already over t at click 0 (the pre-label accepted as it is),
    ``failed@85`` the share still under t after ``max_clicks``; and ``n`` the number of images. An empty
    ``curves`` gives NaN means and ``n`` 0.
    """
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2:
        raise EffortError(f"curves must be [N, K + 1], not {c.shape}")
    max_clicks = c.shape[1] - 1 if max_clicks is None else int(max_clicks)
    out: dict[str, float] = {}
    for t in thresholds:
        key = _key(float(t))
        if len(c) == 0:
            out[f"noc@{key}"] = out[f"accepted_at_0@{key}"] = out[f"failed@{key}"] = float("nan")
            continue
        clicks = noc(c, float(t), max_clicks)
        out[f"noc@{key}"] = float(clicks.mean())
        out[f"accepted_at_0@{key}"] = float((c[:, 0] >= t).mean())
        out[f"failed@{key}"] = float((~reached(c[:, : max_clicks + 1], float(t))).mean())
    out["n"] = len(c)
    return out


def choose_strategy(
    sam: FrozenSam,
    embeddings: Sequence[ImageEmbedding],
    gts: Sequence[np.ndarray],
    start_masks: Sequence[np.ndarray | None],
    starts: Sequence[Start | None] | None,
    candidates: Sequence[str] = STRATEGIES,
    max_clicks: int = DEFAULT_MAX_CLICKS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> tuple[str, dict[str, dict[str, float]]]:
    """The strategy that needs the fewest clicks on these images (e.g. a label's validation split).

    Simulates every candidate (:func:`simulate`) and ranks by mean NoC at the highest threshold, then at the next
    lower ones, then by the candidate's position in :data:`~alignsam.interactive.STRATEGIES` (ties go to the
    earlier, simpler strategy).

    Returns ``(best, scores)``: ``scores[strategy]`` is :func:`summarize` of that candidate's curves, for every
    candidate. Raises EffortError on no candidates or one that is not in STRATEGIES (and what
    :func:`simulate` raises).
    """
    cands = list(dict.fromkeys(candidates))
    if not cands:
        raise EffortError("choose_strategy needs at least one candidate strategy")
    unknown = [c for c in cands if c not in STRATEGIES]
    if unknown:
        raise EffortError(f"unknown strategies {unknown}; choose from: {', '.join(STRATEGIES)}")
    ts = sorted((float(t) for t in thresholds), reverse=True)
    scores = {c: summarize(simulate(sam, embeddings, gts, start_masks, starts, c, max_clicks, ts), ts, max_clicks)
              for c in cands}
    best = min(cands, key=lambda c: (*(scores[c][f"noc@{_key(t)}"] for t in ts), STRATEGIES.index(c)))
    return best, scores


__all__ = [
    "DEFAULT_MAX_CLICKS",
    "DEFAULT_THRESHOLDS",
    "EffortError",
    "choose_strategy",
    "mask_iou",
    "noc",
    "reached",
    "simulate",
    "summarize",
]
