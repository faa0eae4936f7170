"""Segmentation metrics, each checked against a value computed by hand on a tiny array."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignsam.errors import DataError
from alignsam.metrics import (
    MetricInputError,
    adaptive_threshold,
    ber,
    e_measure,
    f_measure,
    foreground_rate,
    iou,
    mae,
    miou,
    summarize,
)

# A 2x2 prediction / ground truth used by several tests.
PRED = np.array([[0.9, 0.2], [0.6, 0.4]])
GT = np.array([[1, 1], [0, 0]], dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------- IoU


def test_iou_by_hand():
    # pred > 0.5 -> [[1, 0], [1, 0]]; gt [[1, 1], [0, 0]]
    # intersection = {(0,0)} = 1; union = {(0,0), (0,1), (1,0)} = 3 -> 1/3
    assert iou(PRED, GT) == pytest.approx(1 / 3)
    # threshold 0.3 -> [[1, 0], [1, 1]]: intersection 1, union 4 -> 1/4
    assert iou(PRED, GT, threshold=0.3) == pytest.approx(1 / 4)


def test_iou_empty_masks():
    empty = np.zeros((3, 3))
    # Both empty: union is empty, convention 1.0 (nothing to find, nothing found).
    assert iou(empty, empty.astype(bool)) == 1.0
    # Empty prediction, non-empty gt: intersection 0 / union 1 -> 0.
    gt = np.zeros((3, 3), dtype=bool)
    gt[1, 1] = True
    assert iou(empty, gt) == 0.0
    # Non-empty prediction, empty gt: 0 / 1 -> 0.
    assert iou(gt.astype(float), empty) == 0.0


def test_iou_accepts_torch_tensors_and_0_255_masks():
    assert iou(torch.tensor(PRED), torch.tensor(GT * 255)) == pytest.approx(1 / 3)
    assert iou(torch.tensor(PRED > 0.5), torch.tensor(GT, dtype=torch.bool)) == pytest.approx(1 / 3)


def test_miou_is_mean_over_samples():
    # Samples: the 1/3 case above, two empty masks (1.0), empty prediction on a non-empty gt (0.0).
    # mean = (1/3 + 1 + 0) / 3 = 4/9
    empty = np.zeros((2, 2))
    preds = [PRED, empty, empty]
    gts = [GT, empty, GT]
    assert miou(preds, gts) == pytest.approx(4 / 9)


# ----------------------------------------------------------------------------------------------------- MAE


def test_mae_by_hand():
    # |0.9-1| + |0.2-1| + |0.6-0| + |0.4-0| = 0.1 + 0.8 + 0.6 + 0.4 = 1.9; / 4 = 0.475
    assert mae(PRED, GT) == pytest.approx(0.475)
    # Perfect binary prediction -> 0; inverted -> 1.
    assert mae(GT.astype(bool), GT) == 0.0
    assert mae(1 - GT, GT) == 1.0


def test_mae_rejects_non_probabilities():
    with pytest.raises(MetricInputError, match=r"\[0, 1\]"):
        mae(PRED * 255, GT)
    with pytest.raises(MetricInputError, match="NaN"):
        mae(np.full((2, 2), np.nan), GT)


# ----------------------------------------------------------------------------------------------------- BER


def test_ber_by_hand():
    # gt: 3 foreground, 6 background pixels.
    gt = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # pred > 0.5: [[1, 0, 1], [1, 0, 0], [0, 0, 0]]
    pred = np.array([[0.8, 0.1, 0.7], [0.9, 0.2, 0.0], [0.3, 0.4, 0.1]])
    # TP = (0,0), (1,0) = 2; FN = (0,1) = 1; FP = (0,2) = 1; TN = 6 - 1 = 5
    # BER = 1 - (2/3 + 5/6) / 2 = 1 - 0.75 = 0.25
    assert ber(pred, gt) == pytest.approx(0.25)
    assert ber(gt, gt) == 0.0
    assert ber(1 - gt, gt) == 1.0


def test_ber_with_one_class_missing_from_gt():
    empty = np.zeros((2, 2))
    # No foreground in gt: TPR undefined -> 1.0; nothing predicted: TNR 4/4 -> BER = 1 - (1 + 1)/2 = 0
    assert ber(empty, empty) == 0.0
    # One false positive of 4 background pixels: TNR = 3/4 -> BER = 1 - (1 + 0.75)/2 = 0.125
    pred = np.array([[0.9, 0.0], [0.0, 0.0]])
    assert ber(pred, empty) == pytest.approx(0.125)
    # All foreground gt, half found: TPR 2/4, TNR undefined -> 1.0: BER = 1 - (0.5 + 1)/2 = 0.25
    assert ber(np.array([[1.0, 1.0], [0.0, 0.0]]), np.ones((2, 2))) == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------- F-measure


def test_adaptive_threshold_is_twice_the_mean_capped_at_one():
    # mean = (0.8 + 0.6 + 0.1 + 0.3 + 0 + 0.2) / 6 = 2.0 / 6 -> threshold 4/6
    assert adaptive_threshold(np.array([[0.8, 0.6, 0.1], [0.3, 0.0, 0.2]])) == pytest.approx(2 / 3)
    # mean 0.75 -> 1.5, capped at 1
    assert adaptive_threshold(np.array([[0.9, 0.7], [0.8, 0.6]])) == 1.0


def test_f_measure_by_hand():
    pred = np.array([[0.8, 0.6, 0.1], [0.3, 0.0, 0.2]])
    gt = np.array([[1, 1, 0], [0, 0, 0]])
    # threshold 2/3 -> binary [[1, 0, 0], [0, 0, 0]] (0.6 < 0.667)
    # TP = 1, predicted = 1 -> precision 1; gt = 2 -> recall 1/2
    # F = (1 + 0.3) * 1 * 0.5 / (0.3 * 1 + 0.5) = 0.65 / 0.8 = 0.8125
    assert f_measure(pred, gt) == pytest.approx(0.8125)


def test_f_measure_threshold_cap_and_ties():
    # mean 0.775 -> threshold 1 (capped); only the 1.0 pixel passes (>=): binary [[1, 0], [0, 0]] == gt
    pred = np.array([[1.0, 0.7], [0.8, 0.6]])
    gt = np.array([[1, 0], [0, 0]])
    assert f_measure(pred, gt) == pytest.approx(1.0)
    # Nothing reaches the capped threshold 1: no true positive -> 0
    assert f_measure(np.array([[0.9, 0.7], [0.8, 0.6]]), gt) == 0.0
    # Uniform 0.1: mean 0.1 -> threshold 0.2: nothing passes -> 0
    assert f_measure(np.full((2, 2), 0.1), gt) == 0.0


def test_f_measure_edge_cases():
    gt = np.array([[1, 0], [0, 0]])
    # All-zero prediction stays empty (no true positive) -> 0
    assert f_measure(np.zeros((2, 2)), gt) == 0.0
    # Empty gt: no true positive possible -> 0 (literature convention)
    assert f_measure(np.array([[0.9, 0.0], [0.0, 0.0]]), np.zeros((2, 2))) == 0.0
    # Everything predicted: uniform 1.0 -> threshold min(2, 1) = 1 -> all 4 pixels pass (>=);
    # TP 1, precision 1/4, recall 1
    # F = 1.3 * 0.25 * 1 / (0.3 * 0.25 + 1) = 0.325 / 1.075
    assert f_measure(np.ones((2, 2)), gt) == pytest.approx(0.325 / 1.075)
    # beta^2 = 1 is the plain F1: 2 * 0.25 * 1 / 1.25 = 0.4
    assert f_measure(np.ones((2, 2)), gt, beta2=1.0) == pytest.approx(0.4)


# ----------------------------------------------------------------------------------------------- E-measure


def test_e_measure_perfect_is_one():
    # pred mean 0.3 -> threshold 0.6 -> binary [[1, 0], [0, 0]] == gt: alignment 1 everywhere -> phi = 1
    pred = np.array([[0.9, 0.1], [0.1, 0.1]])
    assert e_measure(pred, np.array([[1, 0], [0, 0]])) == pytest.approx(1.0)


def test_e_measure_by_hand():
    # pred mean (0.9 + 0.1 + 0.2 + 0) / 4 = 0.3 -> threshold 0.6 -> FM = [[1, 0], [0, 0]]
    pred = np.array([[0.9, 0.1], [0.2, 0.0]])
    gt = np.array([[1, 1], [0, 0]])
    # mean(FM) = 0.25, mean(GT) = 0.5
    # a = FM - 0.25 = [[0.75, -0.25], [-0.25, -0.25]];  b = GT - 0.5 = [[0.5, 0.5], [-0.5, -0.5]]
    # (0,0): xi = 2*0.75*0.5 / (0.5625 + 0.25) = 0.75 / 0.8125 = 12/13; phi = (25/13)^2 / 4 = 625/676
    # (0,1): xi = 2*(-0.25)*0.5 / (0.0625 + 0.25) = -0.8;  phi = 0.2^2 / 4 = 0.01
    # (1,0), (1,1): xi = 2*(-0.25)*(-0.5) / 0.3125 = 0.8;  phi = 1.8^2 / 4 = 0.81 each
    # E = (625/676 + 0.01 + 0.81 + 0.81) / 4 = 0.638639...
    expected = (625 / 676 + 0.01 + 0.81 + 0.81) / 4
    assert e_measure(pred, gt) == pytest.approx(expected)
    assert expected == pytest.approx(0.6386390532)


def test_e_measure_all_zero_and_all_one_gt():
    zeros, ones = np.zeros((2, 2)), np.ones((2, 2))
    # All-zero gt: phi = 1 - FM. Empty prediction -> 1.
    assert e_measure(zeros, zeros) == 1.0
    # pred [[0.9, 0, 0, 0]]: mean 0.225 -> threshold 0.45 -> FM has 1 pixel -> E = 3/4
    one_fp = np.array([[0.9, 0.0], [0.0, 0.0]])
    assert e_measure(one_fp, zeros) == pytest.approx(0.75)
    # All-one gt: phi = FM. pred [[1, 1], [0.1, 0.2]]: mean 0.575 -> threshold 1 -> FM = 2 pixels -> 0.5
    assert e_measure(np.array([[1.0, 1.0], [0.1, 0.2]]), ones) == pytest.approx(0.5)
    # Empty prediction on all-one gt -> 0
    assert e_measure(zeros, ones) == 0.0


# ---------------------------------------------------------------------------------------- Foreground Rate

FR_GT = np.array([[0, 1, 0], [0, 0, 0], [0, 0, 1]])  # foreground at (x=1, y=0) and (x=2, y=2)


def test_foreground_rate_from_points():
    # (x=1, y=0) fg; (2, 2) fg; (0, 0) bg; (1.4, 0.2) rounds to (1, 0) fg -> 3 of 4 = 0.75
    points = np.array([[1, 0], [2, 2], [0, 0], [1.4, 0.2]])
    assert foreground_rate(FR_GT, points) == pytest.approx(0.75)
    # (x, y) order, not (row, col): (0, 1) is row 1, col 0 -> background
    assert foreground_rate(FR_GT, [(0, 1)]) == 0.0
    assert foreground_rate(torch.tensor(FR_GT), torch.tensor([[1.0, 0.0]])) == 1.0


def test_foreground_rate_from_hits():
    # 2 of 3 hits
    assert foreground_rate(None, hits=[True, False, True]) == pytest.approx(2 / 3)
    assert foreground_rate(None, hits=np.zeros(15, dtype=bool)) == 0.0


def test_foreground_rate_rejects_bad_input():
    with pytest.raises(MetricInputError, match="outside"):
        foreground_rate(FR_GT, [(3, 0)])
    with pytest.raises(MetricInputError, match="outside"):
        foreground_rate(FR_GT, [(0, -1)])
    with pytest.raises(MetricInputError, match="exactly one"):
        foreground_rate(FR_GT)
    with pytest.raises(MetricInputError, match="zero steps"):
        foreground_rate(FR_GT, np.zeros((0, 2)))


# ------------------------------------------------------------------------------------------------ summary


def test_summarize_aggregates_per_image_means():
    preds = [PRED, np.array([[0.9, 0.1], [0.2, 0.0]])]
    gts = [GT, np.array([[1, 1], [0, 0]])]
    points = [np.array([[0, 0], [1, 1]]), np.array([[1, 0]])]
    out = summarize(preds, gts, points=points)
    # Image 1: IoU 1/3 (above). Image 2: binary [[1,0],[0,0]] vs [[1,1],[0,0]]: 1/2. mean = 5/12
    assert out["miou"] == pytest.approx(5 / 12)
    # MAE: 0.475 and (0.1 + 0.9 + 0.2 + 0) / 4 = 0.3 -> mean 0.3875
    assert out["mae"] == pytest.approx(0.3875)
    # BER image 1: TP 1, FN 1, TN 1, FP 1 -> 0.5; image 2: TPR 1/2, TNR 1 -> 0.25; mean 0.375
    assert out["ber"] == pytest.approx(0.375)
    assert out["f_measure"] == pytest.approx(
        np.mean([f_measure(p, g) for p, g in zip(preds, gts, strict=True)])
    )
    assert out["e_measure"] == pytest.approx(
        np.mean([e_measure(p, g) for p, g in zip(preds, gts, strict=True)])
    )
    # FR: image 1 points (0,0) fg, (1,1) bg -> 0.5; image 2 (1,0) -> gt[0,1] = 1 -> 1.0; mean 0.75
    assert out["fr"] == pytest.approx(0.75)
    assert out["n"] == 2
    assert "fr" not in summarize(preds, gts)


def test_mismatched_inputs_raise_named_error():
    with pytest.raises(MetricInputError, match="shape"):
        iou(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(MetricInputError, match="2 predictions but 1"):
        miou([PRED, PRED], [GT])
    with pytest.raises(MetricInputError, match="No samples"):
        summarize([], [])
    assert issubclass(MetricInputError, DataError) and issubclass(MetricInputError, ValueError)
