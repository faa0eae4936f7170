"""The small-SAM evaluation's diagnostics: the mask-resolution reference and the area bins."""

import numpy as np
import pytest

from alignsam.sam import FrozenSam
from benchmarks.eval_small_sam import area_bin, resolution_reference, touches_same_kind


def test_resolution_reference_separates_regions_the_output_grid_can_and_cannot_draw():
    sam = FrozenSam.from_preset("tiny")  # 128 px input, 64 x 64 low-res logits: 2 x 2 px per logit
    size = (128, 128)
    square = np.zeros(size, bool)
    square[30:80, 40:100] = True
    line = np.zeros(size, bool)
    line[60, 10:110] = True  # one pixel wide: half of each logit cell it crosses
    ref = resolution_reference(sam, [square, line])
    assert ref.shape == (2,)
    assert ref[0] > 0.95  # a large, grid-aligned region survives the round trip
    assert ref[1] < 0.6  # a 1-px line does not: it covers half of each 2 x 2 cell


@pytest.mark.parametrize(
    ("area", "expected"),
    [(0, "0-200"), (199, "0-200"), (200, "200-500"), (4999, "2000-5000"), (5000, ">=5000"), (10**6, ">=5000")],
)
def test_area_bins(area, expected):
    assert area_bin(area) == expected


def test_touching_counts_only_regions_of_the_same_kind_within_the_gap():
    def box(y0, x0, y1, x1):
        m = np.zeros((40, 40), bool)
        m[y0:y1, x0:x1] = True
        return m

    a = box(5, 5, 15, 15)
    b = box(5, 16, 15, 25)  # 1 px from a
    c = box(30, 30, 35, 35)  # far from both
    d = box(5, 16, 15, 25)  # where b is, but another kind
    assert touches_same_kind([a, b, c], ["shadow"] * 3) == [True, True, False]
    assert touches_same_kind([a, d], ["shadow", "object"]) == [False, False]
    assert touches_same_kind([a, box(5, 19, 15, 25)], ["shadow"] * 2) == [False, False]  # 4 px apart
    # Two regions on opposite image borders are far apart: the border is not part of either one's surroundings.
    assert touches_same_kind([box(0, 0, 5, 5), box(35, 35, 40, 40)], ["shadow"] * 2) == [False, False]


def test_validation_seeds_are_disjoint_from_the_benchmark_splits_and_sam_training():
    from alignsam.synthetic import FAMILIES, SAM_SEED_START, split_seeds
    from benchmarks.train_small_sam import validation_seeds

    seeds = [set(validation_seeds(f, 1000)) for f in range(len(FAMILIES))]
    assert all(not (a & b) for i, a in enumerate(seeds) for b in seeds[i + 1 :])  # one seed range per family
    every = set().union(*seeds)
    assert max(every) < SAM_SEED_START
    assert not every & (set(split_seeds("train")) | set(split_seeds("test")))
    with pytest.raises(ValueError):
        validation_seeds(0, 1001)  # would run into the next family's seeds
