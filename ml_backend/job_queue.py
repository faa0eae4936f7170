"""The web side of the queue: the RQ implementations of the ports in :mod:`ml_backend.ports`.

No torch here: jobs are enqueued by dotted name (``workers.jobs.predict_tasks`` ...) with plain JSON-able
arguments, so any ``alignsam-worker`` on any machine pointed at the same Redis can run them. RQ (pinned 3.0) is
used through its public API only. Queues: ``predict`` (latency-sensitive), ``train`` (one job per project at a
time), ``prelabel`` (bulk). The product's own Redis keys are in :mod:`ml_backend.keys`.

Nothing read from Redis is unpickled: every queue, job, registry and worker of the product, here and in
:mod:`workers.worker`, is built with :data:`SERIALIZER` (RQ's JSON serializer) and :class:`ProductJob` (through
:func:`product_queue`, :func:`read_job` / :func:`fetch_job` / :func:`fetch_jobs`, :func:`started_registry`), so a
job's call, meta and results are JSON text. RQ's pickle default would let anyone who can write to Redis run code in the web process (``GET
/status`` reads job meta) and in the workers. JSON alone still lets a job hash name any importable function
(``func_name``), failure or success callback, or webhook; :class:`ProductJob` runs only the product's three job
functions and none of the others.

Prediction: a ``/predict`` answers every task whose prediction is cached at once. For each other task it joins the
live job already computing it (the task's job marker), or enqueues new jobs: the remaining tasks in order, split
evenly over the predict workers not busy now, at most ``PREDICT_BATCH_SIZE`` per job, so a burst is shared by the
idle workers and each runs its share as one SAM / CLIP batch (:func:`workers.jobs.predict_tasks`). It then waits
(one blocking ``XREAD`` over all of them) on each task's ready stream and its job's RQ result stream, until
``PREDICT_WAIT_S``. The worker appends to a task's ready stream in the round trip that caches its prediction, before
RQ's success bookkeeping, so the answer does not wait for that; a job that fails wakes the wait through its RQ
result. A task that has no prediction then gets an empty one: of the current model version when its job failed,
of ``<version>-pending`` while it still runs. Label Studio stores that under the other version, so the next request
for the task (opening it, "Retrieve predictions") asks again and is answered from the cache.

Training: at most one training job per project is queued or running. A trigger while one is queued joins it (the
job reads the annotations when it starts); a trigger while one runs queues one follow-up job that depends on it
(RQ ``Dependency(allow_failure=True)``), and further triggers join that follow-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from redis import ConnectionPool, Redis
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import JOB_ID_PATTERN, Dependency, Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.webhook import Webhook
from rq.worker import WorkerStatus

from ml_backend.formats import empty_prediction
from ml_backend.keys import (
    JOB_RECORD_TTL_S,
    PENDING_SUFFIX,
    PREDICT_FAILURE_TTL_S,
    PREDICT_RESULT_TTL_S,
    TRAIN_HISTORY_KEPT,
    TRAIN_LOCK_TIMEOUT_S,
    Keys,
    digest,
    plain_task_id,
)
from ml_backend.ports import (
    PredictionRequest,
    PredictorUnavailableError,
    TrainingRequest,
    TrainingTicket,
)
from ml_backend.redis_conn import text
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

PREDICT_QUEUE = "predict"
TRAIN_QUEUE = "train"
PRELABEL_QUEUE = "prelabel"
QUEUES = (PREDICT_QUEUE, TRAIN_QUEUE, PRELABEL_QUEUE)

PREDICT_JOB = "workers.jobs.predict_tasks"
TRAIN_JOB = "workers.jobs.train_project"
PRELABEL_JOB = "workers.jobs.prelabel_project"
JOB_FUNCTIONS = frozenset({PREDICT_JOB, TRAIN_JOB, PRELABEL_JOB})
"""the only functions a job may name: a worker refuses any other ``func_name``"""

WAITING_STATUSES = frozenset(s.value for s in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED))
ALIVE_STATUSES = WAITING_STATUSES | {JobStatus.STARTED.value}
UNREADABLE = "unreadable"
"""``GET /status``'s status of a job whose record in Redis this backend cannot read (not one it wrote)"""

