"""The product's loop inside a real Label Studio 1.23.2, driven through ``label-studio-sdk`` as a user's clicks
would drive it (issue 18):

1. a ``BrushLabels`` project with two labels (``circle``, ``square``); synthetic scenes with known masks uploaded
   as files, so the backend fetches them as real uploads: relative ``/data/upload/...`` URLs with a token;
2. the backend connected as the project's model (``ml.create``); Label Studio shows it connected;
3. a task opened before training gets the zero-shot prediction, tagged with the pre-training model version;
4. ``N_ANNOTATED`` tasks annotated through the API (brush RLE of the known masks), then ``ml.train`` (what the
   UI's Start Training button calls);
5. a new model version appears and every unlabelled task gets a prediction of it from the prelabel job; what
   Label Studio stores is decoded and compared with the known masks (IoU, floor below);
6. an annotator's click: the model switched to interactive (``PATCH /api/ml/<id>``), a positive smart keypoint on
   a pre-labelled task sent through ``POST /api/ml/<id>/interactive-annotating`` as the editor sends it; the
   answer is the label's mask around the click, computed by the worker from the task's cached embedding and the
   policy's cached pre-label;
7. "Retrieve predictions" on a batch holding a task whose image URL is broken: that task gets no mask, the others
   get theirs, and the backend keeps answering.

At the end, nothing the run wrote (logs, Redis keys and values with RQ's job payloads, ``/status``, ``/metrics``,
``MODEL_DIR``) holds the Label Studio token (see ``test_token_stays_secret``).

IoU floor. ``benchmarks/results/quality.md`` measures the same bundled small SAM on the same family
(``semantic:circle``, 50 training scenes, the paper's E=50 / K=20 / T=15): AlignSAM mIoU 0.592, its weakest
learned baseline (PerSAM-style) 0.329. This test trains on ~10 scenes with a budget over 100 times smaller
(``conftest.TRAIN_ENV``), so it cannot be held to 0.592; it is held to half of it, ``MIOU_FLOOR = 0.592 / 2 =
0.296``, which is still far above what a broken loop gives (a mask decoded at the wrong size, transposed, or of
the wrong label scores ~0.05 on these scenes: the circles cover ~8 % of an image).
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from browser import Browser, chromium_program, login_cookies
from e2e_helpers import Backend, file_token_hits, iou, phase, redis_token_hits, wait_for
from label_studio_sdk import LabelStudio
from PIL import Image
from redis import Redis

from alignsam.synthetic.masks import interior_point
from ml_backend.formats import result_to_mask
from workers.label_studio_demo import (
    LABEL_COLOURS,
    LABEL_CONFIG,
    LABELS,
    DemoScene,
    LabelStudioServer,
    brush_annotation,
    demo_scenes,
    iter_tasks,
    png_bytes,
    upload_images,
)

pytestmark = pytest.mark.e2e

N_TASKS = 20
N_ANNOTATED = 12
BENCHMARK_MIOU = 0.592  # benchmarks/results/quality.md: semantic:circle, AlignSAM, bundled small SAM
MIOU_FLOOR = BENCHMARK_MIOU / 2
ZERO_SHOT_VERSION = "alignsam-zeroshot"
TRAIN_TIMEOUT_S = 600.0
PRELABEL_TIMEOUT_S = 300.0


class Run:
    """What the steps share."""

    ls: LabelStudio
    server: LabelStudioServer
    backend: Backend
    project: int
    ml_backend: int
    scenes: dict[int, DemoScene]  # task id -> scene
    annotated: list[int]
    model_version: str
    miou: dict[str, float]
    prelabels: dict[int, dict[str, Any]]  # unlabelled task id -> its prediction of the trained version


RUN = Run()


def _predictions(task_id: int) -> list[dict[str, Any]]:
    return [p.dict() if hasattr(p, "dict") else dict(p) for p in RUN.ls.predictions.list(task=task_id)]


def _label_masks(results: list[dict[str, Any]], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    masks = {label: np.zeros(shape, bool) for label in LABELS}
    for result in results:
        if result.get("type") != "brushlabels":
            continue
        mask = result_to_mask(result)
        assert mask.shape == shape, f"a predicted mask of {mask.shape} on a {shape} image"
        for label in result["value"]["brushlabels"]:
            masks[label] |= mask
    return masks


def _status(backend: Backend) -> dict[str, Any]:
    return requests.get(f"{backend.url}/status/{RUN.project}", timeout=10).json()


def test_1_project_with_uploaded_images(label_studio: LabelStudioServer, backend: Backend) -> None:
    RUN.server, RUN.backend = label_studio, backend
    RUN.ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    with phase("1. project, scenes uploaded as files"):
        project = RUN.ls.projects.create(title="AlignSAM e2e", label_config=LABEL_CONFIG)
        RUN.project = int(project.id)  # type: ignore[arg-type]
        scenes = demo_scenes(range(N_TASKS))
        ids = upload_images(label_studio.url, label_studio.token, RUN.project,
                            [(s.name, png_bytes(s.image)) for s in scenes])
        RUN.scenes = {ids[s.name]: s for s in scenes}
    assert len(RUN.scenes) == N_TASKS
    for task in iter_tasks(label_studio.url, label_studio.token, RUN.project):
        assert str(task["data"]["image"]).startswith(f"/data/upload/{RUN.project}/"), task["data"]


def test_2_connect_backend() -> None:
    with phase("2. backend connected (ml.create)"):
        ml = RUN.ls.ml.create(project=RUN.project, url=RUN.backend.url, title="AlignSAM", is_interactive=False)
        RUN.ml_backend = int(ml.id)  # type: ignore[arg-type]
        state = RUN.ls.ml.get(id=RUN.ml_backend)
    assert state.state == "CO", f"Label Studio shows the backend as {state.state!r}: {state.error_message}"
    status = _status(RUN.backend)
    assert LABELS[0] in str(status), status


def test_3_zero_shot_prediction_before_training() -> None:
    task_id = max(RUN.scenes)  # one that stays unlabelled
    with phase("3. task opened before training: zero-shot prediction"):
        def predicted() -> list[dict[str, Any]] | None:
            RUN.ls.tasks.get(id=str(task_id))  # opening the task: Label Studio asks /predict for it
            done = [p for p in _predictions(task_id) if p["model_version"] == ZERO_SHOT_VERSION]
            return done or None

        predictions = wait_for("a zero-shot prediction of the opened task", predicted, 180, 3.0,
                               RUN.backend.gone)
    scene = RUN.scenes[task_id]
    masks = _label_masks(predictions[0]["result"], scene.image.shape[:2])
    print(f"[e2e] zero-shot IoU of task {task_id}: "
          + ", ".join(f"{k} {iou(v, scene.masks[k]):.3f}" for k, v in masks.items()))
    assert any(m.any() for m in masks.values()), "the zero-shot prediction holds no mask"


def test_4_annotate_and_start_training() -> None:
    RUN.annotated = sorted(RUN.scenes)[:N_ANNOTATED]
    with phase(f"4. {N_ANNOTATED} tasks annotated, Start Training (ml.train)"):
        for task_id in RUN.annotated:
            RUN.ls.annotations.create(id=task_id, result=brush_annotation(RUN.scenes[task_id].masks))
        RUN.ls.ml.train(id=RUN.ml_backend)
    assert [t for t in iter_tasks(RUN.server.url, RUN.server.token, RUN.project) if t["annotations"]]


def test_5_trained_model_prelabels_the_rest() -> None:
    with phase("5a. training (worker) until a new model version is active"):
        def trained() -> str | None:
            training = _status(RUN.backend).get("training") or {}
            if training.get("status") == "failed":
                raise AssertionError(f"training failed: {training}")
            version = RUN.ls.ml.get(id=RUN.ml_backend).model_version or ""
            return version if version and version != ZERO_SHOT_VERSION and training.get("status") == "done" \
                else None

        RUN.model_version = wait_for("a trained model version", trained, TRAIN_TIMEOUT_S, 3.0, RUN.backend.gone)
    print(f"[e2e] model version {RUN.model_version}; training: {_status(RUN.backend).get('training')}")
    unlabelled = sorted(set(RUN.scenes) - set(RUN.annotated))
    with phase(f"5b. prelabel job: predictions for the {len(unlabelled)} unlabelled tasks"):
        def prelabelled() -> dict[int, dict[str, Any]] | None:
            found = {}
            for task in iter_tasks(RUN.server.url, RUN.server.token, RUN.project):
                ours = [p for p in task.get("predictions") or [] if p.get("model_version") == RUN.model_version]
                if ours:
                    found[int(task["id"])] = ours[0]
            return found if set(unlabelled) <= set(found) else None

        stored = wait_for("a prediction of the new version on every unlabelled task", prelabelled,
                          PRELABEL_TIMEOUT_S, 3.0, RUN.backend.gone)
    assert not set(stored) & set(RUN.annotated), "the prelabel job predicted a task a person had annotated"
    RUN.prelabels = {t: stored[t] for t in unlabelled}
    per_label: dict[str, list[float]] = {label: [] for label in LABELS}
    for task_id in unlabelled:
        scene = RUN.scenes[task_id]
        masks = _label_masks(stored[task_id]["result"], scene.image.shape[:2])
        for label in LABELS:
            per_label[label].append(iou(masks[label], scene.masks[label]))
    RUN.miou = {label: float(np.mean(v)) for label, v in per_label.items()}
    print(f"[e2e] pre-labelled tasks ({len(unlabelled)}), mIoU against the known masks: "
          + ", ".join(f"{k} {v:.3f}" for k, v in RUN.miou.items())
          + f"; floor for {LABELS[0]} {MIOU_FLOOR:.3f} (half of quality.md's {BENCHMARK_MIOU})")
    assert RUN.miou[LABELS[0]] >= MIOU_FLOOR, RUN.miou


def test_5_browser_shows_a_prelabel(e2e_dir: Path) -> None:
    """Headless Chromium, logged in as the test user, opens a pre-labelled task; in the PNG it saves, the label's
    brush colour covers the predicted mask (drawn over the image), not the rest of the image."""
    program = chromium_program()
    if program is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium; .ci/run installs it): browser check skipped")
    task_id, prediction = max(RUN.prelabels.items(), key=lambda item: iou(
        _label_masks(item[1]["result"], RUN.scenes[item[0]].image.shape[:2])[LABELS[0]],
        RUN.scenes[item[0]].masks[LABELS[0]]))
    scene = RUN.scenes[task_id]
    predicted = _label_masks(prediction["result"], scene.image.shape[:2])
    assert predicted[LABELS[0]].any(), "no pre-labelled task has a predicted circle to look for"
    out = Path(os.environ.get("ALIGNSAM_E2E_SCREENSHOT") or e2e_dir / "prelabel.png")
    with phase("browser: headless Chromium opens a pre-labelled task, screenshot checked"):
        cookies = login_cookies(RUN.server.url, RUN.server.username, RUN.server.password)
        browser = Browser(program, e2e_dir / "chromium-profile", e2e_dir / "logs" / "chromium.log")
        try:
            browser.connect()
            for name, value in cookies.items():
                browser.call("Network.setCookie", name=name, value=value, url=RUN.server.url)
            browser.call("Page.enable")
            browser.call("Page.navigate", url=f"{RUN.server.url}/projects/{RUN.project}/data?task={task_id}")
            h, w = scene.image.shape[:2]

            def drawn() -> tuple[bytes, dict[str, float]] | None:
                rect = browser.evaluate(_IMAGE_RECT_JS % (w, h))
                if not rect:
                    return None
                png = browser.screenshot()
                agreement = screenshot_agreement(png, rect, predicted)
                return (png, agreement) if agreement[LABELS[0]] >= SCREENSHOT_IOU_FLOOR else None

            try:
                png, agreement = wait_for("the predicted region drawn over the image", drawn, 120, 2.0)
            except AssertionError:
                out.write_bytes(browser.screenshot())
                raise
        finally:
            browser.close()
    out.write_bytes(png)
    print(f"[e2e] screenshot of task {task_id}: {out}; IoU of each label's brush colour in it with the "
          "prediction: " + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items()))
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert image.std() > 10, "the screenshot is blank"


SCREENSHOT_IOU_FLOOR = 0.5
"""IoU of the pixels showing the label's brush colour (inside the displayed image) with the predicted mask: ~0.9
when Label Studio draws it (edges blur under scaling), ~0 when it draws nothing or something elsewhere."""

_IMAGE_RECT_JS = """(() => {
  const imgs = [...document.querySelectorAll('img')].filter(i => i.naturalWidth === %d && i.naturalHeight === %d);
  const rects = imgs.map(i => i.getBoundingClientRect()).filter(r => r.width > 200);
  rects.sort((a, b) => b.width - a.width);
  return rects.length && document.querySelectorAll('canvas').length
    ? {x: rects[0].x, y: rects[0].y, width: rects[0].width, height: rects[0].height} : null;
})()"""


def _colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Pixels showing ``colour`` (a fully saturated #rrggbb, drawn translucent over the image): its full channels
    high and its empty channel clearly lower."""
    rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    full = [c for c, v in enumerate(rgb) if v == 255]
    empty = [c for c, v in enumerate(rgb) if v == 0]
    px = pixels.astype(int)
    mask = np.ones(px.shape[:2], bool)
    for c in full:
        mask &= px[..., c] > 140
        for e in empty:
            mask &= px[..., c] - px[..., e] > 70
    return mask


