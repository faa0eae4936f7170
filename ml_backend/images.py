"""Fetch a task's image safely: only from allowed hosts, with size, pixel and time limits.

Downloads go through ``label_studio_sdk``'s ``get_local_path`` (it knows Label Studio's URL kinds: uploads,
``/data/local-files/?d=``, cloud URIs presigned through ``/tasks/<id>/presign/``, plain http(s)), but every HTTP
request it makes - redirects included - passes through :class:`GuardedSession`, which

- refuses any host other than the Label Studio host and ``ALLOWED_IMAGE_HOSTS`` (no SSRF through task data), and
  on the Label Studio host any path but those Label Studio serves images from (the token goes only there),
- resolves the host itself and connects only to the addresses it checked: a wildcard-allowed name, or a
  /setup-supplied Label Studio host, that resolves to a private, loopback or link-local address is refused
  (no DNS rebinding between the check and the connection),
- applies ``IMAGE_DOWNLOAD_TIMEOUT_S`` as one wall-clock deadline per fetch, headers, redirects and body
  included (a watchdog shuts the fetch's sockets when it passes),
- refuses bodies larger than ``IMAGE_MAX_BYTES`` (from ``Content-Length`` and while streaming).

Files under ``LABEL_STUDIO_UPLOAD_DIR`` are read directly, confined to that folder (symlinks out are refused).
The file is then checked before any pixel is decoded: size again, then PIL reads only the header and we compare
``width * height`` with ``IMAGE_MAX_PIXELS`` (a 30000 x 30000 PNG is ~100 KB on disk but 2.7 GB decoded). A
rejected file is removed from the image cache, and the cache is kept under ``IMAGE_CACHE_MAX_BYTES``.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
import warnings
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path, http_session
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from ml_backend.errors import (
    DisallowedHostError,
    DisallowedPathError,
    ImageFetchError,
    ImageTooLargeError,
    ImageUnreachableError,
    NotAnImageError,
    OutsideUploadDirError,
    SetupRefusedError,
)
from ml_backend.files import private_dir
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_EXIF_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose width and height
_CHUNK = 64 * 1024

# Paths Label Studio 1.23 serves task media from, relative to its base URL; the token is sent to no other path.
# From Label Studio's URL confs: data_import/urls.py (`data/upload/<path:filename>`, `storage-data/uploaded/`
# ?filepath=, the storage proxy of uploads), core/urls.py (`data/local-files/` ?d=, Local Storage) and
# io_storages/urls.py (`tasks/<int:task_id>/resolve/`, `projects/<int:project_id>/resolve/` and their older
# `.../presign/` names: cloud storage URIs, proxied or redirected to a presigned URL).
_LABEL_STUDIO_MEDIA_PATH = re.compile(
    r"/(?:data/upload/[^?#]+|data/local-files/?|storage-data/uploaded/?|(?:tasks|projects)/\d+/(?:resolve|presign)/?)"
)


@dataclass(frozen=True)
class LabelStudioAccess:
    """Where Label Studio is and the token to read from it. ``repr`` never shows the token."""

    url: str | None
    token: str | None

    def __repr__(self) -> str:
        return f"LabelStudioAccess(url={self.url!r}, token={'***' if self.token else None})"

    @classmethod
    def resolve(cls, settings: Settings, setup_url: str | None, setup_token: str | None) -> LabelStudioAccess:
        """The Label Studio host and token to use: LABEL_STUDIO_URL, when set, is the only host (/setup's
        ``hostname`` is ignored) and LABEL_STUDIO_API_KEY wins over /setup's ``access_token``; without
        LABEL_STUDIO_URL the URL and token /setup stored as a pair. The env key is used only with
        LABEL_STUDIO_URL, so it is never sent to a host a /setup named."""
        if settings.label_studio_url:
            key = settings.label_studio_api_key.get_secret_value() if settings.label_studio_api_key else None
            return cls(url=settings.label_studio_url, token=key or setup_token or None)
        url = (setup_url or "").strip().rstrip("/") or None
        return cls(url=url, token=setup_token or None)


def label_studio_access_warning(settings: Settings) -> str | None:
    """Log (once, loudly) and return why this deployment's Label Studio access is unsafe, else ``None``.

    Call it at web-process start-up: without LABEL_STUDIO_URL, /setup decides where the Label Studio token goes,
    and LABEL_STUDIO_API_KEY is not used at all (it is sent only to LABEL_STUDIO_URL).
    """
    if settings.label_studio_url:
        return None
    parts = [
        "LABEL_STUDIO_URL is unset: each project's /setup names the Label Studio host its token and image "
        "downloads go to"
    ]
    if not settings.basic_auth_enabled:
        parts.append("and with BASIC_AUTH_USER/BASIC_AUTH_PASS unset anyone who reaches this port can send /setup")
    if settings.label_studio_api_key is not None:
        parts.append("; LABEL_STUDIO_API_KEY is ignored until LABEL_STUDIO_URL is set (it is sent to no other host)")
    message = " ".join(parts) + ". Set LABEL_STUDIO_URL (and basic auth) for production."
    logger.warning("SECURITY: %s", message)
    return message


@dataclass(frozen=True)
class FetchedImage:
    """A downloaded, checked image file. ``width``/``height`` are after EXIF orientation (as browsers show it)."""

    source: str
    path: str
    width: int
    height: int
    format: str

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (for job arguments)."""
        return {
            "source": self.source,
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "format": self.format,
        }


