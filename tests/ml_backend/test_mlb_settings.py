"""Settings come from environment variables; secrets never print."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ml_backend.settings import Settings

ENV_VARS = [
    "LABEL_STUDIO_URL",
    "LABEL_STUDIO_API_KEY",
    "REDIS_URL",
    "MODEL_DIR",
    "BASIC_AUTH_USER",
    "BASIC_AUTH_PASS",
    "WEBHOOK_SECRET",
    "ALLOWED_IMAGE_HOSTS",
    "PORT",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.port == 9090
    assert settings.redis_url is None and settings.redis_db_file == Path("run/models/redis.db")
    assert not settings.basic_auth_enabled
    assert settings.allowed_image_hosts == []


def test_environment_is_read(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("LABEL_STUDIO_URL", "http://label-studio:8080/")
    clean_env.setenv("LABEL_STUDIO_API_KEY", "key-123")
    clean_env.setenv("MODEL_DIR", str(tmp_path))
    clean_env.setenv("BASIC_AUTH_USER", "ls")
    clean_env.setenv("BASIC_AUTH_PASS", "pw")
    clean_env.setenv("ALLOWED_IMAGE_HOSTS", "images.example.com, *.cdn.example.org,minio:9000")
    clean_env.setenv("PORT", "9999")
    settings = Settings()
    assert settings.label_studio_url == "http://label-studio:8080"
    assert settings.model_dir == tmp_path and settings.port == 9999
    assert settings.basic_auth_enabled
    assert settings.allowed_image_hosts == ["images.example.com", "*.cdn.example.org", "minio:9000"]
    assert "key-123" not in repr(settings) and "key-123" not in str(settings)
    assert "pw" not in repr(settings.basic_auth_pass)


def test_bad_label_studio_url_says_what_to_write(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LABEL_STUDIO_URL", "label-studio:8080")
    with pytest.raises(ValidationError, match="full URL"):
        Settings()


def test_basic_auth_needs_both_user_and_password(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BASIC_AUTH_USER", "ls")
    assert not Settings().basic_auth_enabled


def test_env_example_lists_every_setting() -> None:
    example = (Path(__file__).parents[2] / "deploy" / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"{name.upper()}=" in example, f"{name.upper()} missing from deploy/.env.example"


def test_readme_lists_every_setting() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in readme, f"{name.upper()} missing from README.md (python -m ml_backend.settings)"
