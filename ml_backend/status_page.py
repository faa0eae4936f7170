"""The status page (``GET /ui``): what every project's training and pre-labelling is doing, as plain HTML.

Server-rendered from Redis alone (no torch, no front-end build): per project its labels with the active policy
version, that version's validation mIoU and FR and the previous version's (so the gain shows), the training job
(queued; running with stage, episode of E and an estimate of the time left; failed with its reason), the prelabel
job's progress; then the depth of each queue and the live workers, read through RQ's public API with the JSON
serializer (:mod:`ml_backend.job_queue`). While a job is queued or running the page reloads itself every
:data:`REFRESH_S` seconds (``<meta http-equiv="refresh">``).

Validation scores come from the JSON sidecar a worker writes next to each policy bundle
(``MODEL_DIR/policies/<project>/<label>/<version>.json``), found by version; the page never opens the bundle.
The pictures the worker drew at the end of the active version's training (validation gallery, learning curve,
``<version>.gallery.png`` / ``<version>.curve.png`` beside the bundle) are shown per label, linked to
``GET /pictures/...``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from redis import ConnectionPool, Redis
from rq import Worker

from ml_backend.files import PICTURE_KINDS, label_slug, picture_file, picture_name
from ml_backend.job_queue import (
    ALIVE_STATUSES,
    QUEUES,
    SERIALIZER,
    ProductJob,
    job_summary,
    product_queue,
    started_registry,
    training_jobs,
)
from ml_backend.keys import digest
from ml_backend.settings import Settings
from ml_backend.state import ProjectStore

REFRESH_S = 5
"""Seconds between reloads of the page while something is queued or running."""

VERSION_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,80}")
"""What a policy version looks like (``20261202-010203-1a2b3c4d``): anything else is never looked up on disk."""


def lookup_connection(redis: Redis) -> Redis:
    """A small connection pool of its own for reading RQ's workers: RQ's Worker objects set a socket timeout on
    their connection's pool, which must not change the web process's own connection (as in
    :class:`ml_backend.job_queue.QueuePredictor`)."""
    pool = redis.connection_pool
    return Redis(connection_pool=ConnectionPool(connection_class=pool.connection_class, max_connections=2,
                                                **pool.connection_kwargs))


# ---------------------------------------------------------------------------------------------------------
# What the page shows
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LabelRow:
    label: str
    version: str | None
    miou: float | None = None
    fr: float | None = None
    previous_version: str | None = None
    previous_miou: float | None = None
    previous_fr: float | None = None
    last_result: str | None = None  # what the last training did with this label
    pictures: dict[str, str] = field(default_factory=dict)  # kind -> URL path of the active version's picture
    clicks: str | None = None  # how clicks combine with the active policy, with its validation NoC@90
    instances: str | None = None  # whether the active policy prompts per instance, with both validation mIoUs
    candidates: str | None = None  # every (SRM branch, action grid) trained, with its validation mIoU; the kept one


@dataclass
class TrainingView:
    state: str  # "never trained" | "queued" | "running" | "done" | "failed" | "skipped" | ...
    stage: str = ""
    label: str = ""
    episode: int | None = None
    episodes: int | None = None
    seconds_left: float | None = None
    failure: str | None = None
    job_id: str | None = None


@dataclass
class ProjectView:
    project: int
    model_version: str
    labelled_tasks: int
    labels: list[LabelRow]
    training: TrainingView
    prelabel: dict[str, Any] | None = None  # {"status", "done", "total", "failed"}


@dataclass
class PageData:
    projects: list[ProjectView]
    queues: dict[str, dict[str, int]]  # queue -> {"queued", "running", "failed"}
    workers: list[dict[str, Any]]  # {"name", "state", "queues", "job"}
    generated_at: float = field(default_factory=time.time)

    @property
    def busy(self) -> bool:
        """Whether a job is queued or running anywhere (the page then reloads itself)."""
        if any(q["queued"] or q["running"] for q in self.queues.values()):
            return True
        return any(p.training.state in ("queued", "running")
                   or (p.prelabel is not None and p.prelabel["status"] in ALIVE_STATUSES) for p in self.projects)


def _sidecar(settings: Settings, project_id: int, version: str | None) -> dict[str, Any]:
    """The metadata recorded next to the bundle of ``version`` ({} when absent or unreadable). Only a version of
    the expected shape is looked up, and only below ``MODEL_DIR/policies/<project>/``."""
    if not version or not VERSION_PATTERN.fullmatch(version) or version.startswith("."):
        return {}
    root = settings.policy_dir / str(int(project_id))
    for path in sorted(root.glob(f"*/{version}.json")):
        try:
            meta = json.loads(Path(path).read_text())
            return meta if isinstance(meta, dict) else {}
        except (OSError, ValueError):
            return {}
    return {}


def _sidecar_metrics(settings: Settings, project_id: int, version: str | None) -> dict[str, float]:
    """Validation metrics recorded next to the bundle of ``version`` ({} when absent)."""
    metrics = _sidecar(settings, project_id, version).get("val_metrics")
    if not isinstance(metrics, Mapping):
        return {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _instances(settings: Settings, project_id: int, version: str | None) -> str | None:
    """``"per instance · val mIoU per instance 0.856, one mask 0.594 · mask feedback off (on 0.850) · 3 SRM clicks
    (0: 0.620, 6: 0.641)"``: the training's instance choice with its scores (per-instance prompts with points alone
    and with boxes, when both were validated), then its mask-feedback and SRM-click choices when it made them."""
    meta = _sidecar(settings, project_id, version)
    parts = [p for p in (_instance_choice(meta), _mask_feedback(meta), _refine(meta)) if p is not None]
    return " · ".join(parts) if parts else None


def _mask_feedback(meta: Mapping[str, Any]) -> str | None:
    """``"mask feedback off (on 0.850)"``: whether the policy feeds SAM's previous mask back, and the other
    setting's validation mIoU; None for bundles that did not validate it."""
    scores = meta.get("mask_feedback")
    if not isinstance(scores, Mapping):
        return None
    config = meta.get("config") if isinstance(meta.get("config"), Mapping) else {}
    kept = "on" if config.get("use_mask_input") is True else "off"
    other = "off" if kept == "on" else "on"
    miou = _float(scores[other].get("miou")) if isinstance(scores.get(other), Mapping) else None
    return f"mask feedback {kept}" + (f" ({other} {miou:.3f})" if miou is not None else "")


