"""The synthetic scene generator: determinism, sensible targets, regions, splits, folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alignsam.synthetic import (
    CATEGORIES,
    FAMILIES,
    REGION_KINDS,
    SAM_SEED_START,
    corrective_click,
    dilate,
    interior_point,
    make_scene,
    make_split,
    split_seeds,
    write_split,
)
from alignsam.synthetic import scenes as scene_gen

SEEDS = range(12)


@pytest.fixture(scope="module")
def scenes() -> dict[str, list]:
    return {f: [make_scene(f, s) for s in SEEDS] for f in FAMILIES}


def test_same_seed_same_scene_and_different_seeds_differ():
    for family in FAMILIES:
        a, b, c = make_scene(family, 7), make_scene(family, 7), make_scene(family, 8)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        assert len(a.regions) == len(b.regions) and a.text == b.text
        assert not np.array_equal(a.image, c.image)


def test_scene_shapes_and_types(scenes):
    for family, items in scenes.items():
        for s in items:
            assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
            assert s.mask.shape == (256, 256) and s.mask.dtype == bool
            assert len(s.regions) == len(s.region_kinds) >= 2
            assert set(s.region_kinds) <= set(REGION_KINDS)
            assert s.family == family
    assert make_scene("blur", 0, size=128).image.shape == (128, 128, 3)


def test_target_area_is_non_trivial_for_most_scenes(scenes):
    for family, items in scenes.items():
        frac = np.array([s.mask.mean() for s in items])
        assert (frac > 0).all(), family
        ok = (frac >= 0.02) & (frac <= 0.7)
        assert ok.mean() >= 0.75, (family, frac.round(3))


def test_regions_are_disjoint_and_cover_the_target_exactly(scenes):
    for items in scenes.values():
        for s in items:
            stack = np.stack(s.regions).astype(np.int32)
            assert stack.sum(0).max() == 1  # pairwise disjoint
            union = np.zeros_like(s.mask)
            for i in s.target_regions:
                union |= s.regions[i]
            assert np.array_equal(union, s.mask)
            assert all(r.sum() > 0 for r in s.regions)


def test_families_define_their_own_targets(scenes):
    for s in scenes["blur"] + scenes["shadow"] + scenes["mirror"]:
        assert {s.region_kinds[i] for i in s.target_regions} == {s.family}
    for s in scenes["saliency"]:
        (i,) = s.target_regions
        others = [r.sum() for j, r in enumerate(s.regions) if j != i]
        assert s.regions[i].sum() > 2 * max(others)  # the salient object stands out by size
    for s in scenes["semantic"]:
        assert s.text in CATEGORIES and s.target_regions
        assert all(s.region_kinds[i] == "object" for i in s.target_regions)
    texts = {f: {s.text for s in items} for f, items in scenes.items()}
    assert texts["blur"] == {"blur"} and texts["shadow"] == {"shadow"} and texts["mirror"] == {"mirror"}
    assert texts["saliency"] == {"saliency object"} and len(texts["semantic"]) >= 2
    # the same seed in two families gives two different pictures
    assert not np.array_equal(scenes["blur"][0].image, scenes["mirror"][0].image)


def test_blur_regions_are_smoother_than_their_surroundings(scenes):
    def detail(img: np.ndarray, m: np.ndarray) -> float:
        g = img.astype(np.float32).mean(2)
        d = np.abs(np.diff(g, axis=1))
        return float(d[m[:, 1:] & m[:, :-1]].mean())

    sharper = [detail(s.image, ~s.mask) > detail(s.image, s.mask) for s in scenes["blur"]]
    assert np.mean(sharper) >= 0.9


def test_shadows_are_darker_than_the_rest(scenes):
    darker = [s.image[s.mask].mean() < s.image[~s.mask].mean() for s in scenes["shadow"]]
    assert np.mean(darker) >= 0.9


def test_splits_have_fixed_disjoint_seed_ranges():
    train, test = split_seeds("train"), split_seeds("test")
    assert len(train) == 50 and len(test) >= 200
    assert not set(train) & set(test)
    assert max(test) < SAM_SEED_START and max(train) < SAM_SEED_START
    scenes = make_split("mirror", "train", n=3)
    assert [s.seed for s in scenes] == [0, 1, 2]
    with pytest.raises(ValueError):
        split_seeds("val")
    with pytest.raises(ValueError):
        make_scene("nope", 0)


def test_write_split_writes_image_and_mask_folders(tmp_path):
    out = write_split("shadow", "test", tmp_path / "shadow", n=3)
    images = sorted((out / "images").glob("*.png"))
    masks = sorted((out / "masks").glob("*.png"))
    assert [p.name for p in images] == [p.name for p in masks] and len(images) == 3
    scene = make_scene("shadow", split_seeds("test")[0])
    assert np.array_equal(np.asarray(Image.open(images[0])), scene.image)
    mask = np.asarray(Image.open(masks[0]))
    assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask == 255, scene.mask)
    assert (out / "text.txt").read_text().splitlines()[0].endswith("\tshadow")


def test_interior_point_is_deep_inside():
    m = np.zeros((64, 64), bool)
    m[10:30, 5:45] = True
    x, y = interior_point(m)
    assert m[y, x] and 18 <= y <= 21 and 15 <= x <= 34
    assert interior_point(np.zeros((8, 8), bool)) is None


def test_corrective_click_targets_the_largest_error():
    gt = np.zeros((64, 64), bool)
    gt[10:40, 10:40] = True
    pred = np.zeros_like(gt)
    pred[10:40, 10:20] = True  # misses most of the target
    (x, y), label = corrective_click(pred, gt)
    assert label == 1 and gt[y, x] and not pred[y, x]
    pred2 = gt.copy()
    pred2[50:60, 50:60] = True  # one false-positive blob
    (x, y), label = corrective_click(pred2, gt)
    assert label == 0 and 50 <= x < 60 and 50 <= y < 60
    assert corrective_click(gt, gt) is None


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_a_semantic_split_can_fix_its_category(category):
    scenes = make_split("semantic", "train", 6, category=category)
    assert {s.text for s in scenes} == {category}
    for s in scenes:
        assert s.target_regions and s.mask.any()
        assert all(s.region_kinds[i] == "object" for i in s.target_regions)
    # Without a category the split mixes them (the SAM-training mix), and the other families refuse one.
    assert len({s.text for s in make_split("semantic", "train", 12)}) > 1
    with pytest.raises(ValueError, match="only the semantic family"):
        make_scene("blur", 0, category=category)
    with pytest.raises(ValueError, match="unknown category"):
        make_scene("semantic", 0, category="hexagon")


def test_touching_stuff_regions_are_one_region(scenes):
    """Two touching shadows (or blurred regions) are one dark (blurred) area: one promptable region."""
    for family in ("blur", "shadow"):
        for s in scenes[family]:
            stuff = [r for r, k in zip(s.regions, s.region_kinds, strict=True) if k == family]
            for i, a in enumerate(stuff):
                grown = dilate(a)
                assert not any((grown & b).any() for b in stuff[i + 1 :])
    # the merge does happen: some scenes cast shadows that touch, and those become one region
    merged = 0
    for seed in range(40):
        canvas, _, _ = scene_gen._shadow(np.random.default_rng([FAMILIES.index("shadow"), seed]), 256)
        merged += any(len(g) > 1 and canvas.kinds[g[0]] == "shadow" for g in scene_gen._region_groups(canvas))
    assert merged > 0
