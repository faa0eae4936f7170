"""Faults during load: what breaks, what recovers by itself, how long it takes, and what it leaves behind.

    python -m benchmarks.bench_faults [--faults ls,kill,kill-start,redis] [--clients 4] [--note TEXT]

The stack of :mod:`benchmarks.bench_load` (real gunicorn, 2 real ``alignsam-worker`` processes on
``predict,prelabel``, one real Redis, a loopback Label Studio stub; ``SAM_PRESET=tiny CLIP_PRESET=tiny
TORCH_THREADS=1``, other settings the product's defaults) with ``--clients`` Label Studio-like clients on project 1
the whole time, and these faults one after the other:

- **ls**: Label Studio's API down during a pre-label job. Project 2 is connected, 8 of its tasks are annotated, and
  START_TRAINING trains a policy through the product's own path (a ``train`` worker, ``TRAIN_EPISODES=2
  TRAIN_STEPS=2 TRAIN_EPOCHS=1 TRAIN_BRANCH=implicit``); its activation queues the prelabel job
  (``PRELABEL_BATCH_SIZE=5``). The stub's ``/api/`` then answers 503 twice: a short outage (inside the client's retry
  budget, ``LS_API_RETRIES=4`` / ``LS_API_BACKOFF_S=1``: 1+2+4+8 s) and a long one (past it). A failed job is started
  again the product's way (``enqueue_prelabel`` for the same version, what an operator's re-trigger does).
- **kill**: a predict worker SIGKILLed while it runs a predict job (its status ``started``); a new worker is started
  at once.
- **kill-start**: the same, at the moment the worker has taken the job (RQ has registered its execution) but before
  the job's status says ``started`` (the harness kills when it sees that state; the row says which state the job was
  really in).
- **redis**: Redis stopped (SIGTERM) and started again on the same socket and data a few seconds later.

Per fault: requests that failed meanwhile (by status), what recovered and how long it took, duplicate predictions in
the stub (one task, one model version, more than one prediction: must be 0), policy bundles under
``MODEL_DIR/policies`` that do not load (must be 0), and at the end tasks lost (never answered after a final
sweep: must be 0). Results: ``benchmarks/results/faults.json`` / ``faults.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from benchmarks.common import RESULTS, write_results
from benchmarks.loadlib import (
    Bodies,
    Load,
    Stack,
    busy_job,
    find_job,
    fmt_ms,
    load_avg,
    pct,
    raw_job,
    seconds_since,
    status_text,
    summarize,
    wait_until,
    worker_key,
)

LOAD_PROJECT = 1
PRELABEL_PROJECT = 2
PRELABEL_TASKS = 400
ANNOTATED = 8
SHORT_OUTAGE_S = 6.0
LONG_OUTAGE_S = 40.0
REDIS_DOWN_S = 5.0
SETTLE_S = 50.0  # load kept on after a fault: JOB_HEARTBEAT_TTL_S (30) + reaping, with the workers busy

EXPLANATION = """
How to run: `.venv/bin/python -m benchmarks.bench_faults` (about 8 minutes; `--faults ls,kill,kill-start,redis`
chooses and orders them, `--clients`, `--out DIR`). Same stack as `load.md` (real gunicorn, 2 real `alignsam-worker`
processes on `predict,prelabel`, one real Redis with an append-only file, a loopback Label Studio stub; tiny SAM /
CLIP presets, one torch thread, every other setting the product's default: `PREDICT_WAIT_S=30`,
`JOB_HEARTBEAT_TTL_S=30`, `LS_API_RETRIES=4`, `LS_API_BACKOFF_S=1`), with the load's Label Studio-like clients
running on project 1 through all faults, one after the other, and kept on for 50 s after each fault (the heartbeat
TTL plus reaping).

