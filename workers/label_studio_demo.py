"""A real Label Studio next to the backend: its own virtual environment, its start, and a demo project.

Used by ``alignsam-run --with-label-studio`` (``make demo``) and by the end-to-end test (``tests/e2e``).

- Label Studio 1.23.2 pins rq 2.6 and redis-py 5.2, so it cannot share the product's environment: it gets one of
  its own (``.venv-ls`` next to ``.venv`` by default, ``LABEL_STUDIO_VENV`` to move it), created on first use and
  reused afterwards (a marker file says which version it holds).
- It starts with the flags of DESIGN.md section 5: legacy API tokens on, ML backends on loopback allowed, no
  version check, analytics or Sentry, on ``127.0.0.1``, SQLite in a data directory of its own, with a fixed user
  and legacy token; in a session (process group) of its own, so whoever starts it can stop all of it.
- The demo project: semantic synthetic scenes (``alignsam.synthetic``) with two labels, ``circle`` and
  ``square``, uploaded as files (Label Studio serves them at relative ``/data/upload/...`` URLs that need a token,
  as real uploads), some of them annotated with their exact masks as brush RLE, the backend connected as the
  project's model.

This module imports ``label_studio_sdk`` and ``ml_backend`` but not torch: ``alignsam.synthetic`` (whose package
imports torch) is imported only when scenes are drawn.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests

from ml_backend.formats import mask_to_brush_rle

LABEL_STUDIO_VERSION = "1.23.2"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-ls"
INSTALL_TIMEOUT_S = 1200.0
START_TIMEOUT_S = 300.0
"""Label Studio's first start (database migrations) took 70 s on the 2-core development machine."""

LABELS: tuple[str, ...] = ("circle", "square")
"""The demo project's labels: two categories of the synthetic ``semantic`` family (red circles, blue squares)."""
LABEL_COLOURS: dict[str, str] = {"circle": "#ff00ff", "square": "#00ffff"}
"""Brush colours in the editor: magenta and cyan, unlike any object colour of the scenes."""
CONTROL_NAME = "tag"
IMAGE_NAME = "image"
_LABEL_TAGS = "".join(f'<Label value="{label}" background="{LABEL_COLOURS[label]}"/>' for label in LABELS)
LABEL_CONFIG = (
    f'<View><Image name="{IMAGE_NAME}" value="$image" zoom="true"/>'
    f'<BrushLabels name="{CONTROL_NAME}" toName="{IMAGE_NAME}">{_LABEL_TAGS}</BrushLabels>'
    f'<KeyPointLabels name="kp" toName="{IMAGE_NAME}" smart="true">{_LABEL_TAGS}</KeyPointLabels>'
    f'<RectangleLabels name="box" toName="{IMAGE_NAME}" smart="true">{_LABEL_TAGS}</RectangleLabels></View>'
)
"""The demo project's config: the brush labels the backend pre-labels and trains on, and the smart keypoint and
rectangle tools with the same labels for interactive correction (README "Correct a mask with clicks")."""
SCENE_SIZE = 256
LABEL_STUDIO_FLAGS: dict[str, str] = {
    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # the backend reads images and annotations with one
    "ML_BLOCK_LOCAL_IP": "false",  # else Label Studio refuses a backend on 127.0.0.1
    "SSRF_PROTECTION_ENABLED": "false",
    "LATEST_VERSION_CHECK": "false",
    "COLLECT_ANALYTICS": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
}


class LabelStudioSetupError(RuntimeError):
    """Label Studio could not be installed or started; the message says what to look at."""


# ---------------------------------------------------------------------------------------------------------
# Its virtual environment
# ---------------------------------------------------------------------------------------------------------
def venv_dir() -> Path:
    """Where Label Studio's own environment lives: ``LABEL_STUDIO_VENV`` or ``.venv-ls`` in the repository."""
    return Path(os.environ.get("LABEL_STUDIO_VENV") or DEFAULT_VENV)


def label_studio_bin(venv: Path) -> Path:
    return venv / "bin" / "label-studio"


def _marker(venv: Path) -> Path:
    return venv / f".installed-label-studio-{LABEL_STUDIO_VERSION}"


