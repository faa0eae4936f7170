"""The queue end to end: real embedded Redis, real ``alignsam-worker`` subprocesses (tiny SAM + tiny CLIP), the
Flask app with the RQ ports, and a fake Label Studio HTTP server for the SDK calls and image downloads."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis
from wk_helpers import (
    LABEL_CONFIG,
    FakeLabelStudio,
    WorkerProcess,
    setup_project,
    stored_job,
    wait_for,
    worker_env,
)

from ml_backend.app import services_of
from ml_backend.images import FetchedImage
from ml_backend.job_queue import TRAIN_QUEUE, enqueue_prelabel
from ml_backend.keys import PENDING_SUFFIX, Keys
from ml_backend.settings import Settings
from ml_backend.state import ProjectStore
from workers.models import bundle_path

pytestmark = pytest.mark.integration


def predict(client: FlaskClient, project_id: int, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    body = {"tasks": tasks, "project": f"{project_id}.1795439330", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": None}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


def annotate_via_webhook(client: FlaskClient, ls: FakeLabelStudio, project_id: int, task_id: int) -> dict:
    ann = ls.annotate(task_id)
    body = {"action": "ANNOTATION_CREATED", "project": {"id": project_id, "label_config": LABEL_CONFIG},
            "annotation": {"id": ann["id"], "task": task_id, "was_cancelled": False}, "task": {"id": task_id}}
    response = client.post("/webhook", json=body)
    assert response.status_code == 200
    return response.get_json()


def start_training(client: FlaskClient, project_id: int) -> dict:
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project_id}})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def status(client: FlaskClient, project_id: int) -> dict:
    return client.get(f"/status/{project_id}").get_json()


def predict_jobs(redis: Redis, project_id: int) -> list[str]:
    return [k.decode().split(":")[-1] for k in redis.scan_iter(f"rq:job:predict-{project_id}-*")
            if k.decode().count(":") == 2]


def train_jobs(redis: Redis, project_id: int) -> list[str]:
    return sorted(k.decode().split(":")[-1] for k in redis.scan_iter(f"rq:job:train-{project_id}-*")
                  if k.decode().count(":") == 2)


def test_predict_8_tasks_in_order_through_the_queue(
    worker: WorkerProcess, make_app: Callable[..., Flask], make_fake_ls: Callable[[int], FakeLabelStudio],
    project_id: int, redis: Redis,
) -> None:
    ls = make_fake_ls(8)
    client = make_app().test_client()
    assert setup_project(client, project_id, ls) == "alignsam-zeroshot"
    tasks = [ls.tasks[i] for i in (5, 2, 8, 1, 7, 3, 6, 4)]
    results = predict(client, project_id, tasks)
    assert len(results) == 8
    assert all(r["model_version"] == "alignsam-zeroshot" for r in results)
    # Every task got its own zero-shot regions, in task order: the answer for task t is the one its job cached.
    for task, result in zip(tasks, results, strict=True):
        [key] = list(redis.scan_iter(f"alignsam:pred:{project_id}:{task['id']}:*"))
        assert json.loads(redis.get(key)) == result
        assert result["result"] and result["result"][0]["type"] == "brushlabels"
    assert len({json.dumps(r["result"][0]["value"]["rle"]) for r in results}) > 1  # not one answer copied 8 times
    # /predict answered from the ready streams; the job still gets its RQ result (a moment later), and the one idle
    # worker got the 8 tasks as one job and ran them as one batch.
    ids = predict_jobs(redis, project_id)
    assert len(ids) == 1
    jobs = [stored_job(redis, i) for i in ids]
    wait_for(lambda: all(j.latest_result() is not None for j in jobs), 30, "the jobs' RQ results")
    [outcome] = [j.latest_result().return_value for j in jobs]
    assert outcome["batch"] == 8
    assert sorted(t["task"] for t in outcome["tasks"]) == sorted(t["id"] for t in tasks)
    for key in redis.scan_iter(f"alignsam:pred:{project_id}:*"):
        assert redis.xlen(Keys("alignsam").prediction_ready(key.decode())) == 1
    hits_before = int(redis.hget("alignsam:metrics", "predict_cache_hits") or 0)
    again = predict(client, project_id, tasks)
    assert again == results
    assert int(redis.hget("alignsam:metrics", "predict_cache_hits")) - hits_before == 8


def test_a_task_failing_in_the_worker_gets_an_empty_prediction_and_its_batch_mates_get_theirs(
    worker: WorkerProcess, make_app: Callable[..., Flask], make_fake_ls: Callable[[int], FakeLabelStudio],
    project_id: int, redis: Redis,
) -> None:
    ls = make_fake_ls(3)
    app = make_app()
    client = app.test_client()
    setup_project(client, project_id, ls)
    services = services_of(app)
    fetcher = services.fetcher

    class BreaksTask2:
        """The web process's fetcher, except that task 2's file is broken after the web's checks (a disk error, a
        file replaced meanwhile): only the worker finds out, when it decodes it."""

        def fetch(self, source: str, access: Any, task_id: Any = None) -> FetchedImage:
            fetched = fetcher.fetch(source, access, task_id=task_id)
            if task_id != 2:
                return fetched
            broken = Path(fetched.path).with_suffix(".broken.png")
            broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
            return dataclasses.replace(fetched, path=str(broken))

    services.fetcher = BreaksTask2()  # type: ignore[assignment]
    results = predict(client, project_id, [ls.tasks[i] for i in (1, 2, 3)])
    # The failed task is answered (empty, of the current version: not pending), the others are predicted.
    assert [r["model_version"] for r in results] == ["alignsam-zeroshot"] * 3
    assert results[0]["result"] and results[2]["result"]
    assert results[1]["result"] == []
    [job_id] = predict_jobs(redis, project_id)
    job = stored_job(redis, job_id)
    assert job.get_status().value == "failed"
    assert "1 of 3 tasks not predicted: task 2: " in job.latest_result().exc_string
    # Only the failed task is computed again, by a new job; the others come from the cache.
    again = predict(client, project_id, [ls.tasks[i] for i in (1, 2, 3)])
    assert again[0] == results[0] and again[2] == results[2]
    assert len(predict_jobs(redis, project_id)) == 2


def test_late_tasks_answer_pending_stay_queued_and_come_from_the_cache_next_time(
    worker: WorkerProcess, make_app: Callable[..., Flask], make_fake_ls: Callable[[int], FakeLabelStudio],
    project_id: int, redis: Redis,
) -> None:
    ls = make_fake_ls(4)
    client = make_app(predict_wait_s=0.001).test_client()
    setup_project(client, project_id, ls)
    tasks = [ls.tasks[i] for i in (1, 2, 3, 4)]
    first = predict(client, project_id, tasks)
    assert len(first) == 4
    pending = [r for r in first if r["model_version"].endswith(PENDING_SUFFIX)]
    assert pending, "with a 1 ms deadline some tasks must still be running"
    assert all(r["result"] == [] for r in pending)
    # Asked again at once: the request joins the job already computing its tasks (or finds them cached).
    predict(client, project_id, tasks)
    assert len(predict_jobs(redis, project_id)) == 1
    wait_for(lambda: len(list(redis.scan_iter(f"alignsam:pred:{project_id}:*"))) == 4, 60, "the late jobs to finish")
    second = predict(client, project_id, tasks)
    assert [r["model_version"] for r in second] == ["alignsam-zeroshot"] * 4
    assert all(r["result"] for r in second)


def _train_worker(redis_url: str, model_dir: Path, tmp_path: Path, name: str, **env: str) -> WorkerProcess:
    return WorkerProcess(worker_env(redis_url, model_dir, **env), "train", tmp_path / f"{name}.log")


def test_start_training_twice_makes_one_job_that_activates_a_policy(
    worker: WorkerProcess, make_app: Callable[..., Flask], make_fake_ls: Callable[[int], FakeLabelStudio],
    project_id: int, redis: Redis, redis_url: str, model_dir: Path, tmp_path: Path, make_settings: Callable[..., Settings],
) -> None:
    ls = make_fake_ls(6)
    client = make_app().test_client()
    setup_project(client, project_id, ls)
    for task_id in (1, 2, 3, 4):
        annotate_via_webhook(client, ls, project_id, task_id)
    first = start_training(client, project_id)
    second = start_training(client, project_id)
    assert first["training_status"] == "queued"
    assert second["training_status"] == "coalesced" and second["job_id"] == first["job_id"]
    assert train_jobs(redis, project_id) == [first["job_id"]]
    train_worker = _train_worker(redis_url, model_dir, tmp_path, "train")
    try:
        train_worker.wait_ready(redis)
        job = stored_job(redis, first["job_id"])
        wait_for(lambda: job.get_status(refresh=True).value in ("finished", "failed"), 120, "training",
                 interval=0.5)
        assert job.get_status().value == "finished", train_worker.output()
        store = ProjectStore(redis, make_settings(), zero_shot=True)
        [(label, version)] = store.policy_versions(project_id).items()
        assert label == "Shape" and bundle_path(make_settings(), project_id, label, version).is_file()
        state = status(client, project_id)
        assert state["training_job"]["status"] == "finished"
        assert state["training_job"]["progress"]["stage"] == "done"
        assert "val_miou" in state["training_job"]["progress"]["progress"]
        assert state["model_version"] != "alignsam-zeroshot"
        assert setup_project(client, project_id, ls) == state["model_version"]  # what Label Studio shows
        # Nothing changed since that training set: a new trigger runs a job that skips.
        again = start_training(client, project_id)
        assert again["training_status"] == "queued"
        job2 = stored_job(redis, again["job_id"])
        wait_for(lambda: job2.get_status(refresh=True).value in ("finished", "failed"), 60, "the second job")
        assert job2.get_status().value == "finished", job2.latest_result().exc_string
        assert job2.return_value()["status"] == "skipped"
        assert store.policy_versions(project_id) == {"Shape": version}
    finally:
        train_worker.stop()


def test_threshold_triggers_training_then_prelabel_fills_exactly_the_unlabelled_tasks(
    worker: WorkerProcess, make_app: Callable[..., Flask], make_fake_ls: Callable[[int], FakeLabelStudio],
    project_id: int, redis: Redis, redis_url: str, model_dir: Path, tmp_path: Path,
) -> None:
    ls = make_fake_ls(7)
    client = make_app(train_min_tasks=3).test_client()
    setup_project(client, project_id, ls)
    ls.tasks[6]["predictions"].append({"result": [], "score": 0, "model_version": "someone-else"})
    train_worker = _train_worker(redis_url, model_dir, tmp_path, "train")
    try:
        train_worker.wait_ready(redis)
        assert "training" not in annotate_via_webhook(client, ls, project_id, 1)
        assert "training" not in annotate_via_webhook(client, ls, project_id, 2)
        ls.fail_next = 2  # Label Studio answers 503 twice: the job retries with backoff
        triggered = annotate_via_webhook(client, ls, project_id, 3)
        assert triggered["training"]["training_status"] == "queued"
        job = stored_job(redis, triggered["training"]["job_id"])
        wait_for(lambda: job.get_status(refresh=True).value in ("finished", "failed"), 120, "training",
                 interval=0.5)
        assert job.get_status().value == "finished", train_worker.output()
        summary = job.return_value()
        version = summary["model_version"]
        assert summary["activated"] and summary["prelabel_job"]
        prelabel = stored_job(redis, summary["prelabel_job"])
        wait_for(lambda: prelabel.get_status(refresh=True).value in ("finished", "failed"), 120, "prelabel",
                 interval=0.5)
        assert prelabel.get_status().value == "finished", worker.output()
        predicted = {t for t in ls.tasks if any(p["model_version"] == version for p in ls.predictions_of(t))}
        assert predicted == {4, 5, 6, 7}
        assert prelabel.return_value()["created"] == 4
        # Resumable / idempotent: running it again creates nothing new.
        rerun = enqueue_prelabel(redis, Settings(redis_url=redis_url, model_dir=model_dir), project_id, version)
        wait_for(lambda: rerun.get_status(refresh=True).value in ("finished", "failed"), 60, "prelabel rerun")
        assert rerun.return_value()["created"] == 0
        assert all(len(ls.predictions_of(t)) == (1 if t in (4, 5, 7) else 2 if t == 6 else 0) for t in ls.tasks)
    finally:
        train_worker.stop()


def test_sigkill_mid_training_leaves_the_previous_policy_active_and_the_job_failed(
    worker: WorkerProcess, make_app: Callable[..., Flask], make_fake_ls: Callable[[int], FakeLabelStudio],
    project_id: int, redis: Redis, redis_url: str, model_dir: Path, tmp_path: Path, make_settings: Callable[..., Settings],
) -> None:
    ls = make_fake_ls(5)
    client = make_app().test_client()
    setup_project(client, project_id, ls)
    for task_id in (1, 2, 3):
        annotate_via_webhook(client, ls, project_id, task_id)
    quick = _train_worker(redis_url, model_dir, tmp_path, "quick")
    try:
        quick.wait_ready(redis)
        first = start_training(client, project_id)
        job = stored_job(redis, first["job_id"])
        wait_for(lambda: job.get_status(refresh=True).value in ("finished", "failed"), 120, "first training",
                 interval=0.5)
        assert job.get_status().value == "finished", quick.output()
    finally:
        quick.stop()
    store = ProjectStore(redis, make_settings(), zero_shot=True)
    active = store.policy_versions(project_id)
    model_version = store.model_version(project_id)
    settings = make_settings()
    bundles_before = sorted(p.name for p in bundle_path(settings, project_id, "Shape", "x").parent.iterdir())

    annotate_via_webhook(client, ls, project_id, 4)  # something new to learn from
    slow = _train_worker(redis_url, model_dir, tmp_path, "slow", TRAIN_EPISODES="100000")
    try:
        slow.wait_ready(redis)
        ticket = start_training(client, project_id)
        job = stored_job(redis, ticket["job_id"])
        wait_for(lambda: (job.get_meta(refresh=True).get("progress") or {}).get("episode", 0) >= 1, 120,
                 "training to be under way", interval=0.2)
        # Triggers while it runs queue one follow-up, not more.
        follow = start_training(client, project_id)
        assert follow["training_status"] == "follow-up" and follow["job_id"] != ticket["job_id"]
        assert start_training(client, project_id)["job_id"] == follow["job_id"]
        os.kill(job.meta["pid"], signal.SIGKILL)
        slow.proc.wait(timeout=10)
        state = wait_for(lambda: (s := status(client, project_id))["training_job"]["status"] == "failed" and s,
                         30, "the killed job to be marked failed", interval=0.5)
    finally:
        slow.stop()
    assert "Abandoned" in state["training_job"]["failure"]
    assert store.policy_versions(project_id) == active
    assert store.model_version(project_id) == model_version
    bundles_after = sorted(p.name for p in bundle_path(settings, project_id, "Shape", "x").parent.iterdir())
    assert [b for b in bundles_after if not b.startswith(".staging")] == bundles_before
    # The follow-up run was released (not lost): it is queued for the next training worker.
    assert stored_job(redis, follow["job_id"]).get_status(refresh=True).value == "queued"
    stored_job(redis, follow["job_id"]).cancel()
    assert TRAIN_QUEUE == "train"
