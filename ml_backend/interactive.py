"""Interactive requests: an annotator's smart-tool clicks and boxes in ``/predict``'s ``params.context``.

Label Studio's editor sends them (and ``POST /api/ml/<id>/interactive-annotating``) as ``/predict`` with one task
and ``params.context.result``: a list of ``keypointlabels`` items (``value.x`` / ``value.y`` in percent of the
image, ``is_positive``, the label in ``value.keypointlabels``) and ``rectanglelabels`` items (``value.x`` / ``y`` /
``width`` / ``height`` in percent, ``value.rectanglelabels``). See ``shared/ls-fixtures/predict_interactive*.json``.

:func:`parse_context` turns that into one :class:`LabelPrompt` per clicked label, in fractions of the image (the
worker may have the image at another size); :class:`InteractiveClient` hands it to a worker and waits for the
mask. The hand-over is not an RQ job: a Redis list every worker serving the ``predict`` queue reads from a thread
of its own (:mod:`workers.interactive`), so a click is answered while that worker runs a bulk job, in one round
trip, without RQ's bookkeeping on the way.

Keys (``P = REDIS_KEY_PREFIX``): ``P:interactive:requests`` (list of JSON requests, each with its deadline) and
``P:interactive:reply:<id>`` (the worker's JSON answer, kept :data:`REPLY_TTL_S`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from ml_backend.errors import BadRequestError, MLBackendError
from ml_backend.images import FetchedImage
from ml_backend.label_config import LabelConfig

logger = logging.getLogger(__name__)

KEYPOINT = "keypointlabels"
RECTANGLE = "rectanglelabels"
REPLY_TTL_S = 60
"""a worker's answer waits this long for the web process that asked (which has given up by then)"""
MAX_WAITING = 1000
"""most clicks kept waiting for a worker (the oldest go first); the list expires :data:`REPLY_TTL_S` after the last"""
MAX_PROMPT_ITEMS = 64
"""most context items read per request: more clicks than this on one task is not an annotator"""


class InteractiveContextError(BadRequestError):
    """``params.context`` is not a usable interactive context (answered with an empty result and a log line)."""


class InteractiveUnavailableError(MLBackendError):
    """No worker answered the click in time (answered with an empty result and a log line)."""

    http_status = 503


@dataclass(frozen=True)
class LabelPrompt:
    """The annotator's prompts for one label of the mask control.

    Attributes:
      label: the mask control's label (the target's ``label``).
      clicks: ``(fx, fy, label)`` with fx, fy in [0, 1] of the image width / height, label 1 positive, 0 negative,
        in the order they came.
      box: ``(fx0, fy0, fx1, fy1)`` in [0, 1], the last rectangle of this label, or None.
      region_ids: the context items' ids.
    """

    label: str
    clicks: tuple[tuple[float, float, int], ...] = ()
    box: tuple[float, float, float, float] | None = None
    region_ids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabelPrompt:
        box = data.get("box")
        return cls(
            label=str(data["label"]),
            clicks=tuple((float(x), float(y), int(lab)) for x, y, lab in data.get("clicks") or ()),
            box=None if box is None else (float(box[0]), float(box[1]), float(box[2]), float(box[3])),
            region_ids=tuple(str(r) for r in data.get("region_ids") or ()),
        )


@dataclass
class ParsedContext:
    """What :func:`parse_context` made of a context: the prompts, and what it dropped (one line each)."""

    prompts: list[LabelPrompt] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def is_interactive(context: Any) -> bool:
    """Whether ``params.context`` asks for an interactive answer (anything but null / absent does)."""
    return context is not None


