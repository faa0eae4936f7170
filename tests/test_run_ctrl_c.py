"""Issue 20 finding 8: Ctrl-C on ``alignsam-run`` (``make run``) stops everything it started, every time.

A terminal's Ctrl-C sends SIGINT to its whole foreground process group. Before the fix, gunicorn's threaded workers
were in that group, got SIGINT themselves, and in 2 of 5 tries one deadlocked in its signal handler, orphaned and
still holding the port. This test starts the launcher as a terminal starts a job (a process group of its own),
keeps requests in flight, sends SIGINT to the group, and checks that every process it started is gone and the port
is free; several times, since the failure was intermittent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).parents[1]
TRIES = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _hammer(url: str, stop: threading.Event) -> None:
    """Requests in flight until ``stop`` (bounded: at most 2000, each with a short timeout)."""
    for _ in range(2000):
        if stop.is_set():
            return
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                response.read()
        except OSError:
            time.sleep(0.01)


@pytest.mark.integration
@pytest.mark.parametrize("attempt", range(TRIES))
def test_ctrl_c_stops_every_process_and_frees_the_port(tmp_path: Path, attempt: int) -> None:
    launcher = Path(sys.executable).with_name("alignsam-run")
    if not launcher.exists():
        pytest.skip("alignsam-run is not installed in this environment")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LABEL_STUDIO_URL")}
    env.update({"MODEL_DIR": str(tmp_path / "models"), "PORT": str(port), "SAM_PRESET": "tiny",
                "CLIP_PRESET": "none", "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "4", "LOG_LEVEL": "WARNING",
                "TORCH_THREADS": "1"})
    log = (tmp_path / "run.log").open("w")
    run = subprocess.Popen([str(launcher)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)  # a terminal's job: its own foreground process group
    started: list[psutil.Process] = []
    stop = threading.Event()
    hammers: list[threading.Thread] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()
                time.sleep(0.2)
        hammers = [threading.Thread(target=_hammer, args=(f"http://127.0.0.1:{port}/health", stop), daemon=True)
                   for _ in range(4)]
        for thread in hammers:
            thread.start()
        time.sleep(0.3)
        started = psutil.Process(run.pid).children(recursive=True)
        assert len(started) >= 4, "worker, gunicorn master and its 2 workers (and the embedded Redis)"
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to the whole foreground group
        assert run.wait(timeout=60) == 0
    finally:
        stop.set()
        for thread in hammers:
            thread.join(timeout=5)
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        log.close()
    _, alive = psutil.wait_procs(started, timeout=10)
    leftovers = [f"{p.pid} {p.name()}" for p in alive]
    for proc in alive:  # leave nothing behind for the next test, then fail
        proc.kill()
    assert leftovers == [], f"attempt {attempt}: still running after Ctrl-C: {leftovers}"
    assert _port_is_free(port), f"attempt {attempt}: port {port} still held after Ctrl-C"
