"""The HTTP protocol, driven with the exact requests Label Studio 1.23.2 sent (tests/ml_backend/fixtures)."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from mlb_helpers import IMAGE_SIZE, SECRET_TOKEN, ImageServer, fixture_body, load_fixture

from ml_backend.app import services_of
from ml_backend.formats import annotation_to_masks, masks_to_results, task_prediction
from ml_backend.ports import PredictionRequest, PredictorUnavailableError, TrainingRequest, TrainingTicket
from ml_backend.settings import Settings

UNTRAINED = "alignsam-untrained"
PREDICT_FIXTURES = [
    "predict_retrieve",
    "predict_task_open",
    "predict_label_stream",
    "predict_polygon",
    "predict_test",
    "predict_interactive",
]
WEBHOOK_FIXTURES = [
    "webhook_start_training",
    "webhook_start_training_auto",
    "webhook_start_training_auto_on_update",
    "webhook_annotation_created",
    "webhook_annotation_updated",
    "webhook_annotation_deleted",
    "webhook_annotations_created",
    "webhook_tasks_created",
    "webhook_tasks_deleted",
    "webhook_project_updated",
]


def send(client: FlaskClient, name: str, body: Any = None, **kwargs: Any) -> Any:
    """Replay recorded request ``name`` (its method, path and headers), optionally with another body."""
    recorded = load_fixture(name)
    headers = {k: v for k, v in recorded["headers"].items() if k not in ("Host", "Content-Length")}
    headers.update(kwargs.pop("headers", {}))
    payload = recorded["body"] if body is None else body
    if recorded["method"] == "GET":
        return client.get(recorded["path"], headers=headers, **kwargs)
    return client.post(recorded["path"], json=payload, headers=headers, **kwargs)


def setup_project(client: FlaskClient, name: str = "setup", token: str = SECRET_TOKEN, **headers: str) -> Any:
    body = fixture_body(name)
    body["access_token"] = token
    return send(client, name, body, headers=headers)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --- health, setup, versions, metrics ---------------------------------------------------------------------
def test_health_and_index(client: FlaskClient) -> None:
    for path in ("/health", "/"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.get_json() == {"status": "UP", "model_class": "AlignSAM", "redis": "ok"}
    assert send(client, "health").get_json()["status"] == "UP"


def test_recorded_setup_returns_the_model_version(client: FlaskClient, app: Flask) -> None:
    response = send(client, "setup")
    assert response.status_code == 200
    assert response.get_json() == {"model_version": UNTRAINED}
    state = services_of(app).store.status(1)
    assert state is not None and state["labels"] == ["Shape", "Shadow"] and state["has_token"]


def test_setup_with_extra_params(client: FlaskClient, app: Flask) -> None:
    response = send(client, "setup_extra_params")
    assert response.get_json() == {"model_version": UNTRAINED}
    assert services_of(app).store.extra_params(2) == {"threshold": 0.5, "note": "set via PATCH /api/ml/<id>"}


def test_setup_without_brush_or_polygon_is_a_400_naming_what_is_missing(client: FlaskClient) -> None:
    body = fixture_body("setup")
    body["schema"] = '<View><Image name="image" value="$image"/></View>'
    response = send(client, "setup", body)
    assert response.status_code == 400
    message = response.get_json()["message"]
    assert "<BrushLabels>" in message and "<PolygonLabels>" in message
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"schema": "<View/>"},
        {"project": "1.2"},
        {"project": "x", "schema": fixture_body("setup")["schema"]},
        {"project": "1.2", "schema": fixture_body("setup")["schema"], "extra_params": [1]},
    ],
)
def test_bad_setup_bodies_are_400(client: FlaskClient, body: dict[str, Any]) -> None:
    assert client.post("/setup", json=body).status_code == 400


def test_versions_and_metrics(client: FlaskClient) -> None:
    response = send(client, "versions")
    assert response.status_code == 200
    body = response.get_json()
    assert body["versions"] == [UNTRAINED] and "model_dir" in body
    send(client, "setup")
    send(client, "predict_task_open")
    metrics = client.get("/metrics").get_json()
    assert metrics["projects"] == 1
    assert metrics["counters"]["predict_requests"] == 1 and metrics["counters"]["setup_requests"] == 1


def test_status_has_no_secrets(client: FlaskClient) -> None:
    setup_project(client)
    response = client.get("/status/1")
    assert response.status_code == 200
    assert SECRET_TOKEN not in response.get_data(as_text=True)
    assert response.get_json()["model_version"] == UNTRAINED
    assert client.get("/status/42").status_code == 404


# --- predict ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PREDICT_FIXTURES)
def test_recorded_predict_requests_get_one_result_per_task(client: FlaskClient, name: str) -> None:
    setup_project(client, "setup")
    setup_project(client, "setup_extra_params")
    body = fixture_body(name)
    response = send(client, name)
    assert response.status_code == 200
    assert response.get_json() == {
        "results": [{"result": [], "score": 0, "model_version": UNTRAINED} for _ in body["tasks"]]
    }


def test_predict_without_setup_uses_settings_token(
    make_app: Callable[..., Flask], make_settings: Callable[..., Settings], image_server: ImageServer
) -> None:
    """Label Studio's "Send Test Request" and interactive predict come without /setup first."""
    seen: list[PredictionRequest] = []
    clicks: list[Mapping[str, Any]] = []

    def predictor(request: PredictionRequest) -> list[None]:
        seen.append(request)
        return [None] * len(request.tasks)

    def interactive(payload: Mapping[str, Any]) -> dict[str, Any]:
        clicks.append(payload)
        return {"prediction": {"result": []}}

    app = make_app(make_settings(label_studio_api_key=SECRET_TOKEN), predictor=predictor, interactive=interactive)
    response = send(app.test_client(), "predict_test")
    assert response.status_code == 200 and len(response.get_json()["results"]) == 1
    assert (seen[0].images[0].width, seen[0].images[0].height) == IMAGE_SIZE
    response = send(app.test_client(), "predict_interactive")
    assert response.status_code == 200 and len(response.get_json()["results"]) == 1
    assert len(seen) == 1 and (clicks[0]["image"]["width"], clicks[0]["image"]["height"]) == IMAGE_SIZE
    assert clicks[0]["prompts"][0]["label"] == "Shape"


