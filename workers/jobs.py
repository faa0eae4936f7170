"""RQ job functions: ``predict_tasks``, ``train_project``, ``prelabel_project``.

Plain functions with plain, JSON-able arguments (project id, tasks, versions), enqueued by dotted name from
:mod:`ml_backend.job_queue`; any ``alignsam-worker`` pointed at the same Redis (and ``MODEL_DIR``) can run them. A
person can run one by hand too: outside an RQ job they use ``REDIS_URL`` / the embedded Redis and the models of
:func:`workers.models.models`.

Training, per project (one job at a time, see :class:`ml_backend.job_queue.QueueTrainingTrigger`):

1. read the labelled tasks from Label Studio *now* (START_TRAINING arrives before the annotation it counts);
2. skip when the annotations and config are exactly those the active policies were trained on;
3. load each labelled task's image and its annotation's masks;
4. per label with at least ``TRAIN_MIN_LABEL_EXAMPLES`` annotated images: train (validation split, SRM branch
   chosen by validation), write the bundle atomically as ``MODEL_DIR/policies/<project>/<label>/<version>.pt``,
   and activate it only if its validation mIoU is at least the active policy's; the project's model version (what
   Label Studio shows) changes with the active set;
5. record the training set and queue pre-labelling of the remaining tasks.

Progress (stage, label, episode, losses, validation IoU) goes to the job's meta and the project's training
record, both shown by ``GET /status/<project>``.

RQ stores jobs as JSON (:data:`ml_backend.job_queue.SERIALIZER`), so the meta a job writes and the value it returns
go through :func:`jsonable` (numpy numbers become Python numbers): RQ would store a return value JSON cannot encode
as a placeholder, and a meta update it cannot encode would fail the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
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
from ml_backend.files import private_dir
from ml_backend.formats import annotation_to_masks
from ml_backend.images import ImageFetcher, LabelStudioAccess, image_url_of, load_image
from ml_backend.job_queue import enqueue_prelabel
from ml_backend.keys import JOB_RECORD_TTL_S, READY_TTL_S
from ml_backend.label_config import LabelConfig, Target
from ml_backend.redis_conn import connect_redis, text
from ml_backend.settings import Settings, get_settings
from ml_backend.state import ProjectStore
from workers.inference import LabelMask, predict_labels, predict_labels_many, prediction_for
from workers.label_studio import LabelStudioClient, chunks, human_annotations, prediction_versions
from workers.models import Models, bundle_miou, bundle_path, models

logger = logging.getLogger(__name__)


class TrainingDataError(RuntimeError):
    """The project has nothing trainable (no annotations, no label with enough examples); label more."""


class PredictTasksError(RuntimeError):
    """Some tasks of a predict job could not be predicted (the others were cached and published)."""


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------
def _connection() -> tuple[Job | None, Redis]:
    job = get_current_job()
    if job is not None:
        return job, job.connection
    return None, connect_redis(get_settings())


def _store(conn: Redis, settings: Settings) -> ProjectStore:
    return ProjectStore(conn, settings, zero_shot=settings.zero_shot)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (dicts, lists, str, numbers, bool, None): numpy scalars and arrays become
    numbers and lists, sets sorted lists, anything else its ``str``."""
    return json.loads(json.dumps(value, default=_json_default))


