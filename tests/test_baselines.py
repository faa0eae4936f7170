"""PerSAM-style baseline and oracle clicker of the quality benchmark (tiny SAM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignsam.rollout import encode
from alignsam.sam import FrozenSam
from alignsam.synthetic.baselines import oracle_predict, persam_predict, target_prototype
from tests.helpers import bright_disc_samples


@pytest.fixture(scope="module")
def sam() -> FrozenSam:
    return FrozenSam.from_preset("tiny", seed=0)


def test_prototype_is_the_mean_foreground_embedding(sam):
    samples = bright_disc_samples(3, seed=0)
    enc = encode(sam, [s.image for s in samples], masks=[s.mask for s in samples])
    proto = target_prototype(sam, enc)
    grids = [sam.to_embedding_frame(torch.as_tensor(s.mask).float(), s.mask.shape) for s in samples]
    expected = sum((e * g).sum(dim=(1, 2)) for e, g in zip(enc.embeddings, grids, strict=True))
    torch.testing.assert_close(proto, F.normalize(expected / sum(g.sum() for g in grids), dim=0))


def test_persam_points_are_the_most_and_least_similar_cells(sam):
    samples = bright_disc_samples(2, seed=1)
    enc = encode(sam, [s.image for s in samples])
    # A prototype equal to one cell's feature makes that cell the positive point.
    proto = F.normalize(enc.embeddings[0, :, 5, 9], dim=0)
    probs, points = persam_predict(sam, proto, enc)
    cells = sam.points_to_grid(points, enc.sizes, sam.embedding_size)
    assert cells[0, 0].tolist() == [5, 9]
    sim = torch.einsum("chw,c->hw", F.normalize(enc.embeddings[0], dim=0), proto)
    assert cells[0, 1].tolist() == list(divmod(int(sim.argmin()), sim.shape[1]))
    assert [p.shape for p in probs] == [s.mask.shape for s in samples]


def test_oracle_clicks_on_errors_with_ground_truth_labels(sam):
    samples = bright_disc_samples(3, seed=2)
    enc = encode(sam, [s.image for s in samples], masks=[s.mask for s in samples])
    probs, clicks = oracle_predict(sam, enc, steps=4)
    for s, cl, p in zip(samples, clicks, probs, strict=True):
        assert len(cl) == 4 and p.shape == s.mask.shape
        assert cl[0][2] == 1  # the first error is the whole (missed) target
        for x, y, label in cl:
            if label >= 0:
                assert bool(s.mask[int(y), int(x)]) == (label == 1)


def test_oracle_on_an_empty_target_clicks_negatives_only(sam):
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    enc = encode(sam, [img], masks=[np.zeros((64, 64), bool)])
    _, clicks = oracle_predict(sam, enc, steps=3)
    assert all(label in (0, -1) for *_, label in clicks[0])