SERIALIZER = JSONSerializer
"""How jobs (call, meta, results) are stored, by the web process and the workers alike: JSON, never pickle."""


class ForeignJobError(RuntimeError):
    """A job in Redis names a function this product does not run (someone else wrote it): it is failed unrun."""


class ProductJob(Job):
    """An RQ job that can only run the product's job functions (:data:`JOB_FUNCTIONS`), as plain functions.

    A job hash is data anyone with write access to Redis can forge. With JSON it can no longer carry code, but RQ
    would still import and call whatever it names: the job's function, its success / failure / stopped callbacks
    (the failure callback runs in whichever process reaps an abandoned job: the web process too) and its webhooks
    (HTTP requests to any URL). The product uses no callbacks and no webhooks, so this class has none whatever the
    hash says, and a function outside :data:`JOB_FUNCTIONS` raises :class:`ForeignJobError` instead of being
    imported: the worker records that as the job's failure.
    """

    @property
    def func(self) -> Any:
        name = self.func_name
        if name not in JOB_FUNCTIONS or self.instance is not None:
            raise ForeignJobError(
                f"job {self.id} names {ascii(name)[:200]}, which this worker does not run (it runs only "
                f"{', '.join(sorted(JOB_FUNCTIONS))}); something other than the AlignSAM backend wrote it to Redis: "
                "check who can reach Redis (REDIS_URL password, network policy)."
            )
        return super().func

    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None

    @property  # type: ignore[override]
    def webhooks(self) -> list[Webhook]:
        return []

    @webhooks.setter
    def webhooks(self, value: Sequence[Webhook]) -> None:
        """Ignored: the product sends no webhooks, and a stored list is not ours to send."""


def product_queue(name: str, redis: Redis) -> Queue:
    """The product's queue ``name`` on ``redis``: JSON jobs of :class:`ProductJob`."""
    return Queue(name, connection=redis, serializer=SERIALIZER, job_class=ProductJob)


def started_registry(name: str, redis: Redis) -> StartedJobRegistry:
    """The started-job registry of queue ``name`` (its cleanup reads jobs: as JSON :class:`ProductJob`)."""
    return StartedJobRegistry(name, connection=redis, serializer=SERIALIZER, job_class=ProductJob)


_digests: OrderedDict[tuple[str, int, int, int], str] = OrderedDict()
_digests_lock = threading.Lock()


def file_digest(path: str) -> str:
    """Content hash of an image file (the cache key must change when the image does).

    Remembered per (path, inode, size, mtime) for the last 4096 files: a task's image is hashed once, not on
    every request for it.
    """
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    with _digests_lock:
        known = _digests.get(key)
        if known is not None:
            _digests.move_to_end(key)
            return known
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()[:20]
    with _digests_lock:
        _digests[key] = value
        while len(_digests) > 4096:
            _digests.popitem(last=False)
    return value


def job_status(job: Job, refresh: bool = True) -> str | None:
    """The job's status word (``refresh``: read it from Redis), or None when the job expired."""
    try:
        status = job.get_status(refresh=refresh)
    except Exception:  # NoSuchJobError, InvalidJobOperation when the hash expired
        return None
    return None if status is None else str(status.value if hasattr(status, "value") else status)


class UnreadableJobError(RuntimeError):
    """A job record in Redis that this backend did not write (not JSON, a malformed field, an invalid id)."""