def _percent(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InteractiveContextError(f"{what} must be a finite number (percent of the image), got {ascii(value)[:40]}")
    return float(value)


def _label_of(item: Mapping[str, Any], kind: str, config: LabelConfig) -> str:
    value = item.get("value")
    names = value.get(kind) if isinstance(value, Mapping) else None
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise InteractiveContextError(f"value.{kind} must name the clicked label, e.g. [\"{config.labels[0]}\"]")
    target = config.target_for(names[0])
    if target is None:
        raise InteractiveContextError(f"label {ascii(names[0])[:60]} is not a label of the <{config.control_type}> "
                                      f"control ({', '.join(config.labels)})")
    return target.label


def _rotation(item: Mapping[str, Any]) -> None:
    value = item.get("value")
    for angle in (item.get("image_rotation"), value.get("rotation") if isinstance(value, Mapping) else None):
        if angle not in (None, 0, 0.0):
            raise InteractiveContextError("rotated images and rectangles are not supported: reset the rotation")


def parse_context(context: Any, config: LabelConfig) -> ParsedContext:
    """One :class:`LabelPrompt` per label clicked in ``context`` (Label Studio's ``params.context``).

    An item that cannot be used (a click outside the image, an unknown label, a type other than keypoints and
    rectangles, a malformed value) is dropped with a reason in ``dropped``; the rest are used. Only the last
    :data:`MAX_PROMPT_ITEMS` items are read.
    Raises :class:`InteractiveContextError` when the context is not ``{"result": [...]}`` or nothing in it is
    usable.
    """
    if not isinstance(context, Mapping) or not isinstance(context.get("result"), list):
        raise InteractiveContextError("params.context must be {\"result\": [keypoint / rectangle results]}, got "
                                      f"{type(context).__name__}")
    items = context["result"]
    out = ParsedContext()
    if len(items) > MAX_PROMPT_ITEMS:
        out.dropped.append(f"{len(items) - MAX_PROMPT_ITEMS} oldest of {len(items)} items (at most "
                           f"{MAX_PROMPT_ITEMS} are read)")
        items = items[-MAX_PROMPT_ITEMS:]
    clicks: dict[str, list[tuple[float, float, int]]] = {}
    boxes: dict[str, tuple[float, float, float, float]] = {}
    ids: dict[str, list[str]] = {}
    for n, item in enumerate(items):
        try:
            if not isinstance(item, Mapping):
                raise InteractiveContextError(f"an item must be a JSON object, got {type(item).__name__}")
            kind = item.get("type")
            if kind not in (KEYPOINT, RECTANGLE):
                raise InteractiveContextError(f"type {ascii(kind)[:40]} is neither {KEYPOINT} nor {RECTANGLE}")
            _rotation(item)
            label = _label_of(item, kind, config)
            value = item["value"]
            x, y = _percent(value.get("x"), "value.x"), _percent(value.get("y"), "value.y")
            if kind == KEYPOINT:
                if not (0 <= x <= 100 and 0 <= y <= 100):
                    raise InteractiveContextError(f"the click at ({x:.1f} %, {y:.1f} %) is outside the image")
                positive = item.get("is_positive", True)
                if not isinstance(positive, bool):
                    raise InteractiveContextError("is_positive must be true or false")
                clicks.setdefault(label, []).append((x / 100, y / 100, int(positive)))
            else:
                w, h = _percent(value.get("width"), "value.width"), _percent(value.get("height"), "value.height")
                x0, y0 = max(0.0, min(x, x + w)), max(0.0, min(y, y + h))
                x1, y1 = min(100.0, max(x, x + w)), min(100.0, max(y, y + h))
                if x1 <= x0 or y1 <= y0:
                    raise InteractiveContextError("the rectangle is empty or outside the image")
                boxes[label] = (x0 / 100, y0 / 100, x1 / 100, y1 / 100)
            ids.setdefault(label, []).append(str(item.get("id", ""))[:64])
        except InteractiveContextError as exc:
            out.dropped.append(f"item {n}: {exc}")
    for label in dict.fromkeys([*clicks, *boxes]):
        out.prompts.append(LabelPrompt(label, tuple(clicks.get(label, ())), boxes.get(label),
                                       tuple(ids.get(label, ()))))
    if not out.prompts:
        raise InteractiveContextError("no usable click or rectangle in params.context (" + "; ".join(out.dropped)
                                      + ")")
    return out


class RecentImages:
    """The images of the last clicked tasks, by (project, image URL): an annotator clicks a task many times in a
    row, and each click would otherwise download its image from Label Studio again (~15 ms, the largest part of a
    click's overhead). Entries live ``ttl_s`` (a replaced upload has a new URL in Label Studio; an image edited in
    place at the same URL is seen again after that) and only while their file exists."""

    def __init__(self, size: int = 256, ttl_s: float = 300.0) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self.items: OrderedDict[tuple[int, str], tuple[float, FetchedImage]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, project_id: int, source: str) -> FetchedImage | None:
        key = (int(project_id), source)
        with self.lock:
            hit = self.items.get(key)
            if hit is None:
                return None
            if hit[0] < time.monotonic() or not os.path.isfile(hit[1].path):
                del self.items[key]
                return None
            self.items.move_to_end(key)
            return hit[1]

    def put(self, project_id: int, image: FetchedImage, source: str) -> None:
        """Remember ``image``, fetched for the task image URL ``source``."""
        key = (int(project_id), source)
        with self.lock:
            self.items[key] = (time.monotonic() + self.ttl_s, image)
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


class InteractiveClient:
    """The web side of the hand-over: push a request, wait for a worker's answer until ``INTERACTIVE_WAIT_S``."""

    def __init__(self, redis: Redis, prefix: str, wait_s: float) -> None:
        self.redis = redis
        self.requests_key = requests_key(prefix)
        self.prefix = prefix
        self.wait_s = wait_s

    def ask(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``payload`` (JSON-able: project, config, versions, task, image, prompts) and return the worker's
        answer ``{"prediction": {...}, "timings": {...}}``.

        Raises :class:`InteractiveUnavailableError` when no worker answers within ``wait_s`` or Redis is down,
        and :class:`MLBackendError` with the worker's reason when it could not answer.
        """
        request_id = uuid.uuid4().hex
        reply = reply_key(self.prefix, request_id)
        body = dict(payload, id=request_id, reply_key=reply, deadline=time.time() + self.wait_s)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.lpush(self.requests_key, json.dumps(body))
                pipe.ltrim(self.requests_key, 0, MAX_WAITING - 1)  # without workers the list does not grow forever
                pipe.expire(self.requests_key, REPLY_TTL_S)
                pipe.execute()
            popped = self.redis.brpop([reply], timeout=max(1, math.ceil(self.wait_s)))
        except RedisError as exc:
            raise InteractiveUnavailableError(f"Redis is unreachable ({type(exc).__name__})") from exc
        if popped is None:
            raise InteractiveUnavailableError(
                f"no worker answered within INTERACTIVE_WAIT_S={self.wait_s} s: start an alignsam-worker serving "
                "the predict queue, or check that the workers are not all busy loading models")
        answer = json.loads(popped[1])
        if answer.get("error"):
            raise MLBackendError(f"the worker could not answer: {answer['error']}")
        return answer


def requests_key(prefix: str) -> str:
    return f"{prefix}:interactive:requests"


def reply_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:interactive:reply:{request_id}"


def scale_prompt(prompt: LabelPrompt, width: int, height: int) -> tuple[list[tuple[float, float, int]],
                                                                        tuple[float, float, float, float] | None]:
    """A prompt's clicks and box in pixels of a ``width`` x ``height`` image (a click at 100 % lands on the last
    pixel's far edge, clamped to the last pixel centre's side of it)."""
    clicks = [(min(fx * width, width - 0.5), min(fy * height, height - 0.5), lab) for fx, fy, lab in prompt.clicks]
    box = None
    if prompt.box is not None:
        fx0, fy0, fx1, fy1 = prompt.box
        box = (fx0 * width, fy0 * height, fx1 * width, fy1 * height)
    return clicks, box


def prompts_json(prompts: Sequence[LabelPrompt]) -> list[dict[str, Any]]:
    return [p.to_json() for p in prompts]