def ensure_venv(venv: Path | None = None, say: Callable[[str], None] = print,
                timeout_s: float = INSTALL_TIMEOUT_S) -> Path:
    """Label Studio's environment, installed on first use (``pip install label-studio==1.23.2``, ~1.5 min, ~1 GB)
    and reused afterwards. A lock file serialises concurrent installs. Returns the ``label-studio`` program."""
    venv = venv or venv_dir()
    if _marker(venv).exists() and label_studio_bin(venv).exists():
        return label_studio_bin(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _marker(venv).exists() and label_studio_bin(venv).exists():
            return label_studio_bin(venv)
        say(f"installing Label Studio {LABEL_STUDIO_VERSION} into {venv} (once; about a minute and a half)")
        python = venv / "bin" / "python"
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "pip"],
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             f"label-studio=={LABEL_STUDIO_VERSION}"],
        ]
        deadline = time.monotonic() + timeout_s
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True,
                                      timeout=max(deadline - time.monotonic(), 1.0), check=False)
            except subprocess.TimeoutExpired as exc:
                raise LabelStudioSetupError(f"installing Label Studio took over {timeout_s:.0f} s: {step}") from exc
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
                raise LabelStudioSetupError(f"installing Label Studio failed ({' '.join(step)}):\n{tail}")
        _marker(venv).write_text(f"label-studio=={LABEL_STUDIO_VERSION}\n")
    return label_studio_bin(venv)


