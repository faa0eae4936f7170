"""The pictures of a real training and the status page that shows them, looked at by a headless Chromium.

One real ``alignsam-worker`` (tiny SAM + tiny CLIP, ``TRAIN_BRANCH=auto`` so both SRM branches train) takes the
train and prelabel queues of an embedded Redis; a fake Label Studio serves the tasks. Four projects, one per state
of the page: trained (a real training, its policy activated, its pictures drawn, its pre-labelling done), failed
(a real training of a project without annotations), never trained, and training (its job moved into the started
registry with progress meta the way a worker does, after the worker stopped, so it stays there).

``ALIGNSAM_UPDATE_SCREENSHOT=1`` writes the Chromium screenshot to ``docs/status-page.png`` (the README's).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq.executions import Execution
from rq.job import JobStatus
from werkzeug.serving import make_server
from wk_helpers import (
    LABEL_CONFIG,
    REPO,
    FakeLabelStudio,
    WorkerProcess,
    setup_project,
    stored_job,
    wait_for,
    worker_env,
)

from ml_backend.app import create_app, services_of
from ml_backend.files import label_slug
from ml_backend.job_queue import TRAIN_QUEUE, product_queue
from ml_backend.settings import Settings
from ml_backend.state import ProjectStore
from tests.e2e.browser import Browser, chromium_program

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAINED, FAILED, NEVER, RUNNING = 901, 902, 903, 904
SCREENSHOT = REPO / "docs" / "status-page.png"
WIDTH, HEIGHT = 1280, 900


@dataclass
class Site:
    app: Flask
    client: FlaskClient
    settings: Settings
    store: ProjectStore
    redis: Redis
    worker_log: str
    version: str  # the trained project's active Shape policy


def _annotate(client: FlaskClient, ls: FakeLabelStudio, task_id: int) -> None:
    """A human annotation in Label Studio, and the webhook Label Studio sends for it."""
    ann = ls.annotate(task_id)
    response = client.post("/webhook", json={
        "action": "ANNOTATION_CREATED", "project": {"id": ls.project, "label_config": LABEL_CONFIG},
        "annotation": {"id": ann["id"], "task": task_id, "was_cancelled": False}, "task": {"id": task_id}})
    assert response.status_code == 200, response.get_json()


def _start_training(client: FlaskClient, project_id: int) -> str:
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project_id}})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["job_id"]


@pytest.fixture(scope="module")
def site(redis_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    settings = Settings(model_dir=model_dir, redis_url=redis_url, label_studio_url=None, label_studio_api_key=None,
                        basic_auth_user=None, basic_auth_pass=None, webhook_secret=None, allowed_image_hosts=[],
                        predict_wait_s=30.0, image_fetch_workers=2, job_heartbeat_ttl_s=3,
                        setup_allow_private_hosts=True)
    redis = Redis.from_url(redis_url)
    app = create_app(settings, redis=redis, queue=True)
    app.testing = True
    client = app.test_client()
    servers = {pid: FakeLabelStudio(n, project=pid) for pid, n in ((TRAINED, 6), (FAILED, 3), (NEVER, 2),
                                                                   (RUNNING, 4))}
    try:
        for pid, ls in servers.items():
            setup_project(client, pid, ls)
        for task_id in (1, 2, 3, 4):
            _annotate(client, servers[TRAINED], task_id)
        trained_job, failed_job = _start_training(client, TRAINED), _start_training(client, FAILED)
        log = tmp_path_factory.mktemp("wk-pictures") / "worker.log"
        worker = WorkerProcess(worker_env(redis_url, model_dir, TRAIN_BRANCH="auto", TRAIN_EPISODES="3"),
                               "train,prelabel,predict", log)
        try:
            worker.wait_ready(redis)
            for job_id in (trained_job, failed_job):
                job = stored_job(redis, job_id)
                wait_for(lambda job=job: job.get_status(refresh=True).value in ("finished", "failed"), 240,
                         f"training job {job_id}", interval=0.5)
            job = stored_job(redis, trained_job)
            assert job.get_status().value == "finished", worker.output()
            assert stored_job(redis, failed_job).get_status().value == "failed", worker.output()
            prelabel = stored_job(redis, job.return_value()["prelabel_job"])
            wait_for(lambda: prelabel.get_status(refresh=True).value in ("finished", "failed"), 120, "prelabel",
                     interval=0.5)
            # One /predict through the queue with the new policy (for the Prometheus test).
            predicted = client.post("/predict", json={
                "tasks": [servers[TRAINED].tasks[5]], "project": f"{TRAINED}.1795439330", "label_config": LABEL_CONFIG,
                "params": {"login": None, "password": None, "context": None}})
            assert predicted.status_code == 200 and predicted.get_json()["results"][0]["model_version"] == \
                services_of(app).store.model_version(TRAINED)
        finally:
            worker.stop()
        worker_log = log.read_text()
        # Training, as the page sees it while a worker runs the job: out of the queue, into the started registry,
        # with the progress meta workers.jobs writes (no worker is left to take it).
        for task_id in (1, 2, 3):
            _annotate(client, servers[RUNNING], task_id)
        running = stored_job(redis, _start_training(client, RUNNING))
        product_queue(TRAIN_QUEUE, redis).remove(running)
        with redis.pipeline() as pipe:
            Execution.create(running, ttl=600, pipeline=pipe)
            pipe.execute()
        running.set_status(JobStatus.STARTED)
        running.meta.update(stage="training", label="Shape", progress={
            "stage": "training", "branch": "implicit", "episode": 12, "episodes": 40, "elapsed_s": 30.0})
        running.save_meta()
        store = services_of(app).store
        version = store.policy_versions(TRAINED)["Shape"]
        yield Site(app, client, settings, store, redis, worker_log, version)
    finally:
        for ls in servers.values():
            ls.close()
        redis.close()


def _picture(site: Site, kind: str) -> Path:
    return site.settings.policy_dir / str(TRAINED) / label_slug("Shape") / f"{site.version}.{kind}.png"


def _share(rgb: np.ndarray, color: tuple[int, int, int], tol: int = 25) -> float:
    return float((np.abs(rgb.astype(int) - np.array(color)).max(axis=2) < tol).mean())


def test_a_real_training_draws_a_gallery_and_a_curve_next_to_its_bundle_served_as_png(site: Site) -> None:
    assert "pictures were not drawn" not in site.worker_log
    bundle = _picture(site, "gallery").parent / f"{site.version}.pt"
    assert bundle.is_file()
    meta = json.loads(bundle.with_suffix(".json").read_text())
    for kind, (min_w, min_h) in {"gallery": (600, 200), "curve": (600, 250)}.items():
        path = _picture(site, kind)
        with Image.open(path) as picture:
            picture.load()
            assert picture.format == "PNG"
            assert picture.width >= min_w and picture.height >= min_h, picture.size
            rgb = np.asarray(picture.convert("RGB"))
        assert rgb.std() > 10  # drawn, not blank
        url = f"/pictures/{TRAINED}/{path.parent.name}/{path.name}"
        response = site.client.get(url)
        assert response.status_code == 200 and response.content_type == "image/png"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.data == path.read_bytes()
    with Image.open(_picture(site, "curve")) as curve:
        rgb = np.asarray(curve.convert("RGB"))
    # auto trained both SRM branches: both are drawn (lines, legend; the tiny runs' curves may overlap)
    assert _share(rgb, (31, 119, 180)) > 0.0003 and _share(rgb, (214, 39, 40)) > 0.0003
    assert meta["branch"] in ("implicit", "explicit")
    outside = site.client.get(f"/pictures/{TRAINED}/{label_slug('Shape')}/{site.version}.pt")
    assert outside.status_code == 404


def _serve(app: Flask) -> tuple[str, Any]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


FACTS_JS = """(() => {
  const visible = el => !!el && el.getBoundingClientRect().width > 0 && el.getBoundingClientRect().height > 0;
  const rect = el => { const r = el.getBoundingClientRect();
    return {x: r.x + el.clientLeft, y: r.y + el.clientTop + window.scrollY, w: el.clientWidth, h: el.clientHeight}; };
  const projects = {};
  for (const s of document.querySelectorAll('section.project')) {
    const badge = s.querySelector('.state');
    projects[s.id] = {state: badge && badge.dataset.state, badgeVisible: visible(badge), text: s.innerText,
                      badge: badge && rect(badge),
                      images: Array.from(s.querySelectorAll('.pictures img')).map(i => ({
                        cls: i.className, complete: i.complete, naturalWidth: i.naturalWidth,
                        naturalHeight: i.naturalHeight, visible: visible(i), rect: rect(i)}))};
  }
  return {origin: performance.timeOrigin, ready: document.readyState, projects,
          queues: Array.from(document.querySelectorAll('tr[data-queue]')).map(r => r.dataset.queue),
          workers: (document.querySelector('p.workers') || {}).innerText || '',
          width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight};
})()"""


def _look(browser: Browser, url: str) -> tuple[dict[str, Any], bytes]:
    """The page's facts (one DOM read) and a full-page screenshot of that same page load. The page reloads
    itself every few seconds while a job runs: a reload between the two is noticed and the look is retaken."""
    browser.call("Page.enable")
    browser.call("Page.navigate", url=url)
    for _ in range(5):
        facts = wait_for(lambda: (f := browser.evaluate(FACTS_JS)) and f["ready"] == "complete" and all(
            i["complete"] for p in f["projects"].values() for i in p["images"]) and f, 30, "the status page")
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": facts["width"], "height": facts["height"], "scale": 1})
        if browser.evaluate("performance.timeOrigin") == facts["origin"]:
            return facts, base64.b64decode(shot["data"])
        time.sleep(0.2)
    raise AssertionError("the status page kept reloading during the look")


def _color_at(rgb: np.ndarray, rect: dict[str, float], dx: float, dy: float) -> tuple[int, ...]:
    return tuple(int(v) for v in rgb[int(rect["y"] + dy), int(rect["x"] + dx)])


def test_chromium_shows_every_projects_state_and_the_trained_projects_pictures(
        site: Site, tmp_path: Path) -> None:
    program = chromium_program()
    if program is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium; .ci/run installs it): screenshot skipped")
    base, server = _serve(site.app)
    browser = Browser(program, tmp_path / "chromium-profile", tmp_path / "chromium.log", width=WIDTH, height=HEIGHT)
    try:
        browser.connect()
        facts, png = _look(browser, f"{base}/ui")
    finally:
        browser.close()
        server.shutdown()
    projects = facts["projects"]
    assert {p: projects[f"project-{p}"]["state"] for p in (TRAINED, FAILED, NEVER, RUNNING)} == {
        TRAINED: "done", FAILED: "failed", NEVER: "never trained", RUNNING: "running"}
    assert all(p["badgeVisible"] for p in projects.values())
    trained = projects[f"project-{TRAINED}"]
    assert site.version in trained["text"] and "activated" in trained["text"]
    assert "Pre-labelling: done" in trained["text"] and "2 of 2 tasks" in trained["text"]
    assert "no annotated tasks" in projects[f"project-{FAILED}"]["text"]
    running = projects[f"project-{RUNNING}"]["text"]
    assert "training Shape" in running and "episode 12 of 40" in running and "about 70 s left" in running
    assert "none yet" in projects[f"project-{NEVER}"]["text"]
    assert "4 labelled task(s)" in trained["text"] and "3 labelled task(s)" in projects[f"project-{RUNNING}"]["text"]
    assert facts["queues"] == ["predict", "train", "prelabel"]
    assert "worker" in facts["workers"]  # the live workers line (others' test workers may be listed)
    images = {i["cls"]: i for i in trained["images"]}
    assert set(images) == {"picture-gallery", "picture-curve"}
    for project, view in projects.items():
        if project != f"project-{TRAINED}":
            assert view["images"] == []

    with Image.open(io.BytesIO(png)) as shot:
        assert shot.format == "PNG"
        assert shot.size == (facts["width"], facts["height"]) and shot.width == WIDTH and shot.height > HEIGHT / 2
        rgb = np.asarray(shot.convert("RGB"))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 200 and rgb.std() > 10  # not a blank page
    # Each state's badge is painted in its colour (status_page.CSS), just inside its left edge.
    badge_colors = {TRAINED: (0xd4, 0xf5, 0xd4), FAILED: (0xff, 0xd6, 0xd6), NEVER: (0xee, 0xee, 0xee),
                    RUNNING: (0xcf, 0xe8, 0xff)}
    for pid, color in badge_colors.items():
        badge = projects[f"project-{pid}"]["badge"]
        got = _color_at(rgb, badge, 3, badge["h"] / 2)
        assert max(abs(a - b) for a, b in zip(got, color, strict=True)) <= 8, (pid, got, color)
    # The pictures are painted where the page put them: the screenshot there is the PNG, scaled.
    for kind in ("gallery", "curve"):
        view = images[f"picture-{kind}"]
        with Image.open(_picture(site, kind)) as picture:
            assert (view["naturalWidth"], view["naturalHeight"]) == picture.size
            assert view["visible"]
            r = view["rect"]
            crop = rgb[round(r["y"]):round(r["y"]) + r["h"], round(r["x"]):round(r["x"]) + r["w"]].astype(float)
            expected = np.asarray(picture.convert("RGB").resize((crop.shape[1], crop.shape[0]),
                                                                  Image.Resampling.BILINEAR)).astype(float)
        assert crop.std() > 10
        assert np.abs(crop - expected).mean() < 12, kind
    if os.environ.get("ALIGNSAM_UPDATE_SCREENSHOT") == "1":
        with Image.open(io.BytesIO(png)) as shot:
            shot.convert("RGB").quantize(colors=256).save(SCREENSHOT, optimize=True)
        assert SCREENSHOT.stat().st_size < 500_000


def test_prometheus_series_after_a_real_training_prelabel_and_predict_job(site: Site) -> None:
    """Issue 21: the endpoint scraped after real jobs ran (the fixture's worker trained, pre-labelled and predicted)."""
    response = site.client.get("/metrics/prometheus")
    assert response.status_code == 200 and response.content_type.startswith("text/plain; version=")
    series = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(response.get_data(as_text=True)) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return series.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("alignsam_http_requests_total", method="POST", route="/predict", status="200") >= 1
    assert value("alignsam_http_request_duration_seconds_count", method="POST", route="/predict") >= 1
    assert value("alignsam_queue_jobs", queue="train", state="finished") >= 1
    assert value("alignsam_queue_jobs", queue="train", state="failed") >= 1
    assert value("alignsam_queue_jobs", queue="prelabel", state="finished") >= 1
    assert value("alignsam_queue_jobs", queue="predict", state="finished") >= 1
    assert value("alignsam_job_duration_seconds_count", queue="train") >= 1
    assert value("alignsam_job_duration_seconds_sum", queue="train") > 0
    assert value("alignsam_job_duration_seconds_count", queue="predict") >= 1
