"""Every instance of the target (alignsam.instances): components of the SRM's map, one SAM prompt per instance
(bundled small SAM on the multi-instance family), the validation choice in training and the bundle, and the
Label Studio side (one brush region per instance, the project's setting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignsam.predict as predict_module
from alignsam.bundle import load_bundle, save_bundle
from alignsam.errors import BundleError
from alignsam.instances import (
    FEATURES,
    FEATURES_V1,
    InstanceFilter,
    InstanceResult,
    component_box,
    filter_instances,
    fit_filter_on,
    fit_instance_filter,
    grid_components,
    group_by_point_masks,
    instance_examples,
    instance_features,
    refine_instances,
    split_instances,
    with_weak_components,
)
from alignsam.loading import load_sam
from alignsam.metrics import iou
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.rollout import SrmInputs, encode
from alignsam.sam import FrozenSam
from alignsam.synthetic import make_split
from alignsam.train import kept_instance_mode, train
from ml_backend.errors import LabelConfigError
from ml_backend.formats import masks_to_results
from ml_backend.label_config import parse_label_config
from tests.helpers import bright_disc_samples

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="cell"/>'
          '<Label value="bg"/></BrushLabels></View>')


@pytest.fixture(scope="module")
def small() -> FrozenSam:
    torch.set_num_threads(1)
    return load_sam("small", None, "cpu")


def test_grid_components_are_4_connected() -> None:
    fg = np.array([[1, 1, 0, 0],
                   [0, 1, 0, 1],
                   [1, 0, 0, 1],
                   [1, 0, 1, 1]], bool)
    labels, n = grid_components(fg)
    assert n == 3
    assert len({labels[0, 0], labels[0, 1], labels[1, 1]}) == 1  # one piece
    assert labels[2, 0] == labels[3, 0] != labels[1, 1]           # diagonal contact does not join
    assert labels[1, 3] == labels[3, 2] and (labels[~fg] == 0).all()
    assert grid_components(np.zeros((3, 3), bool))[1] == 0


def test_one_prompt_per_instance_finds_objects_one_positive_click_set_misses(small: FrozenSam) -> None:
    """With the SRM's map replaced by the ground truth on the embedding grid (a perfect SRM), prompting SAM once per
    component recovers the scene's 3-6 red circles; SAM given all their centres at once (what the policy's mask is
    made of) does far worse."""
    scenes = make_split("instances", "test", 6)
    enc = encode(small, [s.image for s in scenes], masks=[s.mask for s in scenes])
    srm_in = SrmInputs(small, enc)
    assert srm_in.gt is not None
    logits = (srm_in.gt[:, 0] > 0.5).float() * 10 - 5
    together, split = [], []
    for i, scene in enumerate(scenes):
        centres = [(float(np.nonzero(scene.regions[t])[1].mean()), float(np.nonzero(scene.regions[t])[0].mean()), 1)
                   for t in scene.target_regions]
        out = small.decode(enc.embeddings[i : i + 1], torch.tensor([[c[:2] for c in centres]]),
                           torch.ones(1, len(centres), dtype=torch.long), [enc.sizes[i]])
        base = out.probs[0].numpy()
        (part,) = split_instances(small, enc.embeddings[i : i + 1], [enc.sizes[i]], logits[i : i + 1],
                                  srm_in.valid[i : i + 1, 0], [centres], [base])
        assert part.split and len(part.masks) == len(part.points)
        assert abs(len(part.masks) - len(scene.target_regions)) <= 1  # touching circles may merge on the grid
        together.append(iou(base > 0.5, scene.mask))
        split.append(iou(part.probs > 0.5, scene.mask))
        assert (part.probs > 0.5).sum() == np.logical_or.reduce(part.masks).sum()  # the union is the target
    assert np.mean(split) > 0.8 and np.mean(split) > np.mean(together) + 0.15, (together, split)


def test_grouping_by_own_masks_finds_instances_without_any_srm_map(small: FrozenSam) -> None:
    """The w/o-SRM ablation's per-instance prompts: positive clicks at the target circles' centres (two per circle)
    are grouped by their own masks into about one group per circle, with no SRM map given, and the union beats SAM
    given all the clicks at once; a click inside a point's mask joins its group; one click is never split."""
    scenes = make_split("instances", "test", 4)
    enc = encode(small, [s.image for s in scenes])
    pts, base, together = [], [], []
    for i, scene in enumerate(scenes):
        centres = []
        for t in scene.target_regions:
            ys, xs = np.nonzero(scene.regions[t])
            centres += [(float(xs.mean()), float(ys.mean()), 1), (float(xs.mean()) + 1.0, float(ys.mean()), 1)]
        out = small.decode(enc.embeddings[i : i + 1], torch.tensor([[c[:2] for c in centres]]),
                           torch.ones(1, len(centres), dtype=torch.long), [enc.sizes[i]])
        pts.append(centres)
        base.append(out.probs[0].numpy())
        together.append(iou(base[-1] > 0.5, scene.mask))
    parts = group_by_point_masks(small, enc.embeddings, enc.sizes, pts, base)
    split = []
    for part, scene, centres in zip(parts, scenes, pts, strict=True):
        assert part.split and len(part.masks) == len(part.points)
        assert abs(len(part.masks) - len(scene.target_regions)) <= 1
        assert sorted(p for g in part.points for p in g if p[2] == 1) == sorted(centres)  # every click, once
        split.append(iou(part.probs > 0.5, scene.mask))
    assert np.mean(split) > 0.9 and np.mean(split) > np.mean(together) + 0.08, (together, split)  # 0.96 / 0.84
    (alone,) = group_by_point_masks(small, enc.embeddings[:1], enc.sizes[:1], [pts[0][:1]], base[:1])
    assert not alone.split and np.array_equal(alone.probs, base[0])
    (absent,) = group_by_point_masks(small, enc.embeddings[:1], enc.sizes[:1], pts[:1], base[:1], present=[False])
    assert not absent.split


