"""Every Redis key, lifetime and model-version suffix this product writes, in one place.

Keys, with ``P = REDIS_KEY_PREFIX`` (``alignsam``); RQ's own keys (``rq:*``, JSON jobs: :mod:`ml_backend.job_queue`)
are RQ's business, their lifetimes are set here and in the settings (a queued predict job: ``PREDICT_JOB_TTL_S``):

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
                                                 version and config hash (``PREDICT_CACHE_TTL_S``); ``<task>`` is
                                                 :func:`task_key` of the task id (never the raw id)
``P:predjob:<digest of the above>``              id of the predict job computing that entry (``PREDICT_JOB_TTL_S``,
                                                 the longest a queued predict job is kept)
``P:predready:<digest of the above>``            stream the worker appends to right after writing the entry
                                                 (``READY_TTL_S``), so ``/predict`` wakes before RQ's bookkeeping
``P:interactive:requests``                        list: annotators' clicks waiting for a predict worker's thread
                                                 (:mod:`ml_backend.interactive`; each carries its deadline)
``P:interactive:reply:<id>``                     list: a worker's answer to one click (``REPLY_TTL_S`` there)
``P:versions``                                   set of model versions ever reported
``P:metrics``                                    hash: counters shown by ``GET /metrics``
===============================================  ==============================================================
"""

from __future__ import annotations

import hashlib
import re
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
# A queued predict job, and the marker naming it, live ``PREDICT_JOB_TTL_S`` (a setting); once a worker starts it
# RQ keeps it until it ends, then for one of these:
READY_TTL_S = 600
"""a task's ready stream: only requests waiting while its job runs read it (later ones hit the cache)"""
PREDICT_RESULT_TTL_S = 600
"""a finished predict job and its RQ result: the prediction itself is in the cache, and ``/predict`` reads the
result only while it waits"""
PREDICT_FAILURE_TTL_S = 24 * 3600
"""a failed predict job (its reason, and its tasks), for the operator to look at for a day; ``/predict`` reads the
reason only while it waits, and the next request for its tasks queues a new job"""
JOB_RECORD_TTL_S = 30 * 24 * 3600
"""training and prelabel jobs' results and failures (one job at a time per project, shown by ``GET /status``), and
the prelabelled-task sets"""
TRAIN_LOCK_TIMEOUT_S = 10
"""a training trigger's lock expires after this (a trigger never holds it that long)"""
TRAIN_HISTORY_KEPT = 10
"""training job ids kept per project for ``GET /status/<project>``"""


_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INT_ID_LIMIT = 2**63


def digest(text: str) -> str:
    """A short, key-safe digest of ``text`` (24 hex digits of its SHA-256)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def plain_task_id(task_id: Any) -> str | None:
    """The task id as key text when it is plain: an integer (what Label Studio sends; not a bool, within 64 bits)
    or a string of 1-64 letters, digits, ``_`` and ``-``; None for anything else."""
    if isinstance(task_id, int) and not isinstance(task_id, bool) and -_INT_ID_LIMIT < task_id < _INT_ID_LIMIT:
        return str(task_id)
    if isinstance(task_id, str) and _PLAIN_ID.fullmatch(task_id):
        return task_id
    return None


def task_key(task_id: Any) -> str:
    """A task id's part of a Redis key: :func:`plain_task_id` when it is plain, else ``~`` and a digest of the id,
    so no client-supplied id (separators, 5000 characters, lone surrogates) ever lands in a key as it is."""
    plain = plain_task_id(task_id)
    if plain is not None:
        return plain
    return "~" + digest(ascii(task_id))


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
        """A task's cached prediction (the task id through :func:`task_key`)."""
        return f"{self.prefix}:pred:{int(pid)}:{task_key(task_id)}:{image_digest}:{model_version}:{config_hash}"

    def predict_job_marker(self, cache_key: str) -> str:
        """Holds the id of the predict job computing ``cache_key``."""
        return f"{self.prefix}:predjob:{digest(cache_key)}"

    def prediction_ready(self, cache_key: str) -> str:
        """Stream the worker appends to once ``cache_key`` holds the task's prediction."""
        return f"{self.prefix}:predready:{digest(cache_key)}"


def untrained_suffix(zero_shot: bool) -> str:
    """The model-version suffix of a project without an active policy."""
    return ZERO_SHOT if zero_shot else UNTRAINED
