"""Brush RLE and polygon <-> mask conversions, and prediction results built from masks."""

from __future__ import annotations

import numpy as np
import pytest
from mlb_helpers import fixture_body

from ml_backend.errors import FormatError
from ml_backend.formats import (
    annotation_to_masks,
    brush_rle_to_mask,
    empty_prediction,
    mask_to_brush_rle,
    mask_to_polygons,
    masks_to_results,
    polygon_px_to_percent,
    polygon_to_mask,
    rasterize_polygon,
    result_to_mask,
    task_prediction,
)
from ml_backend.label_config import parse_label_config

ODD_SIZES = [(1, 1), (1, 7), (7, 1), (13, 7), (31, 17), (64, 96)]


def _random_mask(height: int, width: int, seed: int = 0, p: float = 0.5) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width)) < p


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Reference hole filling: background not 8-connected to the border becomes foreground.

    (Foreground is traced 4-connected, so background touching the outside at a corner is not a hole.)
    """
    h, w = mask.shape
    outside = np.zeros((h + 2, w + 2), dtype=bool)
    padded = np.pad(mask, 1)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    while True:
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown[1:, 1:] |= outside[:-1, :-1]
        grown[:-1, :-1] |= outside[1:, 1:]
        grown[1:, :-1] |= outside[:-1, 1:]
        grown[:-1, 1:] |= outside[1:, :-1]
        grown &= ~padded
        if (grown == outside).all():
            return ~outside[1:-1, 1:-1]
        outside = grown


def _polygons_to_mask(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        out |= polygon_to_mask(polygon_px_to_percent(polygon, width, height), width, height)
    return out


@pytest.mark.parametrize(("height", "width"), ODD_SIZES)
def test_brush_rle_round_trip_on_odd_sizes(height: int, width: int) -> None:
    mask = _random_mask(height, width, seed=height * 100 + width)
    assert np.array_equal(brush_rle_to_mask(mask_to_brush_rle(mask), width, height), mask)


@pytest.mark.parametrize(("height", "width"), ODD_SIZES)
def test_brush_rle_round_trip_of_empty_and_full_masks(height: int, width: int) -> None:
    for mask in (np.zeros((height, width), bool), np.ones((height, width), bool)):
        assert np.array_equal(brush_rle_to_mask(mask_to_brush_rle(mask), width, height), mask)


def test_empty_rle_list_is_an_empty_mask() -> None:
    assert not brush_rle_to_mask([], 5, 3).any()


def test_rle_of_the_wrong_size_is_a_format_error() -> None:
    rle = mask_to_brush_rle(np.ones((4, 5), bool))
    with pytest.raises(FormatError, match="different image size"):
        brush_rle_to_mask(rle, 6, 4)


def test_recorded_brush_annotation_decodes_to_union_per_label() -> None:
    body = fixture_body("webhook_annotation_updated")
    config = parse_label_config(body["project"]["label_config"])
    masks = annotation_to_masks(body["annotation"]["result"], config)
    assert set(masks) == {"Shape", "Shadow"}
    assert masks["Shape"].shape == (64, 96)
    assert masks["Shape"].sum() == 900 and masks["Shadow"].sum() == 900
    assert not (masks["Shape"] & masks["Shadow"]).all()


def test_union_of_two_regions_of_one_label() -> None:
    config = parse_label_config(fixture_body("setup")["schema"])
    a = np.zeros((10, 12), bool)
    a[1:4, 1:4] = True
    b = np.zeros((10, 12), bool)
    b[5:9, 6:11] = True
    results = masks_to_results({"Shape": a}, config) + masks_to_results({"Shape": b}, config)
    masks = annotation_to_masks(results, config)
    assert np.array_equal(masks["Shape"], a | b)
    assert not masks["Shadow"].any()


def test_annotation_without_regions_uses_given_size_or_returns_nothing() -> None:
    config = parse_label_config(fixture_body("setup")["schema"])
    assert annotation_to_masks([], config) == {}
    masks = annotation_to_masks([], config, width=5, height=4)
    assert {k: v.shape for k, v in masks.items()} == {"Shape": (4, 5), "Shadow": (4, 5)}


def test_results_of_other_controls_are_ignored() -> None:
    config = parse_label_config(fixture_body("setup")["schema"])
    other = masks_to_results({"Shape": np.ones((4, 5), bool)}, config)[0] | {"from_name": "other"}
    assert not annotation_to_masks([other], config, 5, 4)["Shape"].any()


def test_square_polygon_covers_exactly_its_pixels() -> None:
    mask = rasterize_polygon([(1, 1), (4, 1), (4, 3), (1, 3)], 6, 5)
    expected = np.zeros((5, 6), bool)
    expected[1:3, 1:4] = True
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize(("height", "width"), ODD_SIZES)
def test_mask_to_polygons_to_mask_is_exact_up_to_holes(height: int, width: int) -> None:
    mask = _random_mask(height, width, seed=width, p=0.6)
    back = _polygons_to_mask(mask_to_polygons(mask), height, width)
    assert np.array_equal(back, _fill_holes(mask))


def test_polygons_of_an_empty_mask() -> None:
    assert mask_to_polygons(np.zeros((7, 5), bool)) == []
    assert not polygon_to_mask([], 5, 7).any()


def test_simplified_polygon_stays_close() -> None:
    yy, xx = np.mgrid[:101, :151]
    disc = (yy - 50) ** 2 + (xx - 70) ** 2 < 40**2
    polygons = mask_to_polygons(disc, simplify_px=1.0)
    assert len(polygons) == 1 and len(polygons[0]) < 100
    back = _polygons_to_mask(polygons, 101, 151)
    assert (back & disc).sum() / (back | disc).sum() > 0.98


def test_min_area_drops_specks() -> None:
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True
    mask[15, 15] = True
    assert len(mask_to_polygons(mask)) == 2
    assert len(mask_to_polygons(mask, min_area_px=4)) == 1


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_brush_and_polygon_come_back_in_natural_orientation(rotation: int) -> None:
    width, height = 9, 5
    natural = np.zeros((height, width), bool)
    natural[0:2, 0:3] = True  # top-left corner
    steps = rotation // 90
    view = np.rot90(natural, -steps)  # what the annotator saw: rotated clockwise
    rle = mask_to_brush_rle(view)
    assert np.array_equal(brush_rle_to_mask(rle, width, height, rotation), natural)
    view_h, view_w = view.shape
    polygon = polygon_px_to_percent(mask_to_polygons(view)[0], view_w, view_h)
    assert np.array_equal(polygon_to_mask(polygon, width, height, rotation), natural)


def test_non_right_angle_rotation_is_refused() -> None:
    with pytest.raises(FormatError, match="multiple of 90"):
        polygon_to_mask([[0, 0], [50, 0], [50, 50]], 10, 10, image_rotation=45)


def test_bad_values_are_format_errors() -> None:
    with pytest.raises(FormatError):
        polygon_to_mask([["a", "b"]], 10, 10)
    with pytest.raises(FormatError):
        result_to_mask({"type": "brushlabels", "value": {"rle": [1]}, "original_width": 0, "original_height": 4})
    with pytest.raises(FormatError):
        result_to_mask({"type": "rectanglelabels", "value": {}, "original_width": 4, "original_height": 4})


def test_brush_results_from_masks() -> None:
    config = parse_label_config(fixture_body("setup")["schema"])
    mask = np.zeros((64, 96), bool)
    mask[10:20, 30:50] = True
    results = masks_to_results({"Shape": mask, "Shadow": np.zeros((64, 96), bool)}, config, {"Shape": 0.75})
    assert len(results) == 1
    result = results[0]
    assert result["from_name"] == "tag" and result["to_name"] == "image"
    assert result["type"] == "brushlabels" and result["score"] == 0.75
    assert (result["original_width"], result["original_height"], result["image_rotation"]) == (96, 64, 0)
    assert result["value"]["format"] == "rle" and result["value"]["brushlabels"] == ["Shape"]
    assert np.array_equal(result_to_mask(result), mask)


def test_polygon_results_from_masks() -> None:
    config = parse_label_config(fixture_body("predict_polygon")["label_config"])
    mask = np.zeros((64, 96), bool)
    mask[10:20, 30:50] = True
    mask[40:60, 5:9] = True
    results = masks_to_results({"Shadow": mask}, config, 0.5)
    assert [r["type"] for r in results] == ["polygonlabels", "polygonlabels"]
    assert all(r["from_name"] == "poly" and r["value"]["polygonlabels"] == ["Shadow"] for r in results)
    assert all(r["value"]["closed"] for r in results)
    assert np.array_equal(annotation_to_masks(results, config)["Shadow"], mask)


def test_unknown_label_is_refused() -> None:
    config = parse_label_config(fixture_body("setup")["schema"])
    with pytest.raises(FormatError, match="not in the labelling config"):
        masks_to_results({"Cat": np.ones((2, 2), bool)}, config)


def test_task_prediction_shapes() -> None:
    assert empty_prediction("v1") == {"result": [], "score": 0, "model_version": "v1"}
    assert task_prediction([{"score": 0.5}, {"score": 1.0}], "v2") == {
        "result": [{"score": 0.5}, {"score": 1.0}],
        "score": 0.75,
        "model_version": "v2",
    }