def test_weak_components_become_instances_of_their_own_and_merge_nothing() -> None:
    logits = torch.full((1, 12, 12), -6.0)
    logits[0, 1:4, 1:4] = 3.0     # a component of the map
    logits[0, 4, 1:4] = -1.0      # a weak rim touching it: stays below 0 (raising it would merge)
    logits[0, 8:10, 8:10] = -1.5  # a weak blob of its own: raised to an instance
    logits[0, 8:10, 0:2] = -1.0   # another, but outside the image
    valid = torch.ones(1, 12, 12, dtype=torch.bool)
    valid[0, :, :3] = valid[0, :, :3] & torch.arange(12)[:, None].lt(6)
    out = with_weak_components(logits, valid, -2.0)
    assert torch.equal(out[0, 1:4, 1:4], logits[0, 1:4, 1:4]) and (out[0, 4, 1:4] < 0).all()
    assert torch.allclose(out[0, 8:10, 8:10], torch.full((2, 2), 0.5)) and (out[0, 8:10, 0:2] < 0).all()
    assert torch.equal(out[0][out[0] < -2], logits[0][logits[0] < -2])  # the rest is untouched
    _, count = grid_components(((out[0] > 0) & valid[0]).numpy())
    assert count == 2
    assert torch.equal(with_weak_components(logits, valid, -0.5), logits)  # nothing weak above -0.5 stands alone


