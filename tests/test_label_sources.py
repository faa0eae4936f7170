"""The label-source benchmark's bookkeeping of the agent's points."""

import numpy as np
import pytest

from alignsam.predict import Prediction
from benchmarks.label_sources import label_confusion


def test_label_confusion_counts_agent_points_against_the_ground_truth():
    gt = np.zeros((8, 8), bool)
    gt[:4] = True  # the top half is the target
    empty = np.zeros((8, 8), np.float32)
    # The SRM's initial pair comes first and is left out (its labels are fixed: 1, 0).
    points = [(0.5, 0.5, 1), (0.5, 7.5, 0),
              (1.5, 1.5, 1), (2.5, 2.5, 0), (3.5, 3.9, 1),  # on target: 2 of 3 positive
              (1.5, 6.5, 0), (7.9, 7.9, 1)]  # off target (7.9 reads pixel 7): 1 of 2 negative
    pred = Prediction(empty > 0, empty, 0.0, 1.0, points)
    out = label_confusion([pred], [gt])
    assert out["points_on_target"] == pytest.approx(3 / 5)
    assert out["on_target_labelled_positive"] == pytest.approx(2 / 3)
    assert out["off_target_labelled_negative"] == pytest.approx(1 / 2)
