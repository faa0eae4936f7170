"""Per-project state in Redis, shared by every web process and the workers.

A Label Studio project is identified by its numeric id: ``/setup`` and ``/predict`` send ``"<id>.<created_at>"``,
webhooks send the project object (``{"id": ...}``). The keys are listed in :mod:`ml_backend.keys`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from redis import Redis
from redis.client import Pipeline

from ml_backend.errors import BadRequestError, SetupRefusedError
from ml_backend.keys import Keys, untrained_suffix
from ml_backend.label_config import LabelConfig
from ml_backend.redis_conn import text, text_map
from ml_backend.settings import Settings

MAX_PROJECT_ID = 2**63 - 1
"""Label Studio's project ids are positive database integers; anything larger is not one."""


def project_id_from(value: Any) -> int:
    """Label Studio's project reference -> numeric id: ``"1.1795439330"``, ``1``, ``"1"`` or ``{"id": 1}``.

    Raises:
      BadRequestError: anything else, including ids of more than 18 digits, non-ASCII digits (``"²"``) and
        negative numbers.
    """
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and 0 <= value <= MAX_PROJECT_ID:
        return value
    if isinstance(value, str):
        head = value.split(".", 1)[0].strip()
        if head.isascii() and head.isdigit() and len(head) <= 18:
            return int(head)
    raise BadRequestError(
        f"`project` must be Label Studio's project reference such as \"1.1795439330\" or {{\"id\": 1}}, "
        f"got {value!r:.80}."
    )