def test_a_filter_fit_on_weak_components_keeps_them_in_its_bundle_and_prediction(monkeypatch, tmp_path) -> None:
    flt = InstanceFilter([0.0] * len(FEATURES), [1.0] * len(FEATURES), [0.0] * len(FEATURES), 1.0, weak=-2.0)
    assert InstanceFilter.from_dict(flt.to_dict()) == flt
    plain = InstanceFilter.from_dict({k: v for k, v in flt.to_dict().items() if k != "weak"})
    assert plain.weak is None  # filters before weak components judge the map's own components only
    for bad in (True, "x", 0.5, 0.0, -100.0, float("nan")):
        with pytest.raises(ValueError, match="weak"):
            InstanceFilter.from_dict({**flt.to_dict(), "weak": bad})
    sam = FrozenSam.from_preset("tiny", seed=0)
    samples = bright_disc_samples(4, seed=2)
    result = train(sam, samples, TrainConfig(ppo=PPOConfig(episodes=1, steps=2, epochs=1), grid=(6, 6),
                                             branch="implicit", seed=3, instances="on", instance_filter="off"))
    result.policy.instance_filter = flt.to_dict()
    save_bundle(result.policy, tmp_path / "w.pt", sam, text="disc")
    model = AlignSAM(sam, load_bundle(tmp_path / "w.pt", sam))
    assert model.instance_filter == flt
    seen: list[float] = []
    real = predict_module.with_weak_components
    monkeypatch.setattr(predict_module, "with_weak_components", lambda lg, v, w: seen.append(w) or real(lg, v, w))
    images = [s.image for s in samples[:2]]
    model.predict(images)
    assert seen == [-2.0]
    model.predict(images, instance_filter=False)  # no filter to judge them: no weak components
    assert seen == [-2.0]
    model.predict(images, instance_filter=False, weak=-1.0)  # asked for (to fit a filter on them)
    assert seen == [-2.0, -1.0]


def test_an_instance_box_covers_its_cells_in_image_pixels(small: FrozenSam) -> None:
    g = small.embedding_size
    cells = np.zeros((g, g), bool)
    cells[2:5, 3:7] = True
    size = (300, 400)  # H, W: the grid covers the 400-px long side, one cell is 400 / g px
    cell = 400 / g
    x0, y0, x1, y1 = component_box(small, cells, size)
    assert (x0, y0, x1, y1) == pytest.approx((3 * cell, 2 * cell, 7 * cell, 5 * cell), abs=1e-3)
    assert component_box(small, np.ones((g, g), bool), size) == pytest.approx((0, 0, 400, 300), abs=1e-3)


def _perfect_srm(small: FrozenSam, n: int):
    """``n`` multi-instance test scenes encoded, with the ground truth on the embedding grid as the SRM's logits (a
    perfect SRM) and an empty base mask each: ``(scenes, enc, srm_in, logits [n, g, g], base)``."""
    scenes = make_split("instances", "test", n)
    enc = encode(small, [s.image for s in scenes], masks=[s.mask for s in scenes])
    srm_in = SrmInputs(small, enc)
    assert srm_in.gt is not None
    logits = (srm_in.gt[:, 0] > 0.5).float() * 10 - 5
    return scenes, enc, srm_in, logits, [np.zeros(s.mask.shape, np.float32) for s in scenes]


def test_instance_boxes_reach_sam_and_keep_one_mask_per_instance(small: FrozenSam) -> None:
    _, enc, srm_in, logits, base = _perfect_srm(small, 2)
    pts: list[list[tuple[float, float, int]]] = [[], []]
    plain = split_instances(small, enc.embeddings, enc.sizes, logits, srm_in.valid[:, 0], pts, base)
    boxed = split_instances(small, enc.embeddings, enc.sizes, logits, srm_in.valid[:, 0], pts, base, boxes=True)
    for a, b in zip(plain, boxed, strict=True):
        assert a.split and b.split and len(a.masks) == len(b.masks) == len(b.points)
        assert not np.allclose(a.probs, b.probs)  # the box changed SAM's answer