def _refine(meta: Mapping[str, Any]) -> str | None:
    """``"3 SRM clicks (0: 0.620, 6: 0.641)"``: how many SRM corrective clicks the policy adds after its episode
    (alignsam.refine), and the other counts' validation mIoU; None for bundles that did not validate them."""
    scores = meta.get("refine")
    if not isinstance(scores, Mapping):
        return None
    config = meta.get("config") if isinstance(meta.get("config"), Mapping) else {}
    kept = config.get("refine_clicks", 0)
    kept = kept if isinstance(kept, int) and not isinstance(kept, bool) else 0
    others = []
    for clicks, metrics in sorted(scores.items(), key=lambda kv: str(kv[0]).zfill(4)):
        miou = _float(metrics.get("miou")) if isinstance(metrics, Mapping) else None
        if str(clicks) != str(kept) and miou is not None:
            others.append(f"{clicks}: {miou:.3f}")
    noun = "SRM click" if kept == 1 else "SRM clicks"
    return f"{kept} {noun}" + (f" ({', '.join(others)})" if others else "")


def _instance_choice(meta: Mapping[str, Any]) -> str | None:
    """The instance part of :func:`_instances`; None for bundles that did not make the choice."""
    if not isinstance(meta.get("instances"), bool):
        return None
    chosen = ("per instance with boxes" if meta.get("instance_boxes") else "per instance") if meta["instances"] \
        else "one mask"
    if meta["instances"] and meta.get("instance_filter"):
        flt = meta["instance_filter"]
        weak = isinstance(flt, Mapping) and flt.get("weak") is not None  # alignsam.instances.with_weak_components
        chosen += ", filtered (weak components too)" if weak else ", filtered"
    split = meta.get("instance_metrics") if isinstance(meta.get("instance_metrics"), Mapping) else {}
    branches = meta.get("candidates") if isinstance(meta.get("candidates"), Mapping) else {}
    kept = meta.get("chosen_candidate") or meta.get("branch")
    by_candidate = meta.get("instance_candidates") if isinstance(meta.get("instance_candidates"), Mapping) else {}
    modes = by_candidate.get(kept) if isinstance(by_candidate.get(kept), Mapping) else {}
    whole = branches.get(kept) if isinstance(branches.get(kept), Mapping) else {}
    on, off = _float(split.get("miou")), _float(whole.get("miou"))
    if on is None or off is None:
        return chosen
    scores = {k: _float(v.get("miou")) for k, v in modes.items() if isinstance(v, Mapping)}
    if len(scores) > 1 and all(v is not None for v in scores.values()):
        detail = " / ".join(f"{k} {v:.3f}" for k, v in scores.items())
        return f"{chosen} · val mIoU per instance ({detail}), one mask {off:.3f}"
    return f"{chosen} · val mIoU per instance {on:.3f}, one mask {off:.3f}"


