"""Interactive requests on the web side: the smart tools in the config, ``params.context`` as Label Studio sends it
(the recorded body, and positive / negative / rectangle / mixed / bad variants of it), and the answers of
``/predict``: the worker's mask when a worker answers, an empty result and a log line for everything else, never a
500. The worker's half (SAM on the clicks) is tested in ``tests/workers/test_wk_interactive.py``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlb_helpers import IMAGE_SIZE, fixture_body, load_fixture
from test_mlb_app import send, setup_project

from ml_backend.errors import LabelConfigError, MLBackendError
from ml_backend.interactive import (
    MAX_PROMPT_ITEMS,
    InteractiveContextError,
    InteractiveUnavailableError,
    LabelPrompt,
    parse_context,
    scale_prompt,
)
from ml_backend.label_config import LabelConfig, parse_label_config

SMART = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
         '<Label value="Shape" background="red"/><Label value="Shadow" background="blue"/></BrushLabels>'
         '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Shape" smart="true"/>'
         '<Label value="Shadow" smart="true"/></KeyPointLabels>'
         '<RectangleLabels name="box" toName="image" smart="true"><Label value="Shape"/><Label value="Shadow"/>'
         '</RectangleLabels></View>')


def keypoint(x: float, y: float, positive: bool = True, label: str = "Shape", **extra: Any) -> dict[str, Any]:
    return {"id": f"kp-{x}-{y}", "from_name": "kp", "to_name": "image", "type": "keypointlabels",
            "origin": "manual", "is_positive": positive, "original_width": IMAGE_SIZE[0],
            "original_height": IMAGE_SIZE[1], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 1.0, "keypointlabels": [label]}, **extra}


def rectangle(x: float, y: float, w: float, h: float, label: str = "Shape") -> dict[str, Any]:
    return {"id": "box-1", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "original_width": IMAGE_SIZE[0], "original_height": IMAGE_SIZE[1], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


@pytest.fixture
def config() -> LabelConfig:
    return parse_label_config(SMART)


# --- the config ---------------------------------------------------------------------------------------------
def test_smart_tools_are_found_next_to_the_mask_control(config: LabelConfig) -> None:
    assert config.control_name == "tag" and config.labels == ["Shape", "Shadow"]
    assert [(c.name, c.tag, c.labels) for c in config.smart_controls] == [
        ("kp", "KeyPointLabels", ("Shape", "Shadow")), ("box", "RectangleLabels", ("Shape", "Shadow"))]
    assert LabelConfig.from_json(config.to_json()) == config
    old = config.to_json()
    del old["smart_controls"]  # a config stored before smart tools were parsed
    assert LabelConfig.from_json(old).smart_controls == ()


def test_a_keypoint_tool_without_smart_and_labels_outside_the_mask_control_are_not_smart_tools() -> None:
    xml = SMART.replace('<KeyPointLabels name="kp" toName="image" smart="true">', '<KeyPointLabels name="kp" '
                        'toName="image">').replace('<Label value="Shadow"/></RectangleLabels>',
                                                   '<Label value="Car"/></RectangleLabels>')
    parsed = parse_label_config(xml)
    assert [(c.name, c.labels) for c in parsed.smart_controls] == [("box", ("Shape",))]


def test_a_config_with_only_a_smart_tool_still_gets_the_clear_error() -> None:
    xml = ('<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image" smart="true">'
           '<Label value="Shape"/></KeyPointLabels></View>')
    with pytest.raises(LabelConfigError, match="no <BrushLabels> or <PolygonLabels>"):
        parse_label_config(xml)


# --- the context --------------------------------------------------------------------------------------------
def test_the_recorded_context_is_one_positive_click_in_fractions_of_the_image() -> None:
    body = fixture_body("predict_interactive")
    parsed = parse_context(body["params"]["context"], parse_label_config(body["label_config"]))
    assert parsed.dropped == []
    (prompt,) = parsed.prompts
    assert prompt == LabelPrompt("Shape", ((0.25, 0.40, 1),), None, ("ctx-kp-1",))
    clicks, box = scale_prompt(prompt, *IMAGE_SIZE)
    assert clicks == [(24.0, 25.6, 1)] and box is None


def test_negative_clicks_rectangles_and_two_labels(config: LabelConfig) -> None:
    context = {"result": [keypoint(10, 20), keypoint(30, 40, positive=False), rectangle(5, 10, 50, 40),
                          keypoint(70, 80, label="Shadow"), rectangle(60, 60, 10, 10, label="Shadow"),
                          rectangle(0, 0, 20, 20)]}
    parsed = parse_context(context, config)
    shape, shadow = parsed.prompts
    assert shape.label == "Shape" and shape.clicks == ((0.1, 0.2, 1), (0.3, 0.4, 0))
    assert shape.box == (0.0, 0.0, 0.2, 0.2)  # the last rectangle of a label wins
    assert shadow.clicks == ((0.7, 0.8, 1),) and shadow.box == pytest.approx((0.6, 0.6, 0.7, 0.7))
    clicks, box = scale_prompt(shadow, 100, 50)
    assert clicks == [pytest.approx((70.0, 40.0, 1))] and box == pytest.approx((60.0, 30.0, 70.0, 35.0))


def test_a_rectangle_alone_and_one_dragged_backwards_or_past_the_edge(config: LabelConfig) -> None:
    (prompt,) = parse_context({"result": [rectangle(80, 90, -30, 20)]}, config).prompts
    assert prompt.clicks == () and prompt.box == pytest.approx((0.5, 0.9, 0.8, 1.0))


def test_unusable_items_are_dropped_with_their_reason_and_the_rest_is_used(config: LabelConfig) -> None:
    context = {"result": [
        keypoint(120, 40),                                   # outside the image
        keypoint(-1, 40),
        keypoint(50, 50, label="Car"),                       # not a label of the mask control
        keypoint(float("nan"), 10),
        {**keypoint(10, 10), "is_positive": "yes"},
        {**keypoint(10, 10), "image_rotation": 90},
        {**keypoint(10, 10), "value": {"x": 10, "y": 10}},  # no label
        {**keypoint(10, 10), "type": "brushlabels"},
        "not an item",
        rectangle(110, 10, 5, 5),                            # entirely outside
        keypoint(40, 60),                                    # the one good click
    ]}
    parsed = parse_context(context, config)
    assert [p.clicks for p in parsed.prompts] == [((0.4, 0.6, 1),)]
    reasons = "\n".join(parsed.dropped)
    assert len(parsed.dropped) == 10
    for words in ("outside the image", "'Car' is not a label", "finite number", "is_positive",
                  "rotated", "value.keypointlabels", "neither keypointlabels", "JSON object", "empty or outside"):
        assert words in reasons


@pytest.mark.parametrize("context", [
    "clicks", [], {}, {"result": None}, {"result": "x"}, {"result": []}, {"result": [keypoint(200, 200)]},
    {"result": [{"type": "keypointlabels", "value": None}]},
])
def test_a_context_with_nothing_usable_raises(config: LabelConfig, context: Any) -> None:
    with pytest.raises(InteractiveContextError):
        parse_context(context, config)


def test_only_the_last_items_of_a_flood_are_read(config: LabelConfig) -> None:
    items = [keypoint(1, 1, positive=False)] * 500 + [keypoint(50, 50)] * MAX_PROMPT_ITEMS
    parsed = parse_context({"result": items}, config)
    (prompt,) = parsed.prompts
    assert len(prompt.clicks) == MAX_PROMPT_ITEMS and {c[2] for c in prompt.clicks} == {1}
    assert "500 oldest" in parsed.dropped[0]


# --- /predict -----------------------------------------------------------------------------------------------
class Worker:
    """Stands in for the worker behind the interactive port in these web-only tests: records each payload and
    answers with one brush region (or raises what it is told to)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.payloads: list[Mapping[str, Any]] = []
        self.error = error

    def __call__(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        self.payloads.append(copy.deepcopy(dict(payload)))
        if self.error is not None:
            raise self.error
        region = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "value": {
            "format": "rle", "rle": [0], "brushlabels": [payload["prompts"][0]["label"]]}}
        return {"prediction": {"result": [region], "score": 0.9, "model_version": payload["model_version"]}}


