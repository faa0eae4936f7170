"""Segmentation metrics of the paper: IoU / mIoU, MAE, BER, F-measure, E-measure and Foreground Rate.

All functions take numpy arrays (torch tensors are accepted and moved to numpy) of one image, H x W:

- ``pred``: a foreground probability map in [0, 1] (float), or a binary mask (bool / 0-1 integers);
- ``gt``: the ground-truth mask, bool or numbers (foreground where ``gt > 0.5``, so 0/1 and 0/255 both work).

Conventions (where the literature leaves a choice, it is written here and in each docstring):

- IoU and BER binarise ``pred`` with ``pred > threshold`` (default 0.5, SAM's ``logits > 0``).
- IoU of two empty masks is 1.0 (nothing to find, nothing found).
- BER is a fraction in [0, 1]; papers print it in percent (``100 * ber``). A rate with an empty denominator
  (no foreground, or no background, in the ground truth) counts as 1.0.
- F-measure and E-measure use the adaptive threshold of the saliency literature, ``min(2 * mean(pred), 1)``,
  and binarise with ``pred >= threshold`` (as PySODMetrics does), except that an all-zero prediction stays
  empty (``>=`` against a threshold of 0 would otherwise make it all foreground). Predictions are used as
  given, not min-max stretched first.
- F-measure is 0 when nothing is truly positive (including an empty ground truth), as in the literature.
- E-measure follows Fan et al. 2018 ("Enhanced-alignment Measure for Binary Foreground Map Evaluation"):
  all-zero ground truth scores ``1 - FM``, all-one ground truth scores ``FM``; the score is the mean of the
  enhanced alignment matrix over the ``w * h`` pixels, as the paper defines it (the reference code divides by
  ``w * h - 1``, a difference invisible at dataset image sizes).
- mIoU and ``summarize`` average per-image scores over the images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from alignsam.errors import DataError

__all__ = [
    "MetricInputError",
    "adaptive_threshold",
    "ber",
    "e_measure",
    "f_measure",
    "foreground_rate",
    "iou",
    "mae",
    "miou",
    "summarize",
]

F_BETA2 = 0.3  # beta^2 of the F-measure, the saliency-detection standard the paper uses


class MetricInputError(DataError, ValueError):
    """Metric inputs are inconsistent: shapes differ, values out of range, points outside the mask."""


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _mask(x: Any) -> np.ndarray:
    """Boolean foreground mask: ``x`` if bool, else ``x > 0.5``."""
    arr = _to_numpy(x)
    return arr if arr.dtype == np.bool_ else arr > 0.5


def _prob(x: Any) -> np.ndarray:
    """Float64 probability map, checked to lie in [0, 1]."""
    arr = _to_numpy(x).astype(np.float64)
    if np.isnan(arr).any():
        raise MetricInputError("Predictions contain NaN.")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise MetricInputError(
            f"Predictions must be probabilities in [0, 1] (got range [{arr.min():g}, {arr.max():g}]); "
            "divide 0-255 maps by 255 and apply a sigmoid to logits first."
        )
    return arr


def _pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = _prob(pred), _mask(gt)
    if p.shape != g.shape:
        raise MetricInputError(f"Prediction shape {p.shape} differs from ground-truth shape {g.shape}.")
    if p.size == 0:
        raise MetricInputError("Empty prediction / ground truth.")
    return p, g


def _ratio(num: float, den: float, if_empty: float) -> float:
    return float(num) / float(den) if den else if_empty


def iou(pred: Any, gt: Any, threshold: float = 0.5) -> float:
    """Intersection over union of the binarised prediction and the ground truth.

    Arguments:
      pred (np.ndarray): H x W probabilities in [0, 1] or binary mask; foreground where ``pred > threshold``.
      gt (np.ndarray): H x W ground-truth mask.
      threshold (float): binarisation threshold of ``pred``.

    Returns:
      (float): ``|P & G| / |P | G|`` in [0, 1]; 1.0 when both masks are empty.
    """
    p, g = _pair(pred, gt)
    b = p > threshold
    return _ratio(np.count_nonzero(b & g), np.count_nonzero(b | g), if_empty=1.0)


def miou(preds: Sequence[Any], gts: Sequence[Any], threshold: float = 0.5) -> float:
    """Mean IoU over images (each image's IoU as in ``iou``, then the mean).

    Arguments:
      preds (list[np.ndarray]): N predictions, each H_i x W_i.
      gts (list[np.ndarray]): N ground-truth masks of the same sizes.
      threshold (float): binarisation threshold of the predictions.

    Returns:
      (float): mean IoU in [0, 1].
    """
    return _mean_over(iou, preds, gts, threshold=threshold)


def mae(pred: Any, gt: Any) -> float:
    """Mean absolute error between a probability map and the binary ground truth.

    Arguments:
      pred (np.ndarray): H x W probabilities in [0, 1] (a binary mask counts as 0/1).
      gt (np.ndarray): H x W ground-truth mask.

    Returns:
      (float): ``mean |pred - gt|`` in [0, 1].
    """
    p, g = _pair(pred, gt)
    return float(np.abs(p - g).mean())


def ber(pred: Any, gt: Any, threshold: float = 0.5) -> float:
    """Balanced error rate ``1 - (TP / (TP + FN) + TN / (TN + FP)) / 2``, as a fraction.

    Multiply by 100 for the percent that shadow / glass detection papers print.

    Arguments:
      pred (np.ndarray): H x W probabilities or binary mask; foreground where ``pred > threshold``.
      gt (np.ndarray): H x W ground-truth mask.
      threshold (float): binarisation threshold of ``pred``.

    Returns:
      (float): BER in [0, 1]. A rate whose denominator is empty (ground truth without foreground, or
        without background) counts as 1.0, so only the other rate can lower the score.
    """
    p, g = _pair(pred, gt)
    b = p > threshold
    tp, fn = np.count_nonzero(b & g), np.count_nonzero(~b & g)
    tn, fp = np.count_nonzero(~b & ~g), np.count_nonzero(b & ~g)
    tpr = _ratio(tp, tp + fn, if_empty=1.0)
    tnr = _ratio(tn, tn + fp, if_empty=1.0)
    return 1.0 - 0.5 * (tpr + tnr)


def adaptive_threshold(pred: Any) -> float:
    """The saliency literature's adaptive threshold ``min(2 * mean(pred), 1)``.

    Arguments:
      pred (np.ndarray): H x W probabilities in [0, 1].

    Returns:
      (float): the threshold in [0, 1].
    """
    return float(min(2.0 * _prob(pred).mean(), 1.0))


def _adaptive_binary(p: np.ndarray) -> np.ndarray:
    """``p >= min(2 mean(p), 1)``; an all-zero map stays empty."""
    return (p >= min(2.0 * p.mean(), 1.0)) & (p > 0)


def f_measure(pred: Any, gt: Any, beta2: float = F_BETA2) -> float:
    """F-measure at the adaptive threshold: ``(1 + b2) P R / (b2 P + R)``, ``b2 = beta^2 = 0.3``.

    Arguments:
      pred (np.ndarray): H x W probabilities in [0, 1]; binarised with ``adaptive_threshold`` (``>=``).
      gt (np.ndarray): H x W ground-truth mask.
      beta2 (float): beta squared; 0.3 weighs precision over recall, as in saliency detection.

    Returns:
      (float): F in [0, 1]; 0 when there is no true positive (also when the ground truth is empty).
    """
    p, g = _pair(pred, gt)
    b = _adaptive_binary(p)
    tp = np.count_nonzero(b & g)
    if tp == 0:
        return 0.0
    precision = tp / np.count_nonzero(b)
    recall = tp / np.count_nonzero(g)
    return float((1.0 + beta2) * precision * recall / (beta2 * precision + recall))


def e_measure(pred: Any, gt: Any) -> float:
    """Enhanced-alignment measure (Fan et al. 2018) at the adaptive threshold.

    With ``FM`` the binarised prediction (``adaptive_threshold``, ``>=``) and ``GT`` the mask, both as 0/1:
    ``a = FM - mean(FM)``, ``b = GT - mean(GT)``, alignment ``xi = 2 a b / (a^2 + b^2)``, enhanced
    ``phi = (1 + xi)^2 / 4``, score ``mean(phi)``. All-zero GT: ``phi = 1 - FM``; all-one GT: ``phi = FM``.

    Arguments:
      pred (np.ndarray): H x W probabilities in [0, 1].
      gt (np.ndarray): H x W ground-truth mask.

    Returns:
      (float): E in [0, 1].
    """
    p, g = _pair(pred, gt)
    fm = _adaptive_binary(p).astype(np.float64)
    gtf = g.astype(np.float64)
    if not g.any():
        enhanced = 1.0 - fm
    elif g.all():
        enhanced = fm
    else:
        a = fm - fm.mean()
        b = gtf - gtf.mean()
        # b is never 0 for a non-constant binary GT, so the denominator is positive.
        align = 2.0 * a * b / (a * a + b * b)
        enhanced = (align + 1.0) ** 2 / 4.0
    return float(enhanced.mean())


def foreground_rate(gt: Any, points: Any = None, *, hits: Any = None) -> float:
    """Foreground Rate ``FR = (1/T) sum_t 1[G(a_t) = 1]``: the share of chosen points on the foreground.

    Give either the points or precomputed hits.

    Arguments:
      gt (np.ndarray): H x W ground-truth mask (unused when ``hits`` is given).
      points (np.ndarray): T x 2 chosen points as (x, y) pixel coordinates of ``gt`` (column, row; SAM's
        order). Coordinates are rounded to the nearest pixel index (SAM treats integer coordinates as pixel
        indices); a point outside the mask raises ``MetricInputError``.
      hits (np.ndarray): T booleans, whether each chosen point was foreground.

    Returns:
      (float): FR in [0, 1].
    """
    if (points is None) == (hits is None):
        raise MetricInputError("Pass exactly one of `points` (T x 2 (x, y)) or `hits` (T booleans).")
    if hits is not None:
        h = _to_numpy(hits).astype(bool).reshape(-1)
    else:
        g = _mask(gt)
        if g.ndim != 2:
            raise MetricInputError(f"Ground truth must be H x W, got shape {g.shape}.")
        pts = _to_numpy(points).astype(np.float64).reshape(-1, 2)
        cols = np.floor(pts[:, 0] + 0.5).astype(np.int64)
        rows = np.floor(pts[:, 1] + 0.5).astype(np.int64)
        outside = (cols < 0) | (cols >= g.shape[1]) | (rows < 0) | (rows >= g.shape[0])
        if outside.any():
            raise MetricInputError(
                f"Points {pts[outside].tolist()} lie outside the {g.shape[1]}x{g.shape[0]} (WxH) mask."
            )
        h = g[rows, cols]
    if h.size == 0:
        raise MetricInputError("Foreground Rate of zero steps is undefined: no points / hits given.")
    return float(h.mean())


def _mean_over(metric: Any, preds: Sequence[Any], gts: Sequence[Any], **kwargs: Any) -> float:
    if len(preds) != len(gts):
        raise MetricInputError(f"{len(preds)} predictions but {len(gts)} ground-truth masks.")
    if len(preds) == 0:
        raise MetricInputError("No samples to average over.")
    return float(np.mean([metric(p, g, **kwargs) for p, g in zip(preds, gts, strict=True)]))


def summarize(
    preds: Sequence[Any],
    gts: Sequence[Any],
    points: Sequence[Any] | None = None,
    threshold: float = 0.5,
) -> dict[str, float]:
    """All metrics over a set of images, each the mean of the per-image scores.

    Arguments:
      preds (list[np.ndarray]): N probability maps (H_i x W_i, in [0, 1]).
      gts (list[np.ndarray]): N ground-truth masks of the same sizes.
      points (list[np.ndarray] or None): optional N arrays of T_i x 2 chosen (x, y) points, for the
        Foreground Rate (per image, then averaged).
      threshold (float): binarisation threshold for IoU and BER.

    Returns:
      (dict): ``{"n", "miou", "mae", "ber", "f_measure", "e_measure"}`` plus ``"fr"`` when points are given;
        all scores are fractions (BER too: multiply by 100 for percent).
    """
    out: dict[str, float] = {
        "n": len(preds),
        "miou": _mean_over(iou, preds, gts, threshold=threshold),
        "mae": _mean_over(mae, preds, gts),
        "ber": _mean_over(ber, preds, gts, threshold=threshold),
        "f_measure": _mean_over(f_measure, preds, gts),
        "e_measure": _mean_over(e_measure, preds, gts),
    }
    if points is not None:
        if len(points) != len(gts):
            raise MetricInputError(f"{len(points)} point sets but {len(gts)} ground-truth masks.")
        out["fr"] = float(np.mean([foreground_rate(g, p) for g, p in zip(gts, points, strict=True)]))
    return out
