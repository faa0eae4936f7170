"""Annotators' clicks, answered by every worker that serves the ``predict`` queue, from a thread of its own.

The web process pushes each click as a JSON request onto ``P:interactive:requests``
(:class:`ml_backend.interactive.InteractiveClient`); :func:`serve` pops it, answers it with :func:`answer` and pushes
the answer onto the request's reply key. The thread shares the worker's warm models, so a click costs one SAM decode
on the image's cached embedding, also while the worker's main thread runs a bulk predict or prelabel job (RQ runs
one job at a time: a click queued as an RQ job would wait for it).

Where a label has an active policy, the correction starts from the policy's pre-label of that image
(:class:`alignsam.interactive.Start`: its prompt points and SAM's logits), cached on disk when the worker predicted
the task (:func:`save_starts`) and computed once on the first click otherwise. The strategy that combines the two is
``INTERACTIVE_STRATEGY``; ``auto`` is the one the label's training chose on its validation tasks (bundle metadata
``interactive_strategy``), else :data:`DEFAULT_STRATEGY`. Labels without a policy: SAM on the clicks alone.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from redis import ConnectionPool, Redis
from redis.exceptions import RedisError

from alignsam.image import as_rgb_uint8, image_digest
from alignsam.interactive import STRATEGIES, Start, correct
from alignsam.interactive import start_of as interactive_start
from alignsam.predict import Prediction
from alignsam.sam import ImageEmbedding
from ml_backend.files import label_slug, private_dir
from ml_backend.formats import masks_to_results, task_prediction
from ml_backend.images import load_image
from ml_backend.interactive import REPLY_TTL_S, LabelPrompt, reply_key, requests_key, scale_prompt
from ml_backend.label_config import LabelConfig
from ml_backend.settings import Settings
from workers.models import Models

logger = logging.getLogger(__name__)

DEFAULT_STRATEGY = "policy-drop-near"
"""``auto``'s strategy for a policy whose bundle records none: the lowest NoC@90 averaged over the measured families
in ``benchmarks/results/noc.md`` (circle 3.25, saliency 0.28, blur 3.43, mirror 10.28; mask-input 2.38 / 0.30 /
4.06 / 10.62 comes second), never the plain ``policy`` one, whose negatives fight the corrections."""


# --- the pre-label starts, on disk next to the embeddings ---------------------------------------------------
def start_path(settings: Settings, project_id: int, label: str, version: str, image_key: str) -> Path:
    """Where the start of ``label``'s policy ``version`` on the image with content hash ``image_key`` lives."""
    return settings.model_dir / "starts" / str(int(project_id)) / label_slug(label) / version / f"{image_key}.npz"


def save_start(settings: Settings, project_id: int, label: str, version: str, image_key: str, start: Start) -> None:
    """Write a start atomically (a reader never sees half a file); failures are logged, never raised."""
    path = start_path(settings, project_id, label, version, image_key)
    try:
        private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(start.to_bytes())
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not cache the pre-label start %s: %s", path, exc)


def load_start(settings: Settings, project_id: int, label: str, version: str, image_key: str) -> Start | None:
    """The cached start, or None when there is none (or it cannot be read)."""
    path = start_path(settings, project_id, label, version, image_key)
    try:
        return Start.from_bytes(path.read_bytes())
    except FileNotFoundError:
        return None
    except Exception as exc:  # a torn or foreign file is a miss
        logger.warning("ignoring unreadable pre-label start %s: %s", path, exc)
        return None


def start_of(prediction: Prediction, size: tuple[int, int]) -> Start:
    """A policy prediction as the start of a correction (its instances too, when it was split)."""
    return interactive_start(prediction, size)


def save_starts(settings: Settings, project_id: int, label: str, version: str, images: Sequence[np.ndarray],
                predictions: Sequence[Prediction]) -> None:
    """Cache the start of each image's policy prediction (called where the worker pre-labels)."""
    for image, prediction in zip(images, predictions, strict=True):
        rgb = as_rgb_uint8(image)
        save_start(settings, project_id, label, version, image_digest(rgb), start_of(prediction, rgb.shape[:2]))


