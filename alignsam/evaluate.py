"""The paper's evaluation table for a trained policy, with its ablations (paper Table 4, supp. Table 4).

Rows: AlignSAM; w/o RL (random actions); w/o SRM (every point positive); w/o multi-step (T=1).
Columns: mIoU, MAE, BER, F-measure (beta^2 = 0.3), E-measure, and the Foreground Rate of the
chosen points. Ablation rows use the same bundle, the same images and the same initial points.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from alignsam import metrics
from alignsam.data import Sample
from alignsam.predict import AlignSAM, Prediction

ABLATIONS: dict[str, dict[str, object]] = {
    "AlignSAM": {},
    "w/o RL": {"actions": "random"},
    "w/o SRM": {"labels": "positive"},
    "w/o multi-step": {"steps": 1},
}


def on_target(gt: np.ndarray, x: float, y: float) -> bool:
    """Whether the point ``(x, y)`` (image pixels) lies on the ground truth: the pixel at the floor of its coordinates,
    as the environment's reward reads it."""
    h, w = gt.shape
    return bool(gt[min(int(y), h - 1), min(int(x), w - 1)])


def points_foreground_rate(points: Sequence[tuple[float, float, int]], gt: np.ndarray) -> float | None:
    """Share of the ``(x, y, label)`` points (label >= 0; -1 is padding) on the ground truth; None without any."""
    chosen = [(x, y) for x, y, label in points if label >= 0]
    if not chosen:
        return None
    hits = [on_target(gt, x, y) for x, y in chosen]
    return metrics.foreground_rate(gt, hits=np.array(hits))


def foreground_rate(pred: Prediction, gt: np.ndarray, initial: int = 2) -> float | None:
    """Share of the agent's points (after the ``initial`` SRM points, before any SRM corrective clicks) that land
    on the ground truth."""
    return points_foreground_rate(pred.points[initial:len(pred.points) - pred.corrective], gt)


def evaluate(
    model: AlignSAM, samples: Sequence[Sample], ablations: bool = False, batch_size: int = 16, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Metrics per row, averaged over ``samples``."""
    rows = ABLATIONS if ablations else {"AlignSAM": {}}
    images = [s.image for s in samples]
    gts = [s.mask for s in samples]
    table: dict[str, dict[str, float]] = {}
    for name, kwargs in rows.items():
        preds = model.predict(images, batch_size=batch_size, generator=torch.Generator().manual_seed(seed), **kwargs)
        row = metrics.summarize([p.probs for p in preds], gts)
        frs = [fr for p, g in zip(preds, gts, strict=True) if (fr := foreground_rate(p, g)) is not None]
        row["fr"] = float(np.mean(frs)) if frs else float("nan")
        table[name] = row
    return table


COLUMNS = (("miou", "mIoU"), ("mae", "MAE"), ("ber", "BER"), ("f_measure", "F-measure"), ("e_measure", "E-measure"), ("fr", "FR"))


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A Markdown table of :func:`evaluate`'s result."""
    cols = [(k, label) for k, label in COLUMNS if any(k in row for row in table.values())]
    lines = ["| method | " + " | ".join(label for _, label in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in table.items():
        cells = [f"{row[k]:.4f}" if k in row else "" for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
