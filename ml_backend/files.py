"""Files and folders the product creates under ``MODEL_DIR``: private to the user the processes run as.

``MODEL_DIR`` holds the embedded Redis database (with the Label Studio token), downloaded images, embeddings and
policies; nobody else on the machine needs to read them.

Policies live in ``MODEL_DIR/policies/<project>/<label slug>/`` (:func:`label_slug`, the one home of that name,
used by the workers that write there and by the web process that shows what is there): per version
``<version>.pt`` (the bundle), ``<version>.json`` (its metadata) and the pictures of its training,
``<version>.gallery.png`` and ``<version>.curve.png`` (:data:`PICTURE_KINDS`), which the web process serves
read-only through :func:`picture_file`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

PICTURE_KINDS = ("gallery", "curve")
"""The pictures a worker draws at the end of each training, as ``<version>.<kind>.png`` next to the bundle."""

PICTURE_NAME = re.compile(r"[A-Za-z0-9._-]+\.(?:gallery|curve)\.png")
"""A picture's file name; nothing else is ever served from the policy folders."""

SLUG_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,80}")
"""What :func:`label_slug` makes (never ``.`` or ``..``)."""


def label_slug(label: str) -> str:
    """A label as a folder name (stable, readable, collision-safe enough with the hash suffix)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "label"
    return f"{safe[:40]}-{hashlib.sha256(label.encode()).hexdigest()[:6]}"


def picture_name(version: str, kind: str) -> str:
    """The file name of picture ``kind`` (one of :data:`PICTURE_KINDS`) of policy ``version``."""
    if kind not in PICTURE_KINDS:
        raise ValueError(f"unknown picture kind {kind!r}; one of {PICTURE_KINDS}")
    return f"{version}.{kind}.png"


def picture_file(policy_dir: str | os.PathLike[str], project_id: int, slug: str, name: str) -> Path | None:
    """The picture ``policy_dir/<project_id>/<slug>/<name>`` when it may be served, else None.

    Served only when ``slug`` looks like a :func:`label_slug`, ``name`` matches :data:`PICTURE_NAME` (and starts
    with no dot), and the file's real path (symlinks resolved) is a regular file inside the real
    ``policy_dir``: ``..``, absolute paths, other files and links leading out of the folder give None.
    """
    if not SLUG_NAME.fullmatch(slug) or not PICTURE_NAME.fullmatch(name) or name.startswith("."):
        return None
    root = Path(policy_dir).resolve()
    try:
        real = (root / str(int(project_id)) / slug / name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, an odd name
        return None
    if not real.is_relative_to(root) or not real.is_file():
        return None
    return real


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) as 0700 folders and return it; an existing ``path`` we own is
    tightened to 0700 (folders made by older versions were 0755). Folders of other users are left alone."""
    path = Path(path)
    missing: list[Path] = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        _tighten(folder, PRIVATE_DIR_MODE)
    if not missing:
        _tighten(path, PRIVATE_DIR_MODE)
    return path


def private_file(path: str | os.PathLike[str]) -> None:
    """Make an existing file we own 0600 (no-op for a missing file or one of another user)."""
    _tighten(Path(path), PRIVATE_FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    with contextlib.suppress(FileNotFoundError, PermissionError):
        info = path.stat()
        if info.st_uid == os.geteuid() and (info.st_mode & 0o777) != mode:
            path.chmod(mode)