def interactive_body(context: Any, config: str = SMART, tasks: int = 1) -> dict[str, Any]:
    body = fixture_body("predict_interactive")
    body["label_config"] = config
    body["params"]["context"] = context
    body["tasks"] = body["tasks"] * tasks
    return body


def test_the_recorded_interactive_request_reaches_the_worker_and_its_mask_is_the_answer(
    make_app: Callable[..., Flask],
) -> None:
    worker = Worker()
    client = make_app(interactive=worker).test_client()
    setup_project(client)
    response = send(client, "predict_interactive")
    assert response.status_code == 200
    (prediction,) = response.get_json()["results"]
    assert prediction["result"][0]["value"]["brushlabels"] == ["Shape"] and prediction["score"] == 0.9
    (payload,) = worker.payloads
    assert payload["project"] == 1 and payload["task"]["id"] == 1
    assert [LabelPrompt.from_json(p) for p in payload["prompts"]] == [
        LabelPrompt("Shape", ((0.25, 0.40, 1),), None, ("ctx-kp-1",))]
    assert (payload["image"]["width"], payload["image"]["height"]) == IMAGE_SIZE
    assert payload["model_version"] == prediction["model_version"]
    assert load_fixture("predict_interactive")["body"]["params"]["context"]["result"][0]["is_positive"] is True


@pytest.mark.parametrize("context, tasks, reason", [
    ({"result": [keypoint(150, 20)]}, 1, "outside the image"),
    ({"result": "x"}, 1, "params.context must be"),
    ("garbage", 1, "params.context must be"),
    ({"result": [keypoint(10, 10)]}, 2, "exactly one task"),
    ({"result": [keypoint(10, 10, label="Car")]}, 1, "'Car' is not a label"),
])
def test_a_bad_context_gets_an_empty_result_and_a_log_line_never_a_500(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture, context: Any, tasks: int, reason: str,
) -> None:
    worker = Worker()
    client = make_app(interactive=worker).test_client()
    setup_project(client)
    response = client.post("/predict", json=interactive_body(context, tasks=tasks))
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == tasks and all(r["result"] == [] for r in results)
    assert worker.payloads == []
    assert reason in caplog.text and "interactive request answered empty" in caplog.text


