"""The offline testbed: synthetic scenes with exact masks standing in for the paper's datasets, the baselines the
paper compares against (PerSAM-style, oracle clicker), the quality table, and binary-mask helpers.

- :mod:`~alignsam.synthetic.scenes`: task families (semantic, saliency, blur, shadow, mirror; and instances), seeded splits;
- :mod:`~alignsam.synthetic.masks`: dilate / erode, interior point, the NoC corrective click;
- :mod:`~alignsam.synthetic.baselines`: PerSAM-style prototype matching and the oracle clicker;
- :mod:`~alignsam.synthetic.quality`: train on a family's train split, the full table on its test split.
"""

from alignsam.synthetic.masks import corrective_click, dilate, erode, interior_point
from alignsam.synthetic.scenes import (
    CATEGORIES,
    EXTRA_FAMILIES,
    FAMILIES,
    FAMILY_TEXT,
    REGION_KINDS,
    SAM_SEED_START,
    STUFF_KINDS,
    TEST_SEED_START,
    TEST_SIZE,
    TRAIN_SEED_START,
    TRAIN_SIZE,
    Scene,
    make_scene,
    make_split,
    split_seeds,
    write_split,
)

__all__ = [
    "CATEGORIES",
    "EXTRA_FAMILIES",
    "FAMILIES",
    "FAMILY_TEXT",
    "REGION_KINDS",
    "SAM_SEED_START",
    "STUFF_KINDS",
    "TEST_SEED_START",
    "TEST_SIZE",
    "TRAIN_SEED_START",
    "TRAIN_SIZE",
    "Scene",
    "corrective_click",
    "dilate",
    "erode",
    "interior_point",
    "make_scene",
    "make_split",
    "split_seeds",
    "write_split",
]