def read_job(redis: Redis, job_id: str) -> Job | None:
    """The job with this id read as JSON, or None when it expired; raises :class:`UnreadableJobError` when its
    record is not one this backend wrote (a pickled payload, a malformed field). An id RQ would not make (RQ's
    letters, digits, ``_`` and ``-``) names no job: None."""
    if not JOB_ID_PATTERN.fullmatch(job_id):
        return None
    try:
        job = ProductJob.fetch(job_id, connection=redis, serializer=SERIALIZER)
    except NoSuchJobError:
        return None
    except RedisError:
        raise
    except Exception as exc:  # ValueError (an invalid status), DeserializationError, UnicodeDecodeError ...
        raise UnreadableJobError(f"{type(exc).__name__}: {exc}") from exc
    if not _is_json(job.meta):  # RQ keeps meta it could not decode as raw bytes
        raise UnreadableJobError("its meta is not JSON")
    return job


def fetch_job(redis: Redis, job_id: str | None) -> Job | None:
    """The job with this id, or None (no id, expired, or unreadable: see :func:`read_job`)."""
    if not job_id:
        return None
    try:
        return read_job(redis, job_id)
    except UnreadableJobError as exc:
        logger.warning("job %s in Redis is unreadable (%s); ignored", ascii(job_id)[:80], exc)
        return None


def fetch_jobs(redis: Redis, job_ids: Sequence[str]) -> list[Job | None]:
    """:func:`fetch_job` for many ids in one round trip (one by one when a record among them is unreadable)."""
    try:
        jobs = ProductJob.fetch_many(job_ids, connection=redis, serializer=SERIALIZER)
        if all(job is None or _is_json(job.meta) for job in jobs):
            return jobs
    except RedisError:
        raise
    except Exception:  # an unreadable record: find which
        pass
    return [fetch_job(redis, job_id) for job_id in job_ids]


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def predict_job_id(project_id: int) -> str:
    """A new predict job's id: the project id (an int) and a random uuid, never anything from the request's
    tasks (RQ allows only letters, digits, ``_`` and ``-`` in job ids, and a task id may be anything)."""
    return f"predict-{int(project_id)}-{uuid.uuid4().hex}"


def chunk_sizes(tasks: int, idle_workers: int, batch_size: int) -> list[int]:
    """Sizes of the predict jobs for ``tasks`` tasks, in task order: split evenly over ``idle_workers`` (at least
    one), at most ``batch_size`` each. 16 tasks on 2 idle workers -> [8, 8]; 20 on 1 -> [16, 4]."""
    if tasks <= 0:
        return []
    size = max(1, min(batch_size, math.ceil(tasks / max(idle_workers, 1))))
    return [min(size, tasks - start) for start in range(0, tasks, size)]


