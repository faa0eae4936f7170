"""deploy/docker/fetch_weights.py, the image build's downloader, against a local HTTP server: a file is kept only
when its SHA-256 matches (the built-in SAM value, --sha256, or the hub's record for CLIP), and every real SAM preset
has an official checkpoint with a checksum."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import pytest

from alignsam.loading import PLUMBING_PRESETS
from alignsam.sam import SAM_PRESETS

ROOT = Path(__file__).resolve().parents[1]
BLOB = b"weights " * 1000
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


def load_fetch() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_weights", ROOT / "deploy" / "docker" / "fetch_weights.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch = load_fetch()


class _Files(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        body = self.routes.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setattr(_Files, "routes", {})
    try:
        yield base
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_every_real_sam_preset_has_an_official_checkpoint_and_checksum() -> None:
    assert set(fetch.SAM) == set(SAM_PRESETS) - set(PLUMBING_PRESETS)
    for preset, known in fetch.SAM.items():
        assert known.url.startswith("https://dl.fbaipublicfiles.com/segment_anything/sam_" + preset)
        assert len(known.sha256) == 64 and int(known.sha256, 16) >= 0


def test_matching_download_is_kept(server: str, tmp_path: Path) -> None:
    _Files.routes["/w.pth"] = BLOB
    out = fetch.download(f"{server}/w.pth", tmp_path / "w.pth", BLOB_SHA)
    assert out.read_bytes() == BLOB
    assert fetch.download(f"{server}/gone.pth", out, BLOB_SHA) == out  # present and matching: not fetched again


def test_mismatching_download_leaves_nothing(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _Files.routes["/w.pth"] = BLOB + b"tampered"
    out = tmp_path / "sam_vit_b.pth"
    assert fetch.main(["sam", "vit_b", "--url", f"{server}/w.pth", "--out", str(out)]) == 1
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the expected " + fetch.SAM["vit_b"].sha256 in err[0]


def test_sha256_override_and_unreachable_source(server: str, tmp_path: Path) -> None:
    _Files.routes["/w.pth"] = BLOB
    out = tmp_path / "sam.pth"
    assert fetch.main(["sam", "vit_h", "--url", f"{server}/w.pth", "--sha256", BLOB_SHA, "--out", str(out)]) == 0
    assert out.read_bytes() == BLOB
    with pytest.raises(fetch.FetchError, match="cannot download"):
        fetch.download(f"{server}/missing", tmp_path / "x", BLOB_SHA)
    with pytest.raises(fetch.FetchError, match="not a SHA-256"):
        fetch.download(f"{server}/w.pth", tmp_path / "x", "abc")


def test_clip_is_checked_against_the_hubs_record_when_not_pinned(server: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    repo, name = fetch.CLIP_REPO, fetch.CLIP_FILE
    _Files.routes[f"/{repo}/resolve/main/{name}"] = BLOB
    _Files.routes[f"/api/models/{repo}/tree/main"] = json.dumps(
        [{"path": "README.md", "type": "file"}, {"path": name, "type": "file", "lfs": {"oid": BLOB_SHA}}]).encode()
    out = tmp_path / "clip.safetensors"
    assert fetch.main(["clip", "--out", str(out)]) == 0
    assert out.read_bytes() == BLOB
    assert f"CLIP_SHA256={BLOB_SHA}" in capsys.readouterr().out
    out.unlink()
    assert fetch.main(["clip", "--out", str(out), "--sha256", "0" * 64]) == 1  # a pin wins over the hub
    assert not out.exists()
