"""The web side of the queue: RQ-backed :class:`~ml_backend.seams.Predictor` and ``TrainingTrigger``.

No torch here: jobs are enqueued by dotted name (``workers.jobs.predict_task`` ...), with plain JSON-able
arguments, so any ``alignsam-worker`` on any machine pointed at the same Redis can run them.

Queues: ``predict`` (latency-sensitive, one job per task), ``train`` (one job per project at a time),
``prelabel`` (bulk). Extra Redis keys (``P = REDIS_KEY_PREFIX``):

==========================================  ==========================================================
``P:pred:<pid>:<task>:<image>:<version>``   a task's finished prediction (JSON), per image content hash,
                                            model version and config hash; ``PREDICT_CACHE_TTL_S``
``P:predjob:<same digest>``                 id of the predict job computing that entry (while queued)
``P:predready:<same digest>``               a stream the worker appends to right after writing the entry
                                            (``READY_TTL_S``), so ``/predict`` wakes before RQ's bookkeeping
``P:project:<pid>:train-job``               id of the project's latest training job (queued or follow-up)
==========================================  ==========================================================

Prediction path: a ``/predict`` answers every task whose prediction is cached at once, enqueues one job per
missing task (or joins the job already computing it), and waits (one blocking ``XREAD`` over all of them) on
each task's ready stream and its job's RQ result stream, until ``PREDICT_WAIT_S``. The worker appends to the ready
stream in the same round trip that caches the prediction, before it does RQ's success bookkeeping (a transaction
of about a dozen commands per job, several milliseconds for a batch of 16): the answer does not wait for that. A
job that fails never writes its ready stream; its failed RQ result wakes the wait instead. Tasks still running
then get an empty prediction whose ``model_version`` ends in ``-pending``: Label Studio stores it under that other
version, so the next request for the task (opening it, "Retrieve predictions") asks again and is answered from
the cache.

Training: at most one training job per project is queued or running. A trigger while one is queued joins it (the
job reads the annotations when it starts); a trigger while one runs queues one follow-up job that depends on it
(RQ ``Dependency(allow_failure=True)``), and further triggers join that follow-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Dependency, Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.utils import now

from ml_backend.formats import empty_prediction
from ml_backend.seams import (
    PredictionRequest,
    PredictorUnavailableError,
    TrainingRequest,
    TrainingTicket,
)
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

PREDICT_QUEUE = "predict"
TRAIN_QUEUE = "train"
PRELABEL_QUEUE = "prelabel"
QUEUES = (PREDICT_QUEUE, TRAIN_QUEUE, PRELABEL_QUEUE)

PREDICT_JOB = "workers.jobs.predict_task"
TRAIN_JOB = "workers.jobs.train_project"
PRELABEL_JOB = "workers.jobs.prelabel_project"

ZERO_SHOT = "zeroshot"
PENDING_SUFFIX = "-pending"
WAITING_STATUSES = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED)
ALIVE_STATUSES = (*WAITING_STATUSES, JobStatus.STARTED)
READY_TTL_S = 600
"""lifetime of a task's ready stream: only requests waiting while its job runs read it (later ones hit the cache)"""


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


def prediction_cache_key(prefix: str, project_id: int, task_id: Any, image_digest: str, model_version: str,
                         config_hash: str) -> str:
    """Redis key of one task's cached prediction."""
    return f"{prefix}:pred:{project_id}:{task_id}:{image_digest}:{model_version}:{config_hash}"


def _cache_digest(cache_key: str) -> str:
    return hashlib.sha256(cache_key.encode()).hexdigest()[:24]


def predict_job_marker_key(prefix: str, cache_key: str) -> str:
    """Redis key holding the id of the predict job computing ``cache_key``."""
    return f"{prefix}:predjob:{_cache_digest(cache_key)}"


def prediction_ready_key(prefix: str, cache_key: str) -> str:
    """Redis stream the worker appends to once ``cache_key`` holds the task's prediction."""
    return f"{prefix}:predready:{_cache_digest(cache_key)}"


def job_status(job: Job) -> str | None:
    """The job's status word, or None when it expired."""
    try:
        status = job.get_status(refresh=True)
    except (NoSuchJobError, Exception):  # InvalidJobOperation when the hash expired
        return None
    return None if status is None else str(status.value if hasattr(status, "value") else status)


