#!/usr/bin/env python3
"""Entry point of the AlignSAM image: the container's command chooses the process.

    backend                          the web process Label Studio talks to (port $PORT, 9090):
                                     gunicorn -c python:ml_backend.gunicorn_conf ml_backend.wsgi:app
    worker [--queues Q[,Q]] [...]    an RQ worker with warm SAM + CLIP (``alignsam-worker``; arguments pass through):
                                     --queues predict,prelabel on GPU machines serving Label Studio, --queues train
    check                            load SAM and CLIP exactly as a worker does, say what was loaded, exit
    health                           exit 0 when the backend in this container answers GET /health with UP
                                     (the image's HEALTHCHECK)
    alignsam ARGS...                 the ``alignsam`` command (presets, train, predict, eval, bench)
    help                             this text

``--dry-run`` before the command prints the command line it stands for (JSON) and exits: the tests compare it
with what ``alignsam-run`` (``make run``) starts, so the image runs what CI runs.

The backend replaces this process (``exec``), so gunicorn is PID 1 and gets the container's SIGTERM. The worker
and ``check`` run in this process, through the same ``main`` the ``alignsam-worker`` console script calls, so an
error a user can cause (above all a SAM checkpoint made for another preset than ``SAM_PRESET``, or missing) ends
with one readable line and exit status 2 instead of a traceback; RQ's own SIGTERM handling (finish the job, then
stop) is unchanged. Plain Python (standard library at import time), started as ``python /app/entrypoint.py``: no
shebang or shell is involved, so a checkout with CRLF line endings cannot break the start (``.gitattributes``
keeps the file LF anyway).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

PROG = "alignsam-entrypoint"
BACKEND = ["gunicorn", "-c", "python:ml_backend.gunicorn_conf", "ml_backend.wsgi:app"]
WORKER = "alignsam-worker"
CLI = "alignsam"
COMMANDS = ("backend", "worker", "check", "health", "alignsam", "help")
EXIT_USAGE = 2


class UsageError(Exception):
    """The container was started with a command this image does not have."""


def command_line(argv: Sequence[str]) -> list[str]:
    """The command line ``argv`` (the container's command) stands for.

    Raises:
      UsageError: no command, or an unknown one.
    """
    if not argv:
        raise UsageError(f"no command given; choose one of: {', '.join(COMMANDS)}")
    name, args = argv[0], list(argv[1:])
    if name == "backend":
        if args:
            raise UsageError("backend takes no arguments (configure it with environment variables: PORT, "
                             "WEB_CONCURRENCY, GUNICORN_THREADS, ...)")
        return list(BACKEND)
    if name == "worker":
        return [WORKER, *args]
    if name == "alignsam":
        return [CLI, *args]
    if name in ("check", "health"):
        if args:
            raise UsageError(f"{name} takes no arguments")
        return [PROG, name]
    if name in ("help", "-h", "--help"):
        return [PROG, "help"]
    raise UsageError(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)} "
                     f"(e.g. `worker --queues predict,prelabel`)")


def console_script(name: str) -> Callable[..., int | None]:
    """The ``main`` behind an installed console script (``alignsam-worker`` -> its function)."""
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
    if not found:
        raise UsageError(f"{name} is not installed in this image (pip install the project)")
    return found[0].load()


def check_models() -> int:
    """Load SAM and CLIP from the settings, as a worker does (also the image build's last step)."""
    from alignsam import load_clip, load_sam
    from ml_backend.settings import get_settings

    settings = get_settings()
    sam = load_sam(settings.sam_preset, str(settings.sam_checkpoint) if settings.sam_checkpoint else None,
                   settings.device)
    clip = load_clip(settings.clip_preset, settings.clip_pretrained, settings.device)
    print(f"{PROG}: SAM {settings.sam_preset} ({sam.model_id}) and CLIP {settings.clip_preset} "
          f"({'none' if clip is None else clip.pretrained or 'random'}) load", flush=True)
    return 0


def check_health(timeout_s: float = 5.0) -> int:
    """GET http://127.0.0.1:$PORT/health: 0 when it answers ``{"status": "UP"}``, else 1 (one line why)."""
    import urllib.request

    url = f"http://127.0.0.1:{os.environ.get('PORT', '9090')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = json.load(response).get("status")
    except (OSError, ValueError, AttributeError) as exc:
        print(f"{PROG}: {url}: {exc}", file=sys.stderr)
        return 1
    if status != "UP":
        print(f"{PROG}: {url} says status {status!r}", file=sys.stderr)
        return 1
    return 0


def run_in_process(target: Callable[[], int | None], what: str) -> int:
    """Run ``target``; an error a user can cause becomes one line on stderr and exit status 2."""
    from alignsam.errors import AlignSamError

    try:
        return int(target() or 0)
    except AlignSamError as exc:
        print(f"{what}: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = bool(argv) and argv[0] == "--dry-run"
    if dry_run:
        argv = argv[1:]
    try:
        line = command_line(argv)
        if dry_run:
            print(json.dumps(line))
            return 0
        if line == [PROG, "help"]:
            print(__doc__)
            return 0
        if line == [PROG, "health"]:
            return check_health()
        if line == [PROG, "check"]:
            return run_in_process(check_models, PROG)
        if line[0] == WORKER:
            worker_main = console_script(WORKER)
            return run_in_process(lambda: worker_main(line[1:]), WORKER)
        if line[0] == CLI:
            cli_main = console_script(CLI)
            return run_in_process(lambda: cli_main(line[1:]), CLI)
        program = shutil.which(line[0])
        if program is None:
            raise UsageError(f"{line[0]} is not installed in this image")
        sys.stdout.flush()
        os.execv(program, line)  # the backend: gunicorn becomes this process
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