def mask_predictor(request: PredictionRequest) -> list[dict[str, Any]]:
    """A stand-in for the workers: a box in the top-left quarter of every image, for the first label."""
    out = []
    for image in request.images:
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[: image.height // 2, : image.width // 2] = True
        label = request.config.labels[0]
        out.append(task_prediction(masks_to_results({label: mask}, request.config, 0.9), request.model_version))
    return out


@pytest.mark.parametrize(("name", "kind"), [("predict_retrieve", "brushlabels"), ("predict_polygon", "polygonlabels")])
def test_predictor_masks_become_label_studio_results(
    make_app: Callable[..., Flask], name: str, kind: str
) -> None:
    client = make_app(predictor=mask_predictor).test_client()
    setup_project(client, "setup" if kind == "brushlabels" else "setup_extra_params")
    body = fixture_body(name)
    results = send(client, name).get_json()["results"]
    assert len(results) == len(body["tasks"])
    for prediction in results:
        assert prediction["model_version"] == UNTRAINED and prediction["score"] == pytest.approx(0.9)
        (region,) = prediction["result"]
        assert region["type"] == kind and region["to_name"] == "image"
        assert (region["original_width"], region["original_height"]) == IMAGE_SIZE
        config = services_of(client.application).store.config(1 if kind == "brushlabels" else 2)
        assert config is not None
        mask = annotation_to_masks(prediction["result"], config)["Shape"]
        assert mask.sum() == (IMAGE_SIZE[0] // 2) * (IMAGE_SIZE[1] // 2)


def test_bad_tasks_get_empty_predictions_and_the_others_are_unaffected(
    make_app: Callable[..., Flask], make_settings: Callable[..., Settings], unreachable_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the unreachable port is an allowed host, so the download is really attempted
    settings = make_settings(allowed_image_hosts=[unreachable_url.removeprefix("http://")])
    client = make_app(settings, predictor=mask_predictor).test_client()
    setup_project(client)
    body = fixture_body("predict_retrieve")
    good = body["tasks"][0]

    def task(task_id: int, image: Any) -> dict[str, Any]:
        return {**good, "id": task_id, "data": {"image": image}}

    body["tasks"] = [
        task(1, "/data/upload/1/78e761b9-img0.png"),
        task(2, f"{unreachable_url}/data/upload/1/a.png"),  # unreachable
        task(3, "http://169.254.169.254/latest/meta-data/x.png"),  # disallowed host
        task(4, "/data/upload/1/notimage.png"),  # not an image
        task(5, "/data/upload/1/bomb.png"),  # 30000 x 30000 PNG bomb
        task(6, None),  # no image at all
        "not a task",
        task(8, "/data/upload/1/a3e21dff-img1.png"),
    ]
    with caplog.at_level(logging.WARNING, logger="ml_backend"):
        response = send(client, "predict_retrieve", body)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == len(body["tasks"])
    assert [bool(r["result"]) for r in results] == [True, False, False, False, False, False, False, True]
    for failed in results[1:7]:
        assert failed == {"result": [], "score": 0, "model_version": UNTRAINED}
    for reason in ("DisallowedHostError", "NotAnImageError", "ImageTooLargeError", "ImageUnreachableError"):
        assert reason in caplog.text
    assert SECRET_TOKEN not in caplog.text
    assert client.get("/health").status_code == 200
    assert len(send(client, "predict_task_open").get_json()["results"]) == 1


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"{not json", 400),
        (b"", 400),
        (b"[1, 2]", 400),
        (b'{"project": "1.1795439330", "label_config": "<View/>"}', 400),
        (b'{"tasks": {"id": 1}, "project": "1.1"}', 400),
        (b'{"tasks": [], "project": "nope"}', 400),
    ],
)
def test_malformed_predict_requests_are_4xx_and_the_server_keeps_answering(
    client: FlaskClient, data: bytes, status: int
) -> None:
    response = client.post("/predict", data=data, content_type="application/json")
    assert response.status_code == status
    assert response.get_json()["status"] == "error"
    assert client.get("/health").status_code == 200