def test_corrective_clicks_per_instance_go_to_the_instance_they_correct(small: FrozenSam) -> None:
    """With a perfect SRM (the ground truth on the embedding grid), each round's click lands in one instance's prompt
    (a positive one in the instance of its component, a negative one in each instance covering it), only clicked
    instances change, the union is rebuilt from them, and three rounds bring the union closer to the target."""
    scenes, enc, srm_in, logits, base = _perfect_srm(small, 4)
    parts = split_instances(small, enc.embeddings, enc.sizes, logits, srm_in.valid[:, 0], [[] for _ in scenes], base)
    assert refine_instances(small, enc.embeddings, enc.sizes, logits, srm_in.valid[:, 0], parts, 0) == parts
    one = refine_instances(small, enc.embeddings, enc.sizes, logits, srm_in.valid[:, 0], parts, 1)
    for before, after in zip(parts, one, strict=True):
        assert after.split and len(after.points) == len(before.points)
        grown = [k for k in range(len(after.points)) if len(after.points[k]) == len(before.points[k]) + 1]
        same = [k for k in range(len(after.points)) if after.points[k] == before.points[k]]
        assert len(grown) + len(same) == len(after.points) and grown
        labels = {after.points[k][-1][2] for k in grown}
        assert len(labels) == 1 and (labels == {0} or len(grown) == 1)  # one positive instance, or every coverer
        for k in same:
            assert np.array_equal(after.part_probs[k], before.part_probs[k])
        assert np.array_equal(after.probs, np.max(np.stack(after.part_probs), axis=0))
        assert all(np.array_equal(m, p > 0.5) for m, p in zip(after.masks, after.part_probs, strict=True))
    three = refine_instances(small, enc.embeddings, enc.sizes, logits, srm_in.valid[:, 0], parts, 3)
    iou_before = np.mean([iou(p.probs > 0.5, s.mask) for p, s in zip(parts, scenes, strict=True)])
    iou_after = np.mean([iou(p.probs > 0.5, s.mask) for p, s in zip(three, scenes, strict=True)])
    assert iou_after > iou_before, (iou_before, iou_after)
    kept = split_instances(small, enc.embeddings[:1], enc.sizes[:1], torch.full_like(logits[:1], -5.0),
                           srm_in.valid[:1, 0], [[]], base[:1])
    assert refine_instances(small, enc.embeddings[:1], enc.sizes[:1], logits[:1], srm_in.valid[:1, 0], kept, 2) == kept


def test_a_single_component_or_an_absent_target_keeps_the_policys_mask(small: FrozenSam) -> None:
    (scene,) = make_split("saliency", "test", 1)
    enc = encode(small, [scene.image])
    srm_in = SrmInputs(small, enc)
    one = torch.full((1, *srm_in.valid.shape[-2:]), -5.0)
    one[0, 4:8, 4:8] = 5.0
    base = np.zeros(scene.mask.shape, np.float32)
    base[10:20, 10:20] = 1
    for logits, present in ((one, [True]), (torch.full_like(one, 5.0), [False])):
        (part,) = split_instances(small, enc.embeddings, enc.sizes, logits, srm_in.valid[:, 0], [[(5.0, 5.0, 1)]],
                                  [base], present)
        assert not part.split and np.array_equal(part.probs, base) and len(part.masks) == 1