What the columns mean: *errors meanwhile* are the clients' requests that did not get a 200 during the fault's phase
(for Redis: from the stop until /predict succeeded again; timeouts are Label Studio's own: health 1 s, setup 3 s, webhooks 1 s, predict 100 s). *Recovered* says what
came back and whether it needed a person; *time* is from the end of the fault (Label Studio back, Redis started, the
worker killed) to the first success of what it broke. *Tasks answered empty (job failed)* are /predict answers of
the current model version with no regions because the task's predict job failed (the web log's "predict job ...
failed" lines from that fault until the next): Label Studio stores such an answer as the model's prediction and does
not ask again, so for the annotator that task has no pre-label. *Duplicates* counts predictions beyond the first of one model
version for one task in the stub (Label Studio's database): 0 means no task got the same pre-label twice. *Policies
corrupted* counts bundles under `MODEL_DIR/policies` that `alignsam.bundle.load_bundle` refuses, plus active versions
in Redis whose bundle is missing. *Lost* counts project-1 tasks that never got an answer of the current model version,
after the final sweep re-requested every task still pending or failed. Shared 2-core VM (other engineers' test runs
were using it too): times are of this machine and this load.
"""


class Faults:
    """The stack, the background load, and one method per fault; each returns a row dict for the results."""

    def __init__(self, stack: Stack, load: Load) -> None:
        self.stack = stack
        self.load = load
        self.url = stack.web.url
        self.session = requests.Session()
        self.bodies = load.bodies
        self.log: list[str] = []

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.load.started:6.1f} s] {text}"
        self.log.append(line)
        print(line, flush=True)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """The clients' requests started in [t0, t1): counts of non-200 by status, predict latencies."""
        records = self.load.records_between(t0, t1)
        bad: dict[str, int] = {}
        for r in records:
            if r.status != "200":
                bad[f"{r.kind.split(' (')[0]} {r.status}"] = bad.get(f"{r.kind.split(' (')[0]} {r.status}", 0) + 1
        predict_ms = [1e3 * r.seconds for r in records if r.kind.startswith("predict")]
        return {"requests": len(records), "errors": sum(bad.values()), "errors_by_kind_status": bad,
                "predict_p50_ms": pct(predict_ms, 50), "predict_p95_ms": pct(predict_ms, 95),
                "predict_max_ms": max(predict_ms) if predict_ms else None,
                "pending_answers": sum(r.pending for r in records)}

    def first_ok_predict_after(self, t: float, timeout: float) -> float | None:
        """Seconds from ``t`` until a client's /predict started after ``t`` answered 200 with no pending task."""
        def found() -> float | None:
            for r in self.load.records_between(t):
                if r.kind.startswith("predict") and r.status == "200" and r.pending == 0:
                    return r.start + r.seconds - t
            return None

        value, _ = wait_until(found, timeout)
        return value

    # --- checks -----------------------------------------------------------------------------------------------
    def policies_corrupted(self) -> dict[str, Any]:
        """Bundles under MODEL_DIR/policies that do not load, and active versions without a loadable bundle."""
        from alignsam.bundle import load_bundle
        from ml_backend.keys import Keys
        from ml_backend.settings import Settings
        from workers.models import bundle_path

        settings = Settings(model_dir=self.stack.model_dir, redis_url=self.stack.redis.url)
        bad, checked = [], 0
        for path in sorted(settings.policy_dir.glob("**/*.pt")):
            if path.name.startswith(".staging"):
                continue  # a job's private temp file: nothing reads it
            checked += 1
            try:
                load_bundle(path)
            except Exception as exc:
                bad.append(f"{path.relative_to(self.stack.model_dir)}: {type(exc).__name__}: {exc}")
        active = {k.decode(): v.decode()
                  for k, v in self.stack.conn.hgetall(Keys().policies(PRELABEL_PROJECT)).items()}
        for label, version in active.items():
            if not bundle_path(settings, PRELABEL_PROJECT, label, version).is_file():
                bad.append(f"active {label} {version}: bundle missing")
        return {"bundles_checked": checked, "active_versions": active, "corrupted": len(bad), "details": bad}

    def prelabel_state(self, version: str) -> dict[str, Any]:
        """Project 2 in the stub: unlabelled tasks with exactly one / no prediction of ``version``, duplicates,
        predictions on labelled tasks."""
        counts = self.stack.ls.version_counts()
        ids = self.stack.task_ids(PRELABEL_PROJECT)
        labelled = set(ids[:ANNOTATED])
        unlabelled = [t for t in ids if t not in labelled]
        return {
            "unlabelled_tasks": len(unlabelled),
            "with_one_prediction": sum(counts.get((t, version), 0) == 1 for t in unlabelled),
            "without_prediction": sum(counts.get((t, version), 0) == 0 for t in unlabelled),
            "duplicates": self.stack.ls.duplicates(),
            "predictions_on_labelled_tasks": sum(n for (t, _v), n in counts.items() if t in labelled),
            "import_calls_stored": self.stack.ls.imports,
        }

    # --- the faults -------------------------------------------------------------------------------------------
    def label_studio_down(self) -> dict[str, Any]:
        stack, ls, conn = self.stack, self.stack.ls, self.stack.conn
        pid = PRELABEL_PROJECT
        self.say("ls: connecting project 2, annotating 8 tasks, starting a train worker")
        assert self.session.post(f"{self.url}/setup", json=self.bodies.setup(pid), timeout=10).ok
        for t in stack.task_ids(pid)[:ANNOTATED]:
            ann = ls.annotate(t)
            body = self.bodies.webhook("ANNOTATION_CREATED", pid, t)
            body["annotation"] = dict(body["annotation"], id=ann["id"], result=ann["result"])
            assert self.session.post(f"{self.url}/webhook", json=body, timeout=5).ok
        trainer = stack.add_worker("train")
        trainer.wait_ready(conn, timeout=180)
        response = self.session.post(f"{self.url}/webhook", json=self.bodies.webhook("START_TRAINING", pid, 0),
                                     timeout=5)
        train_job = response.json()["job_id"]
        self.say(f"ls: START_TRAINING -> {response.status_code} job {train_job}")
        status, took = wait_until(lambda: (s := raw_job(conn, train_job).get("status")) in ("finished", "failed")
                                  and s, 300)
        self.say(f"ls: training {status} after {took} s")
        state = self.session.get(f"{self.url}/status/{pid}", timeout=5).json()
        version = state["model_version"]
        prelabel, _ = wait_until(lambda: find_job(conn, f"prelabel-{pid}-", version), 30)
        assert prelabel, f"no prelabel job was queued for project {pid} version {version}"
        row: dict[str, Any] = {"fault": "Label Studio API down during a prelabel job", "training": status,
                               "training_s": took, "model_version": version, "policy_versions":
                               state.get("policy_versions"), "prelabel_job": prelabel}
        # short outage: as soon as the job runs
        _, _ = wait_until(lambda: raw_job(conn, prelabel).get("status") == "started", 60, interval=0.02)
        imports0 = ls.imports
        t_down = time.monotonic()
        ls.api_down_until = t_down + SHORT_OUTAGE_S
        self.say(f"ls: API down for {SHORT_OUTAGE_S} s (job started, {imports0} imports stored)")
        time.sleep(SHORT_OUTAGE_S)
        t_up = time.monotonic()
        resumed = seconds_since(t_up, lambda: ls.imports > imports0, 60, interval=0.02)
        job_after_short = raw_job(conn, prelabel).get("status")
        row["short"] = {"down_s": SHORT_OUTAGE_S, "api_503_answers": ls.api_503,
                        "job_status_after": job_after_short, "first_import_after_s": resumed}
        self.say(f"ls: short outage over; job {job_after_short}; first import {resumed} s after the API came back")
        # long outage: past the retry budget
        _, _ = wait_until(lambda: ls.imports >= imports0 + 2, 60, interval=0.02)
        before_503 = ls.api_503
        t_long = time.monotonic()
        if raw_job(conn, prelabel).get("status") != "started":
            self.say("ls: the prelabel job finished before the long outage could start; long outage skipped")
            row["long"] = {"skipped": "job finished first"}
        else:
            ls.api_down_until = t_long + LONG_OUTAGE_S
            self.say(f"ls: API down for {LONG_OUTAGE_S} s ({ls.imports} imports stored)")
            failed_after = seconds_since(t_long, lambda: raw_job(conn, prelabel).get("status") == "failed",
                                         LONG_OUTAGE_S + 5, interval=0.1)
            failed = failed_after is not None
            time.sleep(max(t_long + LONG_OUTAGE_S - time.monotonic(), 0))
            t_back = time.monotonic()
            failure_line = [job_failure(conn, prelabel)]
            self.say(f"ls: API back; job {'failed after ' + f'{failed_after:.1f} s' if failed else 'did not fail'}"
                     f": {failure_line[0][:200]}")
            from ml_backend.job_queue import enqueue_prelabel
            from ml_backend.settings import Settings

            requeued = None
            if failed:  # what an operator does: trigger the same version again (the job is resumable)
                enqueue_prelabel(conn, Settings(redis_url=stack.redis.url, model_dir=stack.model_dir), pid, version)
                requeued = time.monotonic()
                self.say("ls: prelabel re-triggered for the same version")
            done, _ = wait_until(lambda: raw_job(conn, prelabel).get("status") == "finished", 180, interval=0.1)
            row["long"] = {"down_s": LONG_OUTAGE_S, "api_503_answers": ls.api_503 - before_503,
                           "job_failed_after_s": failed_after, "failure": failure_line[0][:300],
                           "retriggered": requeued is not None,
                           "finished_after_s": (time.monotonic() - t_back) if done else None}
        wait_until(lambda: raw_job(conn, prelabel).get("status") == "finished", 120, interval=0.2)
        trainer.stop()
        row["prelabel"] = self.prelabel_state(version)
        row["prelabel_job_status"] = raw_job(conn, prelabel).get("status")
        row["window"] = self.window(t_down, time.monotonic())
        row["policies"] = self.policies_corrupted()
        self.say(f"ls: {json.dumps(row['prelabel'])}; policies {row['policies']['corrupted']} corrupted")
        return row

    def kill_worker(self, at_start: bool = False) -> dict[str, Any]:
        """SIGKILL a predict worker while it runs a predict job (``at_start``: the moment RQ has registered the
        job's execution, before the job's status says started), start a new worker at once, and follow the job and
        its tasks."""
        stack, conn = self.stack, self.stack.conn
        victims = [w for w in stack.workers if w.proc.poll() is None and "train" not in " ".join(w.proc.args)]
        job_id, victim = None, None
        t_search = time.monotonic()
        while time.monotonic() - t_search < 60 and job_id is None:
            for w in victims:
                current = busy_job(conn, w)
                if current and current.startswith("predict-") and raw_job(conn, current).get("status") == (
                        "queued" if at_start else "started"):
                    job_id, victim = current, w
                    break
            else:
                time.sleep(0.002)
        name = ("a predict worker SIGKILLed as a predict job starts" if at_start else
                "a predict worker SIGKILLed mid-job")
        row: dict[str, Any] = {"fault": name + ", a new one started", "kind": "kill"}
        if victim is None or job_id is None:
            row["skipped"] = "no worker was seen running a predict job within 60 s"
            return row
        victim.proc.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        victim.proc.wait(timeout=10)
        at_kill = raw_job(conn, job_id)  # nothing changes it now but the reaper
        description = at_kill.get("description", "")
        match = re.search(r"task\(s\):?\s*\[?([0-9, ]*)\]?", description)
        tasks = [int(t) for t in match.group(1).split(",") if t.strip().isdigit()] if match else []
        self.say(f"kill: SIGKILL worker pid {victim.proc.pid} running {job_id} ({len(tasks)} tasks {tasks}), job "
                 f"status at the kill: {at_kill.get('status')}")
        replacement = stack.add_worker()
        ready = seconds_since(t_kill, lambda: worker_key(conn, replacement.proc.pid), 180, interval=0.1)
        self.say(f"kill: replacement worker registered after {ready} s")
        failed_after = seconds_since(t_kill, lambda: raw_job(conn, job_id).get("status") == "failed",
                                     max(45.0 - (time.monotonic() - t_kill), 1.0))  # heartbeat TTL 30 s + reaping
        book = self.load.book

        def all_answered() -> bool:
            with book.lock:
                return all(book.state.get(t) in ("real", "empty") for t in tasks)

        wait_until(all_answered, max(75.0 - (time.monotonic() - t_kill), 1.0), interval=0.2)
        after = raw_job(conn, job_id)
        queued_in = [key for key in ("rq:queue:predict",) if job_id.encode() in conn.lrange(key, 0, -1)]
        registered_in = [key.decode() for key in conn.scan_iter(match="rq:wip:*")
                         if any(m.decode().startswith(job_id) for m in conn.zrange(key, 0, -1))]
        zombie = after.get("status") in ("queued", "started") and not queued_in and not registered_in
        with book.lock:
            outcome = {t: book.state.get(t) for t in tasks}
            answered_at = [book.answered_at[t] - t_kill for t in tasks if t in book.answered_at]
        answered_after = max(answered_at) if answered_at and len(answered_at) == len(tasks) else None
        failed_lines = stack.web_log_lines(rf"predict job {re.escape(job_id)} failed")
        late_lines = [line for line in stack.web_log_lines("answered as pending")
                      if any(f"task {t}" in line for t in tasks)][:5]
        self.say(f"kill: job {after.get('status')} {time.monotonic() - t_kill:.0f} s after the kill (failed after "
                 f"{failed_after} s; in a queue: {bool(queued_in)}, in a started registry: {bool(registered_in)}); "
                 f"its tasks: {outcome}, all answered after {answered_after} s")
        row.update({
            "killed_pid": victim.proc.pid, "job": job_id, "job_tasks": tasks,
            "job_status_at_kill": at_kill.get("status"), "job_status_after": after.get("status"),
            "job_hash_after": {k: after.get(k) for k in ("status", "description", "ended_at")},
            "job_in_queue_after": queued_in, "job_in_started_registry_after": registered_in,
            "job_left_queued_in_no_queue_or_registry": zombie,
            "job_hash_ttl_s": conn.ttl(f"rq:job:{job_id}"),
            "replacement_ready_s": ready, "job_failed_after_s": failed_after,
            "job_tasks_answered_after_s": answered_after, "job_tasks_outcome": outcome,
            "job_tasks_answer_times_s": answered_at, "web_log_job_failed": failed_lines[:10],
            "web_log_pending_lines": late_lines,
            "first_ok_predict_after_s": self.first_ok_predict_after(t_kill, 30),
            "window": self.window(t_kill, time.monotonic()), "duplicates": stack.ls.duplicates(),
            "policies": self.policies_corrupted(),
        })
        return row

    def restart_redis(self) -> dict[str, Any]:
        stack, conn = self.stack, self.stack.conn
        live = [w for w in stack.workers if w.proc.poll() is None]

        def job_counts() -> dict[int, int]:
            out = {}
            for w in live:
                key = worker_key(conn, w.proc.pid)
                if key is not None:
                    out[w.proc.pid] = int(conn.hget(key, "successful_job_count") or 0)
            return out

        before = job_counts()

        def some_job_running() -> list[str]:  # stop Redis while a worker is inside a predict job
            jobs = [j for w in live if (j := busy_job(conn, w)) and j.startswith("predict-")]
            return [j for j in jobs if raw_job(conn, j).get("status") == "started"]

        running, _ = wait_until(some_job_running, 30, interval=0.002)
        running = running or []
        t_stop = time.monotonic()
        stack.redis.stop()
        self.say(f"redis: stopped (SIGTERM); down for {REDIS_DOWN_S} s")
        time.sleep(REDIS_DOWN_S)
        stack.redis.start()
        t_start = time.monotonic()
        self.say("redis: started again on the same socket and data")

        def health_ok() -> bool:
            r = self.session.get(f"{self.url}/health", timeout=2)
            return r.status_code == 200 and r.json().get("redis") == "ok"

        health_after = seconds_since(t_start, health_ok, 60, interval=0.1)
        first_ok = self.first_ok_predict_after(t_start, 90)
        # a task first asked for after the restart, answered with regions: a worker computed it after the restart
        book = self.load.book

        def fresh_real() -> float | None:
            with book.lock:
                times = [book.answered_at[t] for t, first in book.first_asked.items()
                         if first > t_start and book.state.get(t) == "real" and t in book.answered_at]
            return (min(times) - t_start) if times else None

        new_task_after, _ = wait_until(fresh_real, 90)
        workers_after = seconds_since(t_start, lambda: (c := job_counts()) and all(
            c.get(pid, 0) > before.get(pid, 0) for pid in before) and len(c) == len(before), 120, interval=0.2)
        self.say(f"redis: /health ok after {health_after} s, first good /predict after {first_ok} s, first new task "
                 f"computed after {new_task_after} s, every worker ran a job again after {workers_after} s")
        # under load until the jobs cut off by the outage are past their heartbeat TTL and reaped
        time.sleep(max(t_start + SETTLE_S - time.monotonic(), 0))
        cut_off = {}
        book = self.load.book
        for job_id in running:
            info = raw_job(conn, job_id)
            match = re.search(r"task\(s\):?\s*\[?([0-9, ]*)\]?", info.get("description", ""))
            tasks = [int(t) for t in match.group(1).split(",") if t.strip().isdigit()] if match else []
            with book.lock:
                cut_off[job_id] = {"status": info.get("status"), "tasks": {t: book.state.get(t) for t in tasks}}
        self.say(f"redis: jobs running at the stop, {SETTLE_S:.0f} s after the start: {cut_off}")
        policies = self.policies_corrupted()
        row = {
            "fault": f"Redis stopped (SIGTERM) for {REDIS_DOWN_S:.0f} s and started again (same socket and data)",
            "health_ok_after_s": health_after, "first_ok_predict_after_s": first_ok,
            "first_new_task_computed_after_s": new_task_after, "all_workers_ran_a_job_after_s": workers_after,
            "workers_alive": [w.proc.poll() is None for w in live], "web_alive": stack.web.proc.poll() is None,
            "window": self.window(t_stop, t_start + max(x for x in (health_after, first_ok, 0) if x is not None)
                                  + 1),
            "duplicates": stack.ls.duplicates(), "policies": policies,
            "active_policy_after_restart": policies["active_versions"],
            "jobs_running_at_the_stop": cut_off,
        }
        return row


def unanswered_jobs(conn: Any, task_ids: list[int]) -> dict[str, list[dict[str, Any]]]:
    """For each task still unanswered: the predict jobs naming it, with their RQ status and whether they are in the
    predict queue or a started registry (a job ``queued`` in neither is run by nobody)."""
    wanted = {str(t) for t in task_ids}
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in wanted}
    if not wanted:
        return out
    queued = {j.decode() for j in conn.lrange("rq:queue:predict", 0, -1)}
    started = {m.decode().split(":")[0] for m in conn.zrange("rq:wip:predict", 0, -1)}
    for key in conn.scan_iter(match="rq:job:predict-*", count=1000):
        job_id = key.decode()[len("rq:job:"):]
        info = raw_job(conn, job_id)
        named = re.search(r"task\(s\):?\s*\[?([0-9, ]*)\]?", info.get("description", ""))
        for t in {x.strip() for x in named.group(1).split(",")} & wanted if named else ():
            out[t].append({"job": job_id, "status": info.get("status"), "in_queue": job_id in queued,
                           "in_started_registry": job_id in started, "ttl_s": conn.ttl(key)})
    return out


def job_failure(conn: Any, job_id: str) -> str:
    """The last line of a failed job's exception, as ``GET /status`` shows it (the product's own reader)."""
    from ml_backend.job_queue import job_summary

    try:
        summary = job_summary(conn, job_id, reap=False) or {}
    except Exception as exc:
        return f"(unreadable: {type(exc).__name__})"
    return str(summary.get("failure", ""))


def failed_job_answers(log: str, t0: float, t1: float) -> list[dict[str, Any]]:
    """The web log's "task T: predict job J failed: ..." lines written in [t0, t1) (wall clock): tasks answered with
    an empty prediction of the current model version because their predict job failed."""
    out = []
    pattern = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*project (\d+) task (\S+): predict job (\S+) "
                         r"failed: (.*)$")
    for line in log.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000  # local
        if t0 <= when < t1:
            out.append({"task": m.group(4), "job": m.group(5), "reason": m.group(6)[:200]})
    return out