def _candidates(settings: Settings, project_id: int, version: str | None) -> str | None:
    """``"implicit 0.612 (kept) · explicit 0.583 · implicit 16x16 0.601"``: every (SRM branch, action grid) the
    training validated, with its mIoU (one mask); None for bundles without candidates."""
    meta = _sidecar(settings, project_id, version)
    branches = meta.get("candidates")
    if not isinstance(branches, Mapping) or not branches:
        return None
    kept = meta.get("chosen_candidate") or meta.get("branch")
    parts = []
    for name, metrics in branches.items():
        miou = _float(metrics.get("miou")) if isinstance(metrics, Mapping) else None
        parts.append(f"{name} {_fmt(miou)}" + (" (kept)" if name == kept else ""))
    return " · ".join(parts)


def _clicks(settings: Settings, project_id: int, version: str | None) -> str | None:
    """``"<strategy> · NoC@90 x.x (SAM alone y.y)"``: how the training chose to combine clicks with the policy."""
    meta = _sidecar(settings, project_id, version)
    strategy, scores = meta.get("interactive_strategy"), meta.get("interactive_scores")
    if not isinstance(strategy, str):
        return None
    text = strategy
    if isinstance(scores, Mapping) and isinstance(scores.get(strategy), Mapping):
        best = _float(scores[strategy].get("noc@90"))
        alone = _float(scores["clicks"].get("noc@90")) if isinstance(scores.get("clicks"), Mapping) else None
        if best is not None:
            text += f" · NoC@90 {best:.1f}" + (f" (pre-label, then SAM on the clicks alone: {alone:.1f})"
                                               if alone is not None and strategy != "clicks" else "")
    return text


def _pictures(settings: Settings, project_id: int, label: str, version: str | None) -> dict[str, str]:
    """The active version's pictures that exist on disk, as ``kind -> URL`` (relative to ``/ui``)."""
    if not version or not VERSION_PATTERN.fullmatch(version) or version.startswith("."):
        return {}
    slug = label_slug(label)
    found = {}
    for kind in PICTURE_KINDS:
        name = picture_name(version, kind)
        if picture_file(settings.policy_dir, project_id, slug, name) is not None:
            found[kind] = f"pictures/{int(project_id)}/{quote(slug)}/{quote(name)}"
    return found


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _training_view(store: ProjectStore, jobs: Sequence[Mapping[str, Any]], pid: int) -> TrainingView:
    record = store.training(pid)
    if not jobs and not record:
        return TrainingView("never trained")
    started = [j for j in jobs if j["status"] not in ("queued", "deferred", "scheduled")]
    job = (started[0] if started else jobs[0]) if jobs else None
    if any(j["status"] in ("queued", "deferred", "scheduled") for j in jobs) and (job is None
                                                                                  or job["status"] != "started"):
        job = next(j for j in jobs if j["status"] in ("queued", "deferred", "scheduled"))
    if job is None:
        return TrainingView(record.get("status") or "unknown", stage=record.get("stage", ""),
                            failure=record.get("reason") or None, job_id=record.get("job_id") or None)
    meta = job.get("progress") or {}
    progress = meta.get("progress") if isinstance(meta.get("progress"), Mapping) else {}
    state = {"started": "running", "finished": "done", "queued": "queued", "deferred": "queued",
             "scheduled": "queued"}.get(job["status"], job["status"])
    if state == "done" and meta.get("stage") == "skipped":
        state = "skipped"
    view = TrainingView(state, stage=str(meta.get("stage") or ""), label=str(meta.get("label") or ""),
                        job_id=job["id"], failure=job.get("failure"))
    if state == "running":
        episode, episodes = progress.get("episode"), progress.get("episodes")
        if isinstance(episode, int) and isinstance(episodes, int) and episodes:
            view.episode, view.episodes = episode, episodes
            elapsed = _float(progress.get("elapsed_s"))
            if elapsed is not None and episode > 0:
                view.seconds_left = elapsed / episode * max(episodes - episode, 0)
    return view


