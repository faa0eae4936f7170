"""RQ job functions: ``predict_task``, ``train_project``, ``prelabel_project``.

Plain functions with plain, JSON-able arguments (project id, task, versions), enqueued by dotted name from
``ml_backend.queue``; any ``alignsam-worker`` pointed at the same Redis (and ``MODEL_DIR``) can run them, and a
person can run one by hand (``python -c 'from workers.jobs import train_project; ...'`` inside an RQ job context
is not needed: without one they use ``REDIS_URL`` / the embedded Redis).

Training, per project (one job at a time, see ``ml_backend.queue.QueueTrainingTrigger``):

1. read the labelled tasks from Label Studio *now* (START_TRAINING arrives before the annotation it counts);
2. skip when the annotations and config are exactly those the active policies were trained on;
3. per label with at least ``TRAIN_MIN_LABEL_EXAMPLES`` annotated images: train (validation split, SRM branch
   chosen by validation), write the bundle atomically as ``MODEL_DIR/policies/<project>/<label>/<version>.pt``;
4. activate it only if its validation mIoU is at least the active policy's; the project's model version (what
   Label Studio shows) changes with the active set;
5. queue pre-labelling of the remaining tasks.

Progress (stage, label, episode, losses, validation IoU) goes to the job's meta and the project's training
record, both shown by ``GET /status/<project>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis
from rq import get_current_job
from rq.job import Job

from alignsam.bundle import save_bundle
from alignsam.data import Sample
from alignsam.ppo import PPOConfig
from alignsam.train import Progress, TrainConfig, train
from ml_backend.formats import annotation_to_masks
from ml_backend.images import ImageFetcher, LabelStudioAccess, image_url_of, load_image
from ml_backend.label_config import LabelConfig
from ml_backend.queue import READY_TTL_S, enqueue_prelabel
from ml_backend.redis_conn import connect_redis
from ml_backend.settings import Settings, get_settings
from ml_backend.state import ProjectStore
from workers.inference import predict_labels, predict_labels_many, prediction_for
from workers.label_studio import LabelStudioClient, chunks, human_annotations, prediction_versions
from workers.models import bundle_miou, bundle_path, models

logger = logging.getLogger(__name__)


class TrainingDataError(RuntimeError):
    """The project has nothing trainable (no annotations, no label with enough examples); label more."""


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------
def _connection() -> tuple[Job | None, Redis]:
    job = get_current_job()
    if job is not None:
        return job, job.connection
    return None, connect_redis(get_settings())


def _store(conn: Redis, settings: Settings) -> ProjectStore:
    return ProjectStore(conn, prefix=settings.redis_key_prefix, version_prefix=settings.model_version_prefix,
                        events_kept=settings.webhook_events_kept,
                        untrained="zeroshot" if settings.zero_shot else "untrained")


def _meta(job: Job | None, **fields: Any) -> None:
    if job is None:
        return
    job.meta.update(fields)
    job.save_meta()


def _access(store: ProjectStore, settings: Settings, project_id: int) -> LabelStudioAccess:
    url, token = store.label_studio(project_id)
    return LabelStudioAccess.resolve(settings, url, token)


def _task_image(settings: Settings, access: LabelStudioAccess, task: Mapping[str, Any], config: LabelConfig,
                image: Mapping[str, Any] | None = None) -> np.ndarray:
    """The task's image as HxWx3 uint8: the file the web process fetched when it is here, else downloaded."""
    path = image.get("path") if image else None
    if not path or not Path(path).is_file():
        fetched = ImageFetcher(settings).fetch(image_url_of(task, config.image_key), access, task_id=task.get("id"))
        path = fetched.path
    return np.asarray(load_image(path, settings.image_max_pixels))