def test_predict_with_a_config_without_brush_or_polygon_is_400(client: FlaskClient) -> None:
    body = fixture_body("predict_task_open")
    body["label_config"] = '<View><Image name="image" value="$image"/></View>'
    response = send(client, "predict_task_open", body)
    assert response.status_code == 400 and "BrushLabels" in response.get_json()["message"]


def test_predict_for_an_unknown_project_without_config_is_400(client: FlaskClient) -> None:
    body = fixture_body("predict_task_open")
    del body["label_config"]
    response = send(client, "predict_task_open", body)
    assert response.status_code == 400 and "/setup" in response.get_json()["message"]


def test_empty_task_list(client: FlaskClient) -> None:
    body = fixture_body("predict_task_open")
    body["tasks"] = []
    assert send(client, "predict_task_open", body).get_json() == {"results": []}


def test_predictor_failures_are_503_so_label_studio_asks_again(make_app: Callable[..., Flask]) -> None:
    def broken(request: PredictionRequest) -> Sequence[Mapping[str, Any] | None]:
        raise RuntimeError("worker exploded with " + SECRET_TOKEN)

    def unavailable(request: PredictionRequest) -> Sequence[Mapping[str, Any] | None]:
        raise PredictorUnavailableError("queue is down; start Redis")

    def short(request: PredictionRequest) -> Sequence[Mapping[str, Any] | None]:
        return []

    for predictor in (broken, unavailable, short):
        client = make_app(predictor=predictor).test_client()
        setup_project(client)
        response = send(client, "predict_task_open")
        assert response.status_code == 503
        assert SECRET_TOKEN not in response.get_data(as_text=True)


def test_new_policy_changes_the_model_version(client: FlaskClient, app: Flask) -> None:
    setup_project(client)
    version = services_of(app).store.set_policy_version(1, "Shape", "policy-3")
    assert send(client, "setup").get_json() == {"model_version": version}
    assert send(client, "predict_task_open").get_json()["results"][0]["model_version"] == version
    assert version in send(client, "versions").get_json()["versions"]


# --- webhooks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WEBHOOK_FIXTURES)
def test_recorded_webhooks_are_answered_fast(client: FlaskClient, name: str) -> None:
    started = time.perf_counter()
    response = send(client, name)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"
    assert elapsed < 0.1


