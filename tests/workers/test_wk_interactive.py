"""Clicks end to end on the worker side: a real ``alignsam-worker`` (bundled small SAM) on a real embedded Redis
answers the app's interactive requests from its own thread, also while its main thread runs a training job, and a
label with a policy starts from the policy's pre-label (computed on the first click, cached for the next)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis
from test_wk_queue import annotate_via_webhook, start_training
from wk_helpers import (
    LABEL_CONFIG,
    FakeLabelStudio,
    WorkerProcess,
    setup_project,
    stored_job,
    wait_for,
    worker_env,
)

from alignsam.interactive import STRATEGIES
from ml_backend.formats import annotation_to_masks
from ml_backend.interactive import requests_key
from ml_backend.label_config import parse_label_config
from ml_backend.settings import Settings
from ml_backend.state import ProjectStore
from workers.models import bundle_path

pytestmark = pytest.mark.integration

PREFIX = "clicks"  # keys of these tests only: the session's shared worker (another prefix) never sees the clicks


def click_body(project_id: int, ls: FakeLabelStudio, task_id: int, points: list[tuple[float, float, bool]],
               box: tuple[float, float, float, float] | None = None) -> dict[str, Any]:
    """What Label Studio's editor sends for keypoints (and a rectangle) on the task, in percent of the image."""
    height, width = ls.masks[task_id].shape
    result: list[dict[str, Any]] = [
        {"id": f"kp{n}", "from_name": "tag", "to_name": "image", "type": "keypointlabels", "origin": "manual",
         "is_positive": positive, "original_width": width, "original_height": height, "image_rotation": 0,
         "value": {"x": 100 * x / width, "y": 100 * y / height, "width": 1.0, "keypointlabels": ["Shape"]}}
        for n, (x, y, positive) in enumerate(points)]
    if box is not None:
        x0, y0, x1, y1 = box
        result.append({"id": "box", "from_name": "tag", "to_name": "image", "type": "rectanglelabels",
                       "original_width": width, "original_height": height, "image_rotation": 0,
                       "value": {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
                                 "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": ["Shape"]}})
    task = dict(ls.tasks[task_id], drafts=[], allow_skip=True)
    return {"tasks": [task], "project": f"{project_id}.1795439330", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": {"result": result}}}


def click(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    (prediction,) = response.get_json()["results"]
    return prediction


def mask_of(prediction: dict[str, Any]) -> np.ndarray:
    return annotation_to_masks(prediction["result"], parse_label_config(LABEL_CONFIG))["Shape"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_clicks_are_answered_while_the_worker_trains_and_a_policy_label_starts_from_its_prelabel(
    make_app: Callable[..., Flask], make_fake_ls: Callable[[int], FakeLabelStudio], project_id: int, redis: Redis,
    redis_url: str, model_dir: Path, tmp_path: Path, make_settings: Callable[..., Settings],
) -> None:
    ls = make_fake_ls(6)
    client = make_app(redis_key_prefix=PREFIX, interactive_wait_s=30).test_client()
    setup_project(client, project_id, ls)
    for task_id in (1, 2, 3, 4):
        annotate_via_webhook(client, ls, project_id, task_id)
    ticket = start_training(client, project_id)
    # A fixed strategy that starts from the pre-label (auto would use the training's choice, which may be "clicks").
    worker = WorkerProcess(worker_env(redis_url, model_dir, SAM_PRESET="small", REDIS_KEY_PREFIX=PREFIX,
                                      TRAIN_EPISODES="6", TRAIN_STEPS="3", TRAIN_EPOCHS="2", TRAIN_GRIDS="10x10,8x8",
                                      INTERACTIVE_STRATEGY="policy-drop-near"),
                           "train,predict", tmp_path / "worker.log")
    try:
        worker.wait_ready(redis)
        job = stored_job(redis, ticket["job_id"])
        wait_for(lambda: job.get_status(refresh=True).value == "started", 60, "training to start", interval=0.05)
        # A click on task 5 (no policy yet: SAM on the click) while the worker's main thread trains.
        truth = ls.masks[5]
        answered = click(client, click_body(project_id, ls, 5, [(*centre(truth), True)]))
        busy = job.get_status(refresh=True).value
        assert busy == "started", f"the training ended before the click was answered ({busy}): inconclusive"
        assert answered["result"] and answered["result"][0]["type"] == "brushlabels"
        assert iou(mask_of(answered), truth) > 0.8, worker.output()
        assert "click answered in" in worker.output() and "Shape clicks (start none, 1 clicks)" in worker.output()

        wait_for(lambda: job.get_status(refresh=True).value in ("finished", "failed"), 300, "training", interval=0.5)
        assert job.get_status().value == "finished", worker.output()
        store = ProjectStore(redis, make_settings(redis_key_prefix=PREFIX), zero_shot=True)
        [(label, version)] = store.policy_versions(project_id).items()
        assert label == "Shape"
        # The training chose a strategy on its held-out images and kept every candidate's scores in the bundle.
        meta = json.loads(bundle_path(make_settings(), project_id, label, version).with_suffix(".json").read_text())
        assert meta["interactive_strategy"] in STRATEGIES
        assert set(meta["interactive_scores"]) == set(STRATEGIES)
        assert all(0 <= v["noc@90"] <= 20 for v in meta["interactive_scores"].values())
        # Every SRM branch was trained on both grids; the kept pair validates best and its grid is the bundle's.
        branches = {name.split(" ")[0] for name in meta["candidates"]}
        assert set(meta["candidates"]) == branches | {f"{b} 8x8" for b in branches}
        kept = meta["chosen_candidate"]
        assert meta["candidates"][kept]["miou"] == max(c["miou"] for c in meta["candidates"].values())
        assert meta["grid"] == ([8, 8] if kept.endswith(" 8x8") else [10, 10])
        # Task 6 was never pre-labelled: the first click computes the policy's start, the second reads it.
        truth = ls.masks[6]
        x, y = centre(truth)
        first = click(client, click_body(project_id, ls, 6, [(x, y, True)]))
        log = worker.output()
        assert "Shape policy-drop-near (start computed, 1 clicks)" in log
        starts = list((model_dir / "starts" / str(project_id)).rglob("*.npz"))
        assert len(starts) == 1 and starts[0].parent.name == version
        second = click(client, click_body(project_id, ls, 6, [(x, y, True), (1.0, 1.0, False)]))
        assert "(start cached, 2 clicks)" in worker.output()
        assert first["model_version"] == second["model_version"] == store.model_version(project_id)
        assert iou(mask_of(second), truth) > 0.5, worker.output()
        # A rectangle alone reaches SAM as a box prompt (the bundled small SAM was not trained on boxes, so only the
        # answer's form is checked here).
        ys, xs = np.nonzero(truth)
        boxed = click(client, click_body(project_id, ls, 6, [], box=(xs.min(), ys.min(), xs.max(), ys.max())))
        assert boxed["model_version"] == store.model_version(project_id)
        assert ", box)" in worker.output()
        assert redis.llen(requests_key(PREFIX)) == 0
        assert "interactive request" not in worker.output()  # no request failed or was dropped
    finally:
        worker.stop()
