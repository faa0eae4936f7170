"""One task's prediction: per label, the active policy (AlignSAM) or, before training, zero-shot.

Zero-shot (no policy for a label yet, ``ZERO_SHOT`` on): the CLIP-Surgery similarity map of the label's text
prompt over the image; its most similar pixel is a positive point and its least similar one a negative point;
SAM decodes the mask from that pair. No SRM, no agent. The prediction's ``model_version`` then says
``<prefix>-zeroshot`` (the project has no policy) so nobody mistakes it for a trained result.
"""

from __future__ import annotations

from collections.abc import Mapping
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
def zero_shot_mask(models: Models, image: np.ndarray, text: str) -> LabelMask:
    """CLIP-Surgery map of ``text`` -> argmax positive / argmin negative point -> SAM mask."""
    if models.clip is None:
        raise RuntimeError("zero-shot needs CLIP: set CLIP_PRESET (vit_b16 or tiny) or ZERO_SHOT=false")
    sim = models.clip.similarity_map_full(image, text).float().cpu()
    w = sim.shape[1]
    pos = int(torch.argmax(sim))
    neg = int(torch.argmin(sim))
    points = [(float(pos % w) + 0.5, float(pos // w) + 0.5, 1), (float(neg % w) + 0.5, float(neg // w) + 0.5, 0)]
    emb = models.sam.embed(image)
    coords = torch.tensor([[p[:2] for p in points]], dtype=torch.float32)
    labels = torch.tensor([[p[2] for p in points]], dtype=torch.int64)
    out = models.sam.decode([emb], coords, labels, emb.original_size)
    assert out.probs is not None
    probs = out.probs[0]
    mask = (probs > 0.5).cpu().numpy()
    score = float(out.iou_predictions[0, 0].clamp(0, 1))
    return LabelMask(mask=mask, score=score, points=points, source="zeroshot")


def predict_labels(
    models: Models,
    image: np.ndarray,
    project_id: int,
    config: LabelConfig,
    policy_versions: Mapping[str, str],
    zero_shot: bool,
) -> dict[str, LabelMask]:
    """Every label of ``config`` that has a policy (or, with ``zero_shot``, every other label too)."""
    out: dict[str, LabelMask] = {}
    for target in config.targets:
        version = policy_versions.get(target.label)
        if version:
            model = models.policy(project_id, target.label, version)
            pred = model.predict([image], text=target.prompt)[0]
            out[target.label] = LabelMask(pred.mask, pred.score, pred.points, "policy")
        elif zero_shot and models.clip is not None:
            out[target.label] = zero_shot_mask(models, image, target.prompt)
    return out


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