def test_start_training_goes_through_the_trigger_and_is_recorded(make_app: Callable[..., Flask]) -> None:
    requests: list[TrainingRequest] = []

    def trigger(request: TrainingRequest) -> TrainingTicket:
        requests.append(request)
        return TrainingTicket(job_id=f"job-{len(requests)}", status="queued")

    app = make_app(training_trigger=trigger)
    client = app.test_client()
    setup_project(client)
    send(client, "webhook_annotation_created")
    response = send(client, "webhook_start_training")
    assert response.get_json() == {"status": "ok", "job_id": "job-1", "training_status": "queued"}
    (request,) = requests
    assert request.project_id == 1 and request.project_key == "1.1795439330"
    assert request.labels == ["Shape", "Shadow"] and request.labelled_task_ids == [1]
    assert request.reason == "START_TRAINING"
    training = services_of(app).store.training(1)
    assert training["job_id"] == "job-1" and training["status"] == "queued"


def test_default_trigger_records_the_request(client: FlaskClient, app: Flask) -> None:
    body = send(client, "webhook_start_training").get_json()
    assert body["training_status"] == "requested" and body["job_id"].startswith("requested-")
    assert services_of(app).store.training(1)["status"] == "requested"


def test_failing_trigger_is_503(make_app: Callable[..., Flask]) -> None:
    def trigger(request: TrainingRequest) -> TrainingTicket:
        raise ConnectionError("redis down")

    app = make_app(training_trigger=trigger)
    response = send(app.test_client(), "webhook_start_training")
    assert response.status_code == 503
    assert services_of(app).store.training(1)["status"] == "failed"


def test_annotation_webhooks_count_labelled_tasks(client: FlaskClient, app: Flask) -> None:
    assert send(client, "webhook_annotation_created").get_json()["labelled_tasks"] == 1
    assert send(client, "webhook_annotation_updated").get_json()["labelled_tasks"] == 1
    assert send(client, "webhook_annotations_created").get_json()["labelled_tasks"] == 2  # project 2
    assert send(client, "webhook_tasks_deleted").get_json()["labelled_tasks"] == 0  # project 2
    assert send(client, "webhook_annotation_deleted").get_json()["labelled_tasks"] == 1  # id 2: not ours
    store = services_of(app).store
    assert store.labelled_count(1) == 1
    assert store.config(1) is not None and store.config(2) is not None  # learnt from the project objects
    assert [e["action"] for e in store.events(1)] == ["ANNOTATIONS_DELETED", "ANNOTATION_UPDATED",
                                                      "ANNOTATION_CREATED"]


def test_enough_labelled_tasks_request_training_once(
    make_app: Callable[..., Flask], make_settings: Callable[..., Settings]
) -> None:
    tickets: list[TrainingRequest] = []

    def trigger(request: TrainingRequest) -> TrainingTicket:
        tickets.append(request)
        return TrainingTicket(job_id="auto", status="queued")

    client = make_app(make_settings(train_min_tasks=2), training_trigger=trigger).test_client()
    body = fixture_body("webhook_annotation_created")
    assert "training" not in send(client, "webhook_annotation_created", body).get_json()
    body["annotation"] = {**body["annotation"], "id": 7, "task": 2}
    assert send(client, "webhook_annotation_created", body).get_json()["training"]["job_id"] == "auto"
    body["annotation"] = {**body["annotation"], "id": 8, "task": 3}
    assert "training" not in send(client, "webhook_annotation_created", body).get_json()
    assert len(tickets) == 1 and "TRAIN_MIN_TASKS" in tickets[0].reason


def test_unknown_event(client: FlaskClient) -> None:
    response = client.post("/webhook", json={"action": "SOMETHING_NEW", "project": {"id": 1}})
    assert response.status_code == 200 and response.get_json() == {"status": "Unknown event"}


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"",
        b'"START_TRAINING"',
        b'{"project": {"id": 1}}',
        b'{"action": "START_TRAINING"}',
        b'{"action": "ANNOTATION_CREATED", "project": {"id": 1}}',
        b'{"action": "ANNOTATION_CREATED", "project": "oops", "annotation": {"id": 1, "task": 1}}',
    ],
)
def test_malformed_webhooks_are_400_never_500(client: FlaskClient, data: bytes) -> None:
    response = client.post("/webhook", data=data, content_type="application/json")
    assert response.status_code == 400
    assert client.get("/health").status_code == 200