def _label_rows(store: ProjectStore, settings: Settings, pid: int, labels: Sequence[str],
                jobs: Sequence[Mapping[str, Any]]) -> list[LabelRow]:
    active = store.policy_versions(pid)
    # The newest finished training's per-label results: what it did and which version it compared against.
    results: Mapping[str, Any] = {}
    for job in jobs:
        labels_meta = (job.get("progress") or {}).get("labels")
        if job["status"] == "finished" and isinstance(labels_meta, Mapping):
            results = labels_meta
            break
    rows = []
    for label in list(labels) + [lab for lab in active if lab not in labels]:
        version = active.get(label)
        row = LabelRow(label, version)
        metrics = _sidecar_metrics(settings, pid, version)
        row.miou, row.fr = metrics.get("miou"), metrics.get("fr")
        row.pictures = _pictures(settings, pid, label, version)
        row.clicks = _clicks(settings, pid, version)
        row.instances = _instances(settings, pid, version)
        row.candidates = _candidates(settings, pid, version)
        result = results.get(label) if isinstance(results.get(label), Mapping) else None
        if result is not None:
            row.last_result = str(result.get("status") or "")
            if result.get("version") == version and result.get("active_version"):
                row.previous_version = str(result["active_version"])
                previous = _sidecar_metrics(settings, pid, row.previous_version)
                row.previous_miou = _float(result.get("active_val_miou")) or previous.get("miou")
                row.previous_fr = previous.get("fr")
            if row.miou is None and result.get("version") == version:
                row.miou = _float(result.get("val_miou"))
        rows.append(row)
    return rows


def _prelabel(store: ProjectStore, pid: int, model_version: str) -> dict[str, Any] | None:
    summary = job_summary(store.redis, f"prelabel-{int(pid)}-{digest(model_version)}", reap=False)
    if summary is None:
        return None
    meta = summary.get("progress") or {}
    return {"status": summary["status"], "done": meta.get("done"), "total": meta.get("total"),
            "failed": meta.get("failed"), "failure": summary.get("failure")}


def queue_depths(redis: Redis) -> dict[str, dict[str, int]]:
    """Per queue: jobs waiting, running and failed (RQ's queue and registries, JSON serializer)."""
    depths = {}
    for name in QUEUES:
        queue = product_queue(name, redis)
        depths[name] = {"queued": queue.count, "running": started_registry(name, redis).count,
                        "failed": queue.failed_job_registry.count, "finished": queue.finished_job_registry.count}
    return depths


def live_workers(lookup: Redis) -> list[dict[str, Any]]:
    """The workers registered in Redis (RQ removes those that stopped heartbeating), sorted by name."""
    workers = []
    try:
        for worker in Worker.all(connection=lookup, job_class=ProductJob, serializer=SERIALIZER):
            state = worker.get_state()
            workers.append({"name": worker.name, "state": str(getattr(state, "value", state)),
                            "queues": worker.queue_names(), "job": worker.get_current_job_id()})
    finally:
        # No idle connection left behind: the embedded Redis shuts down (and saves) only when its owner's
        # connection is the last one.
        lookup.connection_pool.disconnect()
    return sorted(workers, key=lambda w: w["name"])


