"""Issue 20, the image fetcher: finding 6 (one deadline per fetch, headers included), 7a (the token only to
Label Studio's media paths), 7c (uploads confined to LABEL_STUDIO_UPLOAD_DIR, rejected files not cached), 7e
(resolved addresses checked, the connection goes to the checked address) and 5 (the image cache is bounded).
Every target is a stub on 127.0.0.1; other names are resolved by a patched resolver, never by DNS."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from mlb_helpers import IMAGE_SIZE, SECRET_TOKEN, ImageServer, png_bytes

from ml_backend import images
from ml_backend.errors import (
    DisallowedHostError,
    DisallowedPathError,
    ImageUnreachableError,
    NotAnImageError,
    OutsideUploadDirError,
)
from ml_backend.images import HostPolicy, ImageFetcher, LabelStudioAccess
from ml_backend.settings import Settings


class RedirectingLabelStudio:
    """A Label Studio stand-in whose media path redirects to another path on the same host."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                stub.paths.append(self.path)
                if self.path.startswith("/data/upload/1/redirect.png"):
                    self.send_response(302)
                    self.send_header("Location", "/api/current-user/token")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = b'{"token": "leaked"}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class DripServer:
    """Accepts, reads the request, then sends a status line and headers one byte every ``interval`` seconds."""

    def __init__(self, interval: float = 1.5, n_bytes: int = 20) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.interval = interval
        self.payload = (b"HTTP/1.1 200 OK\r\nX-Drip: " + b"x" * 64)[:n_bytes]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for i in range(len(self.payload)):
                try:
                    conn.sendall(self.payload[i : i + 1])
                except OSError:
                    return
                time.sleep(self.interval)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def access(image_server: ImageServer) -> LabelStudioAccess:
    return LabelStudioAccess(url=image_server.url, token=SECRET_TOKEN)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names -> addresses for :func:`ml_backend.images.resolve_addresses`, counting lookups in ``["calls"]``."""
    table: dict[str, Any] = {"calls": []}
    real = images.resolve_addresses

    def resolve(host: str, port: int | None) -> list[images.AddrInfo]:
        table["calls"].append(host)
        if host in table:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 80)) for a in table[host]]
        return real(host, port)

    monkeypatch.setattr(images, "resolve_addresses", resolve)
    return table


def cache_files(settings: Settings) -> list[str]:
    folder = settings.image_cache_dir
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- finding 6: one deadline per fetch ------------------------------------------------------------------------
def test_a_server_dripping_header_bytes_cannot_hold_a_fetch(make_settings: Callable[..., Settings],
                                                             access: LabelStudioAccess) -> None:
    """Finding 6: the deadline covered the body only; one header byte every 1.5 s held a fetch for 36 s."""
    server = DripServer(interval=1.5, n_bytes=20)  # 30 s of headers
    try:
        settings = make_settings(image_download_timeout_s=2.0, allowed_image_hosts=["127.0.0.1"])
        started = time.monotonic()
        with pytest.raises(ImageUnreachableError, match="IMAGE_DOWNLOAD_TIMEOUT_S=2.0"):
            ImageFetcher(settings).fetch(f"{server.url}/slow-headers.png", access)
        assert time.monotonic() - started < 2.0 + 1.0
    finally:
        server.close()


# --- finding 7a: the token goes only to Label Studio's media paths -------------------------------------------------
def test_only_label_studio_media_paths_may_carry_the_token() -> None:
    """Finding 7a: any path on the Label Studio host could be requested with the token."""
    policy = HostPolicy("http://ls:8080", [])
    for ok in ("/data/upload/1/a.png", "/data/upload/12/7f3e-photo%20one.jpg", "/data/local-files/?d=imgs/a.png",
               "/storage-data/uploaded/?filepath=upload/1/a.png", "/tasks/17/presign/?fileuri=czM6Ly9iL2EucG5n",
               "/tasks/17/resolve/?fileuri=x", "/projects/3/resolve/?fileuri=x"):
        assert policy.check(f"http://ls:8080{ok}") is True, ok
    for bad in ("/api/projects/1/export?exportType=JSON", "/api/current-user/token", "/", "/data/upload/",
                "/data/upload/../../api/users", "/data/upload/1/%2e%2e/%2e%2e/api/users",
                "/data/upload/1%2f..%2f..%2fapi", "/data/upload/1/..%5c..%5capi", "/tasks/x/presign/",
                "/tasks/1/presign/extra", "/data/local-files/../../etc/passwd", "/storage-data/uploaded/x"):
        with pytest.raises(DisallowedPathError, match="Label Studio serves images from"):
            policy.check(f"http://ls:8080{bad}")
    prefixed = HostPolicy("https://example.com/label-studio", [])
    assert prefixed.check("https://example.com/label-studio/data/upload/1/a.png") is True
    with pytest.raises(DisallowedPathError):
        prefixed.check("https://example.com/data/upload/1/a.png")


def test_a_non_media_path_on_label_studio_is_refused_before_connecting(settings: Settings,
                                                                       access: LabelStudioAccess,
                                                                       image_server: ImageServer) -> None:
    """Finding 7a: an image URL naming Label Studio's API is refused and nothing is sent."""
    before = len(image_server.requests)
    with pytest.raises(DisallowedPathError, match="token is sent only there"):
        ImageFetcher(settings).fetch(f"{image_server.url}/api/projects/1/export?exportType=JSON", access)
    assert len(image_server.requests) == before


