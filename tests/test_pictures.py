"""The end-of-training pictures (alignsam/pictures.py): gallery and learning curve as PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignsam.metrics import iou
from alignsam.pictures import GALLERY_ROWS, gallery, learning_curve
from alignsam.predict import Prediction
from tests.helpers import bright_disc_samples


def _prediction(mask: np.ndarray, points: list[tuple[float, float, int]]) -> Prediction:
    return Prediction(mask, mask.astype(np.float32), 0.9, 1.0, points)


def _share(rgb: np.ndarray, color: tuple[int, int, int], tol: int = 40) -> float:
    return float((np.abs(rgb.astype(int) - np.array(color)).max(axis=2) < tol).mean())


def test_the_gallery_has_a_row_per_sample_and_marks_positive_and_negative_points(tmp_path: Path) -> None:
    samples = bright_disc_samples(3, seed=0)
    shifted = np.roll(samples[1].mask, 10, axis=1)
    predictions = [_prediction(samples[0].mask, [(64, 64, 1)]),
                   _prediction(shifted, [(30, 30, 1), (100, 100, 0)]),
                   _prediction(np.zeros_like(samples[2].mask), [(20, 20, 0)])]
    path = tmp_path / "v.gallery.png"
    ious = gallery(samples, predictions, path, title="Shape")
    assert ious == pytest.approx([1.0, iou(shifted, samples[1].mask), 0.0])
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        width, height = picture.size
        rgb = np.asarray(picture.convert("RGB"))
    assert width >= 600 and height >= 3 * 200  # three panels wide, one row of panels per sample
    assert _share(rgb, (0, 208, 0)) > 0  # green + markers
    assert _share(rgb, (255, 32, 32)) > 0  # red x markers
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file, renamed


def test_the_gallery_draws_at_most_its_row_limit(tmp_path: Path) -> None:
    samples = bright_disc_samples(GALLERY_ROWS + 2, seed=1, size=32)
    ious = gallery(samples, [_prediction(s.mask, []) for s in samples], tmp_path / "g.png")
    assert len(ious) == GALLERY_ROWS


def test_the_gallery_refuses_mismatched_predictions(tmp_path: Path) -> None:
    samples = bright_disc_samples(2, seed=0, size=32)
    with pytest.raises(ValueError, match="1 predictions for 2 samples"):
        gallery(samples, [_prediction(samples[0].mask, [])], tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


def test_the_learning_curve_draws_every_branch_and_the_validation_choices(tmp_path: Path) -> None:
    histories = {branch: [{"branch": branch, "episode": e, "reward": r, "foreground_rate": (r + 1) / 2}
                          for e, r in enumerate(rewards, start=1)]
                 for branch, rewards in {"implicit": [-0.8, -0.2, 0.4], "explicit": [-0.9, -0.5, 0.1]}.items()}
    path = tmp_path / "v.curve.png"
    learning_curve(histories, path, candidates={"implicit": {"miou": 0.6, "on": "validation"},
                                                "explicit": {"miou": 0.4, "on": "validation"}},
                   chosen="implicit", baseline={"miou": 0.5}, title="Shape")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size[0] >= 600 and picture.size[1] >= 250
        rgb = np.asarray(picture.convert("RGB"))
    assert _share(rgb, (31, 119, 180), tol=25) > 0.001  # the implicit branch's line
    assert _share(rgb, (214, 39, 40), tol=25) > 0.0005  # the explicit branch's line


def test_the_learning_curve_needs_episodes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no episodes"):
        learning_curve({"implicit": []}, tmp_path / "c.png")