# ---------------------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------------------
def predict_task(
    project_id: int,
    task: Mapping[str, Any],
    image: Mapping[str, Any],
    config: Mapping[str, Any],
    model_version: str,
    policy_versions: Mapping[str, str],
    cache_key: str,
    ready_key: str | None = None,
) -> dict[str, Any]:
    """Predict one task and cache the Label Studio prediction under ``cache_key`` (read by ``/predict``), then
    append to the ``ready_key`` stream (``/predict`` blocks on it; jobs queued before it existed have none)."""
    [outcome] = predict_tasks([{
        "project_id": project_id, "task": task, "image": image, "config": config, "model_version": model_version,
        "policy_versions": policy_versions, "cache_key": cache_key, "ready_key": ready_key,
    }])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def predict_tasks(calls: Sequence[Mapping[str, Any]], conn: Redis | None = None) -> list[dict[str, Any] | Exception]:
    """:func:`predict_task` for several tasks at once (``calls``: each one's keyword arguments), in order.

    The worker runs the predict jobs waiting in its queue through this as one batch: tasks of one project,
    config and versions share each label's SAM / CLIP / policy pass. A task that fails (unreadable image, a
    model error) gets its exception in its slot and the others still get their predictions. ``compute_s`` of
    each result is its share of the batch's compute time (they sum to it): everything up to the predictions,
    not the Redis writes that publish them (those are queue overhead, and the queue benchmark counts them so).
    """
    t0 = time.perf_counter()
    m = models()
    settings = m.settings
    if conn is None:
        conn = _connection()[1]
    store = _store(conn, settings)
    out: list[dict[str, Any] | Exception | None] = [None] * len(calls)
    accesses: dict[int, LabelStudioAccess] = {}
    groups: dict[str, list[tuple[int, np.ndarray, LabelConfig]]] = {}
    for i, call in enumerate(calls):
        try:
            pid = int(call["project_id"])
            cfg = LabelConfig.from_json(call["config"])
            if pid not in accesses:
                accesses[pid] = _access(store, settings, pid)
            array = _task_image(settings, accesses[pid], call["task"], cfg, call["image"])
        except Exception as exc:  # this task only
            out[i] = exc
            continue
        group = json.dumps([pid, call["config"], dict(call["policy_versions"])], sort_keys=True, default=str)
        groups.setdefault(group, []).append((i, array, cfg))
    cached: dict[str, str] = {}
    for members in groups.values():
        first = calls[members[0][0]]
        pid, cfg, versions = int(first["project_id"]), members[0][2], first["policy_versions"]
        try:
            masks = predict_labels_many(m, [a for _, a, _ in members], pid, cfg, versions, settings.zero_shot)
        except Exception:  # find the task that breaks the batch; the others still get their answer
            logger.warning("project %s: batched prediction of %d tasks failed; predicting them one by one", pid,
                           len(members), exc_info=True)
            masks = []
            for i, array, _ in members:
                try:
                    masks.append(predict_labels(m, array, pid, cfg, versions, settings.zero_shot))
                except Exception as exc:
                    out[i] = exc
                    masks.append({})
        for (i, _, _), label_masks in zip(members, masks, strict=True):
            if out[i] is not None:
                continue
            call = calls[i]
            try:
                prediction = prediction_for(settings, label_masks, cfg, call["model_version"])
            except Exception as exc:
                out[i] = exc
                continue
            cached[call["cache_key"]] = (json.dumps(prediction), call.get("ready_key"))
            out[i] = {"task": call["task"].get("id"), "regions": len(prediction["result"]),
                      "score": prediction["score"]}
    share = (time.perf_counter() - t0) / max(len(calls), 1)
    if cached:
        with conn.pipeline(transaction=False) as pipe:
            for key, (value, ready) in cached.items():
                pipe.set(key, value, ex=settings.predict_cache_ttl_s)
                if ready:  # after the value: a reader woken by the stream finds it
                    pipe.xadd(ready, {"ok": 1}, maxlen=1)
                    pipe.expire(ready, READY_TTL_S)
            pipe.execute()
    for result in out:
        if isinstance(result, dict):
            result.update(compute_s=share, batch=len(calls))
    return [r if r is not None else RuntimeError("not predicted") for r in out]


# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------
def train_config(settings: Settings) -> TrainConfig:
    """The paper's defaults, with the operator's TRAIN_* overrides."""
    ppo = PPOConfig()
    if settings.train_episodes:
        ppo.episodes = settings.train_episodes
    if settings.train_steps:
        ppo.steps = settings.train_steps
    if settings.train_epochs:
        ppo.epochs = settings.train_epochs
    return TrainConfig(ppo=ppo, branch=settings.train_branch, val_fraction=settings.train_val_fraction)  # type: ignore[arg-type]


