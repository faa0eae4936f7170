"""The Label Studio adapter, shaped like ``label_studio_ml``'s 2.x model API.

``AlignSAMModel(services, project_id, label_config)`` is created per request (as ``LabelStudioMLBase`` is) and
offers ``setup(...)``, ``predict(tasks, context) -> predictions in task order`` and ``fit(event, data)``. It owns
no model: predictions come from the injected :class:`~ml_backend.ports.Predictor` and training requests go to
the injected :class:`~ml_backend.ports.TrainingTrigger`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ml_backend.errors import BadRequestError, ImageFetchError, LabelConfigError, MLBackendError
from ml_backend.formats import empty_prediction
from ml_backend.images import (
    FetchedImage,
    ImageFetcher,
    LabelStudioAccess,
    check_setup_hostname,
    image_url_of,
)
from ml_backend.interactive import (
    InteractiveContextError,
    RecentImages,
    is_interactive,
    parse_context,
    prompts_json,
)
from ml_backend.label_config import LabelConfig, config_hash, parse_label_config
from ml_backend.ports import (
    InteractivePredictor,
    PredictionRequest,
    Predictor,
    PredictorUnavailableError,
    TrainingRequest,
    TrainingTrigger,
    TrainingUnavailableError,
    record_training_request,
    untrained_predictor,
)
from ml_backend.settings import Settings
from ml_backend.state import ProjectStore

logger = logging.getLogger(__name__)

MODEL_CLASS = "AlignSAM"

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED")
OTHER_KNOWN_EVENTS = (
    "TASKS_CREATED",
    "TASKS_DELETED",
    "PROJECT_CREATED",
    "PROJECT_UPDATED",
    "PROJECT_DELETED",
    "LABEL_LINK_CREATED",
    "LABEL_LINK_UPDATED",
    "LABEL_LINK_DELETED",
)
TRAINING_EVENT = "START_TRAINING"


@dataclass
class BackendServices:
    """Everything a request needs; one per process (built by ``create_app``)."""

    settings: Settings
    store: ProjectStore
    fetcher: ImageFetcher
    predictor: Predictor = field(default=untrained_predictor)
    training_trigger: TrainingTrigger = field(default=record_training_request)
    interactive: InteractivePredictor | None = None
    recent_images: RecentImages = field(default_factory=RecentImages)


class AlignSAMModel:
    """Label Studio ML-backend model for one project."""

    model_class = MODEL_CLASS

    def __init__(self, services: BackendServices, project_id: int, label_config: str | None = None) -> None:
        self.services = services
        self.project_id = project_id
        self.label_config = label_config

    # --- helpers -------------------------------------------------------------------------------------------
    @property
    def store(self) -> ProjectStore:
        return self.services.store

    def parsed_config(self) -> LabelConfig:
        """This project's config: from ``label_config`` when given (stored if new), else the stored one."""
        if self.label_config:
            extra = self.store.extra_params(self.project_id)
            if self.store.config_hash(self.project_id) == config_hash(self.label_config, extra):
                stored = self.store.config(self.project_id)
                if stored is not None:
                    return stored
            config = parse_label_config(self.label_config, extra)
            self.store.save_config(self.project_id, self.label_config, config)
            return config
        stored = self.store.config(self.project_id)
        if stored is None:
            raise LabelConfigError(
                f"Project {self.project_id} is unknown here and the request has no label config; connect the "
                "model in the project's Model settings so Label Studio calls /setup."
            )
        return stored

    def model_version(self) -> str:
        """The project's current model version (changes when a policy is activated)."""
        return self.store.model_version(self.project_id)

    def access(self) -> LabelStudioAccess:
        """Label Studio URL and token to fetch this project's images with (LABEL_STUDIO_URL and its key when set,
        else the pair /setup stored; see :meth:`LabelStudioAccess.resolve`)."""
        url, token = self.store.label_studio(self.project_id)
        return LabelStudioAccess.resolve(self.services.settings, url, token)

    # --- /setup --------------------------------------------------------------------------------------------
    def setup(
        self,
        project_key: str,
        hostname: str | None,
        access_token: str | None,
        extra_params: Mapping[str, Any] | None,
    ) -> str:
        """Store what /setup sent (the token apart, never logged) and return the model version.

        With LABEL_STUDIO_URL set, ``hostname`` is ignored and a token is stored for LABEL_STUDIO_URL, unless
        LABEL_STUDIO_API_KEY is set too (that key is used, so /setup's token is not stored at all). Without it,
        ``hostname`` must pass :func:`~ml_backend.images.check_setup_hostname` and pairs with the token (see
        :meth:`ProjectStore.save_setup`). Raises :class:`SetupRefusedError` (400, nothing stored) otherwise:
        the token must only ever go to the host it was given for.
        """
        if not self.label_config:
            raise BadRequestError("/setup needs `schema`: the project's labelling config XML.")
        if extra_params is not None and not isinstance(extra_params, Mapping):
            raise BadRequestError("`extra_params` must be a JSON object or null.")
        if hostname is not None and not isinstance(hostname, str):
            raise BadRequestError("`hostname` must be Label Studio's base URL (a string) or null.")
        if access_token is not None and (not isinstance(access_token, str) or not _is_utf8(access_token)):
            raise BadRequestError("`access_token` must be a string (valid UTF-8) or null.")
        config = parse_label_config(self.label_config, extra_params)
        settings = self.services.settings
        token = access_token or None
        if settings.label_studio_url and settings.label_studio_api_key is not None:
            token = None  # the operator's key is the one used: /setup's copy is not kept anywhere
        if settings.label_studio_url:
            ls_url = settings.label_studio_url if token else None  # /setup's hostname is never used then
        elif hostname and hostname.strip():
            ls_url = check_setup_hostname(hostname, settings)
        else:
            ls_url = None
        self.store.save_setup(
            self.project_id,
            project_key=project_key,
            label_config_xml=self.label_config,
            config=config,
            ls_url=ls_url,
            ls_token=token,
            extra_params=extra_params,
        )
        version = self.model_version()
        self.store.note_version(version)
        logger.info(
            "project %s set up: %s %r on <%s>, labels %s, Label Studio at %s, model %s",
            self.project_id,
            config.control_type,
            config.control_name,
            config.image_name,
            config.labels,
            self.access().url,
            version,
        )
        return version

    # --- /predict ------------------------------------------------------------------------------------------
    def predict(
        self, tasks: Sequence[Any], context: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """One prediction per task, in task order. A task whose image cannot be used gets an empty one.

        With a ``context`` (Label Studio's ``params.context``: an annotator's smart-tool clicks), the answer is the
        clicked labels' masks for the one task (:meth:`predict_interactive`).
        """
        config = self.parsed_config()
        version = self.model_version()
        self.store.note_version(version)
        if is_interactive(context):
            return self.predict_interactive(tasks, context, config, version)
        images: list[FetchedImage | None] = self._fetch_images(tasks, config)
        good = [i for i, image in enumerate(images) if image is not None]
        predictions: list[dict[str, Any]] = [empty_prediction(version) for _ in tasks]
        self.store.incr("predict_requests")
        self.store.incr("predict_tasks", len(tasks))
        self.store.incr("predict_task_failures", len(tasks) - len(good))
        if not good:
            return predictions
        request = PredictionRequest(
            project_id=self.project_id,
            config=config,
            model_version=version,
            policy_versions=self.store.policy_versions(self.project_id),
            tasks=[tasks[i] for i in good],
            images=[image for image in images if image is not None],
            context=context if isinstance(context, Mapping) else None,
        )
        try:
            answers = list(self.services.predictor(request))
        except MLBackendError:
            raise
        except Exception as exc:
            logger.exception("project %s: predictor failed", self.project_id)
            raise PredictorUnavailableError(
                f"The predictor failed ({type(exc).__name__}); check the workers' logs. Label Studio will ask "
                "again."
            ) from exc
        if len(answers) != len(good):
            raise PredictorUnavailableError(
                f"The predictor returned {len(answers)} predictions for {len(good)} tasks; check the workers."
            )
        for i, answer in zip(good, answers, strict=True):
            if answer is None:
                continue
            prediction = dict(answer)
            prediction.setdefault("result", [])
            prediction.setdefault("score", 0)
            prediction.setdefault("model_version", version)
            predictions[i] = prediction
        return predictions

    def predict_interactive(
        self, tasks: Sequence[Any], context: Any, config: LabelConfig, version: str
    ) -> list[dict[str, Any]]:
        """The answer to an annotator's clicks: for the request's one task, each clicked label's mask from SAM
        with the clicks (starting from the label's policy when it has one, see :mod:`workers.interactive`).

        Never raises for what the request holds: a malformed context, a click outside the image, an unknown label,
        more than one task, an unusable image or no worker in time each get a log line naming the reason and an
        empty result (Label Studio's editor shows nothing new; the annotator can click again).
        """
        predictions: list[dict[str, Any]] = [empty_prediction(version) for _ in tasks]
        self.store.incr("interactive_requests")
        task_id = tasks[0].get("id") if tasks and isinstance(tasks[0], Mapping) else None
        try:
            if len(tasks) != 1:
                raise InteractiveContextError(f"an interactive request has exactly one task, this one has {len(tasks)}")
            parsed = parse_context(context, config)
        except InteractiveContextError as exc:
            self.store.incr("interactive_failures")
            logger.warning("project %s task %s: interactive request answered empty: %s", self.project_id,
                           ascii(task_id)[:40], exc)
            return predictions
        for reason in parsed.dropped:
            logger.warning("project %s task %s: interactive request: ignored %s", self.project_id,
                           ascii(task_id)[:40], reason)
        if self.services.interactive is None:
            self.store.incr("interactive_failures")
            logger.warning("project %s: interactive request answered empty: clicks need the workers (USE_QUEUE=true)",
                           self.project_id)
            return predictions
        task = tasks[0]
        source = task.get("data", {}).get(config.image_key) if isinstance(task.get("data"), Mapping) else None
        recent = self.services.recent_images
        image = recent.get(self.project_id, source.strip()) if isinstance(source, str) else None
        if image is None:
            image = self._fetch_images(tasks, config)[0]
            if image is None:
                self.store.incr("interactive_failures")
                return predictions
            recent.put(self.project_id, image, source.strip() if isinstance(source, str) else image.source)
        payload = {
            "project": self.project_id,
            "config": config.to_json(),
            "model_version": version,
            "policy_versions": dict(self.store.policy_versions(self.project_id)),
            "task": {"id": task.get("id"), "data": task.get("data")},
            "image": image.to_json(),
            "prompts": prompts_json(parsed.prompts),
        }
        try:
            answer = self.services.interactive(payload)
        except MLBackendError as exc:
            self.store.incr("interactive_failures")
            logger.warning("project %s task %s: interactive request answered empty: %s", self.project_id,
                           ascii(task_id)[:40], exc)
            return predictions
        prediction = dict(answer.get("prediction") or {})
        prediction.setdefault("result", [])
        prediction.setdefault("score", 0)
        prediction.setdefault("model_version", version)
        predictions[0] = prediction
        return predictions

    def _fetch_images(self, tasks: Sequence[Any], config: LabelConfig) -> list[FetchedImage | None]:
        access = self.access()
        fetcher = self.services.fetcher
        budget = self.services.settings.predict_fetch_budget_s
        deadline = time.monotonic() + budget

        def fetch_one(task: Any) -> FetchedImage | None:
            task_id = task.get("id") if isinstance(task, Mapping) else None
            try:
                if time.monotonic() > deadline:
                    raise ImageFetchError(
                        f"Skipped: fetching this request's images took over PREDICT_FETCH_BUDGET_S={budget} s; "
                        "send fewer tasks per request or check the image hosts."
                    )
                if not isinstance(task, Mapping):
                    raise ImageFetchError(f"A task must be a JSON object, got {type(task).__name__}.")
                source = image_url_of(task, config.image_key)
                return fetcher.fetch(source, access, task_id=task_id)
            except ImageFetchError as exc:
                logger.warning(
                    "project %s task %s: empty prediction, %s: %s",
                    self.project_id,
                    task_id,
                    type(exc).__name__,
                    exc,
                )
                return None

        workers = min(self.services.settings.image_fetch_workers, len(tasks))
        if workers <= 1:
            return [fetch_one(task) for task in tasks]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch-image") as pool:
            return list(pool.map(fetch_one, tasks))

    # --- /webhook ------------------------------------------------------------------------------------------
    def fit(self, event: str, data: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Handle a webhook event: record it, update counts, request training. Returns the response body."""
        started = time.perf_counter()
        project = data.get("project")
        if isinstance(project, Mapping):
            self._refresh_config(project)
        summary: dict[str, Any] = {"action": event, "at": time.time()}
        body: dict[str, Any] = {"status": "ok"}
        if event == TRAINING_EVENT:
            body.update(self.request_training(reason=TRAINING_EVENT))
        elif event in ANNOTATION_EVENTS:
            count, ids = self._apply_annotation_event(event, data)
            summary["annotations"] = ids
            body["labelled_tasks"] = count
            auto = self._maybe_auto_train(count)
            if auto:
                body["training"] = auto
        elif event == "TASKS_DELETED":
            ids = _ids(data.get("tasks"))
            summary["tasks"] = ids
            body["labelled_tasks"] = self.store.delete_tasks(self.project_id, ids)
        elif event not in OTHER_KNOWN_EVENTS:
            self.store.incr("webhook_unknown")
            return {"status": "Unknown event"}
        self.store.record_event(self.project_id, summary)
        self.store.incr(f"webhook_{event.lower()}")
        logger.info(
            "project %s: webhook %s handled in %.1f ms", self.project_id, event, 1e3 * (time.perf_counter() - started)
        )
        return body

    def _refresh_config(self, project: Mapping[str, Any]) -> None:
        xml = project.get("label_config")
        if not isinstance(xml, str) or not xml:
            return
        extra = self.store.extra_params(self.project_id)
        if self.store.config_hash(self.project_id) == config_hash(xml, extra):
            return
        try:
            self.store.save_config(self.project_id, xml, parse_label_config(xml, extra))
        except LabelConfigError as exc:
            logger.warning("project %s: webhook carries a config this backend cannot serve: %s", self.project_id, exc)

    def _apply_annotation_event(self, event: str, data: Mapping[str, Any]) -> tuple[int, list[Any]]:
        if event == "ANNOTATIONS_DELETED":
            ids = _ids(data.get("annotations") or data.get("annotation"))
            return self.store.delete_annotations(self.project_id, ids), ids
        annotations = data.get("annotation")
        items: list[Mapping[str, Any]] = (
            [a for a in annotations if isinstance(a, Mapping)]
            if isinstance(annotations, list)
            else [annotations] if isinstance(annotations, Mapping) else []
        )
        if not items:
            raise BadRequestError(f"{event} needs an `annotation` object (or list).")
        return self.store.record_annotations(self.project_id, items), [a.get("id") for a in items]

    def _maybe_auto_train(self, labelled: int) -> dict[str, Any] | None:
        """Request training once, when TRAIN_MIN_TASKS tasks are labelled and nothing was trained."""
        threshold = self.services.settings.train_min_tasks
        if labelled < threshold or self.store.policy_versions(self.project_id):
            return None
        if self.store.training(self.project_id):
            return None
        return self.request_training(reason=f"{labelled} labelled tasks (TRAIN_MIN_TASKS={threshold})")

    def request_training(self, reason: str) -> dict[str, Any]:
        """Hand a training request to the trigger and record the ticket."""
        config = self.store.config(self.project_id)
        status = self.store.status(self.project_id) or {}
        request = TrainingRequest(
            project_id=self.project_id,
            project_key=status.get("project_key"),
            reason=reason,
            labels=config.labels if config else [],
            labelled_task_ids=self.store.labelled_task_ids(self.project_id),
            model_version=self.model_version(),
        )
        try:
            ticket = self.services.training_trigger(request)
        except Exception as exc:
            logger.exception("project %s: training trigger failed", self.project_id)
            self.store.set_training(self.project_id, status="failed", reason=f"trigger failed: {exc}")
            raise TrainingUnavailableError(
                f"Training could not be queued ({type(exc).__name__}); check that Redis and the workers are "
                "up, then press Start Training again."
            ) from exc
        self.store.set_training(
            self.project_id,
            job_id=ticket.job_id,
            status=ticket.status,
            reason=reason,
            requested_at=request.requested_at,
            labelled_tasks=len(request.labelled_task_ids),
        )
        logger.info("project %s: training %s (%s): %s", self.project_id, ticket.status, ticket.job_id, reason)
        return {"job_id": ticket.job_id, "training_status": ticket.status}


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates ("\\ud800") cannot be stored in Redis
        return False
    return True


def _ids(items: Any) -> list[Any]:
    if isinstance(items, Mapping):
        items = [items]
    if not isinstance(items, Iterable) or isinstance(items, str | bytes):
        return []
    return [i.get("id") if isinstance(i, Mapping) else i for i in items if i is not None]
