"""The backend's two ports to the model side: the predictor and the training trigger.

Both are plain callables injected into :func:`ml_backend.app.create_app` (``predictor=``, ``training_trigger=``):
the RQ implementations are in :mod:`ml_backend.job_queue`; the protocol code knows only these types.

- :class:`Predictor` receives a :class:`PredictionRequest` (project id, parsed config, model version,
  the tasks whose image was fetched and checked, the image files, the interactive context) and returns one
  Label Studio prediction per task, in order (``{"result": [...], "score": s, "model_version": v}``, or
  ``None`` for "nothing found"). Build results with :func:`ml_backend.formats.masks_to_results` and
  :func:`ml_backend.formats.task_prediction`. Raise :class:`PredictorUnavailableError` when the model side
  cannot answer (queue down, timeout): ``/predict`` then answers 503 and Label Studio stores nothing, so it asks
  again later, instead of caching empty predictions under the current model version.
- :class:`TrainingTrigger` receives a :class:`TrainingRequest` and returns a :class:`TrainingTicket` (job id and
  status), which is recorded in the project's training state. It must return quickly (START_TRAINING and
  annotation webhooks are answered within Label Studio's 1 s webhook timeout).

- :class:`InteractivePredictor` receives an interactive request (one task, its fetched image, the annotator's
  prompts per label as :class:`~ml_backend.interactive.LabelPrompt` JSON) and returns ``{"prediction": {...},
  "timings": {...}}``; the queue's is :class:`~ml_backend.interactive.InteractiveClient`. ``None`` (no queue): clicks
  get an empty answer and a log line.

Without the queue (``USE_QUEUE=false``): :func:`untrained_predictor` (empty predictions, ``<prefix>-untrained``) and
:func:`record_training_request` (records the request; nothing runs).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ml_backend.errors import MLBackendError
from ml_backend.formats import empty_prediction
from ml_backend.images import FetchedImage
from ml_backend.label_config import LabelConfig


class PredictorUnavailableError(MLBackendError):
    """The model side cannot answer now (queue down, worker timeout). Label Studio will ask again later."""

    http_status = 503


class TrainingUnavailableError(MLBackendError):
    """Training could not be queued now. Press Start Training again once the queue is up."""

    http_status = 503


@dataclass(frozen=True)
class PredictionRequest:
    """What a predictor needs for one ``/predict`` call (only the tasks whose image could be used)."""

    project_id: int
    config: LabelConfig
    model_version: str
    policy_versions: Mapping[str, str]
    tasks: Sequence[Mapping[str, Any]]
    images: Sequence[FetchedImage]
    context: Mapping[str, Any] | None = None


class Predictor(Protocol):
    """``predictor(request) -> one prediction (or None) per request task, in order``."""

    def __call__(self, request: PredictionRequest) -> Sequence[Mapping[str, Any] | None]: ...


def untrained_predictor(request: PredictionRequest) -> list[dict[str, Any]]:
    """The predictor without the queue: every task gets an empty prediction."""
    return [empty_prediction(request.model_version) for _ in request.tasks]


@dataclass(frozen=True)
class TrainingRequest:
    """Why and what to train for one project."""

    project_id: int
    project_key: str | None
    reason: str
    labels: Sequence[str]
    labelled_task_ids: Sequence[int]
    model_version: str
    requested_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class TrainingTicket:
    """What the trigger did: a job id (the RQ job's with the queue) and a status word."""

    job_id: str
    status: str


class InteractivePredictor(Protocol):
    """``interactive(payload) -> {"prediction": {...}, "timings": {...}}``; raises MLBackendError when it cannot."""

    def __call__(self, payload: Mapping[str, Any]) -> Mapping[str, Any]: ...


class TrainingTrigger(Protocol):
    """``trigger(request) -> TrainingTicket``; must return within milliseconds."""

    def __call__(self, request: TrainingRequest) -> TrainingTicket: ...


def record_training_request(request: TrainingRequest) -> TrainingTicket:
    """The trigger without the queue: nothing runs; the request is recorded with status ``requested``."""
    return TrainingTicket(job_id=f"requested-{uuid.uuid4().hex[:12]}", status="requested")