def screenshot_agreement(png: bytes, rect: dict[str, float], predicted: dict[str, np.ndarray]) -> dict[str, float]:
    """Per label: IoU of the screenshot's pixels in that label's brush colour, inside the displayed image (``rect``,
    CSS pixels = screenshot pixels) scaled to the image's size, with the predicted mask."""
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    h, w = next(iter(predicted.values())).shape
    box = tuple(round(v) for v in (rect["x"], rect["y"], rect["x"] + rect["width"], rect["y"] + rect["height"]))
    pixels = np.asarray(shot.crop(box).resize((w, h), Image.Resampling.BILINEAR))
    return {label: iou(_colour_mask(pixels, LABEL_COLOURS[label]), mask) for label, mask in predicted.items()}


def test_6_interactive_click_on_a_prelabelled_task() -> None:
    task_id = max(RUN.prelabels)
    scene = RUN.scenes[task_id]
    truth = scene.masks[LABELS[0]]
    height, width = truth.shape
    x, y = interior_point(truth)  # the most interior pixel of the label's mask
    headers = {"Authorization": f"Token {RUN.server.token}"}
    with phase("6. interactive: a smart keypoint through interactive-annotating"):
        patched = requests.patch(f"{RUN.server.url}/api/ml/{RUN.ml_backend}", headers=headers, timeout=30, json={
            "url": RUN.backend.url, "project": RUN.project, "is_interactive": True})
        assert patched.status_code == 200, patched.text
        # What the 1.23.2 editor sends for a positive smart-keypoint click (shared/ls-fixtures/
        # predict_interactive_editor_positive.json): the keypoint in percent of the image, its label.
        context = {"result": [{
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100 * (x + 0.5) / width, "y": 100 * (y + 0.5) / height, "width": 0.26,
                      "labels": [LABELS[0]], "keypointlabels": [LABELS[0]]},
            "is_positive": True, "id": "e2e-kp-1", "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "origin": "manual"}]}
        started = time.monotonic()
        response = requests.post(f"{RUN.server.url}/api/ml/{RUN.ml_backend}/interactive-annotating", headers=headers,
                                 json={"task": task_id, "context": context}, timeout=120)
        seconds = time.monotonic() - started
    assert response.status_code == 200, response.text
    regions = [r for r in _results_in(response.json()) if r.get("type") == "brushlabels"]
    assert regions, f"no brush region in Label Studio's answer: {str(response.json())[:500]}"
    mask = _label_masks(regions, truth.shape)[LABELS[0]]
    print(f"[e2e] click on task {task_id} answered through Label Studio in {seconds:.2f} s; IoU with the known "
          f"{LABELS[0]} mask {iou(mask, truth):.3f}")
    assert mask[y, x], "the answer does not cover the clicked pixel"
    assert iou(mask, truth) > 0.3
    log = RUN.backend.log()
    assert "click answered in" in log
    line = [ln for ln in log.splitlines() if "click answered in" in ln][-1]
    found = re.search(rf"{LABELS[0]} ([a-z-]+) \(start (\w+), 1 clicks\)", line)
    assert found, line
    strategy, start = found.groups()
    print(f"[e2e] the worker: {line.split('click answered in')[1].strip()}")
    # The label has a policy: unless its training chose SAM on the clicks alone, the correction starts from the
    # pre-label the prelabel job cached for this task.
    assert start == ("none" if strategy == "clicks" else "cached"), line


def _results_in(value: Any) -> list[dict[str, Any]]:
    """Every Label Studio result (a dict with ``type`` and ``value``) anywhere in ``value``."""
    if isinstance(value, dict):
        if "type" in value and isinstance(value.get("value"), dict):
            return [value]
        return [r for v in value.values() for r in _results_in(v)]
    if isinstance(value, list):
        return [r for v in value for r in _results_in(v)]
    return []


def test_7_broken_image_in_a_batch() -> None:
    with phase("7. Retrieve predictions on a batch with a broken image URL"):
        fresh = demo_scenes(range(N_TASKS, N_TASKS + 2))
        ids = upload_images(RUN.server.url, RUN.server.token, RUN.project, [(s.name, png_bytes(s.image)) for s in fresh])
        good = [ids[s.name] for s in fresh]
        missing = f"/data/upload/{RUN.project}/00000000-no-such-image.png"
        RUN.ls.projects.import_tasks(id=RUN.project, request=[{"image": missing}])
        broken = next(int(t["id"]) for t in iter_tasks(RUN.server.url, RUN.server.token, RUN.project)
                      if t["data"].get("image") == missing)
        def retrieve() -> None:  # the Data Manager's "Retrieve predictions" on the selected tasks
            started = time.monotonic()
            RUN.ls.actions.create(id="retrieve_tasks_predictions", project=RUN.project,
                                  selected_items={"all": False, "included": [*good, broken]})
            print(f"[e2e] retrieve predictions answered in {time.monotonic() - started:.1f} s")

        retrieve()
        tries = [time.monotonic()]

        def answered() -> dict[int, list[dict[str, Any]]] | None:
            found = {t: [p for p in _predictions(t) if str(p["model_version"]).startswith(RUN.model_version)]
                     for t in good}
            complete = all(any(p["model_version"] == RUN.model_version and p["result"] for p in v)
                           for v in found.values())
            if not complete and time.monotonic() - tries[-1] > 15:
                # a slow worker's answer was "<version>-pending": press it again, as a person would; the
                # backend answers from its cache then
                tries.append(time.monotonic())
                retrieve()
            return found if complete else None

        wait_for("predictions of the good tasks of the batch", answered, 120, 3.0, RUN.backend.gone)
    broken_masks = [p for p in _predictions(broken) if p["result"]]
    assert broken_masks == [], f"the task with a broken image got a mask: {broken_masks}"
    for task_id, scene in zip(good, fresh, strict=True):
        pred = next(p for p in _predictions(task_id) if p["model_version"] == RUN.model_version and p["result"])
        masks = _label_masks(pred["result"], scene.image.shape[:2])
        print(f"[e2e] batch task {task_id}: " + ", ".join(f"{k} {iou(v, scene.masks[k]):.3f}" for k, v in masks.items()))
    assert requests.get(f"{RUN.backend.url}/health", timeout=5).status_code == 200
    assert RUN.ls.ml.get(id=RUN.ml_backend).state == "CO"


def test_token_stays_secret(redis: Redis, e2e_dir: Path) -> None:
    """Nothing the run wrote holds the Label Studio token: with LABEL_STUDIO_API_KEY set, /setup's copy of it is
    not even stored."""
    token = RUN.server.token
    with phase("token search: logs, Redis, RQ jobs, /status, /metrics, MODEL_DIR"):
        probe = "e2e:token-probe"
        redis.hset(probe, "planted", token)  # the search must find a token where one is (else it proves nothing)
        try:
            assert redis_token_hits(redis, token, allowed_keys=set()) == [f"redis hash {probe}"]
        finally:
            redis.delete(probe)
        hits = redis_token_hits(redis, token, allowed_keys=set())
        logs = e2e_dir / "logs"
        hits += file_token_hits(logs, token, skip=set())
        hits += file_token_hits(RUN.backend.model_dir, token, skip=set())
        for route in (f"/status/{RUN.project}", "/metrics", "/versions", "/health"):
            if token in requests.get(f"{RUN.backend.url}{route}", timeout=10).text:
                hits.append(f"GET {route}")
    assert hits == [], f"the Label Studio token was found in: {hits}"
