"""One task's prediction: per label, the active policy (:class:`~alignsam.AlignSAM`) or, before training and with
``ZERO_SHOT`` on, :class:`~alignsam.ZeroShot` (CLIP-Surgery points -> SAM). Label Studio sees the latter under the
model version ``<prefix>-zeroshot``, so nobody mistakes it for a trained result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignsam.predict import AlignSAM
from alignsam.zeroshot import ZeroShot
from ml_backend.formats import masks_to_results, task_prediction
from ml_backend.label_config import LabelConfig
from ml_backend.settings import Settings
from workers.interactive import save_starts
from workers.models import Models


@dataclass
class LabelMask:
    """One label's predicted mask, its score, the prompt points used and its instances' masks."""

    mask: np.ndarray
    score: float
    points: list[tuple[float, float, int]]
    source: str  # "policy" or "zeroshot"
    instances: list[np.ndarray] = field(default_factory=list)  # one mask per instance when the policy split it


def predict_labels_many(
    models: Models,
    images: Sequence[np.ndarray],
    project_id: int,
    config: LabelConfig,
    policy_versions: Mapping[str, str],
    zero_shot: bool,
) -> list[dict[str, LabelMask]]:
    """:func:`predict_labels` for several images of one project, each label's model run once over the batch."""
    out: list[dict[str, LabelMask]] = [{} for _ in images]
    if not images:
        return out
    for target in config.targets:
        version = policy_versions.get(target.label)
        if version:
            model: AlignSAM | ZeroShot = models.policy(project_id, target.label, version)
        elif zero_shot and models.clip is not None:
            model = models.zero_shot
        else:
            continue
        source = "policy" if version else "zeroshot"
        preds = model.predict(list(images), text=target.prompt)
        if version:  # where an annotator's click on this label starts from (workers.interactive)
            save_starts(models.settings, project_id, target.label, version, images, preds)
        for one, pred in zip(out, preds, strict=True):
            one[target.label] = LabelMask(pred.mask, pred.score, pred.points, source, list(pred.instances))
    return out


def predict_labels(
    models: Models,
    image: np.ndarray,
    project_id: int,
    config: LabelConfig,
    policy_versions: Mapping[str, str],
    zero_shot: bool,
) -> dict[str, LabelMask]:
    """Every label of ``config`` that has a policy (or, with ``zero_shot``, every other label too)."""
    return predict_labels_many(models, [image], project_id, config, policy_versions, zero_shot)[0]


def prediction_for(
    settings: Settings,
    label_masks: Mapping[str, LabelMask],
    config: LabelConfig,
    model_version: str,
) -> dict[str, Any]:
    """Label Studio prediction (``result``, ``score``, ``model_version``) from per-label masks."""
    masks = {label: m.mask for label, m in label_masks.items()}
    scores = {label: m.score for label, m in label_masks.items()}
    results = masks_to_results(
        masks, config, scores, simplify_px=settings.polygon_simplify_px, min_area_px=settings.polygon_min_area_px,
        instances={label: m.instances for label, m in label_masks.items()},
    )
    return task_prediction(results, model_version)
