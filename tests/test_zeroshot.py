"""Zero-shot prediction (CLIP-Surgery points -> SAM) on the real classes (tiny presets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignsam import AlignSamError, ClipSurgery, FrozenSam, ZeroShot


@pytest.fixture(scope="module")
def model() -> ZeroShot:
    return ZeroShot(FrozenSam.from_preset("tiny", seed=0), ClipSurgery.from_preset("tiny"))


def test_points_are_the_clip_maps_extremes_and_the_mask_is_sams_answer_to_them(model: ZeroShot):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), rng.integers(0, 256, (72, 48, 3), dtype=np.uint8)]
    preds = model.predict(images, text="shadow")
    assert len(preds) == 2
    for image, pred in zip(images, preds, strict=True):
        sim = model.clip.similarity_map_full(image, "shadow").float()
        w = sim.shape[1]
        pos, neg = int(torch.argmax(sim)), int(torch.argmin(sim))
        assert pred.points == [(pos % w + 0.5, pos // w + 0.5, 1), (neg % w + 0.5, neg // w + 0.5, 0)]
        alone = model.sam.decode([model.sam.embed(image)], torch.tensor([[p[:2] for p in pred.points]]),
                                 torch.tensor([[1, 0]]), None)
        assert pred.mask.shape == image.shape[:2] and pred.mask.dtype == bool
        np.testing.assert_array_equal(pred.mask, alone.probs[0].cpu().numpy() > 0.5)
        assert 0.0 <= pred.score <= 1.0 and pred.present == 1.0


def test_no_images_no_predictions(model: ZeroShot):
    assert model.predict([], text="shadow") == []


def test_without_clip_it_says_what_to_set():
    with pytest.raises(AlignSamError, match="CLIP"):
        ZeroShot(FrozenSam.from_preset("tiny", seed=0), None)
