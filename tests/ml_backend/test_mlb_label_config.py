"""Label config parsing: image + BrushLabels/PolygonLabels, targets and their text prompts."""

from __future__ import annotations

import pytest
from mlb_helpers import fixture_body

from ml_backend.errors import LabelConfigError
from ml_backend.label_config import LabelConfig, parse_label_config


def test_recorded_brush_config() -> None:
    config = parse_label_config(fixture_body("setup")["schema"])
    assert config.control_type == "BrushLabels" and config.result_type == "brushlabels"
    assert (config.control_name, config.image_name, config.image_key) == ("tag", "image", "image")
    assert config.labels == ["Shape", "Shadow"]
    assert [t.prompt for t in config.targets] == ["Shape", "Shadow"]


def test_recorded_polygon_config() -> None:
    config = parse_label_config(fixture_body("setup_extra_params")["schema"])
    assert config.control_type == "PolygonLabels" and config.control_name == "poly"
    assert config.labels == ["Shape", "Shadow"]


def test_hint_attribute_and_extra_params_override_the_prompt() -> None:
    xml = (
        '<View><Image name="img" value="$photo"/><BrushLabels name="b" toName="img">'
        '<Label value="Shadow" hint="dark shadow on the ground"/><Label value="Glass" alias="G"/>'
        '<Label value="Sheep"/></BrushLabels></View>'
    )
    config = parse_label_config(xml)
    assert config.image_key == "photo"
    assert [t.prompt for t in config.targets] == ["dark shadow on the ground", "Glass", "Sheep"]
    assert config.labels == ["Shadow", "G", "Sheep"]  # an alias is what results carry
    assert config.target_for("G") is config.target_for("Glass") is config.targets[1]
    overridden = parse_label_config(xml, {"prompts": {"Sheep": "every sheep"}, "threshold": 0.5})
    assert [t.prompt for t in overridden.targets] == ["dark shadow on the ground", "Glass", "every sheep"]
    assert overridden.config_hash != config.config_hash


def test_brush_is_preferred_over_polygon() -> None:
    xml = (
        '<View><Image name="image" value="$image"/>'
        '<PolygonLabels name="p" toName="image"><Label value="A"/></PolygonLabels>'
        '<BrushLabels name="b" toName="image"><Label value="B"/></BrushLabels></View>'
    )
    assert parse_label_config(xml).control_name == "b"


def test_json_round_trip() -> None:
    config = parse_label_config(fixture_body("setup")["schema"])
    assert LabelConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ('<View><Image name="image" value="$image"/></View>', "no <BrushLabels> or <PolygonLabels>"),
        (
            '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image">'
            '<Label value="A"/></RectangleLabels></View>',
            "no <BrushLabels> or <PolygonLabels>",
        ),
        (
            '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>',
            "no <Image> object tag and no <BrushLabels>",
        ),
        ('<View><BrushLabels name="b" toName="x"><Label value="A"/></BrushLabels></View>', "no <Image>"),
        (
            '<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image"/></View>',
            "no <Label> tags",
        ),
        ("<View><Image", "not valid Label Studio XML"),
        ("", "empty"),
    ],
)
def test_unusable_configs_name_what_is_missing(xml: str, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)