@pytest.mark.parametrize("error, reason", [
    (InteractiveUnavailableError("no worker answered within INTERACTIVE_WAIT_S=10.0 s"), "no worker answered"),
    (MLBackendError("the worker could not answer: FileNotFoundError"), "could not answer"),
])
def test_no_worker_or_a_failing_worker_gets_an_empty_result_and_a_log_line(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture, error: Exception, reason: str,
) -> None:
    client = make_app(interactive=Worker(error)).test_client()
    setup_project(client)
    response = client.post("/predict", json=interactive_body({"result": [keypoint(10, 10)]}))
    assert response.status_code == 200 and response.get_json()["results"][0]["result"] == []
    assert reason in caplog.text


def test_without_the_queue_a_click_is_answered_empty_and_says_why(
    client: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    setup_project(client)
    response = client.post("/predict", json=interactive_body({"result": [keypoint(10, 10)]}))
    assert response.status_code == 200 and response.get_json()["results"][0]["result"] == []
    assert "clicks need the workers (USE_QUEUE=true)" in caplog.text


def test_a_click_on_a_task_whose_image_cannot_be_fetched_is_answered_empty(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture,
) -> None:
    worker = Worker()
    client = make_app(interactive=worker).test_client()
    setup_project(client)
    body = interactive_body({"result": [keypoint(10, 10)]})
    body["tasks"][0]["data"]["image"] = "/data/upload/1/notimage.png"
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and response.get_json()["results"][0]["result"] == []
    assert worker.payloads == [] and "empty prediction" in caplog.text


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_item = st.fixed_dictionaries({
    "type": st.sampled_from(["keypointlabels", "rectanglelabels", "brushlabels"]) | _json,
    "is_positive": st.booleans() | _json,
    "value": st.fixed_dictionaries({
        "x": st.floats(-50, 150) | _json, "y": st.floats(-50, 150) | _json,
        "width": st.floats(-50, 150) | _json, "height": st.floats(-50, 150) | _json,
        "keypointlabels": st.just(["Shape"]) | _json, "rectanglelabels": st.just(["Shadow"]) | _json,
    }) | _json,
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(context=st.fixed_dictionaries({"result": st.lists(_item | _json, max_size=6)}) | _json)
def test_any_context_is_answered_200_with_one_result(make_app: Callable[..., Flask], context: Any) -> None:
    app = make_app(interactive=Worker())
    client = app.test_client()
    setup_project(client)
    response = client.post("/predict", json=interactive_body(context))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(response.get_json()["results"]) == 1


# --- what the real editor sends (recorded from Label Studio 1.23.2's editor in Chromium) ---------------------
def _editor_points(name: str) -> list[tuple[float, float, int]]:
    items = load_fixture(f"predict_interactive_editor_{name}")["body"]["params"]["context"]["result"]
    return [(i["value"]["x"] / 100, i["value"]["y"] / 100, int(i["is_positive"])) for i in items]


@pytest.mark.parametrize("name, clicks, box", [
    ("positive", [1], False),            # one positive keypoint
    ("negative", [1, 0], False),         # Alt+click: the earlier positive keypoint, then the negative one
    ("second_click", [1, 0, 1], False),  # every earlier click of the label is sent again
    ("rectangle", [], True),             # the smart rectangle alone, never with the keypoints
    ("rectangle_second", [], True),      # both rectangles: the last one is the box
    ("other_label", [1], False),         # only the clicked label's keypoints
])
def test_what_the_editor_sends_reaches_the_worker_as_prompts(
    make_app: Callable[..., Flask], name: str, clicks: list[int], box: bool,
) -> None:
    worker = Worker()
    client = make_app(interactive=worker).test_client()
    setup_project(client)
    response = send(client, f"predict_interactive_editor_{name}")
    assert response.status_code == 200
    assert response.get_json()["results"][0]["result"][0]["value"]["brushlabels"] == ["Shape"]
    (payload,) = worker.payloads
    (prompt,) = [LabelPrompt.from_json(p) for p in payload["prompts"]]
    assert prompt.label == "Shape" and [c[2] for c in prompt.clicks] == clicks
    if clicks:
        for got, want in zip(prompt.clicks, _editor_points(name), strict=True):
            assert got == pytest.approx(want)
    items = load_fixture(f"predict_interactive_editor_{name}")["body"]["params"]["context"]["result"]
    assert prompt.region_ids == tuple(i["id"] for i in items)
    if box:
        last = items[-1]["value"]
        assert prompt.box == pytest.approx((last["x"] / 100, last["y"] / 100, (last["x"] + last["width"]) / 100,
                                            (last["y"] + last["height"]) / 100))
    else:
        assert prompt.box is None
