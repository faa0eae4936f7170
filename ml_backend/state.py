"""Per-project state in Redis, shared by every web process and (later) the workers.

A Label Studio project is identified by its numeric id: ``/setup`` and ``/predict`` send ``"<id>.<created_at>"``,
webhooks send the project object (``{"id": ...}``). Keys, with ``P = REDIS_KEY_PREFIX`` (``alignsam``):

=====================================  ================================================================
``P:projects``                          set of project ids seen
``P:project:<id>``                      hash: project key, Label Studio URL, label config XML, parsed
                                        config and labels (JSON), extra params, setup time
``P:project:<id>:secret``               hash: the Label Studio token from /setup. Kept apart so nothing
                                        that reads project state for display can return it.
``P:project:<id>:annotations``          hash: annotation id -> task id (non-cancelled annotations seen)
``P:project:<id>:policies``             hash: label -> active policy version
``P:project:<id>:training``             hash: job id, status, reason, requested/updated times
``P:project:<id>:events``               list: recent webhook events (action, ids, time; never payloads)
``P:versions``                          set of model versions ever reported
``P:metrics``                           hash: counters shown by ``GET /metrics``
=====================================  ================================================================

The connection may return bytes (``decode_responses=False``, which RQ needs) or str; both are handled.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from redis import Redis

from ml_backend.errors import BadRequestError
from ml_backend.label_config import LabelConfig

UNTRAINED = "untrained"


def project_id_from(value: Any) -> int:
    """Label Studio's project reference -> numeric id: ``"1.1795439330"``, ``1``, ``"1"`` or ``{"id": 1}``."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        head = value.split(".", 1)[0].strip()
        if head.isdigit():
            return int(head)
    raise BadRequestError(
        f"`project` must be Label Studio's project reference such as \"1.1795439330\" or {{\"id\": 1}}, "
        f"got {value!r:.80}."
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _text_map(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {str(_text(k)): str(_text(v)) for k, v in raw.items()}


class ProjectStore:
    """Typed access to the Redis keys above."""

    def __init__(self, redis: Redis, prefix: str = "alignsam", version_prefix: str = "alignsam",
                 events_kept: int = 200, untrained: str = UNTRAINED) -> None:
        self.redis = redis
        self.untrained = untrained
        self.prefix = prefix
        self.version_prefix = version_prefix
        self.events_kept = events_kept

    # --- keys ----------------------------------------------------------------------------------------------
    def _key(self, pid: int, part: str = "") -> str:
        return f"{self.prefix}:project:{pid}" + (f":{part}" if part else "")

    @property
    def _projects_key(self) -> str:
        return f"{self.prefix}:projects"

    @property
    def _versions_key(self) -> str:
        return f"{self.prefix}:versions"

    @property
    def _metrics_key(self) -> str:
        return f"{self.prefix}:metrics"

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
        """Record what /setup sent. The token goes to the separate secret hash and is never read back out."""
        now = time.time()
        fields: dict[str, Any] = {
            "project_key": project_key,
            "extra_params": json.dumps(extra_params or {}),
            "setup_at": now,
        }
        if ls_url:  # a /setup without `hostname` keeps the URL an earlier one gave
            fields["ls_url"] = ls_url
        pipe = self.redis.pipeline()
        pipe.sadd(self._projects_key, pid)
        pipe.hset(self._key(pid), mapping=fields)
        if ls_token:
            pipe.hset(self._key(pid, "secret"), mapping={"ls_token": ls_token})
        pipe.execute()
        self.save_config(pid, label_config_xml, config)

    def save_config(self, pid: int, label_config_xml: str, config: LabelConfig) -> None:
        """Record the project's label config (from /setup, /predict or a webhook's project object)."""
        pipe = self.redis.pipeline()
        pipe.sadd(self._projects_key, pid)
        pipe.hset(
            self._key(pid),
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
        return _text(self.redis.hget(self._key(pid), "config_hash"))

    def config(self, pid: int) -> LabelConfig | None:
        """The stored parsed config, if any."""
        raw = _text(self.redis.hget(self._key(pid), "config"))
        return LabelConfig.from_json(json.loads(raw)) if raw else None

    def extra_params(self, pid: int) -> dict[str, Any]:
        """The ``extra_params`` of the last /setup."""
        raw = _text(self.redis.hget(self._key(pid), "extra_params"))
        return json.loads(raw) if raw else {}

    def label_studio(self, pid: int) -> tuple[str | None, str | None]:
        """(URL, token) /setup sent for this project. For image fetching only; never return it from a route."""
        url = _text(self.redis.hget(self._key(pid), "ls_url")) or None
        token = _text(self.redis.hget(self._key(pid, "secret"), "ls_token")) or None
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
        pipe.sadd(self._projects_key, pid)
        if add:
            pipe.hset(self._key(pid, "annotations"), mapping=add)
        if remove:
            pipe.hdel(self._key(pid, "annotations"), *remove)
        pipe.execute()
        return self.labelled_count(pid)

    def delete_annotations(self, pid: int, annotation_ids: Iterable[Any]) -> int:
        """Forget deleted annotations; returns the count of labelled tasks."""
        ids = [str(i) for i in annotation_ids if i is not None]
        if ids:
            self.redis.hdel(self._key(pid, "annotations"), *ids)
        return self.labelled_count(pid)

    def delete_tasks(self, pid: int, task_ids: Iterable[Any]) -> int:
        """Forget the annotations of deleted tasks; returns the count of labelled tasks."""
        gone = {str(t) for t in task_ids if t is not None}
        raw = _text_map(self.redis.hgetall(self._key(pid, "annotations")))
        stale = [ann for ann, task in raw.items() if task in gone]
        if stale:
            self.redis.hdel(self._key(pid, "annotations"), *stale)
        return self.labelled_count(pid)

    def labelled_task_ids(self, pid: int) -> list[int]:
        """Ids of the tasks with at least one non-cancelled annotation seen, sorted."""
        values = {_text(v) for v in self.redis.hvals(self._key(pid, "annotations"))}
        return sorted(int(v) for v in values if v and v.isdigit())

    def labelled_count(self, pid: int) -> int:
        """Number of labelled tasks seen through webhooks."""
        return len(self.labelled_task_ids(pid))

    # --- policies and model versions -----------------------------------------------------------------------
    def set_policy_version(self, pid: int, label: str, version: str) -> str:
        """Activate a policy version for one label; returns the project's new model version."""
        self.redis.hset(self._key(pid, "policies"), label, version)
        model_version = self.model_version(pid)
        self.redis.sadd(self._versions_key, model_version)
        return model_version

    def policy_versions(self, pid: int) -> dict[str, str]:
        """Active policy version per label."""
        return _text_map(self.redis.hgetall(self._key(pid, "policies")))

    def model_version(self, pid: int) -> str:
        """``<prefix>-untrained`` (``<prefix>-zeroshot`` with zero-shot predictions) until a policy is active,
        then ``<prefix>-`` and a short hash of the active policy versions."""
        policies = self.policy_versions(pid)
        if not policies:
            return f"{self.version_prefix}-{self.untrained}"
        digest = hashlib.sha256(json.dumps(sorted(policies.items())).encode()).hexdigest()[:10]
        return f"{self.version_prefix}-{digest}"

    def note_version(self, model_version: str) -> None:
        """Remember a model version reported to Label Studio (listed by /versions)."""
        self.redis.sadd(self._versions_key, model_version)

    def versions(self) -> list[str]:
        """Every model version reported, sorted."""
        return sorted(str(_text(v)) for v in self.redis.smembers(self._versions_key))

    # --- training ------------------------------------------------------------------------------------------
    def set_training(self, pid: int, **fields: Any) -> None:
        """Update the training record (``job_id``, ``status``, ``reason``, ...)."""
        clean = {k: ("" if v is None else v) for k, v in fields.items()}
        clean["updated_at"] = time.time()
        self.redis.hset(self._key(pid, "training"), mapping=clean)

    def training(self, pid: int) -> dict[str, str]:
        """The training record (empty when training was never requested)."""
        return _text_map(self.redis.hgetall(self._key(pid, "training")))

    # --- events and metrics ----------------------------------------------------------------------------------
    def record_event(self, pid: int, event: Mapping[str, Any]) -> None:
        """Append a small event summary (no payloads, no tokens), keeping the last ``events_kept``."""
        if self.events_kept <= 0:
            return
        pipe = self.redis.pipeline()
        pipe.lpush(self._key(pid, "events"), json.dumps(dict(event), default=str))
        pipe.ltrim(self._key(pid, "events"), 0, self.events_kept - 1)
        pipe.execute()

    def events(self, pid: int, limit: int = 20) -> list[dict[str, Any]]:
        """Most recent events first."""
        return [json.loads(str(_text(e))) for e in self.redis.lrange(self._key(pid, "events"), 0, limit - 1)]

    def incr(self, counter: str, by: int = 1) -> None:
        """Increase a /metrics counter."""
        self.redis.hincrby(self._metrics_key, counter, by)

    def metrics(self) -> dict[str, int]:
        """All counters."""
        return {k: int(v) for k, v in _text_map(self.redis.hgetall(self._metrics_key)).items()}

    def project_ids(self) -> list[int]:
        """Every project seen."""
        return sorted(int(str(_text(v))) for v in self.redis.smembers(self._projects_key))

    def status(self, pid: int) -> dict[str, Any] | None:
        """Project state for display: everything except the token. ``None`` for an unknown project."""
        raw = _text_map(self.redis.hgetall(self._key(pid)))
        if not raw:
            return None
        return {
            "project": pid,
            "project_key": raw.get("project_key"),
            "label_studio_url": raw.get("ls_url") or None,
            "has_token": bool(self.redis.hexists(self._key(pid, "secret"), "ls_token")),
            "labels": json.loads(raw.get("labels", "[]")),
            "config": json.loads(raw["config"]) if raw.get("config") else None,
            "extra_params": json.loads(raw.get("extra_params", "{}")),
            "labelled_tasks": self.labelled_count(pid),
            "policy_versions": self.policy_versions(pid),
            "model_version": self.model_version(pid),
            "training": self.training(pid),
            "recent_events": self.events(pid, 10),
        }