def _normal_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _host_port(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    host = _normal_host(parts.hostname or "")
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError as exc:
        raise DisallowedHostError(f"Image URL {url!r} has an invalid port.") from exc
    return host, port


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    return ip.ipv4_mapped or ip.sixtofour


def address_is_public(address: str) -> bool:
    """Whether ``address`` (an IPv4 or IPv6 literal) is a public unicast address: not loopback, private,
    link-local (169.254.169.254, the cloud metadata address), multicast, reserved or unspecified, also when
    written as ``::ffff:``-mapped or 6to4 IPv6."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        ip = _embedded_ipv4(ip) or ip
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
        or ip.is_unspecified
    )


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


def resolve_addresses(host: str, port: int | None) -> list[AddrInfo]:
    """``socket.getaddrinfo`` for a TCP connection to ``host:port``; raises ``socket.gaierror``."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def check_setup_hostname(hostname: str, settings: Settings) -> str:
    """The Label Studio base URL a /setup ``hostname`` names, normalised, if this backend may send the token
    there; raises :class:`SetupRefusedError` otherwise.

    Refused: not http(s), credentials, query or fragment in the URL, a name that does not resolve, and (unless
    SETUP_ALLOW_PRIVATE_HOSTS) any resolved address that is not public. Without this, a /setup could point the
    token and the image fetcher at the cloud metadata address or anything else on the backend's network.
    """
    url = hostname.strip().rstrip("/")
    try:
        url.encode("utf-8")
        parts = urlsplit(url)
        port = parts.port
    except (UnicodeError, ValueError) as exc:
        raise SetupRefusedError(f"/setup `hostname` {url!r:.200} is not a valid URL.") from exc
    host = _normal_host(parts.hostname or "")
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise SetupRefusedError(
            f"/setup `hostname` must be Label Studio's http(s) base URL such as https://label-studio.example.com, "
            f"got {url!r:.200}."
        )
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise SetupRefusedError("/setup `hostname` must be a plain base URL (no credentials, query or fragment).")
    try:
        addresses = {info[4][0] for info in resolve_addresses(host, port or _DEFAULT_PORTS[parts.scheme.lower()])}
    except (OSError, UnicodeError) as exc:
        raise SetupRefusedError(
            f"/setup `hostname` {host!r} does not resolve from this backend ({type(exc).__name__}); set "
            "LABEL_STUDIO_URL to a Label Studio URL this backend can reach."
        ) from exc
    private = sorted(a for a in addresses if not address_is_public(a))
    if private and not settings.setup_allow_private_hosts:
        raise SetupRefusedError(
            f"/setup `hostname` {host!r} resolves to {', '.join(private)}, a loopback, private or link-local "
            "address, so the backend will not send the Label Studio token there. For a Label Studio on this "
            "machine or network set LABEL_STUDIO_URL (recommended) or SETUP_ALLOW_PRIVATE_HOSTS=true."
        )
    return url


class HostPolicy:
    """Which URLs images may come from: Label Studio's media paths on its host, plus the operator's
    ``ALLOWED_IMAGE_HOSTS``.

    An allowed-host entry is ``host`` (any port), ``host:port``, an IP address, or ``*.example.com`` (any
    subdomain). The addresses a host resolves to are checked too (:meth:`check_addresses`): a wildcard match,
    or a Label Studio host that is not ``label_studio_trusted`` (it came from /setup without
    SETUP_ALLOW_PRIVATE_HOSTS), may only resolve to public addresses or to addresses listed in the entries.
    """

    def __init__(self, label_studio_url: str | None, allowed_hosts: list[str], *,
                 label_studio_trusted: bool = True) -> None:
        self.label_studio = _host_port(label_studio_url) if label_studio_url else None
        self.label_studio_base = urlsplit(label_studio_url).path.rstrip("/") if label_studio_url else ""
        self.label_studio_trusted = label_studio_trusted
        self.allowed = [h.strip().lower() for h in allowed_hosts if h.strip()]
        self.allowed_addresses = {_normal_host(h) for h in self.allowed if _is_ip(_normal_host(h))}

    def check(self, url: str) -> bool:
        """Raise :class:`DisallowedHostError` unless ``url`` is http(s) on an allowed host (and on the Label
        Studio host, a media path unless the host is also an allowed image host). Returns whether the URL is a
        Label Studio media path, the only kind of request that may carry the token."""
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise DisallowedHostError(f"Image URL scheme {scheme!r} is not allowed; only http(s) is fetched.")
        host, port = _host_port(url)
        if not host:
            raise DisallowedHostError(f"Image URL {url!r} has no host.")
        listed = self._entry_for(host, port) is not None
        if self.label_studio and (host, port) == self.label_studio:
            if self.is_media_path(urlsplit(url).path):
                return True
            if listed:
                return False
            raise DisallowedPathError(
                f"{_strip_query(url)!r} is on the Label Studio host but not a path Label Studio serves images from "
                "(/data/upload/, /data/local-files/, /storage-data/uploaded/, /tasks/<id>/resolve/ or presign/); the "
                "token is sent only there. Import images by those URLs, or list the host in ALLOWED_IMAGE_HOSTS to "
                "fetch other paths without the token."
            )
        if listed:
            return False
        raise DisallowedHostError(
            f"Image host {host!r} is not the Label Studio host and not in ALLOWED_IMAGE_HOSTS; add it there "
            "if this backend may download from it."
        )

    def is_media_path(self, path: str) -> bool:
        """Whether ``path`` (of a URL on the Label Studio host) is one Label Studio serves media from.

        Dot segments, backslashes and encoded slashes are refused: a server may normalise them into another path.
        """
        if self.label_studio_base:
            if not path.startswith(self.label_studio_base + "/"):
                return False
            path = path[len(self.label_studio_base):]
        decoded = unquote(path)
        if "\\" in decoded or "%" in decoded or any(seg in (".", "..") for seg in decoded.split("/")):
            return False
        return _LABEL_STUDIO_MEDIA_PATH.fullmatch(path) is not None

    def _entry_for(self, host: str, port: int | None) -> str | None:
        """``"exact"`` or ``"wildcard"``: how ``host:port`` is listed in ALLOWED_IMAGE_HOSTS; ``None``: not."""
        for entry in self.allowed:
            if entry.startswith("*."):
                if host.endswith(entry[1:]):
                    return "wildcard"
            elif ":" in entry and not _is_ip(_normal_host(entry)):
                name, _, entry_port = entry.rpartition(":")
                if host == _normal_host(name) and str(port) == entry_port:
                    return "exact"
            elif host == _normal_host(entry):
                return "exact"
        return None

    def check_addresses(self, host: str, port: int | None, addresses: list[str]) -> None:
        """Raise :class:`DisallowedHostError` unless ``host:port`` may be reached at every one of ``addresses``
        (what it resolved to, checked before connecting)."""
        host = _normal_host(host)
        is_label_studio = self.label_studio is not None and (host, port) == self.label_studio
        if is_label_studio and self.label_studio_trusted:
            return
        if self._entry_for(host, port) == "exact":
            return
        for address in addresses:
            if address_is_public(address) or _normal_host(address) in self.allowed_addresses:
                continue
            if is_label_studio:
                raise DisallowedHostError(
                    f"The Label Studio host {host!r} from /setup resolves to {address}, a loopback, private or "
                    "link-local address; set LABEL_STUDIO_URL (recommended) or SETUP_ALLOW_PRIVATE_HOSTS=true."
                )
            raise DisallowedHostError(
                f"Image host {host!r} resolves to {address}, a loopback, private or link-local address; list the "
                "host itself (not a wildcard) or that address in ALLOWED_IMAGE_HOSTS if this backend may download "
                "from it."
            )


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# One fetch: the deadline watchdog and checked connections
# ---------------------------------------------------------------------------------------------------------
_FETCH_GUARD: ContextVar[_FetchGuard | None] = ContextVar("alignsam_fetch_guard", default=None)


class _FetchGuard:
    """The deadline and sockets of one fetch: connects only to addresses the policy checked, and shuts every
    socket it opened when the deadline passes (a server dripping header bytes cannot hold the fetch)."""

    def __init__(self, policy: HostPolicy, timeout_s: float) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._watchdog = threading.Timer(timeout_s, self.expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout_error(self) -> ImageUnreachableError:
        return ImageUnreachableError(
            f"The image download took longer than IMAGE_DOWNLOAD_TIMEOUT_S={self.timeout_s} s (connection, "
            "headers, redirects and body together); check the image host or raise the limit."
        )

    def expire(self) -> None:
        """Deadline passed: mark the fetch expired and shut its sockets (blocked reads return at once)."""
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._watchdog.cancel()

    def connect(self, host: str, port: int, timeout: Any, source_address: Any,
                socket_options: Any) -> socket.socket:
        """A socket connected to an address of ``host:port`` that the policy allowed (resolved once, here)."""
        if self.expired or self.remaining() <= 0:
            raise self.timeout_error()
        infos = resolve_addresses(host, port)
        self.policy.check_addresses(host, port, [info[4][0] for info in infos])
        budget = max(0.001, self.remaining())
        connect_timeout = min(float(timeout), budget) if isinstance(timeout, int | float) else budget
        last: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            with self._lock:
                if self.expired:
                    sock.close()
                    raise self.timeout_error()
                self._sockets.append(sock)
            try:
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(connect_timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                last = exc
                sock.close()
        raise last or OSError(f"no address to connect to for {host}:{port}")


class _GuardedConnectionMixin:
    """urllib3 connection whose socket comes from the current fetch's :class:`_FetchGuard`."""

    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        guard = _FETCH_GUARD.get()
        if guard is None:
            raise RuntimeError("a guarded image connection was opened outside GuardedSession.send")
        try:
            return guard.connect(self._dns_host, self.port, self.timeout, self.source_address,  # type: ignore[attr-defined]
                                 self.socket_options)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out.") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc  # type: ignore[arg-type]


class _GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    """requests adapter whose pools open :class:`_GuardedConnectionMixin` connections."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class GuardedSession(requests.Session):
    """A requests session for one fetch: a :class:`HostPolicy` checked on every request and every connection,
    one wall-clock deadline (``timeout_s``) for everything, and a body-size limit. Proxies from the environment
    are not used (the addresses connected to must be the ones checked). Close it when the fetch is done."""

    def __init__(self, policy: HostPolicy, timeout_s: float, max_bytes: int, max_redirects: int) -> None:
        super().__init__()
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.guard_error: ImageFetchError | None = None
        self.http_failures: list[str] = []
        self.downloads = 0
        self.guard = _FetchGuard(policy, timeout_s)
        adapter = _GuardedAdapter(max_retries=0)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        """Every request, redirects included, is checked against the host policy first; the token is removed
        from any request that is not to a Label Studio media path."""
        try:
            if not self.policy.check(str(request.url)):
                request.headers.pop("Authorization", None)
            if self.guard.expired or self.guard.remaining() <= 0:
                raise self.guard.timeout_error()
        except ImageFetchError as exc:
            self.guard_error = exc
            raise
        kwargs["timeout"] = max(0.001, min(self.timeout_s, self.guard.remaining()))
        kwargs["proxies"] = {}
        token = _FETCH_GUARD.set(self.guard)
        try:
            return super().send(request, **kwargs)
        except ImageFetchError as exc:
            self.guard_error = exc
            raise
        except Exception as exc:
            if self.guard.expired:
                self.guard_error = self.guard.timeout_error()
                raise self.guard_error from exc
            raise
        finally:
            _FETCH_GUARD.reset(token)

    def rebuild_proxies(self, prepared_request: requests.PreparedRequest, proxies: Any) -> dict[str, str]:  # type: ignore[override]
        """No proxies on redirects either (see the class docstring)."""
        prepared_request.headers.pop("Proxy-Authorization", None)
        return {}

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        """Stream the body and stop at ``max_bytes`` or the fetch's deadline."""
        kwargs["stream"] = True
        response = super().request(method, url, *args, **kwargs)
        if not response.ok:
            self.http_failures.append(f"HTTP {response.status_code} from {_strip_query(response.url)}")
        if response.ok:
            try:
                response._content = self._read_capped(response)
                response._content_consumed = True
                self.downloads += 1
            except ImageFetchError as exc:
                self.guard_error = exc
                response.close()
                raise
            except Exception as exc:
                response.close()
                if self.guard.expired:
                    self.guard_error = self.guard.timeout_error()
                    raise self.guard_error from exc
                raise
        return response

    def close(self) -> None:
        """Stop the deadline watchdog and close the connections."""
        self.guard.stop()
        super().close()

    def _read_capped(self, response: requests.Response) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageTooLargeError(
                f"The image is {int(declared)} bytes, above IMAGE_MAX_BYTES={self.max_bytes}; raise the limit "
                "or downscale the image."
            )
        chunks: list[bytes] = []
        total = 0
        raw = response.raw
        read1 = getattr(raw, "read1", None)
        # read1 returns what has arrived (<= _CHUNK), so the deadline is checked even on a slow drip; the
        # watchdog ends a read that blocks past it.
        stream = iter(lambda: read1(_CHUNK, decode_content=True), b"") if read1 else response.iter_content(_CHUNK)
        for chunk in stream:
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageTooLargeError(
                    f"The image is larger than IMAGE_MAX_BYTES={self.max_bytes} bytes; raise the limit or "
                    "downscale the image."
                )
            if self.guard.expired or self.guard.remaining() <= 0:
                raise self.guard.timeout_error()
            chunks.append(chunk)
        if self.guard.expired:  # the watchdog shut the socket: what arrived is truncated
            raise self.guard.timeout_error()
        return b"".join(chunks)


def image_url_of(task: Mapping[str, Any], image_key: str) -> str:
    """The image reference of ``task`` (``task["data"][image_key]``); raises ImageFetchError if absent."""
    data = task.get("data")
    value = data.get(image_key) if isinstance(data, Mapping) else None
    if not isinstance(value, str) or not value.strip():
        raise ImageFetchError(
            f"Task {task.get('id')!r} has no image at data.{image_key}; import tasks with that key "
            "(the <Image value=\"$...\"> of the labelling config)."
        )
    return value.strip()


# ---------------------------------------------------------------------------------------------------------
# The image cache's size bound
# ---------------------------------------------------------------------------------------------------------
_RESCAN_S = 60.0  # a process also rescans this often: other processes add files it does not count


class CacheBound:
    """Keeps one cache folder under ``max_bytes`` by deleting the least recently used files (by modification
    time: a cache hit touches its file). One per folder and process (:func:`cache_bound`); thread-safe.

    Cheap: a running total of what this process added; the folder is rescanned only when that total crosses the
    bound or the last scan is older than a minute, and then trimmed to 90 % of the bound so the next few
    additions do not rescan again.
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._total: int | None = None
        self._scanned_at = 0.0

    def touch(self, path: str | os.PathLike[str]) -> None:
        """Mark a cached file as just used."""
        with contextlib.suppress(OSError):
            os.utime(path)

    def added(self, path: str | os.PathLike[str]) -> None:
        """Count a file just added to the folder and evict the least recently used files if over the bound."""
        try:
            size = os.stat(path).st_size
        except OSError:
            return
        with self._lock:
            stale = time.monotonic() - self._scanned_at > _RESCAN_S
            if self._total is None or stale:
                self._total = self._scan_and_trim(keep=Path(path))
                return
            self._total += size
            if self._total > self.max_bytes:
                self._total = self._scan_and_trim(keep=Path(path))

    def _scan_and_trim(self, keep: Path) -> int:
        self._scanned_at = time.monotonic()
        files: list[tuple[float, int, str]] = []
        total = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.folder) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode):
                        files.append((info.st_mtime, info.st_size, entry.path))
                        total += info.st_size
        if total <= self.max_bytes:
            return total
        target = int(self.max_bytes * 0.9)
        removed = 0
        for _, size, file_path in sorted(files):
            if total <= target:
                break
            if Path(file_path) == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(file_path)
                removed += 1
            total -= size
        logger.info("image cache %s: removed %d least recently used files (IMAGE_CACHE_MAX_BYTES=%d)",
                    self.folder, removed, self.max_bytes)
        return total


_BOUNDS: dict[tuple[str, int], CacheBound] = {}
_BOUNDS_LOCK = threading.Lock()


def cache_bound(folder: Path, max_bytes: int) -> CacheBound:
    """The process-wide :class:`CacheBound` of ``folder`` (fetchers are created per call in workers)."""
    key = (str(folder), max_bytes)
    with _BOUNDS_LOCK:
        if key not in _BOUNDS:
            _BOUNDS[key] = CacheBound(folder, max_bytes)
        return _BOUNDS[key]


# ---------------------------------------------------------------------------------------------------------
# The fetcher
# ---------------------------------------------------------------------------------------------------------
_UPLOAD_URL = re.compile(r"/?(?:data/)?upload/(\d+)/([^/?#]+)")


class ImageFetcher:
    """Downloads (through Label Studio's SDK) and checks task images. Thread-safe; one per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache_dir = settings.image_cache_dir
        self.upload_dir = settings.label_studio_upload_dir
        # The SDK would read uploads from its image_dir itself (following symlinks out of it and leaving a copy
        # in the cache); it gets a folder that never exists and uploads are read by _read_upload instead.
        self._sdk_image_dir = str(settings.model_dir / "label-studio-upload-unset")
        self.bound = cache_bound(self.cache_dir, settings.image_cache_max_bytes)

    def policy(self, access: LabelStudioAccess) -> HostPolicy:
        """The host policy for one project's Label Studio. Its host may resolve to a private address only when
        it is LABEL_STUDIO_URL or SETUP_ALLOW_PRIVATE_HOSTS is on."""
        trusted = self.settings.setup_allow_private_hosts or (
            self.settings.label_studio_url is not None and access.url == self.settings.label_studio_url
        )
        return HostPolicy(access.url, self.settings.allowed_image_hosts, label_studio_trusted=trusted)

    def fetch(self, source: str, access: LabelStudioAccess, task_id: int | None = None) -> FetchedImage:
        """Download ``source`` (a task's image reference) and check it; raises an :class:`ImageFetchError`.
        A rejected file is not left in the image cache."""
        policy = self.policy(access)
        if urlsplit(source).scheme.lower() in ("http", "https"):
            policy.check(source)  # absolute URLs: refuse early, with a clear message
        elif "://" in source and not source.startswith(("s3://", "gs://", "azure-blob://")):
            raise DisallowedHostError(f"Image URL scheme of {source!r} is not supported.")
        private_dir(self.cache_dir)
        local = self._read_upload(source)
        if local is not None:
            return self._checked(source, local[0], added=local[1])
        needs_label_studio = not urlsplit(source).scheme or source.startswith(("s3:", "gs:", "azure-blob:"))
        if needs_label_studio and not access.url:
            raise ImageUnreachableError(
                f"Image {source!r} lives in Label Studio but its URL is unknown: set LABEL_STUDIO_URL or connect "
                "the model in the project settings (Label Studio then calls /setup)."
            )
        if needs_label_studio and not access.token:
            raise ImageUnreachableError(
                "Label Studio needs a token to serve images: set LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY, or "
                "connect the model in the project settings (Label Studio then calls /setup with one)."
            )
        session = GuardedSession(
            policy,
            timeout_s=self.settings.image_download_timeout_s,
            max_bytes=self.settings.image_max_bytes,
            max_redirects=self.settings.image_max_redirects,
        )
        try:
            with http_session(session):
                path = get_local_path(
                    source,
                    cache_dir=str(self.cache_dir),
                    hostname=access.url or "",
                    access_token=access.token or "",
                    image_dir=self._sdk_image_dir,
                    task_id=task_id,
                )
        except ImageFetchError:
            raise
        except Exception as exc:
            # The SDK re-raises the first HTTP error when its fallback fails; prefer the guard's reason.
            if session.guard_error is not None:
                raise session.guard_error from exc
            detail = "; ".join(session.http_failures) or f"{type(exc).__name__}: {_safe(exc, access)}"
            raise ImageUnreachableError(f"Could not download image {source!r}: {detail}") from exc
        finally:
            session.close()
        return self._checked(source, Path(path), added=session.downloads > 0)

    def _checked(self, source: str, path: Path, added: bool = True) -> FetchedImage:
        """:meth:`check_file`, removing a rejected file from the cache; keeps the cache under its bound."""
        in_cache = path.resolve().parent == self.cache_dir.resolve()
        try:
            image = self.check_file(source, path)
        except ImageFetchError:
            if in_cache:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            raise
        if in_cache:
            if added:
                self.bound.added(path)
            else:
                self.bound.touch(path)
        return image

    def _read_upload(self, source: str) -> tuple[Path, bool] | None:
        """A Label Studio upload (``/data/upload/<project>/<file>``) read from LABEL_STUDIO_UPLOAD_DIR into the
        cache (its path there, and whether it was copied just now), or ``None`` to download it (no upload dir, not an upload URL, not there). Raises
        :class:`OutsideUploadDirError` for a file whose real path is outside the upload dir (a symlink out)."""
        match = _UPLOAD_URL.fullmatch(source)
        if self.upload_dir is None or match is None:
            return None
        root = Path(os.path.realpath(self.upload_dir))
        candidate = root / match.group(1) / match.group(2)
        if not os.path.lexists(candidate):
            return None
        real = Path(os.path.realpath(candidate))
        if not real.is_relative_to(root):
            raise OutsideUploadDirError(
                f"Image {source!r} is a link out of LABEL_STUDIO_UPLOAD_DIR ({root}); refused. Store uploads as "
                "plain files there."
            )
        try:
            info = real.stat()
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            raise NotAnImageError(f"Image {source!r} in LABEL_STUDIO_UPLOAD_DIR is not a regular file.")
        if info.st_size > self.settings.image_max_bytes:
            raise ImageTooLargeError(
                f"Image {source!r} is {info.st_size} bytes, above IMAGE_MAX_BYTES={self.settings.image_max_bytes}."
            )
        digest = hashlib.sha256(str(real).encode()).hexdigest()[:16]
        cached = self.cache_dir / f"upload-{digest}__{real.name}"
        if cached.exists():
            return cached, False
        partial = cached.with_name(cached.name + f".{os.getpid()}.{threading.get_ident()}.part")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
        try:
            with os.fdopen(os.open(real, flags), "rb") as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            os.replace(partial, cached)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise ImageUnreachableError(f"Could not read image {source!r} from LABEL_STUDIO_UPLOAD_DIR: {exc}") from exc
        return cached, True

    def check_file(self, source: str, path: str | os.PathLike[str]) -> FetchedImage:
        """Check a local file against the byte and pixel limits and that PIL can read it, without decoding."""
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageUnreachableError(f"Image file for {source!r} is missing: {exc}") from exc
        if size > self.settings.image_max_bytes:
            raise ImageTooLargeError(
                f"Image {source!r} is {size} bytes, above IMAGE_MAX_BYTES={self.settings.image_max_bytes}."
            )
        width, height, fmt = read_image_header(path, self.settings.image_max_pixels, source)
        return FetchedImage(source=source, path=str(path), width=width, height=height, format=fmt)


def read_image_header(path: str | os.PathLike[str], max_pixels: int, source: str = "") -> tuple[int, int, str]:
    """(width, height, format) from the header only, EXIF orientation applied; enforces ``max_pixels``."""
    source = source or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"Image {source!r} is {width}x{height} = {width * height} pixels, above "
                        f"IMAGE_MAX_PIXELS={max_pixels}; downscale it or raise the limit."
                    )
                fmt = image.format or "unknown"
                image.verify()  # chunk structure and checksums, without decoding pixels
            with Image.open(path) as image:
                orientation = image.getexif().get(0x0112, 1)
    except ImageTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            f"Image {source!r} has too many pixels to decode safely (above IMAGE_MAX_PIXELS={max_pixels} and "
            f"PIL's bomb guard: {exc}); downscale it."
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise NotAnImageError(f"{source!r} is not an image PIL can read ({type(exc).__name__}).") from exc
    if orientation in _EXIF_SWAPS_AXES:
        width, height = height, width
    return width, height, fmt


def load_image(path: str | os.PathLike[str], max_pixels: int) -> Image.Image:
    """Decode a checked image as RGB with EXIF orientation applied (what the annotator sees). For workers."""
    read_image_header(path, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            oriented = ImageOps.exif_transpose(image)
            return oriented.convert("RGB")


def _strip_query(url: str) -> str:
    """URL without its query (presigned URLs carry signatures there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _safe(exc: BaseException, access: LabelStudioAccess) -> str:
    """Exception text with the token removed, in case a library put it there."""
    text = str(exc)
    if access.token:
        text = text.replace(access.token, "***")
    return text[:300]
