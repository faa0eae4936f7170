"""Image fetching: allowed hosts only, token sent to Label Studio, size / pixel / time limits."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlb_helpers import IMAGE_SIZE, SECRET_TOKEN, ImageServer, png_bytes

from ml_backend.errors import (
    DisallowedHostError,
    ImageTooLargeError,
    ImageUnreachableError,
    NotAnImageError,
)
from ml_backend.images import HostPolicy, ImageFetcher, LabelStudioAccess, load_image, read_image_header
from ml_backend.settings import Settings


@pytest.fixture
def access(image_server: ImageServer) -> LabelStudioAccess:
    return LabelStudioAccess(url=image_server.url, token=SECRET_TOKEN)


def test_host_policy() -> None:
    policy = HostPolicy("http://label-studio:8080", ["images.example.com", "*.cdn.example.org", "minio:9000"])
    for ok in (
        "http://label-studio:8080/data/upload/1/a.png",
        "https://images.example.com/a.png",
        "http://images.example.com:81/a.png",
        "https://eu.cdn.example.org/a.png",
        "http://minio:9000/bucket/a.png",
    ):
        policy.check(ok)
    for bad in (
        "http://label-studio:8081/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://minio:9001/a.png",
        "http://cdn.example.org.evil.com/a.png",
        "file:///etc/passwd",
        "ftp://images.example.com/a.png",
    ):
        with pytest.raises(DisallowedHostError):
            policy.check(bad)


def test_label_studio_url_and_key_settings_override_setup(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(label_studio_url="http://ls:8080", label_studio_api_key="env-key")
    access = LabelStudioAccess.resolve(settings, "http://localhost:8085", "setup-key")
    assert (access.url, access.token) == ("http://ls:8080", "env-key")
    assert "env-key" not in repr(access)
    fallback = LabelStudioAccess.resolve(make_settings(label_studio_url=None), "http://localhost:8085/", "k")
    assert (fallback.url, fallback.token) == ("http://localhost:8085", "k")


def test_upload_is_fetched_with_the_token(
    settings: Settings, access: LabelStudioAccess, image_server: ImageServer
) -> None:
    image = ImageFetcher(settings).fetch("/data/upload/1/78e761b9-img0.png", access, task_id=1)
    assert (image.width, image.height, image.format) == (*IMAGE_SIZE, "PNG")
    assert Path(image.path).read_bytes() == image_server.png
    path, headers = image_server.requests[-1]
    assert path == "/data/upload/1/78e761b9-img0.png"
    assert headers["Authorization"] == f"Token {SECRET_TOKEN}"
    assert load_image(image.path, settings.image_max_pixels).size == IMAGE_SIZE


def test_missing_token_or_url_says_what_to_set(make_settings: Callable[..., Settings]) -> None:
    fetcher = ImageFetcher(make_settings(label_studio_url=None))
    with pytest.raises(ImageUnreachableError, match="LABEL_STUDIO_URL"):
        fetcher.fetch("/data/upload/1/a.png", LabelStudioAccess(url=None, token="t"))
    with pytest.raises(ImageUnreachableError, match="LABEL_STUDIO_API_KEY"):
        fetcher.fetch("/data/upload/1/a.png", LabelStudioAccess(url="http://127.0.0.1:1", token=None))


def test_wrong_token_is_unreachable(settings: Settings, image_server: ImageServer) -> None:
    with pytest.raises(ImageUnreachableError, match="401"):
        ImageFetcher(settings).fetch("/data/upload/1/x.png", LabelStudioAccess(image_server.url, "wrong"))


def test_disallowed_host(settings: Settings, access: LabelStudioAccess) -> None:
    with pytest.raises(DisallowedHostError, match="ALLOWED_IMAGE_HOSTS"):
        ImageFetcher(settings).fetch("http://169.254.169.254/latest/meta-data/x.png", access)


def test_allowed_extra_host(make_settings: Callable[..., Settings], image_server: ImageServer) -> None:
    settings = make_settings(label_studio_url="http://label-studio:8080", allowed_image_hosts=["127.0.0.1"])
    access = LabelStudioAccess(url="http://label-studio:8080", token=SECRET_TOKEN)
    image = ImageFetcher(settings).fetch(f"{image_server.url}/public/ok.png", access)
    assert (image.width, image.height) == IMAGE_SIZE
    # the token is only for Label Studio's host
    assert "Authorization" not in image_server.requests[-1][1]


def test_redirect_to_a_disallowed_host_is_refused(make_settings: Callable[..., Settings], access: LabelStudioAccess,
                                                  image_server: ImageServer) -> None:
    settings = make_settings(allowed_image_hosts=["127.0.0.1"])  # /public/ is not a Label Studio media path
    with pytest.raises(DisallowedHostError, match="forbidden.invalid"):
        ImageFetcher(settings).fetch(f"{image_server.url}/public/redirect-out", access)


def test_unreachable_port(make_settings: Callable[..., Settings], unreachable_url: str) -> None:
    settings = make_settings(label_studio_url=unreachable_url)
    access = LabelStudioAccess(url=unreachable_url, token=SECRET_TOKEN)
    with pytest.raises(ImageUnreachableError, match="ConnectionError"):
        ImageFetcher(settings).fetch("/data/upload/1/a.png", access)


def test_http_error(settings: Settings, access: LabelStudioAccess) -> None:
    with pytest.raises(ImageUnreachableError, match="404"):
        ImageFetcher(settings).fetch("/data/upload/1/missing.png", access)


def test_not_an_image(settings: Settings, access: LabelStudioAccess) -> None:
    with pytest.raises(NotAnImageError, match="not an image"):
        ImageFetcher(settings).fetch("/data/upload/1/notimage.png", access)


def test_png_bomb_is_refused_before_decoding(settings: Settings, access: LabelStudioAccess,
                                            image_server: ImageServer) -> None:
    assert len(image_server.bomb) < 1_000_000
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="IMAGE_MAX_PIXELS"):
        ImageFetcher(settings).fetch("/data/upload/1/bomb.png", access)
    assert time.perf_counter() - started < 5


def test_file_over_the_byte_limit(make_settings: Callable[..., Settings], access: LabelStudioAccess,
                                  image_server: ImageServer) -> None:
    settings = make_settings(image_max_bytes=1024 * 1024, allowed_image_hosts=["127.0.0.1"])
    with pytest.raises(ImageTooLargeError, match="IMAGE_MAX_BYTES"):
        ImageFetcher(settings).fetch(f"{image_server.url}/public/huge.bin", access)


def test_slow_download_hits_the_deadline(make_settings: Callable[..., Settings], access: LabelStudioAccess,
                                         image_server: ImageServer) -> None:
    settings = make_settings(image_download_timeout_s=0.5, allowed_image_hosts=["127.0.0.1"])
    started = time.perf_counter()
    with pytest.raises(ImageUnreachableError):
        ImageFetcher(settings).fetch(f"{image_server.url}/public/slow.png", access)
    assert time.perf_counter() - started < 3


def test_pixel_limit_on_a_local_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(40, 30))
    assert read_image_header(path, 1200) == (40, 30, "PNG")
    with pytest.raises(ImageTooLargeError):
        read_image_header(path, 1199)


def test_unsupported_scheme(settings: Settings, access: LabelStudioAccess) -> None:
    with pytest.raises(DisallowedHostError):
        ImageFetcher(settings).fetch("ftp://example.com/a.png", access)