def _meta(job: Job | None, **fields: Any) -> None:
    if job is None:
        return
    job.meta.update(jsonable(fields))
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
def predict_tasks(
    project_id: int,
    config: Mapping[str, Any],
    model_version: str,
    policy_versions: Mapping[str, str],
    tasks: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Predict ``tasks`` of one project as one SAM / CLIP batch and publish each prediction for ``/predict``.

    Each item of ``tasks``: ``{"task": {"id", "data"}, "image": FetchedImage JSON, "cache_key", "ready_key"}``.
    A task's Label Studio prediction is cached under its ``cache_key`` (``PREDICT_CACHE_TTL_S``) and its
    ``ready_key`` stream gets an entry, all in one round trip after the batch. Returns ``{"project", "tasks":
    [{"task", "regions", "score"}], "batch", "compute_s"}``: ``compute_s`` is the batch's compute time (image
    loading, the models, result encoding), not the Redis writes that publish it (queue overhead).
    Raises :class:`PredictTasksError` naming the tasks that failed (unreadable image, a model error), after the
    others are published; the job then fails and ``/predict`` answers those tasks with an empty prediction.
    """
    t0 = time.perf_counter()
    m = models()
    settings = m.settings
    _, conn = _connection()
    store = _store(conn, settings)
    cfg = LabelConfig.from_json(config)
    access = _access(store, settings, project_id)
    failures: dict[int, str] = {}
    loaded: list[tuple[int, np.ndarray]] = []
    for n, item in enumerate(tasks):
        try:
            loaded.append((n, _task_image(settings, access, item["task"], cfg, item["image"])))
        except Exception as exc:  # this task only
            failures[n] = f"{type(exc).__name__}: {exc}"
    masks = _predict_batch(m, [a for _, a in loaded], project_id, cfg, policy_versions)
    published: list[tuple[Mapping[str, Any], str]] = []
    outcomes: list[dict[str, Any]] = []
    for (n, _), label_masks in zip(loaded, masks, strict=True):
        try:
            if isinstance(label_masks, Exception):
                raise label_masks
            prediction = prediction_for(settings, label_masks, cfg, model_version)
        except Exception as exc:
            failures[n] = f"{type(exc).__name__}: {exc}"
            continue
        published.append((tasks[n], json.dumps(prediction)))
        outcomes.append({"task": tasks[n]["task"].get("id"), "regions": len(prediction["result"]),
                         "score": prediction["score"]})
    compute_s = time.perf_counter() - t0
    _publish(conn, settings, published)
    if failures:
        raise PredictTasksError(f"{len(failures)} of {len(tasks)} tasks not predicted: " + "; ".join(
            f"task {tasks[n]['task'].get('id')}: {reason}" for n, reason in sorted(failures.items())))
    return jsonable({"project": project_id, "tasks": outcomes, "batch": len(tasks), "compute_s": compute_s})


def _predict_batch(m: Models, images: list[np.ndarray], project_id: int, config: LabelConfig,
                   policy_versions: Mapping[str, str]) -> list[dict[str, LabelMask] | Exception]:
    """Per image, its label masks, or the exception that stopped it: one batched pass over every label's model;
    when that fails, image by image, so one bad image does not cost the others their answer."""
    zero_shot = m.settings.zero_shot
    try:
        return list(predict_labels_many(m, images, project_id, config, policy_versions, zero_shot))
    except Exception:
        logger.warning("project %s: batched prediction of %d tasks failed; predicting them one by one",
                       project_id, len(images), exc_info=True)
    out: list[dict[str, LabelMask] | Exception] = []
    for image in images:
        try:
            out.append(predict_labels(m, image, project_id, config, policy_versions, zero_shot))
        except Exception as exc:
            out.append(exc)
    return out


def _publish(conn: Redis, settings: Settings, published: Sequence[tuple[Mapping[str, Any], str]]) -> None:
    """Cache each prediction, then append to its task's ready stream (a reader woken by it finds the value)."""
    if not published:
        return
    with conn.pipeline(transaction=False) as pipe:
        for item, value in published:
            pipe.set(item["cache_key"], value, ex=settings.predict_cache_ttl_s)
            pipe.xadd(item["ready_key"], {"ok": 1}, maxlen=1)
            pipe.expire(item["ready_key"], READY_TTL_S)
        pipe.execute()


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
    # Per-instance prompts and the action grid are chosen per label by validation, like the SRM branch.
    grid, *more = settings.train_grid_list
    return TrainConfig(ppo=ppo, branch=settings.train_branch, val_fraction=settings.train_val_fraction,  # type: ignore[arg-type]
                       instances="auto", mask_feedback="auto", refine="auto", grid=grid, grids=tuple(more))


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


