"""``GET /pictures/<project>/<label slug>/<file>``: the pictures a worker drew at the end of a training, served
read-only from ``MODEL_DIR/policies`` as ``image/png``; anything else (other files, ``..``, absolute paths, links
out of the folder, unknown projects) is a 404 JSON answer, never a 500; basic auth applies as for ``/ui``.
``tests/workers/test_wk_pictures.py`` serves the pictures of a real training."""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from mlb_helpers import fixture_body
from PIL import Image

from ml_backend.app import services_of
from ml_backend.files import label_slug, picture_file
from ml_backend.settings import Settings

PROJECT = 1
VERSION = "20261202-010203-aaaa1111"


def _png(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 20), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def pictured(app: Flask, settings: Settings) -> tuple[FlaskClient, Path]:
    """A connected project 1 whose label Shape has version VERSION active, with both pictures on disk."""
    client = app.test_client()
    assert client.post("/setup", json=fixture_body("setup")).status_code == 200
    services_of(app).store.set_policy_version(PROJECT, "Shape", VERSION)
    folder = settings.policy_dir / str(PROJECT) / label_slug("Shape")
    folder.mkdir(parents=True)
    for kind in ("gallery", "curve"):
        (folder / f"{VERSION}.{kind}.png").write_bytes(_png())
    (folder / f"{VERSION}.json").write_text('{"val_metrics": {"miou": 0.5}}')
    (folder / f"{VERSION}.pt").write_bytes(b"weights")
    return client, folder


def _assert_404(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code, response.data[:200])
    assert response.content_type == "application/json", path
    assert b"weights" not in response.data and b"val_metrics" not in response.data


def test_a_picture_is_served_as_png_with_nosniff(pictured: tuple[FlaskClient, Path]) -> None:
    client, folder = pictured
    for kind in ("gallery", "curve"):
        response = client.get(f"/pictures/{PROJECT}/{folder.name}/{VERSION}.{kind}.png")
        assert response.status_code == 200
        assert response.content_type == "image/png"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.data == (folder / f"{VERSION}.{kind}.png").read_bytes()
        with Image.open(io.BytesIO(response.data)) as picture:
            assert picture.size == (40, 20)


def test_the_status_page_links_the_active_versions_pictures(pictured: tuple[FlaskClient, Path]) -> None:
    client, folder = pictured
    html = client.get("/ui").get_data(as_text=True)
    match = re.search(r'<div class="pictures" data-label="Shape">(.*?)</div>', html, re.S)
    assert match, html
    sources = re.findall(r'<img class="picture-(\w+)" src="([^"]+)"', match.group(1))
    assert sources == [("gallery", f"pictures/{PROJECT}/{folder.name}/{VERSION}.gallery.png"),
                       ("curve", f"pictures/{PROJECT}/{folder.name}/{VERSION}.curve.png")]
    for _, src in sources:  # relative to /ui
        assert client.get(f"/{src}").content_type == "image/png"
    assert re.findall(r'<div class="pictures" data-label="([^"]+)"', html) == ["Shape"]  # Shadow has none


def test_a_label_without_pictures_shows_none(pictured: tuple[FlaskClient, Path]) -> None:
    client, folder = pictured
    for kind in ("gallery", "curve"):
        (folder / f"{VERSION}.{kind}.png").unlink()
    html = client.get("/ui").get_data(as_text=True)
    assert 'class="pictures"' not in html and "picture-gallery" not in html