# ---------------------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------------------
class QueuePredictor:
    """``/predict`` through the ``predict`` queue: jobs of up to ``PREDICT_BATCH_SIZE`` tasks, predictions cached
    per (task, image content, model version, config)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.redis_key_prefix)
        self.queue = product_queue(PREDICT_QUEUE, redis)
        # RQ's Worker objects (built to read the workers' states) set a socket timeout on their connection's pool:
        # they get a pool of their own, so this process's connection keeps its settings.
        pool = redis.connection_pool
        lookup = Redis(connection_pool=ConnectionPool(connection_class=pool.connection_class,
                                                      max_connections=4, **pool.connection_kwargs))
        self._workers_queue = product_queue(PREDICT_QUEUE, lookup)

    def __call__(self, request: PredictionRequest) -> list[dict[str, Any] | None]:
        try:
            return self._predict(request)
        except RedisError as exc:
            raise PredictorUnavailableError(
                f"Redis is unreachable ({type(exc).__name__}); predictions resume when it is back."
            ) from exc

    def _predict(self, request: PredictionRequest) -> list[dict[str, Any] | None]:
        """The answers: see :meth:`_predict_usable` for tasks with a usable id, an empty prediction for the others.

        Label Studio's task ids are integers. An id that is neither an integer nor a short plain string
        (:func:`ml_backend.keys.plain_task_id`: ``"a b"``, ``1.5``, ``{}``, 5000 characters, a lone surrogate) can
        only come from a hand-made request; such a task gets an empty prediction of the current model version and
        a log line, and its id goes nowhere else. Predicting it anyway would carry the raw id into the job, its
        description, its failure text and the worker's logs (redis-py cannot even encode a lone surrogate), for
        no task Label Studio could store the answer of. The other tasks of the request are answered as usual.
        """
        usable = [i for i, task in enumerate(request.tasks) if plain_task_id(task.get("id")) is not None]
        if len(usable) == len(request.tasks):
            return self._predict_usable(request)
        for i in sorted(set(range(len(request.tasks))) - set(usable)):
            logger.warning("project %s: task #%d of the request has the id %s, not an integer or a short plain "
                           "string (letters, digits, _ and -); empty prediction", request.project_id, i,
                           ascii(request.tasks[i].get("id"))[:80])
        self._count("predict_unusable_task_ids", len(request.tasks) - len(usable))
        answers: list[dict[str, Any] | None] = [empty_prediction(request.model_version) for _ in request.tasks]
        if usable:
            sub = dataclasses.replace(request, tasks=[request.tasks[i] for i in usable],
                                      images=[request.images[i] for i in usable])
            for i, answer in zip(usable, self._predict_usable(sub), strict=True):
                answers[i] = answer
        return answers

    def _predict_usable(self, request: PredictionRequest) -> list[dict[str, Any] | None]:
        """Cache, the jobs computing the tasks, the wait; every task's id is plain."""
        version = request.model_version
        keys = self.cache_keys(request)
        answers: list[dict[str, Any] | None] = [None] * len(keys)
        self._fill_from_cache(keys, answers)
        missing = [i for i, a in enumerate(answers) if a is None]
        self._count("predict_cache_hits", len(keys) - len(missing))
        if not missing:
            return answers
        jobs = self.jobs_for(request, keys, missing)
        ready = [self.keys.prediction_ready(keys[i]) for i in missing]
        self._wait(jobs, ready, time.monotonic() + self.settings.predict_wait_s)
        self._fill_from_cache(keys, answers)
        if any(answers[i] is None for i in missing):
            # a job whose worker died while it ran is failed now, not after the next worker's maintenance
            reap_abandoned(self.redis, [PREDICT_QUEUE])
        failures: dict[str, str | None] = {}  # job id -> why it failed, None while it has not (or may run again)
        late = 0
        for i, job in zip(missing, jobs, strict=True):
            if answers[i] is not None:
                continue
            if job.id not in failures:
                reason = last_line(job) if job_status(job) == JobStatus.FAILED.value else None
                # A worker that died (abandoned job) says nothing about the task: answer it as pending, so Label
                # Studio asks again and the next request computes it anew, instead of a final empty answer.
                failures[job.id] = None if reason is not None and "AbandonedJobError" in reason else reason
            if failures[job.id] is not None:
                logger.warning("project %s task %s: predict job %s failed: %s", request.project_id,
                               request.tasks[i].get("id"), job.id, failures[job.id])
                answers[i] = empty_prediction(version)
            else:
                late += 1
                answers[i] = empty_prediction(version + PENDING_SUFFIX)
        if late:
            logger.info("project %s: %d of %d tasks not ready after PREDICT_WAIT_S=%s s; answered as pending",
                        request.project_id, late, len(keys), self.settings.predict_wait_s)
            self._count("predict_late_tasks", late)
        return answers

    def cache_keys(self, request: PredictionRequest) -> list[str]:
        """Each request task's prediction cache key, in order."""
        config_hash = request.config.config_hash or "-"
        return [self.keys.prediction(request.project_id, task.get("id"), file_digest(image.path),
                                     request.model_version, config_hash)
                for task, image in zip(request.tasks, request.images, strict=True)]

    def _fill_from_cache(self, keys: Sequence[str], answers: list[dict[str, Any] | None]) -> None:
        todo = [i for i, a in enumerate(answers) if a is None]
        if not todo:
            return
        values = self.redis.mget([keys[i] for i in todo])
        for i, raw in zip(todo, values, strict=True):
            if raw is not None:
                answers[i] = json.loads(raw)

    def jobs_for(self, request: PredictionRequest, keys: Sequence[str], missing: Sequence[int]) -> list[Job]:
        """The job computing each task of ``missing`` (indices into the request), in order: the live job already
        computing it, or a new one (one per chunk of the remaining tasks, enqueued in one transaction)."""
        markers = [self.keys.predict_job_marker(keys[i]) for i in missing]
        known = [text(v) for v in self.redis.mget(markers)]
        ids = sorted({i for i in known if i})
        alive = {job.id: job for job in fetch_jobs(self.redis, ids)
                 if job is not None and job_status(job, refresh=False) in ALIVE_STATUSES
                 and not self.orphaned(job)}
        jobs: list[Job | None] = [alive.get(i) if i else None for i in known]
        todo = [n for n, job in enumerate(jobs) if job is None]
        if todo:
            new = self._enqueue(request, keys, [missing[n] for n in todo], [markers[n] for n in todo])
            for n, job in zip(todo, new, strict=True):
                jobs[n] = job
        return [job for job in jobs if job is not None]

    def orphaned(self, job: Job) -> bool:
        """Whether ``job`` says ``queued`` but is in no queue: a worker serving several queues takes a job off with
        a plain pop, and one that died before marking it started leaves it so, never run and never failed (RQ's
        cleanup only fails started jobs). Its tasks are then enqueued again; a live worker caught in that instant
        costs one duplicate computation, never a wrong answer."""
        return job_status(job, refresh=False) == JobStatus.QUEUED.value and self.queue.get_job_position(job.id) is None

    def idle_workers(self) -> int:
        """Workers on the ``predict`` queue not running a job now (at least 1)."""
        workers = Worker.all(queue=self._workers_queue, job_class=ProductJob, serializer=SERIALIZER)
        return max(sum(w.get_state() != WorkerStatus.BUSY for w in workers), 1)

    def _enqueue(self, request: PredictionRequest, keys: Sequence[str], tasks: Sequence[int],
                 markers: Sequence[str]) -> list[Job]:
        """New jobs for the request tasks ``tasks`` (indices), with their job markers, in one transaction; returns
        each task's job."""
        s = self.settings
        idle = self.idle_workers() if len(tasks) > 1 and s.predict_batch_size > 1 else 1
        sizes = chunk_sizes(len(tasks), idle, s.predict_batch_size)
        config = request.config.to_json()
        data = []
        start = 0
        for size in sizes:
            chunk = tasks[start : start + size]
            start += size
            ids = [plain_task_id(request.tasks[i].get("id")) for i in chunk]
            data.append(Queue.prepare_data(
                PREDICT_JOB,
                kwargs={
                    "project_id": request.project_id,
                    "config": config,
                    "model_version": request.model_version,
                    "policy_versions": dict(request.policy_versions),
                    "tasks": [{
                        "task": {"id": request.tasks[i].get("id"), "data": dict(request.tasks[i].get("data") or {})},
                        "image": request.images[i].to_json(),
                        "cache_key": keys[i],
                        "ready_key": self.keys.prediction_ready(keys[i]),
                    } for i in chunk],
                },
                timeout=s.predict_job_timeout_s * size,
                result_ttl=PREDICT_RESULT_TTL_S,
                failure_ttl=PREDICT_FAILURE_TTL_S,
                ttl=s.predict_job_ttl_s,
                job_id=predict_job_id(request.project_id),
                description=f"predict project {int(request.project_id)}, {size} task(s): {', '.join(map(str, ids))}",
            ))
        # A marker lives as long as a queued job may: once its job is gone (run, failed or dropped) a stale marker
        # is ignored anyway (jobs_for joins only live jobs).
        marker_ttl = s.predict_job_ttl_s
        with self.redis.pipeline() as pipe:
            new = self.queue.enqueue_many(data, pipeline=pipe)
            owners = [job for job, size in zip(new, sizes, strict=True) for _ in range(size)]
            for marker, job in zip(markers, owners, strict=True):
                pipe.set(marker, job.id, ex=marker_ttl)
            pipe.execute()
        self._count("predict_jobs_enqueued", len(new))
        return owners

    def _wait(self, jobs: Sequence[Job], ready_keys: Sequence[str], deadline: float) -> None:
        """Block until each task is ready (its ready stream, or its job's RQ result stream, has an entry) or the
        deadline passes. ``jobs[n]`` computes the task of ``ready_keys[n]``.

        Each blocking read lasts at most a second, and less than the connection's socket timeout when it has one
        (``?socket_timeout=`` in REDIS_URL), so a long wait is never mistaken for a dead Redis.
        """
        owners: dict[str, list[int]] = {}
        for n, (job, ready) in enumerate(zip(jobs, ready_keys, strict=True)):
            owners.setdefault(Result.get_key(job.id), []).append(n)
            owners.setdefault(ready, []).append(n)
        waiting = set(range(len(jobs)))
        socket_timeout = self.redis.connection_pool.connection_kwargs.get("socket_timeout")
        slice_ms = min(1000, max(int(float(socket_timeout) * 500), 1)) if socket_timeout else 1000
        while waiting:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return
            streams = {key: "0-0" for key, tasks in owners.items() if waiting.intersection(tasks)}
            response = self.redis.xread(streams, block=min(left_ms, slice_ms))
            for stream, _entries in response or ():
                waiting.difference_update(owners[str(text(stream))])

    def _count(self, counter: str, by: int) -> None:
        if by:
            self.redis.hincrby(self.keys.metrics, counter, by)


