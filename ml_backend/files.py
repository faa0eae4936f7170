"""Files and folders the product creates under ``MODEL_DIR``: private to the user the processes run as.

``MODEL_DIR`` holds the embedded Redis database (with the Label Studio token), downloaded images, embeddings and
policies; nobody else on the machine needs to read them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


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