def test_other_files_and_paths_out_of_the_folder_are_404(pictured: tuple[FlaskClient, Path], settings: Settings,
                                                         tmp_path: Path) -> None:
    client, folder = pictured
    slug = folder.name
    outside = tmp_path / "secret.gallery.png"
    outside.write_bytes(b"weights: a file outside the policy folder")
    (folder / f"link-{VERSION}.gallery.png").symlink_to(outside)
    (settings.policy_dir / str(PROJECT) / "linked-abcdef").symlink_to(tmp_path, target_is_directory=True)
    (folder / "dir.gallery.png").mkdir()
    for path in [
        f"/pictures/{PROJECT}/{slug}/{VERSION}.pt",  # the bundle
        f"/pictures/{PROJECT}/{slug}/{VERSION}.json",
        f"/pictures/{PROJECT}/{slug}/{VERSION}.png",  # not a picture kind
        f"/pictures/{PROJECT}/{slug}/{VERSION}.gallery.png.pt",
        f"/pictures/{PROJECT}/{slug}/{VERSION}.gallery.jpg",
        f"/pictures/{PROJECT}/{slug}/missing.gallery.png",
        f"/pictures/{PROJECT}/{slug}/dir.gallery.png",  # a folder with a picture's name
        f"/pictures/{PROJECT}/{slug}/.{VERSION}.gallery.png",
        f"/pictures/{PROJECT}/{slug}/link-{VERSION}.gallery.png",  # a link leading outside
        f"/pictures/{PROJECT}/linked-abcdef/secret.gallery.png",  # a linked folder leading outside
        f"/pictures/{PROJECT}/../{slug}/{VERSION}.gallery.png",
        f"/pictures/{PROJECT}/../../secret.gallery.png",
        f"/pictures/{PROJECT}/{slug}/..%2F..%2F..%2Fsecret.gallery.png",
        f"/pictures/{PROJECT}/%2E%2E/{VERSION}.gallery.png",
        f"/pictures/{PROJECT}/{slug}%2F..%2F{slug}/{VERSION}.gallery.png",
        f"/pictures/{PROJECT}/{slug}/%2Fetc%2Fpasswd.gallery.png",
        f"/pictures/{PROJECT}//{outside}",  # an absolute path
        f"/pictures/{PROJECT}/{slug}/{outside}",
        f"/pictures/{PROJECT}/{slug}/{VERSION}.gallery.png%00.pt",
        f"/pictures/{PROJECT}/{slug}",
        f"/pictures/2/{slug}/{VERSION}.gallery.png",  # an unknown project
        f"/pictures/-1/{slug}/{VERSION}.gallery.png",
        f"/pictures/99999999999999999999999/{slug}/{VERSION}.gallery.png",
        f"/pictures/x/{slug}/{VERSION}.gallery.png",
    ]:
        _assert_404(client, path)


def test_the_resolver_never_answers_outside_the_policy_folder(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    (root / "1" / "Shape-abc123").mkdir(parents=True)
    good = root / "1" / "Shape-abc123" / "v1.curve.png"
    good.write_bytes(_png())
    assert picture_file(root, 1, "Shape-abc123", "v1.curve.png") == good.resolve()
    (tmp_path / "v1.curve.png").write_bytes(_png())
    os.symlink(tmp_path, root / "1" / "up-abc123")
    for slug, name in [("..", "v1.curve.png"), (".", "v1.curve.png"), ("up-abc123", "v1.curve.png"),
                       ("Shape-abc123", "../v1.curve.png"), ("Shape-abc123/..", "v1.curve.png"),
                       (str(tmp_path), "v1.curve.png"), ("Shape-abc123", "v1.CURVE.PNG")]:
        assert picture_file(root, 1, slug, name) is None, (slug, name)


def test_pictures_need_basic_auth(make_app: Callable[..., Flask], make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(basic_auth_user="ops", basic_auth_pass="s3cret")
    client = make_app(settings).test_client()
    auth = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()}
    assert client.post("/setup", json=fixture_body("setup"), headers=auth).status_code == 200
    folder = settings.policy_dir / str(PROJECT) / label_slug("Shape")
    folder.mkdir(parents=True)
    (folder / f"{VERSION}.curve.png").write_bytes(_png())
    path = f"/pictures/{PROJECT}/{folder.name}/{VERSION}.curve.png"
    assert client.get(path).status_code == 401
    assert client.get(path, headers=auth).content_type == "image/png"