def last_line(job: Job) -> str:
    """The last line of the job's latest failure (its exception), or ``"unknown reason"``."""
    try:
        result = job.latest_result()
        failure = (result.exc_string if result is not None else None) or ""
    except Exception:  # the result may have expired
        failure = ""
    lines = [line for line in failure.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown reason"


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
class QueueTrainingTrigger:
    """START_TRAINING / the TRAIN_MIN_TASKS threshold -> at most one training job per project (+ one follow-up)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.redis_key_prefix)
        self.queue = product_queue(TRAIN_QUEUE, redis)

    def __call__(self, request: TrainingRequest) -> TrainingTicket:
        pid = request.project_id
        reap_abandoned(self.redis, [TRAIN_QUEUE])
        lock = self.redis.lock(self.keys.train_lock(pid), timeout=TRAIN_LOCK_TIMEOUT_S, blocking_timeout=0.8)
        if not lock.acquire():
            # Another trigger for this project is being handled right now: it decides for both.
            current = text(self.redis.get(self.keys.train_job(pid))) or "unknown"
            return TrainingTicket(job_id=current, status="coalesced")
        try:
            current = fetch_job(self.redis, text(self.redis.get(self.keys.train_job(pid))))
            status = job_status(current) if current is not None else None
            if current is not None and status in WAITING_STATUSES:
                return TrainingTicket(job_id=current.id, status="coalesced")
            depends_on = None
            if current is not None and status == JobStatus.STARTED.value:
                depends_on = Dependency(jobs=[current], allow_failure=True)
            job = self.queue.enqueue_call(
                TRAIN_JOB,
                kwargs={"project_id": pid, "reason": request.reason, "requested_at": request.requested_at},
                timeout=self.settings.train_job_timeout_s,
                result_ttl=JOB_RECORD_TTL_S,
                failure_ttl=JOB_RECORD_TTL_S,
                job_id=f"train-{int(pid)}-{uuid.uuid4().hex}",
                description=f"train project {pid}: {request.reason}",
                depends_on=depends_on,
            )
            with self.redis.pipeline() as pipe:
                pipe.set(self.keys.train_job(pid), job.id)
                pipe.lpush(self.keys.train_jobs(pid), job.id)
                pipe.ltrim(self.keys.train_jobs(pid), 0, TRAIN_HISTORY_KEPT - 1)
                pipe.execute()
            return TrainingTicket(job_id=job.id, status="follow-up" if depends_on is not None else "queued")
        finally:
            try:
                lock.release()
            except Exception:  # expired lock: nothing to release
                logger.debug("training lock for project %s had expired", pid)


def enqueue_prelabel(redis: Redis, settings: Settings, project_id: int, model_version: str) -> Job:
    """Queue (once per project and model version) the job that pre-labels the project's unlabelled tasks.

    Its id is derived from both (a digest of the model version, whose prefix is an operator setting), so a second
    call while it is queued or running finds it."""
    job_id = f"prelabel-{int(project_id)}-{digest(model_version)}"
    existing = fetch_job(redis, job_id)
    if existing is not None and job_status(existing) in ALIVE_STATUSES:
        return existing
    return product_queue(PRELABEL_QUEUE, redis).enqueue_call(
        PRELABEL_JOB,
        kwargs={"project_id": project_id, "model_version": model_version},
        timeout=settings.prelabel_job_timeout_s,
        result_ttl=JOB_RECORD_TTL_S,
        failure_ttl=JOB_RECORD_TTL_S,
        job_id=job_id,
        description=f"prelabel project {project_id} with {model_version}",
    )


def training_jobs(redis: Redis, keys: Keys, project_id: int) -> list[dict[str, Any]]:
    """Summaries of the project's recent training jobs, newest first (reaps abandoned jobs first)."""
    reap_abandoned(redis, QUEUES)
    ids = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)  # ours are ASCII; others are not read
           for v in redis.lrange(keys.train_jobs(project_id), 0, -1)]
    return [s for s in (job_summary(redis, i, reap=False) for i in ids) if s is not None]


