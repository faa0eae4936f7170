"""alignsam.interactive: how clicks combine with a pre-label (each strategy), the cached start's round trip, and
SAM's answers to clicks and boxes on the bundled small SAM (real weights, synthetic scenes)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from alignsam.interactive import (
    STRATEGIES,
    InteractiveError,
    Start,
    combine,
    correct,
    correct_many,
    route_clicks,
)
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


def _two_squares(size: tuple[int, int] = (40, 60)) -> np.ndarray:
    masks = np.zeros((2, *size), bool)
    masks[0, 5:15, 5:15] = True
    masks[1, 20:30, 40:50] = True
    return masks


def test_a_split_start_keeps_its_instances_through_bytes_and_old_caches_read_without() -> None:
    masks = _two_squares()
    groups = (((10.0, 10.0, 1), (55.0, 5.0, 0)), ((45.0, 25.0, 1),))
    start = Start(POLICY, None, (40, 60), groups, masks)
    back = Start.from_bytes(start.to_bytes())
    assert back.split and back.instance_points == groups
    assert back.instance_masks is not None and np.array_equal(back.instance_masks, masks)
    # A start cached before instances existed (no instance arrays in the .npz) reads as not split.
    buf = io.BytesIO()
    np.savez_compressed(buf, points=np.asarray(POLICY, np.float32), low_res=LOW.astype(np.float16),
                        size=np.asarray((8, 8)))
    old = Start.from_bytes(buf.getvalue())
    assert not old.split and old.instance_points == () and old.points == POLICY


def test_clicks_go_to_the_instance_they_fall_in_or_near_or_start_a_new_one() -> None:
    start = Start((), None, (40, 60), (((10.0, 10.0, 1),), ((45.0, 25.0, 1),)), _two_squares())
    # 8 % of the 60-px long side: within 4.8 px of a mask is "near".
    routed = route_clicks([(12.0, 12.0, 0), (47.5, 32.5, 1), (30.0, 35.0, 1), (31.0, 37.0, 1), (58.0, 2.0, 0)],
                          start)
    assert routed[0] == [(12.0, 12.0, 0)]  # inside instance 0
    assert routed[2] == [(30.0, 35.0, 1), (31.0, 37.0, 1)]  # far from both: a new instance, the second joins it
    # 2.5 px below instance 1: near. The far negative at (58, 2) goes to the nearest: instance 1 (20 px away;
    # instance 0 is 45 px, the new one 43 px).
    assert routed[1] == [(47.5, 32.5, 1), (58.0, 2.0, 0)]
    assert set(routed) == {0, 1, 2}


def test_per_instance_correction_adds_the_missed_instance_and_keeps_the_others(sam: FrozenSam) -> None:
    """A pre-label of all but one of a scene's target circles (each its own instance, from a perfect SRM map): one
    positive click on the missed circle adds it and keeps the rest; every one-mask strategy loses instances."""
    from alignsam.instances import split_instances
    from alignsam.rollout import SrmInputs, encode

    gains, singles = [], []
    for scene in make_split("instances", "test", 6):
        targets = [scene.regions[t] for t in scene.target_regions]
        if len(targets) < 3:
            continue
        enc = encode(sam, [scene.image], masks=[np.logical_or.reduce(targets[1:])])  # circle 0 is missed
        srm_in = SrmInputs(sam, enc)
        assert srm_in.gt is not None
        logits = (srm_in.gt[:, 0] > 0.5).float() * 10 - 5
        (part,) = split_instances(sam, enc.embeddings, enc.sizes, logits, srm_in.valid[:, 0], [[]],
                                  [np.zeros(scene.mask.shape, np.float32)])
        assert part.split
        start = Start((), None, scene.mask.shape, tuple(tuple(p) for p in part.points), np.stack(part.masks))
        ys, xs = np.nonzero(targets[0])
        click = [(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, 1)]
        emb = sam.embed(scene.image)
        before = iou(part.probs > 0.5, scene.mask)
        after = iou(correct(sam, emb, click, start, "per-instance").mask, scene.mask)
        single = max(iou(correct(sam, emb, click, start, s).mask, scene.mask) for s in STRATEGIES
                     if s != "per-instance")
        gains.append(after - before)
        singles.append(after - single)
    assert len(gains) >= 3
    assert np.mean(gains) > 0.05 and min(gains) > -0.02, gains  # the click adds the missed circle
    assert np.mean(singles) > 0.2, singles  # one mask from the click drops the others


def test_per_instance_without_a_split_start_is_policy_drop_near(sam: FrozenSam) -> None:
    (scene,) = make_split("saliency", "test", 1)
    emb = sam.embed(scene.image)
    start = Start(((5.0, 5.0, 0), (30.0, 30.0, 1)), None, scene.mask.shape)
    click = [(6.0, 6.0, 1)]
    a = correct(sam, emb, click, start, "per-instance")
    b = correct(sam, emb, click, start, "policy-drop-near")
    assert a.points == b.points and np.array_equal(a.mask, b.mask)