# --- one answer ---------------------------------------------------------------------------------------------
class _Images:
    """The last few clicked images and their embeddings, by file (path, inode, size, mtime): the next click on
    a task decodes no PNG and hashes no pixels."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.items: OrderedDict[tuple[str, int, int, int], tuple[np.ndarray, ImageEmbedding]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, m: Models, path: str) -> tuple[np.ndarray, ImageEmbedding]:
        st = os.stat(path)
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        array = as_rgb_uint8(np.asarray(load_image(path, m.settings.image_max_pixels)))
        value = (array, m.sam.embed(array))
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


_images = _Images()


def strategy_for(settings: Settings, meta: Mapping[str, Any] | None) -> str:
    """The strategy for a label with a policy whose bundle metadata is ``meta``."""
    if settings.interactive_strategy != "auto":
        return settings.interactive_strategy
    chosen = (meta or {}).get("interactive_strategy")
    return chosen if chosen in STRATEGIES else DEFAULT_STRATEGY


def answer(m: Models, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The answer to one interactive request (see :meth:`ml_backend.model.AlignSAMModel.predict_interactive`).

    Returns ``{"prediction": Label Studio prediction, "labels": {label: {"strategy", "start", "score"}},
    "timings": {"total_ms", "image_ms", "start_ms", "decode_ms", "encode_ms"}}``; ``decode_ms`` is SAM's work
    (the prompt encoder and mask decoder), the rest is this product's overhead. Raises on a request it cannot
    answer (the caller replies with the reason).
    """
    t0 = time.perf_counter()
    settings = m.settings
    project_id = int(payload["project"])
    config = LabelConfig.from_json(payload["config"])
    versions: Mapping[str, str] = payload.get("policy_versions") or {}
    path = payload["image"]["path"]
    if not Path(path).is_file():
        raise FileNotFoundError(f"the task's image {path} is not on this worker: share IMAGE_CACHE_DIR with it")
    image, emb = _images.get(m, path)
    height, width = image.shape[:2]
    t1 = time.perf_counter()
    masks: dict[str, np.ndarray] = {}
    scores: dict[str, float] = {}
    about: dict[str, dict[str, Any]] = {}
    start_s = decode_s = 0.0
    for raw in payload["prompts"]:
        prompt = LabelPrompt.from_json(raw)
        if config.target_for(prompt.label) is None:
            raise ValueError(f"label {prompt.label!r} is not in the labelling config")
        clicks, box = scale_prompt(prompt, width, height)
        version = versions.get(prompt.label)
        start, strategy, origin = None, "clicks", "none"
        ts = time.perf_counter()
        if version:
            model = m.policy(project_id, prompt.label, version)
            strategy = strategy_for(settings, model.bundle.meta)
            if strategy != "clicks":
                start = load_start(settings, project_id, prompt.label, version, emb.key)
                origin = "cached"
                if start is None:  # predicted before starts were cached, or the cache was cleared: once per image
                    start = start_of(model.predict([image])[0], (height, width))
                    save_start(settings, project_id, prompt.label, version, emb.key, start)
                    origin = "computed"
        td = time.perf_counter()
        start_s += td - ts
        result = correct(m.sam, emb, clicks, start=start, strategy=strategy, box=box)
        decode_s += time.perf_counter() - td
        masks[prompt.label] = result.mask
        scores[prompt.label] = result.score
        about[prompt.label] = {"strategy": strategy, "start": origin, "score": result.score,
                               "clicks": len(clicks), "box": box is not None}
    t2 = time.perf_counter()
    results = masks_to_results(masks, config, scores, simplify_px=settings.polygon_simplify_px,
                               min_area_px=settings.polygon_min_area_px)
    prediction = task_prediction(results, str(payload.get("model_version") or ""))
    t3 = time.perf_counter()
    timings = {"total_ms": 1e3 * (t3 - t0), "image_ms": 1e3 * (t1 - t0), "start_ms": 1e3 * start_s,
               "decode_ms": 1e3 * decode_s, "encode_ms": 1e3 * (t3 - t2)}
    return {"prediction": prediction, "labels": about, "timings": timings}


# --- the serving thread -------------------------------------------------------------------------------------
def serve_one(conn: Redis, m: Models, raw: bytes | str) -> None:
    """Answer one popped request and push the answer (or the reason it has none) to its reply key."""
    try:
        payload = json.loads(raw)
        reply = str(payload["reply_key"])
        deadline = float(payload.get("deadline") or 0)
    except Exception as exc:
        logger.warning("dropping an interactive request that is not the backend's JSON: %s", exc)
        return
    if not reply.startswith(reply_key(m.settings.redis_key_prefix, "")):
        logger.warning("dropping an interactive request whose reply key %s is not the backend's", ascii(reply)[:80])
        return
    if deadline and time.time() > deadline:
        logger.info("interactive request %s arrived after its deadline; skipped", ascii(payload.get("id"))[:40])
        return
    try:
        body: dict[str, Any] = answer(m, payload)
        t = body["timings"]
        logger.info("project %s task %s: click answered in %.1f ms (SAM decode %.1f ms): %s", payload.get("project"),
                    ascii((payload.get("task") or {}).get("id"))[:40], t["total_ms"], t["decode_ms"],
                    ", ".join(f"{label} {v['strategy']} (start {v['start']}, {v['clicks']} clicks"
                              f"{', box' if v['box'] else ''})" for label, v in body["labels"].items()))
    except Exception as exc:
        logger.warning("interactive request for project %s task %s failed: %s: %s", payload.get("project"),
                       ascii((payload.get("task") or {}).get("id"))[:40], type(exc).__name__, exc)
        body = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    with conn.pipeline(transaction=False) as pipe:
        pipe.lpush(reply, json.dumps(body))
        pipe.expire(reply, REPLY_TTL_S)
        pipe.execute()


def serve(conn: Redis, m: Models, stop: threading.Event, poll_s: float = 1.0) -> None:
    """Pop and answer interactive requests until ``stop`` is set; waits out Redis outages."""
    key = requests_key(m.settings.redis_key_prefix)
    while not stop.is_set():
        try:
            popped = conn.brpop([key], timeout=poll_s)
        except RedisError as exc:
            logger.warning("interactive thread: Redis unreachable (%s); retrying", exc)
            stop.wait(poll_s)
            continue
        if popped is None:
            continue
        try:
            serve_one(conn, m, popped[1])
        except RedisError as exc:
            logger.warning("interactive thread: could not reply (%s)", exc)


def start_serving(conn: Redis, m: Models, poll_s: float = 1.0) -> tuple[threading.Thread, threading.Event]:
    """Start :func:`serve` on a daemon thread with a connection of its own (``conn``'s server and settings, a
    socket timeout above the poll); set the returned event to stop it."""
    pool = conn.connection_pool
    kwargs = dict(pool.connection_kwargs, socket_timeout=poll_s + 10)
    conn = Redis(connection_pool=ConnectionPool(connection_class=pool.connection_class, max_connections=2, **kwargs))
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(conn, m, stop, poll_s), name="interactive", daemon=True)
    thread.start()
    return thread, stop
