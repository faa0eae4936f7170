"""One task's prediction: per label, the active policy (AlignSAM) or, before training, zero-shot.

Zero-shot (no policy for a label yet, ``ZERO_SHOT`` on): the CLIP-Surgery similarity map of the label's text
prompt over the image; its most similar pixel is a positive point and its least similar one a negative point;
SAM decodes the mask from that pair. No SRM, no agent. The prediction's ``model_version`` then says
``<prefix>-zeroshot`` (the project has no policy) so nobody mistakes it for a trained result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ml_backend.formats import masks_to_results, task_prediction
from ml_backend.label_config import LabelConfig
from ml_backend.settings import Settings
from workers.models import Models


@dataclass
class LabelMask:
    """One label's predicted mask, its score and the prompt points used."""

    mask: np.ndarray
    score: float
    points: list[tuple[float, float, int]]
    source: str  # "policy" or "zeroshot"


@torch.no_grad()
def zero_shot_masks(models: Models, images: Sequence[np.ndarray], text: str) -> list[LabelMask]:
    """Per image: CLIP-Surgery map of ``text`` -> argmax positive / argmin negative point -> SAM mask.

    The images go through CLIP, SAM's encoder (cached embeddings) and SAM's decoder as one batch.
    """
    if models.clip is None:
        raise RuntimeError("zero-shot needs CLIP: set CLIP_PRESET (vit_b16 or tiny) or ZERO_SHOT=false")
    if not images:
        return []
    models.clip.patch_maps(list(images), text)  # one CLIP batch; the per-image maps below hit its cache
    all_points: list[list[tuple[float, float, int]]] = []
    for image in images:
        sim = models.clip.similarity_map_full(image, text).float().cpu()
        w = sim.shape[1]
        pos = int(torch.argmax(sim))
        neg = int(torch.argmin(sim))
        all_points.append([(float(pos % w) + 0.5, float(pos // w) + 0.5, 1),
                           (float(neg % w) + 0.5, float(neg // w) + 0.5, 0)])
    embs = models.sam.embed_many(list(images))
    coords = torch.tensor([[p[:2] for p in points] for points in all_points], dtype=torch.float32)
    labels = torch.tensor([[p[2] for p in points] for points in all_points], dtype=torch.int64)
    out = models.sam.decode(embs, coords, labels, [e.original_size for e in embs])
    assert out.probs is not None
    masks: list[LabelMask] = []
    for i, points in enumerate(all_points):
        mask = (out.probs[i] > 0.5).cpu().numpy()
        score = float(out.iou_predictions[i, 0].clamp(0, 1))
        masks.append(LabelMask(mask=mask, score=score, points=points, source="zeroshot"))
    return masks


def zero_shot_mask(models: Models, image: np.ndarray, text: str) -> LabelMask:
    """:func:`zero_shot_masks` of one image."""
    return zero_shot_masks(models, [image], text)[0]


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
            model = models.policy(project_id, target.label, version)
            preds = model.predict(list(images), text=target.prompt)
            for one, pred in zip(out, preds, strict=True):
                one[target.label] = LabelMask(pred.mask, pred.score, pred.points, "policy")
        elif zero_shot and models.clip is not None:
            for one, mask in zip(out, zero_shot_masks(models, images, target.prompt), strict=True):
                one[target.label] = mask
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
        masks, config, scores, simplify_px=settings.polygon_simplify_px, min_area_px=settings.polygon_min_area_px
    )
    return task_prediction(results, model_version)
