"""The web process stays small: importing the app (and its gunicorn entry point) never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).parents[2]

PROBE = """
import json, sys
import ml_backend.app
from ml_backend.app import create_app
import ml_backend.wsgi as wsgi
client = wsgi.app.test_client()
health = client.get("/health").get_json()
pid = wsgi.app.extensions["alignsam"].store.redis.pid
heavy = sorted(m for m in ("torch", "torchvision", "open_clip", "segment_anything", "alignsam", "workers", "cv2")
               if m in sys.modules)
print(json.dumps({"heavy": heavy, "health": health, "redis_pid": pid}))
"""


def test_app_imports_no_torch_and_owns_its_embedded_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LABEL_STUDIO_URL")}
    env.update({"MODEL_DIR": str(tmp_path / "models"), "PYTHONPATH": str(REPO), "LOG_LEVEL": "WARNING"})
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["health"] == {"status": "UP", "model_class": "AlignSAM", "redis": "ok"}
    assert (tmp_path / "models" / "redis.db").exists()
    # the embedded Redis server the app started is shut down when the process exits
    deadline = time.monotonic() + 10
    while psutil.pid_exists(report["redis_pid"]) and time.monotonic() < deadline:
        proc = psutil.Process(report["redis_pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    assert not psutil.pid_exists(report["redis_pid"]) or psutil.Process(report["redis_pid"]).status() == "zombie"