def reap_abandoned(redis: Redis, queue_names: Sequence[str] = QUEUES) -> None:
    """Move jobs whose worker stopped heartbeating (killed mid-job) to the failed registry.

    Workers refresh a short heartbeat while a job runs (``JOB_HEARTBEAT_TTL_S``); RQ's cleanup fails the jobs
    whose heartbeat expired and releases their dependents (a follow-up training run). Cheap; safe to call often.
    """
    for name in queue_names:
        try:
            started_registry(name, redis).cleanup()
        except RedisError:
            logger.warning("could not reap abandoned %s jobs", name, exc_info=True)


def job_summary(redis: Redis, job_id: str | None, reap: bool = True) -> dict[str, Any] | None:
    """A job's status, progress meta and failure reason, for ``GET /status/<project>``; None when it expired.

    A record this backend did not write (see :func:`read_job`) is summarised as ``{"id", "status":
    "unreadable", "failure"}``, read as JSON only: nothing in it is unpickled, imported or run."""
    if reap:
        reap_abandoned(redis, QUEUES)
    if not job_id:
        return None
    try:
        job = read_job(redis, job_id)
    except UnreadableJobError as exc:
        logger.warning("job %s in Redis is unreadable (%s): not written by this backend", ascii(job_id)[:80], exc)
        return {"id": ascii(job_id)[1:-1][:200], "status": UNREADABLE,
                "failure": "this job's record in Redis was not written by this backend (not JSON); ignored"}
    if job is None:
        return None
    summary: dict[str, Any] = {
        "id": job.id,
        "status": job_status(job),
        "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "ended_at": job.ended_at.isoformat() if job.ended_at else None,
        "progress": dict(job.get_meta(refresh=True)) if isinstance(job.meta, Mapping) else {},
    }
    if summary["status"] == JobStatus.FAILED.value:
        summary["failure"] = last_line(job)
    return summary