class ProjectStore:
    """Typed access to the per-project keys of :mod:`ml_backend.keys`.

    ``zero_shot``: whether this deployment answers untrained labels with zero-shot predictions (the queue with
    ZERO_SHOT on); it sets the model version of a project without a policy (``<prefix>-zeroshot`` or
    ``<prefix>-untrained``).
    """

    def __init__(self, redis: Redis, settings: Settings, *, zero_shot: bool) -> None:
        self.redis = redis
        self.keys = Keys(settings.redis_key_prefix)
        self.version_prefix = settings.model_version_prefix
        self.events_kept = settings.webhook_events_kept
        self.untrained = untrained_suffix(zero_shot)

    # --- setup and config ----------------------------------------------------------------------------------
    def save_setup(
        self,
        pid: int,
        project_key: str,
        label_config_xml: str,
        config: LabelConfig,
        ls_url: str | None,
        ls_token: str | None,
        extra_params: Mapping[str, Any] | None,
    ) -> None:
        """Record what /setup sent. The Label Studio URL and token are one pair: the token is for that URL only.

        A new ``ls_url`` with a new ``ls_token`` replaces both; the same (or no) ``ls_url`` without a token keeps
        the stored token. A new ``ls_url`` without a token, while a URL or token is stored, raises
        :class:`SetupRefusedError` and changes nothing: else a /setup could send the stored token to its host.
        The token goes to the separate secret hash and is never read back out of this class but by
        :meth:`label_studio`.
        """
        project_key_name = self.keys.project(pid)
        secret_key_name = self.keys.secret(pid)
        now = time.time()
        fields: dict[str, Any] = {
            "project_key": project_key,
            "extra_params": json.dumps(extra_params or {}),
            "setup_at": now,
        }

        def write(pipe: Pipeline) -> None:
            stored_url = text(pipe.hget(project_key_name, "ls_url")) or None
            has_token = bool(pipe.hexists(secret_key_name, "ls_token"))
            if ls_url and ls_url != stored_url and not ls_token and (stored_url or has_token):
                raise SetupRefusedError(
                    f"This /setup changes the project's Label Studio URL from {stored_url!r} to {ls_url!r} without "
                    "an `access_token`; the stored token is only for the stored URL. Send the token of the new "
                    "Label Studio with it (connect the model again in the project settings), or set LABEL_STUDIO_URL."
                )
            pipe.multi()
            pipe.sadd(self.keys.projects, pid)
            pipe.hset(project_key_name, mapping={**fields, **({"ls_url": ls_url} if ls_url else {})})
            if ls_token:
                pipe.hset(secret_key_name, mapping={"ls_token": ls_token})

        self.redis.transaction(write, project_key_name, secret_key_name)
        self.save_config(pid, label_config_xml, config)

    def save_config(self, pid: int, label_config_xml: str, config: LabelConfig) -> None:
        """Record the project's label config (from /setup, /predict or a webhook's project object)."""
        pipe = self.redis.pipeline()
        pipe.sadd(self.keys.projects, pid)
        pipe.hset(
            self.keys.project(pid),
            mapping={
                "label_config": label_config_xml,
                "config": json.dumps(config.to_json()),
                "labels": json.dumps(config.labels),
                "config_hash": config.config_hash,
                "updated_at": time.time(),
            },
        )
        pipe.execute()

    def config_hash(self, pid: int) -> str | None:
        """Hash of the stored config, to skip re-parsing an unchanged config."""
        return text(self.redis.hget(self.keys.project(pid), "config_hash"))

    def config(self, pid: int) -> LabelConfig | None:
        """The stored parsed config, if any."""
        raw = text(self.redis.hget(self.keys.project(pid), "config"))
        return LabelConfig.from_json(json.loads(raw)) if raw else None

    def extra_params(self, pid: int) -> dict[str, Any]:
        """The ``extra_params`` of the last /setup."""
        raw = text(self.redis.hget(self.keys.project(pid), "extra_params"))
        return json.loads(raw) if raw else {}

    def label_studio(self, pid: int) -> tuple[str | None, str | None]:
        """(URL, token) /setup sent for this project. For image fetching only; never return it from a route."""
        url = text(self.redis.hget(self.keys.project(pid), "ls_url")) or None
        token = text(self.redis.hget(self.keys.secret(pid), "ls_token")) or None
        return url, token

    # --- annotations ---------------------------------------------------------------------------------------
    def record_annotations(self, pid: int, annotations: Iterable[Mapping[str, Any]]) -> int:
        """Count non-cancelled annotations (by id -> task id); cancelled ones are removed. Returns the count
        of labelled tasks."""
        add: dict[str, str] = {}
        remove: list[str] = []
        for ann in annotations:
            if not isinstance(ann, Mapping) or ann.get("id") is None:
                continue
            task = ann.get("task")
            task_id = task.get("id") if isinstance(task, Mapping) else task
            if ann.get("was_cancelled") or task_id is None:
                remove.append(str(ann["id"]))
            else:
                add[str(ann["id"])] = str(task_id)
        pipe = self.redis.pipeline()
        pipe.sadd(self.keys.projects, pid)
        if add:
            pipe.hset(self.keys.annotations(pid), mapping=add)
        if remove:
            pipe.hdel(self.keys.annotations(pid), *remove)
        pipe.execute()
        return self.labelled_count(pid)

    def delete_annotations(self, pid: int, annotation_ids: Iterable[Any]) -> int:
        """Forget deleted annotations; returns the count of labelled tasks."""
        ids = [str(i) for i in annotation_ids if i is not None]
        if ids:
            self.redis.hdel(self.keys.annotations(pid), *ids)
        return self.labelled_count(pid)

    def delete_tasks(self, pid: int, task_ids: Iterable[Any]) -> int:
        """Forget the annotations of deleted tasks; returns the count of labelled tasks."""
        gone = {str(t) for t in task_ids if t is not None}
        raw = text_map(self.redis.hgetall(self.keys.annotations(pid)))
        stale = [ann for ann, task in raw.items() if task in gone]
        if stale:
            self.redis.hdel(self.keys.annotations(pid), *stale)
        return self.labelled_count(pid)

    def labelled_task_ids(self, pid: int) -> list[int]:
        """Ids of the tasks with at least one non-cancelled annotation seen, sorted."""
        values = {text(v) for v in self.redis.hvals(self.keys.annotations(pid))}
        return sorted(int(v) for v in values if v and v.isdigit())

    def labelled_count(self, pid: int) -> int:
        """Number of labelled tasks seen through webhooks."""
        return len(self.labelled_task_ids(pid))

    # --- policies and model versions -----------------------------------------------------------------------
    def set_policy_version(self, pid: int, label: str, version: str) -> str:
        """Activate a policy version for one label; returns the project's new model version."""
        self.redis.hset(self.keys.policies(pid), label, version)
        model_version = self.model_version(pid)
        self.redis.sadd(self.keys.versions, model_version)
        return model_version

    def policy_versions(self, pid: int) -> dict[str, str]:
        """Active policy version per label."""
        return text_map(self.redis.hgetall(self.keys.policies(pid)))

    def model_version(self, pid: int) -> str:
        """``<prefix>-untrained`` (``<prefix>-zeroshot`` with zero-shot predictions) until a policy is active,
        then ``<prefix>-`` and a short hash of the active policy versions."""
        policies = self.policy_versions(pid)
        if not policies:
            return self.untrained_version()
        digest = hashlib.sha256(json.dumps(sorted(policies.items())).encode()).hexdigest()[:10]
        return f"{self.version_prefix}-{digest}"

    def untrained_version(self) -> str:
        """The model version of a project without an active policy."""
        return f"{self.version_prefix}-{self.untrained}"

    def note_version(self, model_version: str) -> None:
        """Remember a model version reported to Label Studio (listed by /versions)."""
        self.redis.sadd(self.keys.versions, model_version)

    def versions(self) -> list[str]:
        """Every model version reported, sorted."""
        return sorted(str(text(v)) for v in self.redis.smembers(self.keys.versions))

    # --- training ------------------------------------------------------------------------------------------
    def set_training(self, pid: int, **fields: Any) -> None:
        """Update the training record (``job_id``, ``status``, ``reason``, ...)."""
        clean = {k: ("" if v is None else v) for k, v in fields.items()}
        clean["updated_at"] = time.time()
        self.redis.hset(self.keys.training(pid), mapping=clean)

    def training(self, pid: int) -> dict[str, str]:
        """The training record (empty when training was never requested)."""
        return text_map(self.redis.hgetall(self.keys.training(pid)))

    # --- events and metrics ----------------------------------------------------------------------------------
    def record_event(self, pid: int, event: Mapping[str, Any]) -> None:
        """Append a small event summary (no payloads, no tokens), keeping the last ``events_kept``."""
        if self.events_kept <= 0:
            return
        pipe = self.redis.pipeline()
        pipe.lpush(self.keys.events(pid), json.dumps(dict(event), default=str))
        pipe.ltrim(self.keys.events(pid), 0, self.events_kept - 1)
        pipe.execute()

    def events(self, pid: int, limit: int = 20) -> list[dict[str, Any]]:
        """Most recent events first."""
        return [json.loads(str(text(e))) for e in self.redis.lrange(self.keys.events(pid), 0, limit - 1)]

    def incr(self, counter: str, by: int = 1) -> None:
        """Increase a /metrics counter."""
        self.redis.hincrby(self.keys.metrics, counter, by)

    def metrics(self) -> dict[str, int]:
        """All counters."""
        return {k: int(v) for k, v in text_map(self.redis.hgetall(self.keys.metrics)).items()}

    def project_ids(self) -> list[int]:
        """Every project seen."""
        return sorted(int(str(text(v))) for v in self.redis.smembers(self.keys.projects))

    def status(self, pid: int) -> dict[str, Any] | None:
        """Project state for display: everything except the token. ``None`` for an unknown project."""
        raw = text_map(self.redis.hgetall(self.keys.project(pid)))
        if not raw:
            return None
        return {
            "project": pid,
            "project_key": raw.get("project_key"),
            "label_studio_url": raw.get("ls_url") or None,
            "has_token": bool(self.redis.hexists(self.keys.secret(pid), "ls_token")),
            "labels": json.loads(raw.get("labels", "[]")),
            "config": json.loads(raw["config"]) if raw.get("config") else None,
            "extra_params": json.loads(raw.get("extra_params", "{}")),
            "labelled_tasks": self.labelled_count(pid),
            "policy_versions": self.policy_versions(pid),
            "model_version": self.model_version(pid),
            "training": self.training(pid),
            "recent_events": self.events(pid, 10),
        }
