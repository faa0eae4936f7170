"""The image's entry point (deploy/docker/entrypoint.py), run as the container runs it: the command chooses the
process (backend -> gunicorn with the project's config, worker -> alignsam-worker), unknown commands and a SAM
checkpoint that does not fit SAM_PRESET end with one readable line, and the file stays LF-only."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.py"
BUNDLED_SMALL_SAM = ROOT / "alignsam" / "assets" / "sam_small.pth"


def load_entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("alignsam_entrypoint", ENTRYPOINT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_entrypoint(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "SYSTEMROOT")}
    base["HF_HUB_OFFLINE"] = "1"
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run([sys.executable, str(ENTRYPOINT), *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_backend_is_gunicorn_with_the_project_config_and_wsgi_app() -> None:
    done = run_entrypoint("--dry-run", "backend")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["gunicorn", "-c", "python:ml_backend.gunicorn_conf", "ml_backend.wsgi:app"]


def test_worker_is_alignsam_worker_with_its_arguments() -> None:
    done = run_entrypoint("--dry-run", "worker", "--queues", "predict,prelabel")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["alignsam-worker", "--queues", "predict,prelabel"]
    assert load_entrypoint().command_line(["worker"]) == ["alignsam-worker"]  # all queues, like alignsam-worker
    assert load_entrypoint().command_line(["alignsam", "presets"]) == ["alignsam", "presets"]


@pytest.mark.parametrize("argv, says", [
    (["bogus"], "unknown command 'bogus'; choose one of: backend, worker, check, health, alignsam, help"),
    ([], "no command given; choose one of: backend, worker"),
    (["backend", "--bind", "0.0.0.0:1"], "backend takes no arguments"),
])
def test_unknown_command_ends_with_one_line_and_status_2(argv: list[str], says: str) -> None:
    done = run_entrypoint(*argv)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr


def test_backend_replaces_the_entrypoint_with_gunicorn(tmp_path: Path) -> None:
    """Not a dry run: a stand-in `gunicorn` first on PATH shows the argv the entry point exec()s."""
    fake = tmp_path / "gunicorn"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps([os.path.basename(sys.argv[0])]"
                    " + sys.argv[1:]))\n")
    fake.chmod(0o755)
    done = run_entrypoint("backend", env={"PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["gunicorn", "-c", "python:ml_backend.gunicorn_conf", "ml_backend.wsgi:app"]


def test_worker_with_a_checkpoint_of_another_preset_fails_with_one_line(tmp_path: Path) -> None:
    """The real worker start (alignsam-worker's main, in the entry point's process): the bundled `small` checkpoint
    under SAM_PRESET=tiny stops it before it reaches Redis, with one line naming both presets and no traceback."""
    done = run_entrypoint("worker", "--queues", "predict", env={
        "SAM_PRESET": "tiny", "SAM_CHECKPOINT": str(BUNDLED_SMALL_SAM), "CLIP_PRESET": "none",
        "DEVICE": "cpu", "MODEL_DIR": str(tmp_path), "REDIS_URL": "redis://127.0.0.1:9/0",
    })
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("alignsam-worker: ")
    assert "another SAM preset than 'tiny'" in last and "'small'" in last


def test_check_loads_the_configured_models(tmp_path: Path) -> None:
    done = run_entrypoint("check", env={"SAM_PRESET": "small", "SAM_CHECKPOINT": str(BUNDLED_SMALL_SAM),
                                        "CLIP_PRESET": "none", "DEVICE": "cpu", "MODEL_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "SAM small" in done.stdout and "load" in done.stdout


class _Health(http.server.BaseHTTPRequestHandler):
    status = "UP"

    def do_GET(self) -> None:
        body = json.dumps({"status": self.status}).encode() if self.path == "/health" else b"{}"
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_health_probes_the_backend_on_port(health_server: http.server.ThreadingHTTPServer,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    entrypoint = load_entrypoint()
    monkeypatch.setenv("PORT", str(health_server.server_address[1]))
    assert entrypoint.check_health() == 0
    monkeypatch.setattr(_Health, "status", "DOWN")
    assert entrypoint.check_health() == 1
    health_server.shutdown()
    health_server.server_close()
    assert entrypoint.check_health(timeout_s=1) == 1


def test_container_scripts_are_lf_only_and_marked_so_in_gitattributes() -> None:
    for script in (ENTRYPOINT, ROOT / "deploy" / "docker" / "fetch_weights.py"):
        data = script.read_bytes()
        assert b"\r" not in data, f"{script} has CR characters"
        assert data.startswith(b"#!/usr/bin/env python3\n")
    try:
        out = subprocess.run(["git", "check-attr", "eol", "--", "deploy/docker/entrypoint.py", "Dockerfile",
                              "deploy/docker-compose.yml"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert out.stdout.count("eol: lf") == 3, out.stdout