def page_data(store: ProjectStore, settings: Settings, lookup: Redis) -> PageData:
    """Everything the page shows, read from Redis (and the bundles' JSON sidecars) now."""
    projects = []
    for pid in store.project_ids():
        status = store.status(pid)
        if status is None:
            continue
        jobs = training_jobs(store.redis, store.keys, pid)
        projects.append(ProjectView(
            project=pid, model_version=status["model_version"], labelled_tasks=status["labelled_tasks"],
            labels=_label_rows(store, settings, pid, status["labels"], jobs),
            training=_training_view(store, jobs, pid),
            prelabel=_prelabel(store, pid, status["model_version"]),
        ))
    return PageData(projects, queue_depths(store.redis), live_workers(lookup))


# ---------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:0 0 .4em}
.muted{color:#777}.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:1em 0}
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #eee;text-align:left}
th{font-weight:600;background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.state{display:inline-block;padding:.1em .55em;border-radius:1em;font-weight:600;font-size:.9em}
.s-never{background:#eee}.s-queued{background:#fff3c4}.s-running{background:#cfe8ff}.s-done{background:#d4f5d4}
.s-failed{background:#ffd6d6}.s-skipped{background:#eee}
.gain{color:#18794e}.loss{color:#b42318}.bar{background:#eee;border-radius:3px;height:8px;width:12em;display:inline-block}
.bar>span{display:block;height:8px;background:#3b82f6;border-radius:3px}
.pictures{display:flex;flex-wrap:wrap;gap:1em;margin-top:.8em}.pictures figure{margin:0;max-width:36em}
.pictures img{display:block;max-width:100%;max-height:24em;border:1px solid #ddd;border-radius:4px;background:#fff}
.pictures figcaption{font-size:.9em;color:#555}
"""


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _state_badge(state: str) -> str:
    css = {"never trained": "never", "done": "done", "failed": "failed", "queued": "queued",
           "running": "running"}.get(state, "skipped")
    return f'<span class="state s-{css}" data-state="{escape(state)}">{escape(state)}</span>'


def _bar(done: int, total: int) -> str:
    width = 100 * done / total if total else 0
    return f'<span class="bar"><span style="width:{width:.0f}%"></span></span>'


def _training_html(t: TrainingView) -> str:
    parts = [f"Training: {_state_badge(t.state)}"]
    if t.state == "running":
        stage = f"{t.stage} {t.label}".strip()
        if stage:
            parts.append(f'<span class="stage">{escape(stage)}</span>')
        if t.episode is not None and t.episodes:
            parts.append(f'<span class="episode">episode {t.episode} of {t.episodes}</span> '
                         + _bar(t.episode, t.episodes))
        if t.seconds_left is not None:
            parts.append(f'<span class="eta">about {t.seconds_left:.0f} s left</span>')
    if t.state == "failed":
        parts.append(f'<span class="failure">{escape(t.failure or "unknown reason")}</span>')
    if t.job_id:
        parts.append(f'<span class="muted">job {escape(t.job_id)}</span>')
    return " · ".join(parts)


def _labels_html(rows: Sequence[LabelRow]) -> str:
    if not rows:
        return '<p class="muted">No labels in the label config.</p>'
    out = ['<table class="labels"><tr><th>label</th><th>active policy</th><th class="num">val mIoU</th>'
           '<th class="num">val FR</th><th>previous policy</th><th class="num">prev. mIoU</th>'
           '<th class="num">prev. FR</th><th>last training</th><th>SRM · grid (val mIoU)</th><th>instances</th>'
           '<th>clicks</th></tr>']
    for r in rows:
        gain = ""
        if r.miou is not None and r.previous_miou is not None:
            delta = r.miou - r.previous_miou
            gain = f' <span class="{"gain" if delta >= 0 else "loss"}">({delta:+.3f})</span>'
        out.append(
            f'<tr data-label="{escape(r.label)}"><td>{escape(r.label)}</td>'
            f'<td>{escape(r.version) if r.version else "<span class=muted>none yet</span>"}</td>'
            f'<td class="num">{_fmt(r.miou)}{gain}</td><td class="num">{_fmt(r.fr)}</td>'
            f'<td>{escape(r.previous_version or "–")}</td><td class="num">{_fmt(r.previous_miou)}</td>'
            f'<td class="num">{_fmt(r.previous_fr)}</td><td>{escape(r.last_result or "–")}</td>'
            f'<td>{escape(r.candidates or "–")}</td><td>{escape(r.instances or "–")}</td><td>{escape(r.clicks or "–")}</td></tr>')
    out.append("</table>")
    captions = {"gallery": "validation gallery: image, ground truth, prediction with its points and IoU",
                "curve": "learning curve: reward per episode per SRM branch, validation mIoU"}
    for r in rows:
        if not r.pictures:
            continue
        out.append(f'<div class="pictures" data-label="{escape(r.label)}">')
        for kind, url in r.pictures.items():
            out.append(f'<figure><a href="{escape(url)}"><img class="picture-{kind}" src="{escape(url)}" '
                       f'alt="{escape(r.label)} {kind}"></a><figcaption>{escape(r.label)} · {escape(r.version or "")}'
                       f" · {captions[kind]}</figcaption></figure>")
        out.append("</div>")
    return "".join(out)


def _prelabel_html(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return ""
    done, total = p.get("done"), p.get("total")
    text = f"Pre-labelling: {_state_badge({'started': 'running', 'finished': 'done'}.get(p['status'], p['status']))}"
    if isinstance(done, int) and isinstance(total, int):
        text += f' <span class="prelabel-progress">{done} of {total} tasks</span> {_bar(done, total)}'
    if p.get("failure"):
        text += f' <span class="failure">{escape(str(p["failure"]))}</span>'
    return f"<p>{text}</p>"


def render(data: PageData) -> str:
    """The page as HTML text."""
    head = ['<!doctype html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width,initial-scale=1">',
            f'<meta http-equiv="refresh" content="{REFRESH_S}">' if data.busy else "",
            f"<title>AlignSAM status</title><style>{CSS}</style></head><body>",
            "<h1>AlignSAM backend</h1>",
            f'<p class="muted">{time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(data.generated_at))}'
            f'{f" · refreshes every {REFRESH_S} s while a job runs" if data.busy else ""}</p>']
    body = ['<section class="card" id="queues"><h2>Queues and workers</h2><table><tr><th>queue</th>'
            '<th class="num">queued</th><th class="num">running</th><th class="num">failed</th></tr>']
    for name, depth in data.queues.items():
        body.append(f'<tr data-queue="{escape(name)}"><td>{escape(name)}</td><td class="num">{depth["queued"]}</td>'
                    f'<td class="num">{depth["running"]}</td><td class="num">{depth["failed"]}</td></tr>')
    body.append("</table>")
    if data.workers:
        body.append(f'<p class="workers">{len(data.workers)} live worker(s):</p><ul>')
        for w in data.workers:
            job = f" running {escape(w['job'])}" if w["job"] else ""
            body.append(f'<li class="worker">{escape(w["name"])} ({escape(w["state"])}, queues '
                        f'{escape(", ".join(w["queues"]))}){job}</li>')
        body.append("</ul>")
    else:
        body.append('<p class="workers">No live workers: queued jobs wait until one starts (alignsam-worker).</p>')
    body.append("</section>")
    if not data.projects:
        body.append('<section class="card"><p>No project has connected yet: add this backend in a Label Studio '
                    "project (Settings &gt; Model).</p></section>")
    for p in data.projects:
        body.append(f'<section class="card project" id="project-{p.project}"><h2>Project {p.project}</h2>'
                    f'<p>model version <code>{escape(p.model_version)}</code> · {p.labelled_tasks} labelled '
                    f"task(s)</p><p>{_training_html(p.training)}</p>{_prelabel_html(p.prelabel)}"
                    f"{_labels_html(p.labels)}</section>")
    return "".join(head + body) + "</body></html>"


def page(store: ProjectStore, settings: Settings, lookup: Redis) -> str:
    """The page for the current state; a Redis error propagates (the app answers 503)."""
    return render(page_data(store, settings, lookup))