def test_a_redirect_from_a_media_path_to_another_path_is_refused(make_settings: Callable[..., Settings]) -> None:
    """Finding 7a: redirect hops are checked too; the redirect target on the same host is never requested."""
    stub = RedirectingLabelStudio()
    try:
        settings = make_settings(label_studio_url=stub.url)
        with pytest.raises(DisallowedPathError):
            ImageFetcher(settings).fetch(f"{stub.url}/data/upload/1/redirect.png", LabelStudioAccess(stub.url, "t"))
        assert stub.paths == ["/data/upload/1/redirect.png"]
    finally:
        stub.close()


def test_other_paths_of_a_label_studio_host_also_allowed_for_images_get_no_token(
    make_settings: Callable[..., Settings], access: LabelStudioAccess, image_server: ImageServer
) -> None:
    """Finding 7a: when the operator also lists the Label Studio host in ALLOWED_IMAGE_HOSTS, its other paths are
    fetched as from any image host: without the token."""
    settings = make_settings(allowed_image_hosts=["127.0.0.1"])
    image = ImageFetcher(settings).fetch(f"{image_server.url}/public/ok.png", access)
    assert (image.width, image.height) == IMAGE_SIZE
    path, headers = image_server.requests[-1]
    assert path == "/public/ok.png" and "Authorization" not in headers


# --- finding 7e: resolved addresses ---------------------------------------------------------------------------------
def test_wildcards_and_setup_hosts_may_not_resolve_to_private_addresses() -> None:
    """Finding 7e: a wildcard entry let any name under it resolve to a private address."""
    policy = HostPolicy("http://ls.example.com", ["*.cdn.example.org", "minio.internal", "10.9.9.9"],
                        label_studio_trusted=False)
    policy.check_addresses("eu.cdn.example.org", 443, ["93.184.215.14"])
    policy.check_addresses("minio.internal", 9000, ["10.0.0.5"])  # listed exactly: the operator's choice
    policy.check_addresses("eu.cdn.example.org", 443, ["10.9.9.9"])  # that address is listed
    for address in ("10.0.0.5", "127.0.0.1", "169.254.169.254", "::1", "::ffff:169.254.169.254", "fe80::1"):
        with pytest.raises(DisallowedHostError, match="not a wildcard"):
            policy.check_addresses("eu.cdn.example.org", 443, ["93.184.215.14", address])
        with pytest.raises(DisallowedHostError, match="SETUP_ALLOW_PRIVATE_HOSTS"):
            policy.check_addresses("ls.example.com", 80, [address])
    HostPolicy("http://ls:8080", [], label_studio_trusted=True).check_addresses("ls", 8080, ["10.0.0.5"])


def test_a_wildcard_name_resolving_to_loopback_is_refused_before_connecting(
    make_settings: Callable[..., Settings], access: LabelStudioAccess, image_server: ImageServer,
    fake_dns: dict[str, Any]
) -> None:
    """Finding 7e: the fetch checks the address a wildcard-allowed name resolves to before connecting."""
    fake_dns["img.example.test"] = ["127.0.0.1"]
    settings = make_settings(allowed_image_hosts=["*.example.test"])
    port = image_server.url.rsplit(":", 1)[1]
    before = len(image_server.requests)
    with pytest.raises(DisallowedHostError, match="resolves to 127.0.0.1"):
        ImageFetcher(settings).fetch(f"http://img.example.test:{port}/public/ok.png", access)
    assert len(image_server.requests) == before


def test_the_connection_goes_to_the_address_that_was_checked(
    make_settings: Callable[..., Settings], access: LabelStudioAccess, image_server: ImageServer,
    fake_dns: dict[str, Any]
) -> None:
    """Finding 7e (DNS rebinding): the name is resolved once, by the check, and the socket connects to that
    address (urllib3 does not resolve it again: this name exists only in the patched resolver)."""
    fake_dns["img.example.test"] = ["127.0.0.1"]
    settings = make_settings(allowed_image_hosts=["img.example.test"])
    port = image_server.url.rsplit(":", 1)[1]
    image = ImageFetcher(settings).fetch(f"http://img.example.test:{port}/public/ok.png", access)
    assert (image.width, image.height) == IMAGE_SIZE
    assert fake_dns["calls"] == ["img.example.test"]
    assert image_server.requests[-1][1]["Host"] == f"img.example.test:{port}"


