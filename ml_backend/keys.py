"""Every Redis key, lifetime and model-version suffix this product writes, in one place.

Keys, with ``P = REDIS_KEY_PREFIX`` (``alignsam``); RQ's own keys (``rq:*``) are RQ's business:

===============================================  ==============================================================
``P:projects``                                   set of project ids seen
``P:project:<id>``                               hash: project key, Label Studio URL, label config XML, parsed
                                                 config and labels (JSON), extra params, setup time
``P:project:<id>:secret``                        hash: the Label Studio token from /setup, apart from the rest
                                                 so nothing that reads project state for display can return it
``P:project:<id>:annotations``                   hash: annotation id -> task id (non-cancelled annotations seen)
``P:project:<id>:policies``                      hash: label -> active policy version
``P:project:<id>:training``                      hash: job id, status, reason, requested/updated times
``P:project:<id>:events``                        list: recent webhook events (action, ids, time; never payloads)
``P:project:<id>:train-job``                     id of the project's latest training job (queued or follow-up)
``P:project:<id>:train-jobs``                    list: the last ``TRAIN_HISTORY_KEPT`` training job ids, newest first
``P:project:<id>:train-lock``                    lock held while a training trigger decides (``TRAIN_LOCK_TIMEOUT_S``)
``P:project:<id>:trained-set``                   fingerprint of what the active policies were trained on
``P:project:<id>:prelabelled:<version>``         set: task ids pre-labelled with that version (``JOB_RECORD_TTL_S``)
``P:pred:<pid>:<task>:<image>:<version>:<cfg>``  a task's finished prediction (JSON), per image content hash, model
                                                 version and config hash (``PREDICT_CACHE_TTL_S``)
``P:predjob:<digest of the above>``              id of the predict job computing that entry (while it is alive)
``P:predready:<digest of the above>``            stream the worker appends to right after writing the entry
                                                 (``READY_TTL_S``), so ``/predict`` wakes before RQ's bookkeeping
``P:versions``                                   set of model versions ever reported
``P:metrics``                                    hash: counters shown by ``GET /metrics``
===============================================  ==============================================================
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

# --- model versions: ``<MODEL_VERSION_PREFIX>-<suffix>`` -------------------------------------------------------
UNTRAINED = "untrained"
"""suffix of a project's model version before any policy is active, when nothing predicts it"""
ZERO_SHOT = "zeroshot"
"""suffix of a project's model version before any policy is active, when zero-shot predictions answer"""
PENDING_SUFFIX = "-pending"
"""appended to the model version of an empty prediction whose task is still being computed"""

# --- lifetimes (seconds) -----------------------------------------------------------------------------------
READY_TTL_S = 600
"""a task's ready stream: only requests waiting while its job runs read it (later ones hit the cache)"""
PREDICT_RESULT_TTL_S = 600
"""a finished predict job's RQ result: the prediction itself is in the cache"""
PREDICT_FAILURE_TTL_S = 24 * 3600
"""a failed predict job, for the operator to look at"""
PREDICT_JOB_MIN_TTL_S = 3600
"""least time a queued predict job, and the marker naming it, are kept"""
JOB_RECORD_TTL_S = 30 * 24 * 3600
"""training and prelabel jobs' results and failures, and the prelabelled-task sets"""
TRAIN_LOCK_TIMEOUT_S = 10
"""a training trigger's lock expires after this (a trigger never holds it that long)"""
TRAIN_HISTORY_KEPT = 10
"""training job ids kept per project for ``GET /status/<project>``"""


def _digest(cache_key: str) -> str:
    return hashlib.sha256(cache_key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Keys:
    """The product's Redis key names under one ``REDIS_KEY_PREFIX``."""

    prefix: str = "alignsam"

    # --- global -------------------------------------------------------------------------------------------
    @property
    def projects(self) -> str:
        return f"{self.prefix}:projects"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:versions"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}:metrics"

    # --- per project --------------------------------------------------------------------------------------
    def project(self, pid: int, part: str = "") -> str:
        """``P:project:<pid>`` (the project hash), or ``P:project:<pid>:<part>``."""
        return f"{self.prefix}:project:{pid}" + (f":{part}" if part else "")

    def secret(self, pid: int) -> str:
        return self.project(pid, "secret")

    def annotations(self, pid: int) -> str:
        return self.project(pid, "annotations")

    def policies(self, pid: int) -> str:
        return self.project(pid, "policies")

    def training(self, pid: int) -> str:
        return self.project(pid, "training")

    def events(self, pid: int) -> str:
        return self.project(pid, "events")

    def train_job(self, pid: int) -> str:
        return self.project(pid, "train-job")

    def train_jobs(self, pid: int) -> str:
        return self.project(pid, "train-jobs")

    def train_lock(self, pid: int) -> str:
        return self.project(pid, "train-lock")

    def trained_set(self, pid: int) -> str:
        return self.project(pid, "trained-set")

    def prelabelled(self, pid: int, model_version: str) -> str:
        return self.project(pid, f"prelabelled:{model_version}")

    # --- predictions --------------------------------------------------------------------------------------
    def prediction(self, pid: int, task_id: Any, image_digest: str, model_version: str, config_hash: str) -> str:
        """A task's cached prediction."""
        return f"{self.prefix}:pred:{pid}:{task_id}:{image_digest}:{model_version}:{config_hash}"

    def predict_job_marker(self, cache_key: str) -> str:
        """Holds the id of the predict job computing ``cache_key``."""
        return f"{self.prefix}:predjob:{_digest(cache_key)}"

    def prediction_ready(self, cache_key: str) -> str:
        """Stream the worker appends to once ``cache_key`` holds the task's prediction."""
        return f"{self.prefix}:predready:{_digest(cache_key)}"


def untrained_suffix(zero_shot: bool) -> str:
    """The model-version suffix of a project without an active policy."""
    return ZERO_SHOT if zero_shot else UNTRAINED