def fault_table(rows: list[dict[str, Any]], lost: int) -> list[tuple[str, ...]]:
    table = []
    for row in rows:
        if "skipped" in row:
            table.append((row["fault"], f"skipped: {row['skipped']}", "", "", "", "", "", "", ""))
            continue
        window = row["window"]
        errors = (f"{window['errors']} of {window['requests']}"
                  + (f" ({', '.join(f'{k}: {v}' for k, v in window['errors_by_kind_status'].items())})"
                     if window["errors"] else ""))
        policies = str(row["policies"]["corrupted"])
        if row["fault"].startswith("Label Studio"):
            short, long, pre = row["short"], row.get("long", {}), row["prelabel"]
            what = (f"prelabel of {pre['unlabelled_tasks']} tasks; {SHORT_OUTAGE_S:.0f} s outage: job "
                    f"{short['job_status_after']} (retries); ")
            if "skipped" in long:
                what += "long outage skipped (job finished first)"
            else:
                what += (f"{LONG_OUTAGE_S:.0f} s outage: job failed after {fmt_s(long['job_failed_after_s'])} "
                         f"({long['failure'][:110]}...); re-triggered: {'yes' if long['retriggered'] else 'no'}")
            recovered = (f"short: by itself; long: {'after a re-trigger' if long.get('retriggered') else '-'}; "
                         f"{pre['with_one_prediction']}/{pre['unlabelled_tasks']} tasks pre-labelled once, "
                         f"{pre['without_prediction']} missing, {pre['predictions_on_labelled_tasks']} on "
                         f"labelled tasks")
            took = (f"first import {fmt_s(short['first_import_after_s'])} after the short one; job finished "
                    f"{fmt_s(long.get('finished_after_s'))} after the long one")
            dup = str(pre["duplicates"])
        elif row.get("kind") == "kill":
            outcome = Counter(str(v) for v in row["job_tasks_outcome"].values())
            fate = (f"marked failed after {fmt_s(row['job_failed_after_s'])}" if row["job_failed_after_s"] is not None
                    else f"never marked failed: still `{row['job_status_after']}` but in no queue and no started "
                    f"registry" if row["job_left_queued_in_no_queue_or_registry"]
                    else f"status `{row['job_status_after']}`")
            what = (f"job of {len(row['job_tasks'])} tasks killed while `{row['job_status_at_kill']}`; {fate}; "
                    f"replacement ready after {fmt_s(row['replacement_ready_s'])}")
            recovered = (f"the other worker kept answering (first good /predict "
                         f"{fmt_s(row['first_ok_predict_after_s'])}); the job's tasks: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(outcome.items()))
                         + (f" {fmt_s(row['job_tasks_answered_after_s'])} after the kill"
                            if row["job_tasks_answered_after_s"] is not None else
                            " (not all answered 75 s after the kill)"))
            took = fmt_s(row["job_tasks_answered_after_s"])
            dup = str(row["duplicates"])
        else:
            cut = row.get("jobs_running_at_the_stop", {})
            states = Counter(str(v) for j in cut.values() for v in j["tasks"].values())
            what = (f"{len(cut)} predict job(s) running at the stop; {SETTLE_S:.0f} s after the start they were "
                    + (", ".join(sorted({str(j['status']) for j in cut.values()})) or "-")
                    + "; their tasks: " + (", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "-"))
            recovered = (f"web and workers reconnected by themselves (no restart): /health ok "
                         f"{fmt_s(row['health_ok_after_s'])}, every worker ran a job again "
                         f"{fmt_s(row['all_workers_ran_a_job_after_s'])}; active policy kept: "
                         f"{'yes' if row['active_policy_after_restart'] else 'no'}")
            took = (f"first good /predict {fmt_s(row['first_ok_predict_after_s'])}, first new task computed "
                    f"{fmt_s(row['first_new_task_computed_after_s'])} after the start")
            dup = str(row["duplicates"])
        empties = row.get("answered_empty_because_the_job_failed", [])
        jobs = sorted({e["job"] for e in empties})
        empty_text = str(len(empties)) + (f" ({len(jobs)} job(s): {empties[0]['reason'][:70]})" if empties else "")
        table.append((row["fault"], what, errors, recovered, took, empty_text, dup, policies, ""))
    table.append(("(all faults) tasks never answered after the final sweep", "", "", "", "", "", "", "", str(lost)))
    return table


def fmt_s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", default="ls,kill,kill-start,redis",
                        help="comma separated, in order: ls,kill,kill-start,redis")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--think-s", type=float, default=0.25)
    parser.add_argument("--baseline-s", type=float, default=20.0, help="load before the first fault")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="faults")
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(faults) - {"ls", "kill", "kill-start", "redis"}
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    max_s = 900.0  # the clients stop by themselves after this, whatever happens
    n_load = 8000  # more than the clients ask for in the run
    settings = {"TRAIN_EPISODES": "2", "TRAIN_STEPS": "2", "TRAIN_EPOCHS": "1", "TRAIN_BRANCH": "implicit",
                "PRELABEL_BATCH_SIZE": "5"}
    results: dict[str, Any] = {"faults": faults, "clients": args.clients, "think_s": args.think_s,
                               "settings_over_defaults": settings,
                               "worker_settings": "SAM_PRESET=tiny CLIP_PRESET=tiny DEVICE=cpu TORCH_THREADS=1",
                               "load_avg_1m_start": load_avg()}
    print("starting the stack...", flush=True)
    with Stack({LOAD_PROJECT: n_load, PRELABEL_PROJECT: PRELABEL_TASKS}, n_workers=2, settings=settings) as stack:
        results["redis"] = f"{stack.redis.kind} {stack.redis.version()}"
        bodies = Bodies(stack.ls)
        with requests.Session() as session:
            assert session.post(f"{stack.web.url}/setup", json=bodies.setup(LOAD_PROJECT), timeout=10).ok
        load = Load(stack.web.url, bodies, LOAD_PROJECT, stack.task_ids(LOAD_PROJECT), args.clients, max_s,
                    args.think_s, args.seed).start()
        runner = Faults(stack, load)
        rows: list[dict[str, Any]] = []
        try:
            time.sleep(args.baseline_s)
            results["baseline"] = runner.window(load.started, time.monotonic())
            runner.say(f"baseline: {results['baseline']}")
            for fault in faults:
                wall_start = time.time()
                rows.append({"ls": runner.label_studio_down, "kill": runner.kill_worker,
                             "kill-start": lambda: runner.kill_worker(at_start=True),
                             "redis": runner.restart_redis}[fault]())
                rows[-1]["wall_start"] = wall_start
                time.sleep(5)
        finally:
            load.stop()
        t_end = time.monotonic()
        results["sweep"] = load.sweep(timeout_s=120)
        results["tasks"] = load.book.counts()
        results["unanswered_tasks"] = unanswered_jobs(stack.conn, load.book.unanswered())
        results["requests"] = summarize(load.records_between(0, t_end))
        results["duplicates_total"] = stack.ls.duplicates()
        results["policies_final"] = runner.policies_corrupted()
        results["workers_alive_at_end"] = [w.proc.poll() is None for w in stack.workers]
        fivexx = [line for line in stack.web.output().splitlines() if re.search(r'" 5\d\d ', line)]
        results["web_5xx_count"] = len(fivexx)
        results["web_5xx_lines"] = fivexx[:30]
        results["web_error_lines"] = stack.web_log_lines(r" ERROR |Traceback")[:30]
        results["log"] = runner.log
        web_log = stack.web.output()
        ends = [r["wall_start"] for r in rows[1:]] + [time.time() + 1]
        for row, end in zip(rows, ends, strict=True):
            # until the next fault (the last one: through the final sweep)
            row["answered_empty_because_the_job_failed"] = failed_job_answers(web_log, row["wall_start"], end)
        results["answered_empty_because_the_job_failed"] = failed_job_answers(web_log, 0, time.time() + 1)
    results["rows"] = rows
    results["load_avg_1m_end"] = load_avg()
    results["notes"] = args.note
    lost = results["sweep"]["lost"]
    table = fault_table(rows, lost)
    path = write_results(args.name, results, table, ("fault", "what happened", "errors meanwhile", "recovered",
                                                     "time to recover", "tasks answered empty (job failed)",
                                                     "duplicates", "policies corrupted", "lost"),
                         args.out)
    with path.with_suffix(".md").open("a") as md:
        md.write(f"\nAll requests of the run ({args.clients} clients, faults included):\n\n")
        md.write("| request kind | requests | status codes | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|---|\n")
        for kind, s in results["requests"].items():
            md.write(f"| {kind} | {s['requests']} | {status_text(s['status'])} | {fmt_ms(s['p50_ms'])} | "
                     f"{fmt_ms(s['p95_ms'])} | {fmt_ms(s['p99_ms'])} |\n")
        base = results["baseline"]
        md.write(f"\nBaseline before the faults ({args.baseline_s:.0f} s): {base['requests']} requests, "
                 f"{base['errors']} errors, /predict p50 {fmt_ms(base['predict_p50_ms'])} ms, p95 "
                 f"{fmt_ms(base['predict_p95_ms'])} ms. Duplicates in the stub at the end: "
                 f"{results['duplicates_total']}; bundles checked at the end: "
                 f"{results['policies_final']['bundles_checked']}, corrupted: "
                 f"{results['policies_final']['corrupted']}; tasks lost: {lost} (final sweep: "
                 f"{results['sweep']['unanswered_before_sweep']} unanswered before it, {results['sweep']['sweep_s']} s)."
                 f" Web log: {results['web_5xx_count']} 5xx responses, {len(results['web_error_lines'])} "
                 "ERROR / Traceback lines.\n")
        if results["unanswered_tasks"]:
            md.write("\nTasks never answered, and the predict jobs naming them at the end: "
                     + "; ".join(f"task {t}: " + (", ".join(
                         f"{j['job']} `{j['status']}` (in the predict queue: {j['in_queue']}, in a started "
                         f"registry: {j['in_started_registry']}, expires in {j['ttl_s']} s)" for j in jobs) or "no job")
                         for t, jobs in sorted(results["unanswered_tasks"].items())) + ".\n")
        md.write(EXPLANATION)
        md.write("\nTimeline:\n\n" + "".join(f"    {line}\n" for line in results["log"]))
        notes = [f"{results['redis']}; 1-minute load average {results['load_avg_1m_start']:.2f} at the start, "
                 f"{results['load_avg_1m_end']:.2f} at the end (2 cores).", *args.note]
        md.write("\nNotes:\n\n" + "".join(f"- {line}\n" for line in notes))
    print(path.with_suffix(".md").read_text())
    bad = lost or results["duplicates_total"] or results["policies_final"]["corrupted"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
