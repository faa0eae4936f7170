"""The pictures of a training run, for people: a validation gallery and the learning curve (PNG, matplotlib).

* :func:`gallery` — one row per held-out image: the image, its ground truth, the policy's prediction with the
  agent's prompt points (green ``+`` positive, red ``x`` negative) and the prediction's IoU in the row's title.
* :func:`learning_curve` — per training episode the mean reward and the foreground rate (FR) of the sampled
  actions, one line per SRM branch trained (the chosen one drawn thicker and named so), and the validation
  choices: each branch's validation mIoU, and the active policy's on the same images when it was compared.
  Validation runs once per branch, after its last episode (:func:`alignsam.train.train`), so validation mIoU is
  one point per branch at its last episode, not a curve.

Drawn with matplotlib's object API on the Agg canvas (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): no
``pyplot``, so no global backend, no display and nothing shared between threads. Files are written atomically
(temp file + rename): a reader sees the previous picture or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from alignsam.data import Sample
from alignsam.metrics import iou as mask_iou
from alignsam.predict import Prediction

GALLERY_ROWS = 8
"""At most this many images in a gallery (the first ones given)."""

DPI = 80
POSITIVE, NEGATIVE = "#00d000", "#ff2020"
_MASK_TINT = np.array([40, 200, 255], np.float32)


def _tinted(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (HxWx3 uint8) with ``mask`` (HxW bool) tinted blue-cyan; a new array."""
    out = image.astype(np.float32).copy()
    out[mask] = 0.5 * out[mask] + 0.5 * _MASK_TINT
    return out.clip(0, 255).astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Writes ``fig`` as a PNG at ``path`` atomically (the folder must exist)."""
    path = Path(path)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            fig.savefig(out, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gallery(samples: Sequence[Sample], predictions: Sequence[Prediction], path: str | os.PathLike[str],
            title: str | None = None, max_rows: int = GALLERY_ROWS) -> list[float]:
    """Draws the first ``max_rows`` of ``samples`` with their ``predictions`` (same order) as a PNG at ``path``.

    Each row: the image; its ground truth tinted; the predicted mask tinted with the prompt points, ``+`` green
    for positive, ``x`` red for negative; the row's title names the sample and gives the prediction's IoU against
    the ground truth. ``title`` heads the figure. Returns the IoU of each row drawn.

    Raises:
      ValueError: no samples, or not one prediction per sample.
    """
    if not samples:
        raise ValueError("gallery: no samples to draw")
    if len(predictions) != len(samples):
        raise ValueError(f"gallery: {len(predictions)} predictions for {len(samples)} samples")
    rows = list(zip(samples, predictions, strict=True))[:max_rows]
    fig = Figure(figsize=(9.0, 3.0 * len(rows) + (0.5 if title else 0.0)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    ious = []
    for (sample, pred), (ax_image, ax_truth, ax_pred) in zip(rows, axes, strict=True):
        image = _rgb(sample.image)
        score = mask_iou(pred.mask, sample.mask)
        ious.append(score)
        ax_image.imshow(image)
        ax_image.set_title(sample.name or "image", fontsize=9)
        ax_truth.imshow(_tinted(image, sample.mask))
        ax_truth.set_title("ground truth", fontsize=9)
        ax_pred.imshow(_tinted(image, pred.mask))
        positive = [(x, y) for x, y, label in pred.points if label == 1]
        negative = [(x, y) for x, y, label in pred.points if label != 1]
        marker_size = 12 * 12
        if positive:
            ax_pred.scatter(*zip(*positive, strict=True), marker="+", s=marker_size, linewidths=2.5, c=POSITIVE,
                            label="positive")
        if negative:
            ax_pred.scatter(*zip(*negative, strict=True), marker="x", s=marker_size, linewidths=2.5, c=NEGATIVE,
                            label="negative")
        ax_pred.set_title(f"prediction · IoU {score:.3f} · {len(positive)}+ {len(negative)}−", fontsize=9)
        for ax in (ax_image, ax_truth, ax_pred):
            ax.set_axis_off()
            ax.set_xlim(-0.5, image.shape[1] - 0.5)
            ax.set_ylim(image.shape[0] - 0.5, -0.5)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return ious


def learning_curve(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike[str],
                   candidates: Mapping[str, Mapping[str, Any]] | None = None, chosen: str | None = None,
                   baseline: Mapping[str, Any] | None = None, title: str | None = None) -> None:
    """Draws the learning curve of one training run as a PNG at ``path``.

    Arguments:
      histories: candidate (SRM branch, ``"<branch> <rows>x<cols>"`` on another action grid: see
        :func:`alignsam.train.candidate_name`) -> one record per episode with ``episode`` and ``reward`` (and ``foreground_rate``),
        as in :attr:`alignsam.train.TrainResult.histories`; one line per branch.
      candidates: branch -> validation metrics (``miou``), as in :attr:`~alignsam.train.TrainResult.candidates`:
        drawn as one point per branch at its last episode (validation runs once, after training).
      chosen: the branch kept; its lines are drawn thicker and its legend entry says "chosen".
      baseline: the active policy's metrics on the same held-out images (``miou``): a dashed line.
      title: heads the figure.

    Raises:
      ValueError: no branch has any episode.
    """
    if not any(histories.values()):
        raise ValueError("learning_curve: no episodes to draw")
    candidates = candidates or {}
    fig = Figure(figsize=(9.0, 3.6 + (0.4 if title else 0.0)))
    ax_reward, ax_val = fig.subplots(1, 2)
    colors = {"implicit": "#1f77b4", "explicit": "#d62728"}
    for branch, records in histories.items():
        if not records:
            continue
        color = colors.get(branch.split(" ")[0], "#555555")
        width = 2.6 if branch == chosen else 1.3
        style = "-" if " " not in branch else "--"  # another action grid than the configured one
        name = f"{branch} (chosen)" if branch == chosen else branch
        episodes = [int(r["episode"]) for r in records]
        ax_reward.plot(episodes, [float(r["reward"]) for r in records], color=color, lw=width, ls=style, marker=".",
                       label=name)
        if all("foreground_rate" in r for r in records):
            ax_val.plot(episodes, [float(r["foreground_rate"]) for r in records], color=color, lw=width, alpha=0.6,
                        ls=":", label=f"{branch} training FR")
        metrics = candidates.get(branch) or {}
        if isinstance(metrics.get("miou"), (int, float)):
            on = metrics.get("on", "validation")
            ax_val.scatter([episodes[-1]], [float(metrics["miou"])], color=color, marker="*", zorder=3,
                           s=260 if branch == chosen else 120, label=f"{name} {on} mIoU {float(metrics['miou']):.3f}")
    if baseline is not None and isinstance(baseline.get("miou"), (int, float)):
        ax_val.axhline(float(baseline["miou"]), color="#444444", ls="--", lw=1.2,
                       label=f"active policy mIoU {float(baseline['miou']):.3f}")
    ax_reward.set_title("mean reward per step", fontsize=10)
    ax_reward.set_xlabel("episode")
    ax_reward.set_ylim(-1.05, 1.05)
    ax_val.set_title("validation mIoU (★, after training) and FR", fontsize=10)
    ax_val.set_xlabel("episode")
    ax_val.set_ylim(-0.02, 1.02)
    for ax in (ax_reward, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)
