"""Fetch a task's image safely: only from allowed hosts, with size, pixel and time limits.

Downloads go through ``label_studio_sdk``'s ``get_local_path`` (it knows Label Studio's URL kinds: uploads,
``/data/local-files/?d=``, cloud URIs presigned through ``/tasks/<id>/presign/``, plain http(s)), but every HTTP
request it makes - redirects included - passes through :class:`GuardedSession`, which

- refuses any host other than the Label Studio host and ``ALLOWED_IMAGE_HOSTS`` (no SSRF through task data),
- applies ``IMAGE_DOWNLOAD_TIMEOUT_S`` (per request, and as a wall-clock deadline for the body),
- refuses bodies larger than ``IMAGE_MAX_BYTES`` (from ``Content-Length`` and while streaming).

The file is then checked before any pixel is decoded: size again, then PIL reads only the header and we compare
``width * height`` with ``IMAGE_MAX_PIXELS`` (a 30000 x 30000 PNG is ~100 KB on disk but 2.7 GB decoded).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path, http_session
from PIL import Image, ImageOps, UnidentifiedImageError

from ml_backend.errors import (
    DisallowedHostError,
    ImageFetchError,
    ImageTooLargeError,
    ImageUnreachableError,
    NotAnImageError,
)
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_EXIF_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose width and height
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class LabelStudioAccess:
    """Where Label Studio is and the token to read from it. ``repr`` never shows the token."""

    url: str | None
    token: str | None

    def __repr__(self) -> str:
        return f"LabelStudioAccess(url={self.url!r}, token={'***' if self.token else None})"

    @classmethod
    def resolve(cls, settings: Settings, setup_url: str | None, setup_token: str | None) -> LabelStudioAccess:
        """LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY win over what /setup sent (``hostname``, ``access_token``)."""
        url = settings.label_studio_url or (setup_url or "").strip().rstrip("/") or None
        key = settings.label_studio_api_key.get_secret_value() if settings.label_studio_api_key else None
        return cls(url=url, token=key or setup_token or None)


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


def _host_port(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError as exc:
        raise DisallowedHostError(f"Image URL {url!r} has an invalid port.") from exc
    return host, port


class HostPolicy:
    """Which hosts images may come from: the Label Studio host plus the operator's ``ALLOWED_IMAGE_HOSTS``.

    An allowed-host entry is ``host`` (any port), ``host:port``, or ``*.example.com`` (any subdomain).
    """

    def __init__(self, label_studio_url: str | None, allowed_hosts: list[str]) -> None:
        self.label_studio = _host_port(label_studio_url) if label_studio_url else None
        self.allowed = [h.strip().lower() for h in allowed_hosts if h.strip()]

    def check(self, url: str) -> None:
        """Raise :class:`DisallowedHostError` unless ``url`` is http(s) on an allowed host."""
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise DisallowedHostError(f"Image URL scheme {scheme!r} is not allowed; only http(s) is fetched.")
        host, port = _host_port(url)
        if not host:
            raise DisallowedHostError(f"Image URL {url!r} has no host.")
        if self.label_studio and (host, port) == self.label_studio:
            return
        for entry in self.allowed:
            if entry.startswith("*."):
                if host.endswith(entry[1:]):
                    return
            elif ":" in entry:
                name, _, entry_port = entry.rpartition(":")
                if host == name and str(port) == entry_port:
                    return
            elif host == entry:
                return
        raise DisallowedHostError(
            f"Image host {host!r} is not the Label Studio host and not in ALLOWED_IMAGE_HOSTS; add it there "
            "if this backend may download from it."
        )


class GuardedSession(requests.Session):
    """A requests session that enforces a :class:`HostPolicy`, a timeout and a body-size limit."""

    def __init__(self, policy: HostPolicy, timeout_s: float, max_bytes: int, max_redirects: int) -> None:
        super().__init__()
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.guard_error: ImageFetchError | None = None
        self.http_failures: list[str] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        """Every request, redirects included, is checked against the host policy first."""
        try:
            self.policy.check(str(request.url))
        except DisallowedHostError as exc:
            self.guard_error = exc
            raise
        kwargs["timeout"] = self.timeout_s
        return super().send(request, **kwargs)

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        """Stream the body and stop at ``max_bytes`` or the wall-clock deadline."""
        kwargs["stream"] = True
        kwargs["timeout"] = self.timeout_s
        deadline = time.monotonic() + self.timeout_s
        response = super().request(method, url, *args, **kwargs)
        if not response.ok:
            self.http_failures.append(f"HTTP {response.status_code} from {_strip_query(response.url)}")
        if response.ok:
            try:
                response._content = self._read_capped(response, deadline)
                response._content_consumed = True
            except ImageFetchError as exc:
                self.guard_error = exc
                response.close()
                raise
        return response

    def _read_capped(self, response: requests.Response, deadline: float) -> bytes:
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
        # read1 returns what has arrived (<= _CHUNK), so the deadline is checked even on a slow drip.
        stream = iter(lambda: read1(_CHUNK, decode_content=True), b"") if read1 else response.iter_content(_CHUNK)
        for chunk in stream:
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageTooLargeError(
                    f"The image is larger than IMAGE_MAX_BYTES={self.max_bytes} bytes; raise the limit or "
                    "downscale the image."
                )
            if time.monotonic() > deadline:
                raise ImageUnreachableError(
                    f"The image download took longer than IMAGE_DOWNLOAD_TIMEOUT_S={self.timeout_s} s."
                )
            chunks.append(chunk)
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


class ImageFetcher:
    """Downloads (through Label Studio's SDK) and checks task images. Thread-safe; one per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache_dir = settings.image_cache_dir
        # get_local_path reads Label Studio's upload folder directly when it exists; only when mounted.
        self.upload_dir = str(settings.label_studio_upload_dir or settings.model_dir / "label-studio-upload-unset")

    def policy(self, access: LabelStudioAccess) -> HostPolicy:
        """The host policy for one project's Label Studio."""
        return HostPolicy(access.url, self.settings.allowed_image_hosts)

    def fetch(self, source: str, access: LabelStudioAccess, task_id: int | None = None) -> FetchedImage:
        """Download ``source`` (a task's image reference) and check it; raises an :class:`ImageFetchError`."""
        policy = self.policy(access)
        if urlsplit(source).scheme.lower() in ("http", "https"):
            policy.check(source)  # absolute URLs: refuse early, with a clear message
        elif "://" in source and not source.startswith(("s3://", "gs://", "azure-blob://")):
            raise DisallowedHostError(f"Image URL scheme of {source!r} is not supported.")
        needs_label_studio = not urlsplit(source).scheme or source.startswith(("s3:", "gs:", "azure-blob:"))
        if needs_label_studio and not access.url:
            raise ImageUnreachableError(
                f"Image {source!r} lives in Label Studio but its URL is unknown: set LABEL_STUDIO_URL or connect "
                "the model in the project settings (Label Studio then calls /setup)."
            )
        if needs_label_studio and not access.token:
            raise ImageUnreachableError(
                "Label Studio needs a token to serve images: set LABEL_STUDIO_API_KEY or connect the model in "
                "the project settings (Label Studio then calls /setup with one)."
            )
        session = GuardedSession(
            policy,
            timeout_s=self.settings.image_download_timeout_s,
            max_bytes=self.settings.image_max_bytes,
            max_redirects=self.settings.image_max_redirects,
        )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            with http_session(session):
                path = get_local_path(
                    source,
                    cache_dir=str(self.cache_dir),
                    hostname=access.url or "",
                    access_token=access.token or "",
                    image_dir=self.upload_dir,
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
        return self.check_file(source, path)

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
