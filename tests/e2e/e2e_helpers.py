"""Helpers of the end-to-end test: ports, polling with deadlines, phase timings, IoU, the token search."""

from __future__ import annotations

import socket
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from redis import Redis

T = TypeVar("T")

PHASES: dict[str, float] = {}
"""Wall seconds of each phase of the run, in order (printed at the end of the session, also on failure)."""


@contextmanager
def phase(name: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"\n[e2e] {name} ...", flush=True)
    try:
        yield
    finally:
        PHASES[name] = time.monotonic() - started
        print(f"[e2e] {name}: {PHASES[name]:.1f} s", flush=True)


@dataclass
class Backend:
    """The running ``alignsam-run`` (worker + gunicorn) of the test."""

    proc: subprocess.Popen[bytes]
    url: str
    model_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def gone(self) -> str | None:
        return None if self.proc.poll() is None else f"alignsam-run exited with {self.proc.returncode}:\n" + \
            self.log()[-4000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, every_s: float = 1.0,
             alive: Callable[[], str | None] | None = None) -> T:
    """Calls ``check`` until it returns something truthy (returned) or ``timeout_s`` passes (AssertionError
    naming ``what``). ``alive`` returns a reason to give up at once (a process died), or None."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if alive is not None and (reason := alive()):
            raise AssertionError(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union; two empty masks agree (1.0)."""
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


# ---------------------------------------------------------------------------------------------------------
# Where a Label Studio token must not be
# ---------------------------------------------------------------------------------------------------------
def _texts(value: bytes) -> list[bytes]:
    """A Redis value and, when it is zlib-compressed (RQ compresses job payloads), its decompressed form."""
    out = [value]
    if value[:1] == b"x":
        with suppress(zlib.error):
            out.append(zlib.decompress(value))
    return out


def redis_token_hits(conn: Redis, token: str, allowed_keys: set[str]) -> list[str]:
    """Every Redis key (other than ``allowed_keys``) whose name or value holds ``token``: strings, hashes (RQ
    jobs: payload, meta, result), lists, sets, sorted sets and streams."""
    needle = token.encode()
    hits = []
    for raw_key in conn.scan_iter(count=500):
        key = raw_key.decode(errors="replace")
        if key in allowed_keys:
            continue
        kind = conn.type(raw_key).decode()
        values: list[bytes] = [raw_key]
        if kind == "string":
            values.append(conn.get(raw_key) or b"")
        elif kind == "hash":
            for field, value in conn.hgetall(raw_key).items():
                values += [field, value]
        elif kind == "list":
            values += conn.lrange(raw_key, 0, -1)
        elif kind == "set":
            values += list(conn.smembers(raw_key))
        elif kind == "zset":
            values += [member for member, _ in conn.zrange(raw_key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, entry in conn.xrange(raw_key):
                for field, value in entry.items():
                    values += [field, value]
        if any(needle in text for value in values for text in _texts(value)):
            hits.append(f"redis {kind} {key}")
    return hits


def file_token_hits(root: Path, token: str, skip: set[Path]) -> list[str]:
    """Every file under ``root`` (but ``skip``) whose bytes hold ``token``."""
    needle = token.encode()
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.resolve() in skip:
            continue
        if needle in path.read_bytes():
            hits.append(f"file {path}")
    return hits
