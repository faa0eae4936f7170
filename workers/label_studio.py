"""Label Studio API access for jobs, through ``label-studio-sdk``, with retries and backoff.

Calls used: ``tasks.list`` (``GET /api/tasks/?project=&fields=all&page=&page_size=``) and
``projects.import_predictions`` (``POST /api/projects/<id>/import/predictions``). Connection errors, timeouts,
429 and 5xx answers are retried ``LS_API_RETRIES`` times, waiting ``LS_API_BACKOFF_S`` then twice as long each
time; then :class:`LabelStudioApiError` says what failed (never with the token).

A failed import may still have been saved: Label Studio can store the batch and then answer 5xx, or the answer
can time out after the write. Label Studio has no idempotency key for imports, so before re-sending a batch after
a failure, :meth:`LabelStudioClient.import_predictions` re-reads the project's tasks (the same ``tasks.list`` call)
and sends only the tasks that still have no prediction of that model version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import httpx
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from ml_backend.images import LabelStudioAccess
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class LabelStudioApiError(RuntimeError):
    """Label Studio's API kept failing (or refused us); the message says which call and why."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.status_code is None or exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError)


def with_retries(settings: Settings, what: str, call: Callable[[], T],
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried with exponential backoff on transient failures."""
    delay = settings.ls_api_backoff_s
    for attempt in range(settings.ls_api_retries + 1):
        try:
            return call()
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            if not _retryable(exc) or attempt == settings.ls_api_retries:
                detail = f"HTTP {status}" if status is not None else type(exc).__name__
                raise LabelStudioApiError(
                    f"Label Studio API {what} failed after {attempt + 1} tries ({detail}); check LABEL_STUDIO_URL, "
                    "the API token and that Label Studio is up, then retry the job."
                ) from exc
            logger.warning("Label Studio API %s failed (%s); retry %d in %.1f s", what,
                           status or type(exc).__name__, attempt + 1, delay)
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class LabelStudioClient:
    """The few Label Studio calls the jobs make."""

    def __init__(self, access: LabelStudioAccess, settings: Settings) -> None:
        if not access.url or not access.token:
            raise LabelStudioApiError(
                "Label Studio's URL or API token is unknown: connect the model in the project's Model settings "
                "(Label Studio then calls /setup), or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY."
            )
        self.settings = settings
        # Retries are ours (with_retries), so the SDK's own are off.
        self.client = LabelStudio(base_url=access.url, api_key=access.token, timeout=settings.ls_api_timeout_s,
                                  max_retries=0)

    def tasks(self, project_id: int, only_annotated: bool = False, page_size: int = 100) -> list[dict[str, Any]]:
        """Every task of the project (with annotations and predictions) as plain dicts."""

        return with_retries(self.settings, f"list tasks of project {project_id}",
                            lambda: self._read_tasks(project_id, only_annotated, page_size))

    def _read_tasks(self, project_id: int, only_annotated: bool = False, page_size: int = 100) -> list[dict[str, Any]]:
        """One try of :meth:`tasks` (the callers retry)."""
        pager = self.client.tasks.list(project=project_id, fields="all", page_size=page_size,
                                       only_annotated=only_annotated or None)
        return [_plain(task) for task in pager]

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int:
        """Create predictions (each with ``task`` and ``model_version``) in one call, retried without duplicates.

        A retry after a failed call first re-reads the project's tasks and drops every prediction whose task now
        has one of that ``model_version`` (the failed call was saved after all), so a task never gets a second
        prediction of one version from this call. Returns how many of ``predictions`` are in Label Studio now
        (created by the last call, or found saved by an earlier one).
        """
        pending = [dict(p) for p in predictions]
        saved_earlier = 0
        tried = False

        def send() -> int:
            nonlocal pending, saved_earlier, tried
            if tried:
                # A transient failure here is retried like the import itself (and checks again next time).
                have = self._tasks_with_versions(project_id, {int(p["task"]) for p in pending})
                still = [p for p in pending if str(p.get("model_version")) not in have.get(int(p["task"]), set())]
                if len(still) < len(pending):
                    logger.warning("project %s: %d of %d predictions of the failed import were saved anyway; "
                                   "re-sending the other %d", project_id, len(pending) - len(still), len(pending),
                                   len(still))
                saved_earlier += len(pending) - len(still)
                pending = still
                if not pending:
                    return saved_earlier
            tried = True
            response = self.client.projects.import_predictions(id=project_id, request=pending)
            created = getattr(response, "created", None)
            return saved_earlier + (int(created) if created is not None else len(pending))

        return with_retries(self.settings, f"import {len(predictions)} predictions into project {project_id}", send)

    def _tasks_with_versions(self, project_id: int, task_ids: set[int]) -> dict[int, set[str]]:
        """model_versions of the predictions of ``task_ids``, read now (one try: the caller retries)."""
        return {int(t["id"]): prediction_versions(t) for t in self._read_tasks(project_id)
                if int(t.get("id") or 0) in task_ids}


def _plain(task: Any) -> dict[str, Any]:
    if isinstance(task, Mapping):
        return dict(task)
    dump = getattr(task, "model_dump", None) or getattr(task, "dict", None)
    return dict(dump()) if dump is not None else dict(task)


def human_annotations(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The task's annotations that count as labels (not cancelled/skipped), newest first."""
    anns = [a for a in (task.get("annotations") or []) if isinstance(a, Mapping) and not a.get("was_cancelled")]
    return sorted((dict(a) for a in anns), key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or 0),
                  reverse=True)


def prediction_versions(task: Mapping[str, Any]) -> set[str]:
    """model_version of every prediction the task already has."""
    out = set()
    for p in task.get("predictions") or []:
        version = p.get("model_version") if isinstance(p, Mapping) else getattr(p, "model_version", None)
        if version:
            out.add(str(version))
    return out


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
