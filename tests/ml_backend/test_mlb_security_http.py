"""Issue 20, HTTP findings: each test pins one finding of the probe (and fails on the code before the fix).

Finding 3: /webhook was open when basic auth was on and WEBHOOK_SECRET unset. Finding 4: malformed input answered
500 (deep JSON, lone surrogates, odd project references). Finding 5: no body or tasks-per-request limit.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from mlb_helpers import fixture_body

from ml_backend.ports import PredictionRequest
from ml_backend.settings import Settings


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --- finding 3 ------------------------------------------------------------------------------------------------
def test_with_basic_auth_and_no_secret_unauthenticated_webhooks_change_nothing(
    make_app: Callable[..., Flask], make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 3: PROJECT_UPDATED would rewrite the stored config and START_TRAINING queue training, unauthenticated."""
    app = make_app(make_settings(basic_auth_user="ls", basic_auth_pass="pw"))
    client = app.test_client()
    creds = _basic("ls", "pw")
    assert client.post("/setup", json=fixture_body("setup"), headers=creds).status_code == 200
    store = app.extensions["alignsam"].store
    before = store.status(1)
    updated = fixture_body("webhook_project_updated")
    updated["project"]["label_config"] = updated["project"]["label_config"].replace('value="', 'value="X')
    with caplog.at_level(logging.WARNING, logger="ml_backend.app"):
        for body in (updated, fixture_body("webhook_start_training"), fixture_body("webhook_annotation_created")):
            response = client.post("/webhook", json=body)
            assert response.status_code == 401
            assert "WEBHOOK_SECRET" in response.get_json()["message"]
    assert "set WEBHOOK_SECRET" in caplog.text
    after = store.status(1)
    assert after["config"] == before["config"] and after["training"] == before["training"] == {}
    assert after["recent_events"] == before["recent_events"]
    # Label Studio's START_TRAINING through the ML API carries the credentials
    assert client.post("/webhook", json=fixture_body("webhook_start_training"), headers=creds).status_code == 200


# --- finding 4 ------------------------------------------------------------------------------------------------
DEEP = ("[" * 5000 + "]" * 5000).encode()


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
@pytest.mark.parametrize("raw", [DEEP, b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}"], ids=["5000-deep", "100-deep"])
def test_deeply_nested_json_is_a_400(client: FlaskClient, path: str, raw: bytes) -> None:
    """Finding 4: JSON nested ~1000 deep raised RecursionError (500)."""
    response = client.post(path, data=raw, content_type="application/json")
    assert response.status_code == 400
    assert "nests deeper" in response.get_json()["message"]


def _with_surrogate(body: dict[str, Any], path: tuple[Any, ...]) -> bytes:
    """``body`` as JSON bytes with a lone surrogate escape at ``path`` (json.dumps writes it as \\ud800)."""
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "x\ud800y"
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("path", "fixture", "where"),
    [
        ("/setup", "setup", ("hostname",)),
        ("/setup", "setup", ("access_token",)),
        ("/setup", "setup", ("project",)),
        ("/predict", "predict_task_open", ("tasks", 0, "id")),
        ("/predict", "predict_task_open", ("tasks", 0, "data", "image")),
        ("/webhook", "webhook_annotation_created", ("annotation", "id")),
    ],
)
def test_lone_surrogates_are_a_400(client: FlaskClient, path: str, fixture: str, where: tuple[Any, ...]) -> None:
    """Finding 4: a lone surrogate reached redis-py, whose UTF-8 encoding raised UnicodeEncodeError (500)."""
    client.post("/setup", json=fixture_body("setup"))
    response = client.post(path, data=_with_surrogate(fixture_body(fixture), where), content_type="application/json")
    assert response.status_code == 400
    assert "not valid Unicode" in response.get_json()["message"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("project", ["1" * 5000, "²", "²³.123", -1, 2**70, "1" * 19])
def test_project_references_that_are_no_project_id_are_a_400(client: FlaskClient, project: Any) -> None:
    """Finding 4: ``"1" * 5000`` exceeded int's digit limit and ``"²"`` passed isdigit but not int() (500)."""
    for path, fixture in (("/setup", "setup"), ("/predict", "predict_task_open")):
        body = fixture_body(fixture)
        body["project"] = project
        response = client.post(path, json=body)
        assert response.status_code == 400, (path, project)
        assert "project" in response.get_json()["message"]


# --- finding 5 ------------------------------------------------------------------------------------------------
def test_a_body_over_max_request_bytes_is_a_413(make_app: Callable[..., Flask],
                                               make_settings: Callable[..., Settings]) -> None:
    """Finding 5: a 150 MB body was read whole (+540 MB RSS)."""
    client = make_app(make_settings(max_request_bytes=4096)).test_client()
    body = fixture_body("predict_retrieve")
    body["padding"] = "x" * 8192
    response = client.post("/predict", json=body)
    assert response.status_code == 413
    assert client.post("/setup", json=fixture_body("setup")).status_code == 200  # small bodies still pass


def test_more_tasks_than_predict_max_tasks_is_a_400_and_queues_nothing(
    make_app: Callable[..., Flask], make_settings: Callable[..., Settings]
) -> None:
    """Finding 5: 10,000 tasks in one request made 10,000 jobs kept for a week."""
    seen: list[PredictionRequest] = []

    def predictor(request: PredictionRequest) -> list[None]:
        seen.append(request)
        return [None] * len(request.tasks)

    client = make_app(make_settings(predict_max_tasks=3), predictor=predictor).test_client()
    client.post("/setup", json=fixture_body("setup"))
    body = fixture_body("predict_task_open")
    task = body["tasks"][0]
    body["tasks"] = [dict(task, id=i) for i in range(4)]
    response = client.post("/predict", json=body)
    assert response.status_code == 400
    assert "PREDICT_MAX_TASKS=3" in response.get_json()["message"]
    assert seen == []
    body["tasks"] = body["tasks"][:3]
    assert len(client.post("/predict", json=body).get_json()["results"]) == 3