def test_a_setup_label_studio_host_on_loopback_needs_setup_allow_private_hosts(
    make_settings: Callable[..., Settings], image_server: ImageServer
) -> None:
    """Finding 7e: a Label Studio URL from /setup (not LABEL_STUDIO_URL) is checked at connect time too."""
    access = LabelStudioAccess(image_server.url, SECRET_TOKEN)
    before = len(image_server.requests)
    with pytest.raises(DisallowedHostError, match="SETUP_ALLOW_PRIVATE_HOSTS"):
        ImageFetcher(make_settings(label_studio_url=None)).fetch("/data/upload/1/a.png", access)
    assert len(image_server.requests) == before
    allowed = make_settings(label_studio_url=None, setup_allow_private_hosts=True)
    assert ImageFetcher(allowed).fetch("/data/upload/1/a.png", access).width == IMAGE_SIZE[0]


# --- finding 7c: the local upload dir; rejected files are not cached -----------------------------------------------
@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "media" / "upload"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "good.png").write_bytes(png_bytes(40, 30))
    (folder / "1" / "notimage.png").write_bytes(b"<html>not an image</html>")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(20, 10))
    os.symlink(outside / "secret.png", folder / "1" / "evil.png")
    os.symlink(outside, folder / "2")
    return folder


def test_a_symlink_out_of_the_upload_dir_is_refused(make_settings: Callable[..., Settings], upload_dir: Path,
                                                    access: LabelStudioAccess) -> None:
    """Finding 7c: a symlink inside LABEL_STUDIO_UPLOAD_DIR was followed out of it (and copied into the cache)."""
    settings = make_settings(label_studio_upload_dir=upload_dir)
    fetcher = ImageFetcher(settings)
    for source in ("/data/upload/1/evil.png", "/data/upload/2/secret.png"):
        with pytest.raises(OutsideUploadDirError, match="LABEL_STUDIO_UPLOAD_DIR"):
            fetcher.fetch(source, access)
    assert cache_files(settings) == []
    image = fetcher.fetch("/data/upload/1/good.png", access)
    assert (image.width, image.height) == (40, 30)
    assert Path(image.path).parent == settings.image_cache_dir  # a copy: workers share MODEL_DIR, not the uploads


def test_a_rejected_file_is_not_left_in_the_image_cache(make_settings: Callable[..., Settings], upload_dir: Path,
                                                         access: LabelStudioAccess) -> None:
    """Finding 7c: a non-image copy was left in the image cache (from the upload dir and from a download)."""
    local = make_settings(label_studio_upload_dir=upload_dir)
    with pytest.raises(NotAnImageError):
        ImageFetcher(local).fetch("/data/upload/1/notimage.png", access)
    assert cache_files(local) == []
    downloaded = make_settings()
    with pytest.raises(NotAnImageError):
        ImageFetcher(downloaded).fetch("/data/upload/1/notimage.png", access)
    assert cache_files(downloaded) == []


# --- finding 5: the image cache is bounded ----------------------------------------------------------------------------
def test_the_image_cache_stays_under_its_bound_least_recently_used_first(
    make_settings: Callable[..., Settings], access: LabelStudioAccess, image_server: ImageServer
) -> None:
    """Finding 5: 10,000 tasks left 10,000 cached images; IMAGE_CACHE_MAX_BYTES bounds the cache, evicting the
    least recently used (a cache hit counts as a use)."""
    size = len(image_server.png)
    settings = make_settings(image_cache_max_bytes=int(3.5 * size))
    fetcher = ImageFetcher(settings)
    paths = {}
    for name in ("a", "b", "c"):
        paths[name] = Path(fetcher.fetch(f"/data/upload/1/{name}.png", access).path)
        time.sleep(0.02)
    downloads = [path for path, _ in image_server.requests].count("/data/upload/1/a.png")
    assert fetcher.fetch("/data/upload/1/a.png", access).path == str(paths["a"])  # a hit: not downloaded again
    assert [path for path, _ in image_server.requests].count("/data/upload/1/a.png") == downloads
    time.sleep(0.02)
    paths["d"] = Path(fetcher.fetch("/data/upload/1/d.png", access).path)
    assert not paths["b"].exists()  # the least recently used
    assert paths["a"].exists() and paths["c"].exists() and paths["d"].exists()
    for i in range(10):
        fetcher.fetch(f"/data/upload/1/more{i}.png", access)
    total = sum(p.stat().st_size for p in settings.image_cache_dir.iterdir())
    assert total <= settings.image_cache_max_bytes