@dataclass
class _TrainingRun:
    """What every step of one ``train_project`` job shares."""

    project_id: int
    m: Models
    job: Job | None
    conn: Redis
    store: ProjectStore
    started: float = field(default_factory=time.time)

    @property
    def settings(self) -> Settings:
        return self.m.settings

    @property
    def job_id(self) -> str:
        return self.job.id if self.job is not None else "manual"


@dataclass
class _TrainingImages:
    """The labelled images of a project and, per label, each image's mask (bool HxW, in image order)."""

    images: list[np.ndarray]
    names: list[str]
    masks: dict[str, list[np.ndarray]]


def train_project(project_id: int, reason: str = "", requested_at: float | None = None) -> dict[str, Any]:
    """Train (and maybe activate) one policy per label of ``project_id`` from its Label Studio annotations: the
    five steps of this module's docstring. Returns the job's summary; raises :class:`TrainingDataError` when the
    project has nothing trainable."""
    m = models()
    job, conn = _connection()
    run = _TrainingRun(project_id, m, job, conn, _store(conn, m.settings))
    _meta(job, pid=os.getpid(), project=project_id, stage="reading annotations", reason=reason)
    run.store.set_training(project_id, job_id=run.job_id, status="running", stage="reading annotations")
    config, access, tasks = _read_labelled_tasks(run)
    cfg = train_config(run.settings)
    fingerprint = _training_set_fingerprint(tasks, config, cfg)
    if _trained_on(run, fingerprint):
        return jsonable(_skip(run, fingerprint))
    data = _load_training_images(run, access, tasks, config)
    results, activated = _train_labels(run, config, data, cfg)
    return jsonable(_finish(run, fingerprint, results, activated))


def _read_labelled_tasks(run: _TrainingRun) -> tuple[LabelConfig, LabelStudioAccess, list[dict[str, Any]]]:
    """Step 1: the project's config, its Label Studio access, and its labelled tasks by id (at most
    ``TRAIN_MAX_SAMPLES``), read from Label Studio now."""
    pid, settings = run.project_id, run.settings
    config = run.store.config(pid)
    if config is None:
        raise TrainingDataError(f"Project {pid} has no label config here; connect it first (/setup).")
    access = _access(run.store, settings, pid)
    tasks = [t for t in LabelStudioClient(access, settings).tasks(pid, only_annotated=True) if human_annotations(t)]
    tasks = sorted(tasks, key=lambda t: int(t.get("id") or 0))[: settings.train_max_samples]
    if not tasks:
        raise TrainingDataError(f"Project {pid} has no annotated tasks in Label Studio yet; label some first.")
    return config, access, tasks


def _trained_on(run: _TrainingRun, fingerprint: str) -> bool:
    """Step 2: whether the active policies were trained on exactly this training set."""
    previous = text(run.conn.get(run.store.keys.trained_set(run.project_id)))
    return bool(run.store.policy_versions(run.project_id)) and previous == fingerprint


def _skip(run: _TrainingRun, fingerprint: str) -> dict[str, Any]:
    detail = "annotations unchanged since the active policies were trained"
    _meta(run.job, stage="skipped", skipped=detail)
    run.store.set_training(run.project_id, status="skipped", stage="skipped", detail=detail)
    return {"status": "skipped", "project": run.project_id, "fingerprint": fingerprint}


def _load_training_images(run: _TrainingRun, access: LabelStudioAccess, tasks: list[dict[str, Any]],
                          config: LabelConfig) -> _TrainingImages:
    """Step 3: each task's image and its newest annotation's masks; tasks without masks, or whose annotation was
    drawn on an image of another size, are left out."""
    _meta(run.job, stage="loading images", tasks=len(tasks))
    data = _TrainingImages([], [], {t.label: [] for t in config.targets})
    for task in tasks:
        image = _task_image(run.settings, access, task, config)
        masks = annotation_to_masks(human_annotations(task)[0].get("result") or [], config,
                                    width=image.shape[1], height=image.shape[0])
        if not masks:
            continue
        shape = next(iter(masks.values())).shape
        if shape != image.shape[:2]:
            logger.warning("project %s task %s: annotation size %s != image size %s; skipped", run.project_id,
                           task.get("id"), shape, image.shape[:2])
            continue
        data.images.append(image)
        data.names.append(f"task-{task.get('id')}")
        for label, label_masks in data.masks.items():
            label_masks.append(masks[label])
    return data


