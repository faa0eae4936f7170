"""``make demo`` (``alignsam-run --with-label-studio``): Label Studio, the backend, a worker and embedded Redis
start, the demo project is created with the backend connected, the URL, user and password are printed, and Ctrl-C
(SIGINT to the launcher's whole foreground group, as a terminal sends it) stops every process it started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
from e2e_helpers import free_port, phase, wait_for
from label_studio_sdk import LabelStudio

from workers.label_studio_demo import DEMO_TITLE, LabelStudioSetupError, ensure_venv, iter_tasks

pytestmark = pytest.mark.e2e

REPO = Path(__file__).parents[2]


def test_make_demo_starts_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    launcher = Path(sys.executable).with_name("alignsam-run")
    if not launcher.exists():
        pytest.fail("alignsam-run is not installed in this environment (pip install -e .)")
    with phase("Label Studio: virtual environment (installed on first use)"):
        try:
            ensure_venv(say=lambda line: print(f"[e2e] {line}", flush=True))
        except LabelStudioSetupError as exc:
            pytest.fail(str(exc))
    ls_port, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "REDIS_URL", "TRAIN_"))}
    env.update({"MODEL_DIR": str(tmp_path / "models"), "PORT": str(port), "SAM_PRESET": "small",
                "CLIP_PRESET": "tiny", "DEVICE": "cpu", "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port}",
                "WEB_CONCURRENCY": "1", "HF_HUB_OFFLINE": "1"})
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        run = subprocess.Popen([str(launcher), "--with-label-studio", "--label-studio-port", str(ls_port),
                                "--label-studio-data", str(tmp_path / "label-studio")], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)  # a terminal's job: its own foreground process group
    started: list[psutil.Process] = []
    try:
        def gone() -> str | None:
            return None if run.poll() is None else f"exited with {run.returncode}:\n{log_path.read_text()[-3000:]}"

        with phase("make demo: Label Studio, backend, worker up; demo project made"):
            banner = wait_for("the demo's banner (URL, user, password)",
                              lambda: re.search(r"Label Studio:\s+(\S+)\n\s+user:\s+(\S+)\n\s+password:\s+(\S+)",
                                                log_path.read_text(errors="replace")), 400, 1.0, gone)
        url, user, password = banner.groups()
        assert url.startswith(f"http://127.0.0.1:{ls_port}/projects/"), url
        creds = json.loads((tmp_path / "label-studio" / "alignsam-demo-credentials.json").read_text())
        assert (creds["username"], creds["password"]) == (user, password)
        assert (tmp_path / "label-studio" / "alignsam-demo-credentials.json").stat().st_mode & 0o077 == 0
        base = f"http://127.0.0.1:{ls_port}"
        ls = LabelStudio(base_url=base, api_key=creds["token"])
        project = next(p for p in ls.projects.list() if p.title == DEMO_TITLE)
        tasks = list(iter_tasks(base, creds["token"], int(project.id)))  # type: ignore[arg-type]
        assert len(tasks) == 30 and sum(bool(t["annotations"]) for t in tasks) == 10
        [model] = ls.ml.list(project=project.id)
        assert model.state == "CO" and model.url == f"http://127.0.0.1:{port}", (model.state, model.url)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        started = psutil.Process(run.pid).children(recursive=True)
        assert len(started) >= 4, "Label Studio, the worker, gunicorn and its worker"
        with phase("make demo: Ctrl-C"):
            os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to the whole foreground group
            assert run.wait(timeout=120) == 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    _, alive = psutil.wait_procs(started, timeout=15)
    leftovers = [f"{p.pid} {p.name()}" for p in alive]
    for proc in alive:  # leave nothing behind, then fail
        proc.kill()
    assert leftovers == [], f"still running after Ctrl-C: {leftovers}"