# ---------------------------------------------------------------------------------------------------------
# Starting it
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LabelStudioServer:
    """A running Label Studio and how to log in to it."""

    proc: subprocess.Popen[bytes]
    url: str
    username: str
    password: str
    token: str
    data_dir: Path
    log_path: Path

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM its process group, SIGKILL what is left after ``grace_s``."""
        stop_process_group(self.proc, grace_s)


def label_studio_env(data_dir: Path) -> dict[str, str]:
    """Label Studio's environment: the flags of DESIGN.md section 5 and nothing of the product's settings (its
    own rq / redis-py must not pick up ``REDIS_URL``, nor anything else meant for the backend)."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(LABEL_STUDIO_FLAGS)
    env["HOME"] = str(data_dir)  # Label Studio writes its user folders under HOME too
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_label_studio(program: Path, port: int, data_dir: Path, username: str, password: str, token: str,
                       log_path: Path) -> LabelStudioServer:
    """Starts ``label-studio start`` on 127.0.0.1:``port`` in a session of its own (returns at once: see
    :func:`wait_until_up`). Label Studio moves to the next free port when ``port`` is taken, so pass a free one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [str(program), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port),
               "--username", username, "--password", password, "--user-token", token, "--data-dir", str(data_dir)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, env=label_studio_env(data_dir), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=data_dir)
    return LabelStudioServer(proc, f"http://127.0.0.1:{port}", username, password, token, data_dir, log_path)


def wait_until_up(server: LabelStudioServer, timeout_s: float = START_TIMEOUT_S) -> float:
    """Polls ``/health`` until Label Studio answers and the token is accepted; returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        if server.proc.poll() is not None:
            raise LabelStudioSetupError(f"Label Studio exited with {server.proc.returncode}; see {server.log_path}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                me = requests.get(f"{server.url}/api/current-user/whoami", timeout=10,
                                  headers={"Authorization": f"Token {server.token}"})
                if me.status_code == 200:
                    return time.monotonic() - started
        if time.monotonic() > deadline:
            raise LabelStudioSetupError(f"Label Studio did not answer within {timeout_s:.0f} s; see {server.log_path}")
        time.sleep(1.0)


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM the process group ``proc`` leads (``start_new_session``), wait up to ``grace_s``, then SIGKILL
    what is left of the group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def credentials(path: Path) -> dict[str, str]:
    """The demo's Label Studio user, password and legacy token: made once (random) and kept in ``path`` (mode
    0600) so that a restarted demo logs in to the same database."""
    if path.exists():
        return json.loads(path.read_text())
    creds = {"username": "demo@alignsam.local", "password": secrets.token_urlsafe(12),
             "token": secrets.token_hex(20)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(creds, file)
    return creds


# ---------------------------------------------------------------------------------------------------------
# Demo data
# ---------------------------------------------------------------------------------------------------------
@dataclass
class DemoScene:
    """One synthetic image and the exact mask of every label (``LABELS``)."""

    name: str  # file name, e.g. ``scene_0000003.png``
    image: np.ndarray  # [H, W, 3] uint8
    masks: dict[str, np.ndarray]  # label -> [H, W] bool


def demo_scenes(seeds: Sequence[int], size: int = SCENE_SIZE) -> list[DemoScene]:
    """Scenes of the synthetic ``semantic`` family (``make_scene("semantic", seed, category="circle")``) with the
    masks of both labels: every circle and every square of the scene (squares are among its distractors)."""
    from alignsam.synthetic import scenes as synth  # imports torch (alignsam's package): only when needed

    out = []
    for seed in seeds:
        scene = synth.make_scene("semantic", seed, size, category=LABELS[0])
        # The same drawing, with the category of every object: make_scene keeps only its target's mask.
        rng = np.random.default_rng([synth.FAMILIES.index("semantic"), int(seed)])
        canvas, _, _ = synth._semantic(rng, size, LABELS[0])
        if not np.array_equal(np.clip(canvas.image, 0, 255).astype(np.uint8), scene.image):
            raise RuntimeError("alignsam.synthetic changed how semantic scenes are drawn; update demo_scenes")
        min_area = synth._MIN_REGION_FRACTION * size * size
        masks = {}
        for label in LABELS:
            mask = np.zeros((size, size), bool)
            for i, tag in enumerate(canvas.tags):
                region = canvas.labels == i
                if tag == label and region.sum() >= min_area:
                    mask |= region
            masks[label] = mask
        if not np.array_equal(masks[LABELS[0]], scene.mask):
            raise RuntimeError("alignsam.synthetic changed the semantic target masks; update demo_scenes")
        out.append(DemoScene(f"scene_{int(seed):07d}.png", scene.image, masks))
    return out


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def brush_annotation(masks: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """An annotation's ``result``: one brush region per label with a non-empty mask (what the editor saves)."""
    results = []
    for label, mask in masks.items():
        if not mask.any():
            continue
        h, w = mask.shape
        results.append({
            "id": f"{label}-gt", "from_name": CONTROL_NAME, "to_name": IMAGE_NAME, "type": "brushlabels",
            "original_width": int(w), "original_height": int(h), "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]},
        })
    return results


def upload_images(url: str, token: str, project_id: int, files: Sequence[tuple[str, bytes]],
                  batch: int = 20) -> dict[str, int]:
    """Uploads PNG files into a project as the import dialog does (``POST /api/projects/<id>/import``, multipart),
    one task per file. Returns ``{file name: task id}`` (Label Studio stores ``/data/upload/<pid>/<8hex>-<name>``)."""
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        answer = requests.post(f"{url}/api/projects/{project_id}/import", timeout=120,
                               headers={"Authorization": f"Token {token}"},
                               files={name: (name, data, "image/png") for name, data in chunk})
        answer.raise_for_status()
    names = {name for name, _ in files}
    found: dict[str, int] = {}
    for task in iter_tasks(url, token, project_id):
        image = str((task.get("data") or {}).get(IMAGE_NAME, ""))
        stored = image.rsplit("/", 1)[-1]
        original = stored.split("-", 1)[1] if "-" in stored else stored
        if original in names:
            found[original] = int(task["id"])
    return found


def iter_tasks(url: str, token: str, project_id: int, page_size: int = 100) -> Iterator[dict[str, Any]]:
    """Every task of a project, as ``GET /api/tasks`` gives them (predictions and annotations included)."""
    page = 1
    while True:
        answer = requests.get(f"{url}/api/tasks", timeout=60, headers={"Authorization": f"Token {token}"},
                              params={"project": project_id, "page": page, "page_size": page_size, "fields": "all"})
        if answer.status_code == 404:  # past the last page
            return
        answer.raise_for_status()
        body = answer.json()
        tasks = body.get("tasks", []) if isinstance(body, dict) else body
        yield from tasks
        if len(tasks) < page_size:
            return
        page += 1


DEMO_TITLE = "AlignSAM demo: circles and squares"


def create_demo_project(url: str, token: str, backend_url: str, n_tasks: int = 30, n_annotated: int = 10,
                        say: Callable[[str], None] = print) -> int:
    """The demo project (made once; an existing one with this title is reused): ``n_tasks`` synthetic scenes,
    the first ``n_annotated`` annotated with their exact masks (as if a person had labelled them, so Start
    Training has something to learn from), the backend at ``backend_url`` connected as its model. Returns its id."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=url, api_key=token)
    for project in ls.projects.list():
        if project.title == DEMO_TITLE:
            say(f"demo project {project.id} exists already")
            return int(project.id)  # type: ignore[arg-type]
    project = ls.projects.create(title=DEMO_TITLE, label_config=LABEL_CONFIG,
                                 description="Synthetic scenes: label every red circle and every blue square.")
    pid = int(project.id)  # type: ignore[arg-type]
    scenes = demo_scenes(range(n_tasks))
    tasks = upload_images(url, token, pid, [(s.name, png_bytes(s.image)) for s in scenes])
    for scene in scenes[:n_annotated]:
        ls.annotations.create(id=tasks[scene.name], result=brush_annotation(scene.masks))
    ls.ml.create(project=pid, url=backend_url, title="AlignSAM", is_interactive=False)
    say(f"demo project {pid}: {n_tasks} tasks, {n_annotated} annotated, backend {backend_url} connected")
    return pid