def _train_labels(run: _TrainingRun, config: LabelConfig, data: _TrainingImages,
                  cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """Step 4 for every label: ``(result per label, {label: activated version})``."""
    active = run.store.policy_versions(run.project_id)
    results: dict[str, Any] = {}
    activated: dict[str, str] = {}
    for target in config.targets:
        results[target.label] = _train_label(run, target, data, cfg, active.get(target.label))
        if results[target.label].get("status") == "activated":
            activated[target.label] = results[target.label]["version"]
        _meta(run.job, labels=results)
    return results, activated


def _train_label(run: _TrainingRun, target: Target, data: _TrainingImages, cfg: TrainConfig,
                 old: str | None) -> dict[str, Any]:
    """Step 4 for one label: train on its examples, write the bundle, activate it when it validates at least as
    well as the active version ``old``. Returns the label's result entry (``status`` says what happened)."""
    settings = run.settings
    label_masks = data.masks[target.label]
    positives = sum(int(mask.any()) for mask in label_masks)
    if positives < settings.train_min_label_examples:
        return {"status": "not enough examples", "examples": positives, "needed": settings.train_min_label_examples}
    samples = [Sample(img, mask, target.prompt, name)
               for img, mask, name in zip(data.images, label_masks, data.names, strict=True)]
    baseline = _active_policy(run.m, run.project_id, target.label, old) if old else None
    result = train(run.m.sam, samples, cfg, clip=run.m.clip, callback=_progress_reporter(run, target.label),
                   baseline=baseline)
    policy = result.policy
    new_miou = float(policy.val_metrics["miou"])
    held_out = _held_out_predictions(run, target, samples, result)
    interactive = _choose_interactive(run, target, result, held_out)
    choices = {"candidates": result.candidates, "chosen_candidate": result.chosen or policy.branch,
               "instance_metrics": result.instance_metrics, "instance_candidates": result.instance_candidates,
               "mask_feedback": result.mask_feedback, "refine": result.refine}
    bundle = _write_bundle(settings, run.project_id, target.label, target.prompt, policy, run.m, run.job_id,
                           extra=jsonable({**interactive, **choices}))
    version = bundle.stem
    _draw_pictures(run, target.label, result, bundle, held_out)
    # The active policy, validated on the same held-out images as the new one (its own recorded validation score
    # when it cannot be loaded, e.g. made for other SAM weights).
    if result.baseline_metrics is not None:
        old_miou: float | None = float(result.baseline_metrics["miou"])
    else:
        old_miou = bundle_miou(settings, run.project_id, target.label, old) if old else None
    entry = {"version": version, "val_miou": new_miou, "branch": policy.branch,
             "active_version": old, "active_val_miou": old_miou, "candidates": result.candidates,
             "chosen_candidate": choices["chosen_candidate"], "grid": list(policy.config.grid),
             "instances": policy.instances, "instance_boxes": policy.instance_boxes,
             "instance_filter": policy.instance_filter is not None, "instance_metrics": result.instance_metrics, "mask_input": policy.config.use_mask_input,
             "refine_clicks": policy.config.refine_clicks, **interactive}
    if old is None or old_miou is None or new_miou >= old_miou:
        run.store.set_policy_version(run.project_id, target.label, version)
        entry["status"] = "activated"
    else:
        entry["status"] = "kept previous (validates better)"
    return entry


def _held_out_predictions(run: _TrainingRun, target: Target, samples: Sequence[Sample],
                          result: Any) -> tuple[list[Sample], list[Any]] | None:
    """The new policy's pre-labels of the label's held-out images (``result.val_names``, in that order):
    ``(samples, predictions)``, made as the label's pre-labels will be (per instance when its training chose
    that). One rollout per image, shared by the strategy choice and the gallery. None (and a warning) when there
    are none or they cannot be made."""
    try:
        from alignsam.bundle import Bundle
        from alignsam.predict import AlignSAM

        by_name = {s.name: s for s in samples}
        held_out = [by_name[n] for n in result.val_names if n in by_name]
        if not held_out:
            return None
        model = AlignSAM(run.m.sam, Bundle.of(result.policy, target.prompt, "validation"), run.m.clip)
        return held_out, model.predict([s.image for s in held_out])
    except Exception as exc:
        logger.warning("project %s label %s: the held-out images were not pre-labelled (%s: %s)", run.project_id,
                       target.label, type(exc).__name__, exc, exc_info=True)
        return None


def _choose_interactive(run: _TrainingRun, target: Target, result: Any,
                        held_out: tuple[list[Sample], list[Any]] | None) -> dict[str, Any]:
    """How an annotator's clicks on this label combine with the new policy's pre-label: the strategy
    (:data:`alignsam.interactive.STRATEGIES`) that needs the fewest simulated clicks (NoC@90, then NoC@85; the
    simulated annotator of :mod:`alignsam.effort`) on the held-out images (``held_out``: them and their
    pre-labels, from :func:`_held_out_predictions`), with every candidate's scores:
    ``{"interactive_strategy": s, "interactive_scores": {s: {"noc@90", "noc@85", ...}}}`` (kept in the bundle's
    metadata; ``INTERACTIVE_STRATEGY=auto`` uses it). Costs at most 20 decodes per image and candidate. ``{}``
    (and a warning) when it cannot be measured: the worker then uses
    :data:`workers.interactive.DEFAULT_STRATEGY`.
    """
    if held_out is None:
        return {}
    try:
        from alignsam.effort import choose_strategy
        from workers.interactive import start_of

        shown, predictions = held_out
        embeddings = run.m.sam.embed_many([s.image for s in shown])
        starts = [start_of(pred, emb.original_size) for pred, emb in zip(predictions, embeddings, strict=True)]
        best, scores = choose_strategy(run.m.sam, embeddings, [s.mask for s in shown],
                                       [pred.mask for pred in predictions], starts)
        logger.info("project %s label %s: clicks start from the pre-label with %s (NoC@90 %.2f on %d held-out "
                    "images)", run.project_id, target.label, best, scores[best]["noc@90"], len(shown))
        return {"interactive_strategy": best, "interactive_scores": jsonable(scores)}
    except Exception as exc:
        logger.warning("project %s label %s: the interactive strategy was not chosen (%s: %s)", run.project_id,
                       target.label, type(exc).__name__, exc, exc_info=True)
        return {}


def _draw_pictures(run: _TrainingRun, label: str, result: Any, bundle: Path,
                   held_out: tuple[list[Sample], list[Any]] | None) -> None:
    """The pictures of one label's training next to its bundle: ``<version>.gallery.png`` (the new policy's
    pre-labels of at most :data:`alignsam.pictures.GALLERY_ROWS` held-out images, those ``result.candidates``
    were measured on: the first of ``held_out``, from :func:`_held_out_predictions`; no gallery without them) and
    ``<version>.curve.png`` (every SRM branch's episodes, the validation choices).

    Never fails the training: any error is logged as a warning and the job goes on without pictures.
    """
    try:
        from alignsam.pictures import GALLERY_ROWS, gallery, learning_curve
        from ml_backend.files import picture_name, private_file

        version = bundle.stem
        title = f"project {run.project_id} · {label} · {version}"
        chosen = result.chosen or result.policy.branch
        curve = bundle.with_name(picture_name(version, "curve"))
        learning_curve(result.histories or {chosen: result.policy.history}, curve, candidates=result.candidates,
                       chosen=chosen, baseline=result.baseline_metrics, title=title)
        private_file(curve)
        if held_out is None:
            return
        shown, predictions = held_out[0][:GALLERY_ROWS], held_out[1][:GALLERY_ROWS]
        on = (result.candidates.get(chosen) or {}).get("on", "validation")
        path = bundle.with_name(picture_name(version, "gallery"))
        grid = "x".join(str(n) for n in result.policy.config.grid)
        gallery(shown, predictions, path, title=f"{title} · {result.policy.branch} SRM · {grid} grid · {on} images")
        private_file(path)
    except Exception as exc:
        logger.warning("project %s label %s: the training's pictures were not drawn (%s: %s)", run.project_id,
                       label, type(exc).__name__, exc, exc_info=True)


def _progress_reporter(run: _TrainingRun, label: str) -> Any:
    """Training callback: progress to the job's meta and the training record, at most every 0.5 s while
    training (every other stage, and the last episode, at once)."""
    last = [0.0]

    def report(p: Progress) -> None:
        progress = {k: v for k, v in asdict(p).items() if v is not None}
        now = time.monotonic()
        if p.stage != "training" or now - last[0] > 0.5 or p.episode == p.episodes:
            last[0] = now
            _meta(run.job, stage=p.stage, label=label, progress=progress)
            run.store.set_training(run.project_id, stage=f"{p.stage} {label}", progress=json.dumps(progress))

    return report


def _finish(run: _TrainingRun, fingerprint: str, results: dict[str, Any],
            activated: dict[str, str]) -> dict[str, Any]:
    """Step 5: record the training set, queue pre-labelling after an activation; returns the job's summary.
    Raises :class:`TrainingDataError` when no label had enough examples."""
    pid, settings = run.project_id, run.settings
    if not any(isinstance(r, dict) and "version" in r for r in results.values()):
        raise TrainingDataError(
            f"No label of project {pid} has {settings.train_min_label_examples} annotated images yet "
            f"({ {k: v.get('examples') for k, v in results.items()} }); label more (TRAIN_MIN_LABEL_EXAMPLES)."
        )
    run.conn.set(run.store.keys.trained_set(pid), fingerprint)
    model_version = run.store.model_version(pid)
    prelabel_job = None
    if activated and settings.prelabel_after_training:
        prelabel_job = enqueue_prelabel(run.conn, settings, pid, model_version).id
    _meta(run.job, stage="done", labels=results, model_version=model_version)
    run.store.set_training(pid, status="done", stage="done", model_version=model_version,
                           activated=json.dumps(activated))
    return {"status": "done", "project": pid, "model_version": model_version, "labels": results,
            "activated": activated, "prelabel_job": prelabel_job, "seconds": round(time.time() - run.started, 2)}


def _active_policy(m: Any, project_id: int, label: str, version: str) -> tuple[Any, Any, Any, Any] | None:
    """(agent, SRM, config, instance filter) of the active policy of a label, or None when it cannot be loaded."""
    try:
        model = m.policy(project_id, label, version)
    except Exception as exc:  # a missing or incompatible bundle: compare by its recorded score instead
        logger.warning("project %s label %s: cannot load active policy %s (%s)", project_id, label, version, exc)
        return None
    return model.agent, model.srm, model.bundle.config, model.instance_filter


def _write_bundle(settings: Settings, project_id: int, label: str, text: str, policy: Any, m: Any,
                  job_id: str, extra: Mapping[str, Any] | None = None) -> Path:
    """Save atomically under a job-private name, then rename into ``<version>.pt`` (+ ``.json``).

    A worker killed before the rename leaves only the private temp files, which nothing reads; the versioned
    files appear complete or not at all, and only then can the version be activated.
    """
    staging = bundle_path(settings, project_id, label, f".staging-{job_id}")
    private_dir(staging.parent)  # policies are the project's work: MODEL_DIR/policies/... is 0700
    meta = save_bundle(policy, staging, m.sam, text=text, clip_model=m.clip_name,
                       extra={**(extra or {}), "project": project_id, "label": label, "job_id": job_id})
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
    done_key = store.keys.prelabelled(project_id, model_version)
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
            conn.expire(done_key, JOB_RECORD_TTL_S)
            created += len(predictions)
        _meta(job, done=created, failed=failed)
    _meta(job, stage="done", done=created, failed=failed)
    return {"status": "done", "project": project_id, "model_version": model_version, "created": created,
            "failed": failed, "skipped": len(tasks) - len(todo)}