def test_training_chooses_the_mode_by_validation_and_the_bundle_keeps_it(tmp_path) -> None:
    sam = FrozenSam.from_preset("tiny", seed=0)
    samples = bright_disc_samples(6, seed=2)
    base = TrainConfig(ppo=PPOConfig(episodes=2, steps=2, epochs=2), grid=(6, 6), branch="implicit", seed=3)
    off = train(sam, samples, base)  # the paper's default
    assert base.instances == "off" and off.instance_metrics is None and off.policy.instances is False
    on = train(sam, samples, TrainConfig(**{**base.__dict__, "instances": "on"}))
    assert on.policy.instances is True and on.instance_metrics is not None
    assert on.policy.val_metrics["miou"] == on.instance_metrics["miou"]
    auto = train(sam, samples, TrainConfig(**{**base.__dict__, "instances": "auto"}))
    assert auto.instance_metrics is not None
    chosen = auto.instance_metrics["miou"] >= auto.candidates["implicit"]["miou"] + 0.01
    assert auto.policy.instances is chosen
    # Per-instance prompts with points alone and with boxes were both validated (and the better one with a filter,
    # when one could be fit); the kept one is the mode.
    modes = auto.instance_candidates["implicit"]
    assert set(auto.instance_candidates) == {"implicit"} and {"points", "box"} <= set(modes)
    assert set(modes) - {"points", "box"} <= {"points+filter", "box+filter", "points+filter+weak", "box+filter+weak"}
    kept = kept_instance_mode(modes, auto.candidates["implicit"]["miou"], auto.policy.config)
    assert auto.instance_metrics == modes[kept or max(modes, key=lambda k: modes[k]["miou"])]
    assert auto.policy.instance_boxes is (kept is not None and kept.startswith("box"))
    assert (auto.policy.instance_filter is not None) is (kept is not None and "+filter" in kept)
    if auto.policy.instance_filter is not None:  # the kept filter judges the candidates it was fit on
        assert (auto.policy.instance_filter.get("weak") is not None) is kept.endswith("+weak")
    boxed = train(sam, samples, TrainConfig(**{**base.__dict__, "instances": "on", "instance_boxes": "on",
                                                "instance_filter": "off"}))
    assert set(boxed.instance_candidates["implicit"]) == {"box"} and boxed.policy.instance_boxes is True
    points = train(sam, samples, TrainConfig(**{**base.__dict__, "instances": "on", "instance_boxes": "off",
                                                "instance_filter": "off"}))
    assert set(points.instance_candidates["implicit"]) == {"points"} and points.policy.instance_boxes is False
    assert points.policy.instance_filter is None
    assert off.instance_candidates == {}
    save_bundle(boxed.policy, tmp_path / "b.pt", sam, text="disc")
    assert load_bundle(tmp_path / "b.pt", sam).meta["instance_boxes"] is True
    save_bundle(on.policy, tmp_path / "p.pt", sam, text="disc")
    bundle = load_bundle(tmp_path / "p.pt", sam)
    assert bundle.meta["instances"] is True
    preds = AlignSAM(sam, bundle).predict([s.image for s in samples[:2]])
    assert all(len(p.instances) >= 1 and p.instances[0].shape == p.mask.shape for p in preds)
    assert all(p.low_res is None for p in preds if len(p.instances) > 1)