def _training_set_fingerprint(tasks: list[dict[str, Any]], config: LabelConfig, cfg: TrainConfig) -> str:
    """What a policy was trained on: each labelled task's newest annotation (id, update time, result), the
    config and the training settings. Equal fingerprints -> retraining would change nothing."""
    items = []
    for task in sorted(tasks, key=lambda t: int(t.get("id") or 0)):
        ann = human_annotations(task)[0]
        result_hash = hashlib.sha256(json.dumps(ann.get("result"), sort_keys=True, default=str).encode()).hexdigest()
        items.append([task.get("id"), ann.get("id"), str(ann.get("updated_at") or ""), result_hash,
                      json.dumps(task.get("data"), sort_keys=True, default=str)])
    payload = {"tasks": items, "config": config.to_json(), "train": asdict(cfg)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_project(project_id: int, reason: str = "", requested_at: float | None = None) -> dict[str, Any]:
    """Train (and maybe activate) one policy per label of ``project_id`` from its Label Studio annotations."""
    m = models()
    settings = m.settings
    job, conn = _connection()
    store = _store(conn, settings)
    started = time.time()
    job_id = job.id if job is not None else "manual"
    _meta(job, pid=os.getpid(), project=project_id, stage="reading annotations", reason=reason)
    store.set_training(project_id, job_id=job_id, status="running", stage="reading annotations")
    config = store.config(project_id)
    if config is None:
        raise TrainingDataError(f"Project {project_id} has no label config here; connect it first (/setup).")
    access = _access(store, settings, project_id)
    ls = LabelStudioClient(access, settings)
    tasks = [t for t in ls.tasks(project_id, only_annotated=True) if human_annotations(t)]
    tasks = sorted(tasks, key=lambda t: int(t.get("id") or 0))[: settings.train_max_samples]
    if not tasks:
        raise TrainingDataError(f"Project {project_id} has no annotated tasks in Label Studio yet; label some first.")
    cfg = train_config(settings)
    fingerprint = _training_set_fingerprint(tasks, config, cfg)
    trained_key = f"{settings.redis_key_prefix}:project:{project_id}:trained-set"
    previous = conn.get(trained_key)
    active = store.policy_versions(project_id)
    if active and previous is not None and previous.decode() == fingerprint:
        _meta(job, stage="skipped", skipped="annotations unchanged since the active policies were trained")
        store.set_training(project_id, status="skipped", stage="skipped",
                           detail="annotations unchanged since the active policies were trained")
        return {"status": "skipped", "project": project_id, "fingerprint": fingerprint}

    _meta(job, stage="loading images", tasks=len(tasks))
    images: list[np.ndarray] = []
    per_label: dict[str, list[np.ndarray]] = {t.label: [] for t in config.targets}
    names: list[str] = []
    for task in tasks:
        image = _task_image(settings, access, task, config)
        masks = annotation_to_masks(human_annotations(task)[0].get("result") or [], config,
                                    width=image.shape[1], height=image.shape[0])
        if not masks:
            continue
        if next(iter(masks.values())).shape != image.shape[:2]:
            logger.warning("project %s task %s: annotation size %s != image size %s; skipped", project_id,
                           task.get("id"), next(iter(masks.values())).shape, image.shape[:2])
            continue
        images.append(image)
        names.append(f"task-{task.get('id')}")
        for label in per_label:
            per_label[label].append(masks[label])

    results: dict[str, Any] = {}
    activated: dict[str, str] = {}
    for target in config.targets:
        label_masks = per_label[target.label]
        positives = sum(int(mask.any()) for mask in label_masks)
        if positives < settings.train_min_label_examples:
            results[target.label] = {"status": "not enough examples", "examples": positives,
                                     "needed": settings.train_min_label_examples}
            continue
        samples = [Sample(img, mask, target.prompt, name)
                   for img, mask, name in zip(images, label_masks, names, strict=True)]
        last_save = [0.0]

        def report(p: Progress, label: str = target.label, last: list[float] = last_save) -> None:
            progress = {k: v for k, v in asdict(p).items() if v is not None}
            now = time.monotonic()
            if p.stage != "training" or now - last[0] > 0.5 or p.episode == p.episodes:
                last[0] = now
                _meta(job, stage=p.stage, label=label, progress=progress)
                store.set_training(project_id, stage=f"{p.stage} {label}", progress=json.dumps(progress))

        old = active.get(target.label)
        baseline = _active_policy(m, project_id, target.label, old) if old else None
        result = train(m.sam, samples, cfg, clip=m.clip, callback=report, baseline=baseline)
        policy = result.policy
        new_miou = float(policy.val_metrics["miou"])
        final = _write_bundle(settings, project_id, target.label, target.prompt, policy, m, job_id)
        version = final.stem
        # The active policy, validated on the same held-out images as the new one (its own recorded
        # validation score when it cannot be loaded, e.g. made for other SAM weights).
        if result.baseline_metrics is not None:
            old_miou: float | None = float(result.baseline_metrics["miou"])
        else:
            old_miou = bundle_miou(settings, project_id, target.label, old) if old else None
        entry = {"version": version, "val_miou": new_miou, "branch": policy.branch,
                 "active_version": old, "active_val_miou": old_miou, "candidates": result.candidates}
        if old is None or old_miou is None or new_miou >= old_miou:
            store.set_policy_version(project_id, target.label, version)
            activated[target.label] = version
            entry["status"] = "activated"
        else:
            entry["status"] = "kept previous (validates better)"
        results[target.label] = entry
        _meta(job, labels=results)

    if not any(isinstance(r, dict) and "version" in r for r in results.values()):
        raise TrainingDataError(
            f"No label of project {project_id} has {settings.train_min_label_examples} annotated images yet "
            f"({ {k: v.get('examples') for k, v in results.items()} }); label more (TRAIN_MIN_LABEL_EXAMPLES)."
        )
    conn.set(trained_key, fingerprint)
    model_version = store.model_version(project_id)
    prelabel_job = None
    if activated and settings.prelabel_after_training:
        prelabel_job = enqueue_prelabel(conn, settings, project_id, model_version).id
    summary = {"status": "done", "project": project_id, "model_version": model_version, "labels": results,
               "activated": activated, "prelabel_job": prelabel_job, "seconds": round(time.time() - started, 2)}
    _meta(job, stage="done", labels=results, model_version=model_version)
    store.set_training(project_id, status="done", stage="done", model_version=model_version,
                       activated=json.dumps(activated))
    return summary


def _active_policy(m: Any, project_id: int, label: str, version: str) -> tuple[Any, Any, Any] | None:
    """(agent, SRM, config) of the active policy of a label, or None when it cannot be loaded."""
    try:
        model = m.policy(project_id, label, version)
    except Exception as exc:  # a missing or incompatible bundle: compare by its recorded score instead
        logger.warning("project %s label %s: cannot load active policy %s (%s)", project_id, label, version, exc)
        return None
    return model.agent, model.srm, model.bundle.config


def _write_bundle(settings: Settings, project_id: int, label: str, text: str, policy: Any, m: Any,
                  job_id: str) -> Path:
    """Save atomically under a job-private name, then rename into ``<version>.pt`` (+ ``.json``).

    A worker killed before the rename leaves only the private temp files, which nothing reads; the versioned
    files appear complete or not at all, and only then can the version be activated.
    """
    staging = bundle_path(settings, project_id, label, f".staging-{job_id}")
    meta = save_bundle(policy, staging, m.sam, text=text, clip_model=m.clip_name,
                       extra={"project": project_id, "label": label, "job_id": job_id})
    final = bundle_path(settings, project_id, label, meta["version"])
    shutil.move(staging.with_suffix(".json"), final.with_suffix(".json"))
    os.replace(staging, final)
    return final


# ---------------------------------------------------------------------------------------------------------
# prelabel
# ---------------------------------------------------------------------------------------------------------
def prelabel_project(project_id: int, model_version: str) -> dict[str, Any]:
    """Create predictions (tagged ``model_version``) for every task without a human annotation, in batches.

    Resumable: tasks that already have a prediction of this version in Label Studio, or that this job sent
    before it was interrupted, are skipped. Stops early when another version has been activated meanwhile.
    """
    m = models()
    settings = m.settings
    job, conn = _connection()
    store = _store(conn, settings)
    if store.model_version(project_id) != model_version:
        _meta(job, stage="superseded")
        return {"status": "superseded", "project": project_id, "model_version": model_version}
    config = store.config(project_id)
    if config is None:
        raise TrainingDataError(f"Project {project_id} has no label config here; connect it first (/setup).")
    policy_versions = store.policy_versions(project_id)
    access = _access(store, settings, project_id)
    ls = LabelStudioClient(access, settings)
    done_key = f"{settings.redis_key_prefix}:project:{project_id}:prelabelled:{model_version}"
    sent_before = {int(v) for v in conn.smembers(done_key)}
    tasks = ls.tasks(project_id)
    todo = [t for t in tasks
            if not human_annotations(t) and model_version not in prediction_versions(t)
            and int(t.get("id") or 0) not in sent_before]
    _meta(job, pid=os.getpid(), stage="prelabelling", total=len(todo), done=0, failed=0)
    created = failed = 0
    for batch in chunks(todo, settings.prelabel_batch_size):
        if store.model_version(project_id) != model_version:
            _meta(job, stage="superseded")
            return {"status": "superseded", "project": project_id, "created": created}
        predictions = []
        for task in batch:
            try:
                image = _task_image(settings, access, task, config)
                label_masks = predict_labels(m, image, project_id, config, policy_versions, zero_shot=False)
                prediction = prediction_for(settings, label_masks, config, model_version)
            except Exception as exc:  # one bad image must not stop the others
                failed += 1
                logger.warning("project %s task %s: not pre-labelled: %s: %s", project_id, task.get("id"),
                               type(exc).__name__, exc)
                continue
            predictions.append({"task": int(task["id"]), **prediction})
        if predictions:
            ls.import_predictions(project_id, predictions)
            conn.sadd(done_key, *[p["task"] for p in predictions])
            conn.expire(done_key, 30 * 24 * 3600)
            created += len(predictions)
        _meta(job, done=created, failed=failed)
    _meta(job, stage="done", done=created, failed=failed)
    return {"status": "done", "project": project_id, "model_version": model_version, "created": created,
            "failed": failed, "skipped": len(tasks) - len(todo)}
