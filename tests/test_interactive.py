"""alignsam.interactive: how clicks combine with a pre-label (each strategy), the cached start's round trip, and
SAM's answers to clicks and boxes on the bundled small SAM (real weights, synthetic scenes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignsam.interactive import STRATEGIES, InteractiveError, Start, combine, correct, correct_many
from alignsam.loading import load_sam
from alignsam.metrics import iou
from alignsam.sam import FrozenSam
from alignsam.synthetic import make_split
from alignsam.synthetic.masks import corrective_click
from ml_backend.settings import INTERACTIVE_STRATEGIES

POLICY = ((10.0, 10.0, 1), (50.0, 50.0, 0), (90.0, 12.0, 0), (52.0, 48.0, 1))
LOW = np.full((8, 8), 2.0, np.float32)


@pytest.fixture(scope="module")
def sam() -> FrozenSam:
    torch.set_num_threads(1)
    return load_sam("small", None, "cpu")


def test_settings_offer_exactly_the_strategies_alignsam_has() -> None:
    assert ("auto", *STRATEGIES) == INTERACTIVE_STRATEGIES


def test_each_strategy_combines_the_clicks_with_the_start_as_documented() -> None:
    start = Start(POLICY, LOW, (100, 100))
    click = [(51.0, 51.0, 1)]  # a positive click next to the policy's negative point at (50, 50)
    assert combine("clicks", click, start, (100, 100)) == (click, None)
    assert combine("policy", click, start, (100, 100)) == ([*POLICY, *click], None)
    kept, mask = combine("policy-drop-near", click, start, (100, 100))
    assert kept == [POLICY[0], POLICY[2], POLICY[3], *click] and mask is None  # only the contradicted one goes
    assert combine("policy-positive", click, start, (100, 100)) == ([POLICY[0], POLICY[3], *click], None)
    points, mask = combine("mask-input", click, start, (100, 100))
    assert points == click and mask is LOW
    points, mask = combine("positive-mask-input", click, start, (100, 100))
    assert points == [POLICY[0], POLICY[3], *click] and mask is LOW
    for strategy in STRATEGIES:  # without a start every strategy is SAM on the clicks
        assert combine(strategy, click, None, (100, 100)) == (click, None)


def test_bad_strategy_or_start_of_another_image_raise() -> None:
    with pytest.raises(InteractiveError, match="unknown interactive strategy"):
        combine("best", [], None, (10, 10))
    with pytest.raises(InteractiveError, match="for a"):
        combine("policy", [(1.0, 1.0, 1)], Start(POLICY, None, (10, 10)), (20, 20))


def test_start_round_trips_through_bytes_and_refuses_anything_else() -> None:
    start = Start(POLICY, np.linspace(-5, 5, 64, dtype=np.float32).reshape(8, 8), (64, 48))
    back = Start.from_bytes(start.to_bytes())
    assert back.points == POLICY and back.size == (64, 48)
    assert back.low_res is not None and np.allclose(back.low_res, start.low_res, atol=5e-3)
    assert Start.from_bytes(Start(POLICY, None, (5, 5)).to_bytes()).low_res is None
    with pytest.raises(InteractiveError):
        Start.from_bytes(b"not an npz")


def test_sam_answers_a_click_a_negative_click_and_a_box(sam: FrozenSam) -> None:
    scenes = make_split("saliency", "test", 3)
    embs = sam.embed_many([s.image for s in scenes])
    for scene, emb in zip(scenes, embs, strict=True):
        ys, xs = np.nonzero(scene.mask)
        inside = (float(xs.mean()), float(ys.mean()), 1)
        one = correct(sam, emb, [inside])
        assert one.mask.shape == scene.mask.shape and iou(one.mask, scene.mask) > 0.85
        assert 0 <= one.score <= 1 and one.points == [inside] and one.low_res is not None
        box = correct(sam, emb, [], box=(float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())))
        assert box.mask.shape == scene.mask.shape and box.points == []
    with pytest.raises(InteractiveError, match="at least one click or a box"):
        correct(sam, embs[0], [])


def test_corrective_clicks_negative_ones_included_improve_the_mask(sam: FrozenSam) -> None:
    """The simulated annotator (clicks on the largest error region) on scenes a first click gets wrong."""
    scenes = make_split("shadow", "test", 6)
    embs = sam.embed_many([s.image for s in scenes])
    first, last, negatives = [], [], 0
    for scene, emb in zip(scenes, embs, strict=True):
        clicks: list[tuple[float, float, int]] = []
        mask = np.zeros_like(scene.mask)
        for k in range(4):
            click = corrective_click(mask, scene.mask)
            if click is None:
                break
            (x, y), label = click
            clicks.append((float(x), float(y), label))
            negatives += label == 0
            mask = correct(sam, emb, clicks).mask
            if k == 0:
                first.append(iou(mask, scene.mask))
        last.append(iou(mask, scene.mask))
    assert negatives > 0
    assert np.mean(last) > np.mean(first) + 0.05


def test_a_batch_answers_as_each_image_alone_whatever_its_kind(sam: FrozenSam) -> None:
    scenes = make_split("blur", "test", 3)
    embs = sam.embed_many([s.image for s in scenes])
    centre = [(float(np.nonzero(s.mask)[1].mean()), float(np.nonzero(s.mask)[0].mean()), 1) for s in scenes]
    first = correct(sam, embs[0], [centre[0]])
    start = Start(tuple(first.points), first.low_res, embs[1].original_size)
    clicks = [[centre[0]], [centre[1], (2.0, 2.0, 0)], [centre[2]]]
    starts = [None, start, None]
    boxes = [None, None, (0.0, 0.0, 40.0, 40.0)]
    batch = correct_many(sam, embs, clicks, starts, "positive-mask-input", boxes)
    for i in range(3):
        alone = correct(sam, embs[i], clicks[i], starts[i], "positive-mask-input", boxes[i])
        assert np.allclose(batch[i].probs, alone.probs, atol=1e-4)
        assert batch[i].points == alone.points