# --- auth and secrets -------------------------------------------------------------------------------------
@pytest.fixture
def auth_client(make_app: Callable[..., Flask], make_settings: Callable[..., Settings]) -> FlaskClient:
    settings = make_settings(basic_auth_user="ls", basic_auth_pass="s3cret", webhook_secret="hook-secret")
    return make_app(settings).test_client()


def test_basic_auth_protects_the_ml_api(auth_client: FlaskClient) -> None:
    for name in ("setup", "predict_task_open", "versions"):
        assert send(auth_client, name).status_code == 401
        assert send(auth_client, name, headers=basic("ls", "wrong")).status_code == 401
        assert send(auth_client, name, headers=basic("other", "s3cret")).status_code == 401
    response = send(auth_client, "setup", headers=basic("ls", "wrong"))
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert "s3cret" not in response.get_data(as_text=True)
    assert auth_client.get("/metrics", headers=basic("ls", "wrong")).status_code == 401
    assert auth_client.get("/status/1").status_code == 401
    assert send(auth_client, "health").status_code == 200  # probes stay open
    assert send(auth_client, "setup", headers=basic("ls", "s3cret")).status_code == 200
    assert send(auth_client, "predict_task_open", headers=basic("ls", "s3cret")).status_code == 200
    assert send(auth_client, "versions", headers=basic("ls", "s3cret")).status_code == 200


def test_webhook_secret(auth_client: FlaskClient) -> None:
    assert send(auth_client, "webhook_annotation_created").status_code == 401
    assert send(auth_client, "webhook_annotation_created", headers={"X-Webhook-Secret": "nope"}).status_code == 401
    assert send(auth_client, "webhook_annotation_created",
                headers={"X-Webhook-Secret": "hook-secret"}).status_code == 200
    body = fixture_body("webhook_annotation_created")
    assert auth_client.post("/webhook?secret=hook-secret", json=body).status_code == 200
    assert auth_client.post("/webhook?secret=wrong", json=body).status_code == 401
    # START_TRAINING comes through the ML API with basic auth
    assert send(auth_client, "webhook_start_training", headers=basic("ls", "s3cret")).status_code == 200


def test_webhook_is_open_without_basic_auth_and_secret(client: FlaskClient) -> None:
    """The embedded default (nothing configured): webhooks work as Label Studio sends them."""
    assert send(client, "webhook_annotation_created").status_code == 200


def test_tokens_never_leave_the_backend(
    make_app: Callable[..., Flask], make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    api_key = "env-api-key-987654321"
    client = make_app(make_settings(label_studio_api_key=api_key)).test_client()
    bodies = []
    with caplog.at_level(logging.DEBUG):
        for call in (
            lambda: setup_project(client),
            lambda: send(client, "predict_retrieve"),
            lambda: send(client, "webhook_start_training"),
            lambda: send(client, "versions"),
            lambda: client.get("/metrics"),
            lambda: client.get("/status/1"),
            lambda: client.get("/health"),
        ):
            bodies.append(call().get_data(as_text=True))
        body = fixture_body("predict_retrieve")
        body["tasks"][0]["data"]["image"] = "/data/upload/1/missing.png"
        bodies.append(send(client, "predict_retrieve", body).get_data(as_text=True))
    for text in [*bodies, caplog.text]:
        assert SECRET_TOKEN not in text and api_key not in text


def test_fetch_budget_gives_late_tasks_empty_predictions(
    make_app: Callable[..., Flask], make_settings: Callable[..., Settings], image_server: ImageServer
) -> None:
    settings = make_settings(predict_fetch_budget_s=0.3, image_fetch_workers=1, allowed_image_hosts=["127.0.0.1"])
    client = make_app(settings, predictor=mask_predictor).test_client()
    setup_project(client)
    body = fixture_body("predict_retrieve")
    body["tasks"][0]["data"]["image"] = f"{image_server.url}/public/slow.png"  # ~0.5 s with 5 s timeout
    results = send(client, "predict_retrieve", body).get_json()["results"]
    assert len(results) == 2
    assert results[1] == {"result": [], "score": 0, "model_version": UNTRAINED}