def fetch_job(redis: Redis, job_id: str | None) -> Job | None:
    if not job_id:
        return None
    try:
        return Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------------------
class QueuePredictor:
    """``/predict`` through the ``predict`` queue: one job per task, cached per (task, image, version)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.queue = Queue(PREDICT_QUEUE, connection=redis)
        self.prefix = settings.redis_key_prefix

    def __call__(self, request: PredictionRequest) -> list[dict[str, Any] | None]:
        try:
            return self._predict(request)
        except RedisError as exc:
            raise PredictorUnavailableError(
                f"Redis is unreachable ({type(exc).__name__}); predictions resume when it is back."
            ) from exc

    def _predict(self, request: PredictionRequest) -> list[dict[str, Any] | None]:
        s = self.settings
        version = request.model_version
        config_hash = request.config.config_hash or "-"
        keys = []
        for task, image in zip(request.tasks, request.images, strict=True):
            keys.append(prediction_cache_key(self.prefix, request.project_id, task.get("id"),
                                             file_digest(image.path), version, config_hash))
        answers: list[dict[str, Any] | None] = [None] * len(keys)
        self._fill_from_cache(keys, answers)
        missing = [i for i, a in enumerate(answers) if a is None]
        self._count("predict_cache_hits", len(keys) - len(missing))
        if not missing:
            return answers
        jobs = self._jobs_for(request, keys, missing)
        ready = [prediction_ready_key(self.prefix, keys[i]) for i in missing]
        self._wait(jobs, ready, time.monotonic() + s.predict_wait_s)
        self._fill_from_cache(keys, answers)
        late = 0
        for i, job in zip(missing, jobs, strict=True):
            if answers[i] is not None:
                continue
            status = job_status(job)
            if status == JobStatus.FAILED.value:
                reason = _last_line(job)
                logger.warning("project %s task %s: predict job %s failed: %s", request.project_id,
                               request.tasks[i].get("id"), job.id, reason)
                answers[i] = empty_prediction(version)
            else:
                late += 1
                answers[i] = empty_prediction(version + PENDING_SUFFIX)
        if late:
            logger.info("project %s: %d of %d tasks not ready after PREDICT_WAIT_S=%s s; answered as pending",
                        request.project_id, late, len(keys), s.predict_wait_s)
            self._count("predict_late_tasks", late)
        return answers

    def _fill_from_cache(self, keys: Sequence[str], answers: list[dict[str, Any] | None]) -> None:
        todo = [i for i, a in enumerate(answers) if a is None]
        if not todo:
            return
        values = self.redis.mget([keys[i] for i in todo])
        for i, raw in zip(todo, values, strict=True):
            if raw is not None:
                answers[i] = json.loads(raw)

    def _jobs_for(self, request: PredictionRequest, keys: Sequence[str], missing: Sequence[int]) -> list[Job]:
        """The job computing each missing task: an existing live one, or a new one (enqueued in one pipeline)."""
        s = self.settings
        marker_keys = [predict_job_marker_key(self.prefix, keys[i]) for i in missing]
        known = self.redis.mget(marker_keys)
        jobs: list[Job | None] = []
        for job_id in known:
            job = fetch_job(self.redis, _text(job_id))
            jobs.append(job if job is not None and job_status(job) in {st.value for st in ALIVE_STATUSES} else None)
        new: list[Job] = []
        new_index: list[int] = []
        config = request.config.to_json()
        for n, i in enumerate(missing):
            if jobs[n] is not None:
                continue
            task = request.tasks[i]
            new.append(self.queue.create_job(
                PREDICT_JOB,
                kwargs={
                    "project_id": request.project_id,
                    "task": {"id": task.get("id"), "data": dict(task.get("data") or {})},
                    "image": request.images[i].to_json(),
                    "config": config,
                    "model_version": request.model_version,
                    "policy_versions": dict(request.policy_versions),
                    "cache_key": keys[i],
                    "ready_key": prediction_ready_key(self.prefix, keys[i]),
                },
                timeout=s.predict_job_timeout_s,
                result_ttl=600,
                failure_ttl=24 * 3600,
                ttl=max(s.predict_cache_ttl_s, 3600),
                job_id=f"predict-{request.project_id}-{task.get('id')}-{uuid.uuid4().hex[:12]}",
                description=f"predict project {request.project_id} task {task.get('id')}",
                status=JobStatus.QUEUED,
            ))
            new_index.append(n)
        if new:
            self._enqueue(new, [marker_keys[n] for n in new_index], max(s.predict_job_timeout_s * 2, 3600))
            for n, job in zip(new_index, new, strict=True):
                jobs[n] = job
            self._count("predict_jobs_enqueued", len(new))
        return [j for j in jobs if j is not None]

    def _enqueue(self, jobs: Sequence[Job], marker_keys: Sequence[str], marker_ttl: int) -> None:
        """Put new predict jobs (no dependencies, callbacks or repeats) on the queue in one round trip.

        Writes what RQ's ``Queue.enqueue_many`` writes for such jobs (the job hash, with status ``queued``, its
        expiry, the queue's entry in ``rq:queues`` and the ids pushed in order) but as one plain pipeline of
        ~3 commands per job instead of a MULTI/EXEC of ~6 (status written separately, expiries on dependency keys
        these jobs never have), about 2 ms less for 16 tasks. Hashes go before the ids, so a worker never pops an
        id whose hash is missing. rq is pinned (3.0): the hash layout is its ``Job.to_dict``.
        """
        queue = self.queue
        version = queue.get_redis_server_version()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(queue.redis_queues_keys, queue.key)
            for job, marker in zip(jobs, marker_keys, strict=True):
                job.origin = queue.name
                job.enqueued_at = now()
                job.redis_server_version = version
                pipe.hset(job.key, mapping=job.to_dict())
                if job.ttl:
                    pipe.expire(job.key, job.ttl)
                pipe.set(marker, job.id, ex=marker_ttl)
            pipe.rpush(queue.key, *[job.id for job in jobs])
            pipe.execute()

    def _wait(self, jobs: Sequence[Job], ready_keys: Sequence[str], deadline: float) -> None:
        """Block until every job's task is ready (its ready stream or its RQ result stream has an entry) or the
        deadline passes.

        Each blocking read lasts at most a second (less when the connection's socket timeout is shorter): a
        connection may carry a socket timeout (``?socket_timeout=`` in REDIS_URL; RQ's ``Worker`` sets one on any
        pool it is given, 5 s for connections opened after that, e.g. on reconnecting after a Redis restart), and
        a long wait must never be mistaken for a dead Redis.
        """
        owner: dict[str, int] = {}
        for n, (job, ready) in enumerate(zip(jobs, ready_keys, strict=True)):
            owner[Result.get_key(job.id)] = n
            owner[ready] = n
        waiting = set(range(len(jobs)))
        socket_timeout = self.redis.connection_pool.connection_kwargs.get("socket_timeout")
        slice_ms = min(1000, max(int(float(socket_timeout) * 500), 1)) if socket_timeout else 1000
        while waiting:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return
            streams = {key: "0-0" for key, n in owner.items() if n in waiting}
            response = self.redis.xread(streams, block=min(left_ms, slice_ms))
            for stream, _entries in response or ():
                waiting.discard(owner[_text(stream)])

    def _count(self, counter: str, by: int) -> None:
        if by:
            self.redis.hincrby(f"{self.prefix}:metrics", counter, by)


def _last_line(job: Job) -> str:
    try:
        result = job.latest_result()
        text = (result.exc_string if result is not None else None) or ""
    except Exception:  # the result may have expired
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown reason"


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
class QueueTrainingTrigger:
    """START_TRAINING / the TRAIN_MIN_TASKS threshold -> at most one training job per project (+ one follow-up)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.queue = Queue(TRAIN_QUEUE, connection=redis)
        self.prefix = settings.redis_key_prefix

    def current_key(self, project_id: int) -> str:
        return f"{self.prefix}:project:{project_id}:train-job"

    def history_key(self, project_id: int) -> str:
        return train_history_key(self.prefix, project_id)

    def __call__(self, request: TrainingRequest) -> TrainingTicket:
        pid = request.project_id
        reap_abandoned(self.redis, [TRAIN_QUEUE])
        lock = self.redis.lock(f"{self.prefix}:project:{pid}:train-lock", timeout=10, blocking_timeout=0.8)
        if not lock.acquire():
            # Another trigger for this project is being handled right now: it decides for both.
            current = _text(self.redis.get(self.current_key(pid))) or "unknown"
            return TrainingTicket(job_id=current, status="coalesced")
        try:
            current = fetch_job(self.redis, _text(self.redis.get(self.current_key(pid))))
            status = job_status(current) if current is not None else None
            if current is not None and status in {st.value for st in WAITING_STATUSES}:
                return TrainingTicket(job_id=current.id, status="coalesced")
            depends_on = None
            if current is not None and status == JobStatus.STARTED.value:
                depends_on = Dependency(jobs=[current], allow_failure=True)
            job = self.queue.enqueue_call(
                TRAIN_JOB,
                kwargs={"project_id": pid, "reason": request.reason, "requested_at": request.requested_at},
                timeout=self.settings.train_job_timeout_s,
                result_ttl=30 * 24 * 3600,
                failure_ttl=30 * 24 * 3600,
                job_id=f"train-{pid}-{uuid.uuid4().hex[:12]}",
                description=f"train project {pid}: {request.reason}",
                depends_on=depends_on,
            )
            with self.redis.pipeline() as pipe:
                pipe.set(self.current_key(pid), job.id)
                pipe.lpush(self.history_key(pid), job.id)
                pipe.ltrim(self.history_key(pid), 0, 9)
                pipe.execute()
            return TrainingTicket(job_id=job.id, status="follow-up" if depends_on is not None else "queued")
        finally:
            try:
                lock.release()
            except Exception:  # expired lock: nothing to release
                logger.debug("training lock for project %s had expired", pid)


def enqueue_prelabel(redis: Redis, settings: Settings, project_id: int, model_version: str) -> Job:
    """Queue (once per project and model version) the job that pre-labels the project's unlabelled tasks."""
    job_id = f"prelabel-{project_id}-{model_version}"
    existing = fetch_job(redis, job_id)
    if existing is not None and job_status(existing) in {st.value for st in ALIVE_STATUSES}:
        return existing
    return Queue(PRELABEL_QUEUE, connection=redis).enqueue_call(
        PRELABEL_JOB,
        kwargs={"project_id": project_id, "model_version": model_version},
        timeout=settings.prelabel_job_timeout_s,
        result_ttl=30 * 24 * 3600,
        failure_ttl=30 * 24 * 3600,
        job_id=job_id,
        description=f"prelabel project {project_id} with {model_version}",
    )


def train_history_key(prefix: str, project_id: int) -> str:
    """Redis list of the project's last 10 training job ids, newest first."""
    return f"{prefix}:project:{project_id}:train-jobs"


def training_jobs(redis: Redis, prefix: str, project_id: int) -> list[dict[str, Any]]:
    """Summaries of the project's recent training jobs, newest first (reaps abandoned jobs first)."""
    reap_abandoned(redis, QUEUES)
    ids = [_text(v) for v in redis.lrange(train_history_key(prefix, project_id), 0, -1)]
    return [s for s in (job_summary(redis, i, reap=False) for i in ids) if s is not None]


def reap_abandoned(redis: Redis, queue_names: Sequence[str] = QUEUES) -> None:
    """Move jobs whose worker stopped heartbeating (killed mid-job) to the failed registry.

    Workers refresh a short heartbeat while a job runs (``JOB_HEARTBEAT_TTL_S``); RQ's cleanup fails the jobs
    whose heartbeat expired and releases their dependents (a follow-up training run). Cheap; safe to call often.
    """
    for name in queue_names:
        try:
            StartedJobRegistry(name, connection=redis).cleanup()
        except RedisError:
            logger.warning("could not reap abandoned %s jobs", name, exc_info=True)


def job_summary(redis: Redis, job_id: str | None, reap: bool = True) -> dict[str, Any] | None:
    """A job's status, progress meta and failure reason, for ``GET /status/<project>``."""
    if reap:
        reap_abandoned(redis, QUEUES)
    job = fetch_job(redis, job_id)
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
        summary["failure"] = _last_line(job)
    return summary