def _shapes_image(rng: np.random.Generator, n_discs: int, n_squares: int) -> tuple[np.ndarray, list, np.ndarray]:
    """A grey 96 x 96 image with red discs (the target) and red squares: (image, instance masks, target mask)."""
    image = np.full((96, 96, 3), 120, np.uint8)
    yy, xx = np.mgrid[:96, :96]
    masks, gt = [], np.zeros((96, 96), bool)
    for k in range(n_discs + n_squares):
        cy, cx = 14 + 34 * (k // 3), 14 + 34 * (k % 3)
        r = int(rng.integers(7, 12))
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if k < n_discs else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        image[m] = (int(rng.integers(180, 255)), int(rng.integers(0, 40)), int(rng.integers(0, 40)))
        masks.append(m)
        gt |= m if k < n_discs else False
    return image, masks, gt


def test_an_instance_filter_learns_which_instances_are_the_target() -> None:
    """Red discs among red squares: the filter learned from labelled images keeps the discs of a new one, drops the
    squares, and rebuilds the union from what it keeps; it survives the bundle's JSON; nothing to learn, no filter."""
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for _ in range(6):
        image, masks, gt = _shapes_image(rng, 3, 3)
        x, y = instance_examples(image, masks, gt)
        assert x.shape == (6, len(FEATURES)) and y.tolist() == [True] * 3 + [False] * 3
        xs.append(x)
        ys.append(y)
    flt = fit_instance_filter(np.concatenate(xs), np.concatenate(ys))
    assert flt is not None
    image, masks, gt = _shapes_image(rng, 2, 4)
    probs = [m.astype(np.float32) for m in masks]
    result = InstanceResult(np.max(np.stack(probs), 0), masks, [[(0.0, 0.0, 1)]] * 6, True, probs)
    kept = filter_instances(result, image, flt)
    assert len(kept.masks) == 2 and np.array_equal(kept.probs > 0.5, gt)
    again = InstanceFilter.from_dict(flt.to_dict())
    assert np.allclose(again.scores(np.stack([instance_features(image, m) for m in masks])),
                       flt.scores(np.stack([instance_features(image, m) for m in masks])))
    only_squares = InstanceResult(result.probs, masks[2:], [[]] * 4, True, probs[2:])
    assert len(filter_instances(only_squares, image, flt).masks) == 1  # all rejected: the likeliest one stays
    unsplit = InstanceResult(result.probs, [result.probs > 0.5], [[]], False, [result.probs])
    assert filter_instances(unsplit, image, flt) is unsplit
    assert fit_instance_filter(np.concatenate(xs), np.ones(36, bool)) is None
    assert fit_instance_filter(xs[0][:4], ys[0][:4]) is None
    with pytest.raises(ValueError, match="other features"):
        InstanceFilter.from_dict({**flt.to_dict(), "features": ["hue"]})
    with pytest.raises(ValueError, match="malformed"):
        InstanceFilter.from_dict({**flt.to_dict(), "weight": [1.0]})
    assert instance_features(image[..., 0], masks[0]).shape == (len(FEATURES),)  # grey images are read as RGB
    assert not instance_features(image, np.zeros((96, 96), bool)).any()


def test_the_filter_learns_a_band_with_squares_and_still_reads_linear_filters() -> None:
    """Targets in the middle of one feature, distractors on both sides (circles between triangles and squares in box
    fill): no linear filter separates them, the squared terms do; a linear filter (bundles before squares) loads and
    scores as it did."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, len(FEATURES)))
    x[:, 10] = np.concatenate([rng.uniform(0.7, 0.85, 40), rng.uniform(0.4, 0.6, 40), rng.uniform(0.95, 1.0, 40)])
    y = np.arange(120) < 40
    linear = fit_instance_filter(x, y, squares=False)
    banded = fit_instance_filter(x, y)
    assert linear is not None and banded is not None and banded.squares and not linear.squares
    assert ((banded.scores(x) >= 0) == y).mean() > 0.95
    assert ((linear.scores(x) >= 0) == y).mean() < 0.85
    assert np.allclose(InstanceFilter.from_dict(linear.to_dict()).scores(x), linear.scores(x))
    assert np.allclose(InstanceFilter.from_dict(banded.to_dict()).scores(x), banded.scores(x))
    outlier = np.zeros((1, len(FEATURES)))
    outlier[0, 10] = 1e6  # clipped: scored like a far distractor, not by an unbounded square
    assert np.isfinite(banded.scores(outlier)).all() and banded.scores(outlier)[0] < 0
    with pytest.raises(ValueError, match="malformed"):
        InstanceFilter.from_dict({**banded.to_dict(), "weight": banded.weight[:-1]})


def test_radial_features_tell_turned_squares_and_triangles_from_discs() -> None:
    """Box fill changes when a square turns; the boundary's spread of distances to the centroid does not, and it
    orders disc < square < triangle."""
    from PIL import Image, ImageDraw

    def shape(vertices: int, angle: float) -> np.ndarray:
        img = Image.new("L", (96, 96))
        if vertices == 0:
            ImageDraw.Draw(img).ellipse((18, 18, 78, 78), fill=1)
        else:
            t = angle + np.arange(vertices) * 2 * np.pi / vertices
            ImageDraw.Draw(img).polygon([(48 + 30 * np.cos(a), 48 + 30 * np.sin(a)) for a in t], fill=1)
        return np.asarray(img, bool)

    image = np.zeros((96, 96, 3), np.uint8)
    spread, reach, fill = FEATURES.index("radial spread"), FEATURES.index("radial range"), FEATURES.index("box fill")
    disc = instance_features(image, shape(0, 0.0))
    squares = [instance_features(image, shape(4, a)) for a in (0.0, 0.4, np.pi / 4)]
    triangles = [instance_features(image, shape(3, a)) for a in (0.0, 0.7)]
    assert disc[spread] < 0.03 and disc[reach] < 0.15
    assert all(0.05 < f[spread] < 0.15 for f in squares) and all(f[spread] > 0.15 for f in triangles)
    assert max(f[fill] for f in squares) - min(f[fill] for f in squares) > 0.3  # what box fill alone would read
    assert max(f[spread] for f in squares) - min(f[spread] for f in squares) < 0.03


def test_a_filter_over_the_first_features_still_loads_and_scores_on_their_columns() -> None:
    """Bundles made before the radial features carry filters over :data:`FEATURES_V1`: they load, score today's
    feature vectors on those columns (a prefix), and keep their names when saved again."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, len(FEATURES)))
    y = x[:, 0] > 0
    old = fit_instance_filter(x[:, : len(FEATURES_V1)], y)
    assert old is not None
    assert old.features == FEATURES_V1
    loaded = InstanceFilter.from_dict(old.to_dict())
    assert loaded.features == FEATURES_V1 and loaded.to_dict()["features"] == list(FEATURES_V1)
    assert np.allclose(loaded.scores(x), old.scores(x[:, : len(FEATURES_V1)]))
    new = fit_instance_filter(x, y)
    assert new is not None and InstanceFilter.from_dict(new.to_dict()).features == FEATURES
    with pytest.raises(ValueError, match="other features"):
        InstanceFilter.from_dict({**new.to_dict(), "features": list(FEATURES[:-1])})


def test_the_filter_drops_distractor_instances_sam_draws(small: FrozenSam) -> None:
    """The bundled small SAM on the multi-instance family, prompted once per object of every kind (targets and
    distractors: an SRM map that cannot tell them apart): a filter fit on 8 scenes drops most distractors of 4 others
    and lifts their mIoU."""
    scenes = make_split("instances", "test", 12)
    objects = [np.logical_or.reduce(s.regions) for s in scenes]
    enc = encode(small, [s.image for s in scenes], masks=objects)
    srm_in = SrmInputs(small, enc)
    assert srm_in.gt is not None
    logits = (srm_in.gt[:, 0] > 0.5).float() * 10 - 5
    parts = split_instances(small, enc.embeddings, enc.sizes, logits, srm_in.valid[:, 0], [[] for _ in scenes],
                            [np.zeros(s.mask.shape, np.float32) for s in scenes])
    flt, keep = fit_filter_on((s.image, p.masks, s.mask) for s, p in zip(scenes[:8], parts[:8], strict=True))
    assert flt is not None and len(keep) == sum(len(p.masks) for p in parts[:8]) and 0 < keep.mean() < 1
    before = [iou(p.probs > 0.5, s.mask) for s, p in zip(scenes[8:], parts[8:], strict=True)]
    after = [iou(filter_instances(p, s.image, flt).probs > 0.5, s.mask)
             for s, p in zip(scenes[8:], parts[8:], strict=True)]
    assert np.mean(after) > np.mean(before) + 0.1, (before, after)


def test_kept_instance_mode_needs_the_margin_at_each_step() -> None:
    cfg = TrainConfig(instances="auto")
    m = {"points": {"miou": 0.60}, "box": {"miou": 0.55}, "points+filter": {"miou": 0.605}}
    assert kept_instance_mode(m, 0.50, cfg) == "points"           # the filter's +0.005 is noise
    assert kept_instance_mode(m, 0.595, cfg) is None               # neither clears one mask by 0.01
    assert kept_instance_mode({**m, "points+filter": {"miou": 0.62}}, 0.605, cfg) == "points+filter"
    assert kept_instance_mode(m, 0.70, TrainConfig(instances="on")) == "points"
    assert kept_instance_mode(m, 0.50, TrainConfig(instances="auto", instance_filter="on")) == "points+filter"
    assert kept_instance_mode({"box": {"miou": 0.7}}, 0.5, cfg) == "box"
    # The weak components cost decodes: their filter is kept over the plain one only 0.01 higher.
    weak = {**m, "points+filter": {"miou": 0.62}, "points+filter+weak": {"miou": 0.625}}
    assert kept_instance_mode(weak, 0.5, cfg) == "points+filter"
    weak["points+filter+weak"] = {"miou": 0.63}
    assert kept_instance_mode(weak, 0.5, cfg) == "points+filter+weak"
    assert kept_instance_mode({"points": {"miou": 0.6}, "points+filter+weak": {"miou": 0.7}}, 0.5, cfg) == \
        "points+filter+weak"
    assert kept_instance_mode({}, 0.5, cfg) is None


def test_a_bundle_keeps_its_instance_filter_and_a_broken_one_is_refused(tmp_path) -> None:
    sam = FrozenSam.from_preset("tiny", seed=0)
    samples = bright_disc_samples(6, seed=2)
    cfg = TrainConfig(ppo=PPOConfig(episodes=1, steps=2, epochs=1), grid=(6, 6), branch="implicit", seed=3,
                      instances="on", instance_filter="off")
    result = train(sam, samples, cfg)
    flt = InstanceFilter([0.0] * len(FEATURES), [1.0] * len(FEATURES), [0.0] * len(FEATURES), -1.0)  # rejects all
    result.policy.instance_filter = flt.to_dict()
    save_bundle(result.policy, tmp_path / "f.pt", sam, text="disc")
    model = AlignSAM(sam, load_bundle(tmp_path / "f.pt", sam))
    assert model.instance_filter == flt
    images = [s.image for s in samples]
    filtered, plain = model.predict(images), model.predict(images, instance_filter=False)
    for f, p in zip(filtered, plain, strict=True):
        assert len(f.instances) == (1 if len(p.instances) > 1 else len(p.instances))
    bundle = load_bundle(tmp_path / "f.pt", sam)
    bundle.meta["instance_filter"] = {"features": ["old"]}
    with pytest.raises(BundleError, match="instance filter"):
        AlignSAM(sam, bundle)
    result.policy.instance_filter = None
    save_bundle(result.policy, tmp_path / "n.pt", sam, text="disc")
    with pytest.raises(ValueError, match="no instance filter"):
        AlignSAM(sam, load_bundle(tmp_path / "n.pt", sam)).predict(images[:1], instance_filter=True)


def test_one_brush_region_per_instance_as_the_project_or_the_policy_chooses() -> None:
    a = np.zeros((20, 20), bool)
    a[2:6, 2:6] = True
    b = np.zeros((20, 20), bool)
    b[10:15, 10:15] = True
    masks, instances = {"cell": a | b}, {"cell": [a, b]}
    auto = parse_label_config(CONFIG)
    assert auto.instance_regions is None
    assert len(masks_to_results(masks, auto, 0.9, instances=instances)) == 2  # the policy split it
    assert len(masks_to_results(masks, auto, 0.9)) == 1
    never = parse_label_config(CONFIG, {"instance_regions": False})
    assert len(masks_to_results(masks, never, 0.9, instances=instances)) == 1
    listed = parse_label_config(CONFIG, {"instance_regions": ["cell"]})
    assert listed.instance_regions == ("cell",) and listed.regions_per_instance("bg", True) is False
    assert parse_label_config(CONFIG, {"instance_regions": True}).instance_regions == ("cell", "bg")
    assert auto.config_hash != listed.config_hash  # changing the setting re-parses the stored config
    for bad in ({"instance_regions": ["car"]}, {"instance_regions": "yes"}):
        with pytest.raises(LabelConfigError, match="instance_regions"):
            parse_label_config(CONFIG, bad)
