"""Redis goes away under a running backend and worker, and comes back on the same socket: the web process reports
the outage on /health, answers /predict with a clear 503 meanwhile, and serves predictions again afterwards
without being restarted (it and the worker reconnect by themselves)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from redis import Redis
from wk_helpers import (
    LABEL_CONFIG,
    FakeLabelStudio,
    RedisProc,
    WorkerProcess,
    setup_project,
    wait_for,
    worker_env,
)

from ml_backend.app import create_app
from ml_backend.keys import PENDING_SUFFIX
from ml_backend.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def restartable_redis() -> Iterator[RedisProc]:
    folder = Path(tempfile.mkdtemp(prefix="wk-rr-"))  # short: a unix socket path has at most 107 bytes
    server = RedisProc(folder, fsync_always=True)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)


def predict(client: FlaskClient, project_id: int, tasks: list[dict[str, Any]]) -> Any:
    body = {"tasks": tasks, "project": f"{project_id}.1795439330", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": None}}
    return client.post("/predict", json=body)


def test_backend_and_worker_survive_a_redis_restart(
    restartable_redis: RedisProc, make_settings: Callable[..., Settings], make_fake_ls: Callable[[int], FakeLabelStudio],
    project_id: int, model_dir: Path, tmp_path: Path,
) -> None:
    ls = make_fake_ls(4)
    settings = make_settings(redis_url=restartable_redis.url, predict_wait_s=20.0)
    conn = Redis.from_url(restartable_redis.url)
    app = create_app(settings, redis=conn, queue=True)
    app.testing = True
    client = app.test_client()
    worker = WorkerProcess(worker_env(restartable_redis.url, model_dir), "predict", tmp_path / "worker.log")
    try:
        worker.wait_ready(conn)
        setup_project(client, project_id, ls)
        assert client.get("/health").get_json()["redis"] == "ok"
        before = predict(client, project_id, [ls.tasks[1]])
        assert before.status_code == 200, before.get_json()
        assert before.get_json()["results"][0]["result"]

        restartable_redis.kill()
        health = client.get("/health")
        assert health.status_code == 200
        assert health.get_json()["status"] == "UP"
        assert health.get_json()["redis"].startswith("unreachable")
        down = predict(client, project_id, [ls.tasks[2]])
        assert down.status_code == 503
        assert "Redis is unreachable" in down.get_json()["message"]

        restartable_redis.start()  # same socket, same data
        wait_for(lambda: client.get("/health").get_json()["redis"] == "ok", 30, "/health to see Redis again")

        def answered() -> list[dict[str, Any]] | None:
            response = predict(client, project_id, [ls.tasks[3], ls.tasks[4]])
            assert response.status_code == 200, response.get_json()
            results = response.get_json()["results"]
            done = all(r["result"] and not r["model_version"].endswith(PENDING_SUFFIX) for r in results)
            return results if done else None

        # The worker reconnects with its own backoff; /predict answers from the cache once its jobs ran.
        after = wait_for(answered, 90, "predictions after the restart", interval=0.5)
        assert [r["model_version"] for r in after] == ["alignsam-zeroshot"] * 2
        assert worker.proc.poll() is None, worker.output()
    finally:
        worker.stop()
        conn.close()
