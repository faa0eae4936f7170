"""Click-to-answer latency of interactive requests, idle and while a prelabel job runs on the same worker.

    python -m benchmarks.bench_interactive [--clicks 120] [--warm-tasks 8] [--prelabel-tasks 80] [--preset small]

The product as production runs it (:mod:`benchmarks.loadlib`): the real gunicorn web process, one real Redis, a
loopback stub of Label Studio, one ``alignsam-worker --queues predict,prelabel`` (the pool that answers clicks and
pre-labels) and one ``--queues train`` worker, all with ``SAM_PRESET=--preset`` (default the bundled small SAM) and
``TORCH_THREADS=1``. A client sends what Label Studio's editor sends for a smart keypoint: ``POST /predict`` with one
task and ``params.context.result`` holding the task's clicks so far (1 to 4: a positive click on the object, then
negatives on the background), and times each answer.

1. **idle**: every warm task gets one click first (the image is encoded then: not measured), then ``--clicks``
   clicks round-robin over them, on labels without a policy (SAM on the clicks).
2. **during prelabel**: ``--warm-tasks`` tasks are annotated, training runs (``TRAIN_EPISODES=4`` ...), the new policy
   is activated and the prelabel job of the remaining tasks starts on the predict/prelabel worker; while it runs,
   ``--clicks`` clicks again (the label now has a policy: the correction starts from its pre-label, after one
   warm-up click per task). Only clicks sent and answered while the prelabel job was running count.

Per click, the worker logs SAM's own time (prompt encoder + mask decoder: "SAM decode") with the answer; requests are
sent one at a time to one predict worker, so the i-th log line is the i-th click's. **Overhead** = the client's
round trip minus that decode, per click: HTTP, the web process (context parsing, image cache lookup), Redis both ways,
the worker's image / embedding lookup, the start lookup and the brush RLE. Targets (issue 16): overhead p50 <= 25 ms
and p95 <= 60 ms, idle and during prelabel.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from benchmarks.common import RESULTS, write_results
from benchmarks.loadlib import Bodies, Stack, load_avg, pct

PROJECT = 1
LINE = re.compile(r"click answered in ([\d.]+) ms \(SAM decode ([\d.]+) ms\): (.*)$")
TARGET_P50_MS, TARGET_P95_MS = 25.0, 60.0


def click_body(bodies: Bodies, task_id: int, mask: np.ndarray, n_clicks: int, rng: random.Random) -> dict[str, Any]:
    """The editor's request for ``n_clicks`` keypoints on a task: the object's centre, then background negatives."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    points = [(float(xs.mean()), float(ys.mean()), True)]
    bg_y, bg_x = np.nonzero(~mask)
    for _ in range(n_clicks - 1):
        j = rng.randrange(len(bg_x))
        points.append((float(bg_x[j]), float(bg_y[j]), False))
    result = [{"id": f"kp{n}", "from_name": "tag", "to_name": "image", "type": "keypointlabels",
               "origin": "manual", "is_positive": positive, "original_width": width, "original_height": height,
               "image_rotation": 0,
               "value": {"x": 100 * (x + 0.5) / width, "y": 100 * (y + 0.5) / height, "width": 1.0,
                         "keypointlabels": ["Shape"]}} for n, (x, y, positive) in enumerate(points)]
    body = bodies.predict(PROJECT, [task_id])
    body["params"]["context"] = {"result": result}
    return body


def send_clicks(session: requests.Session, url: str, bodies: Bodies, stack: Stack, task_ids: list[int], n: int,
                rng: random.Random, while_running: Any = None) -> list[dict[str, Any]]:
    """``n`` clicks round-robin over ``task_ids``; returns one record per click (round trip, regions, and whether
    ``while_running()`` was true before and after it)."""
    records = []
    for i in range(n):
        task_id = task_ids[i % len(task_ids)]
        body = click_body(bodies, task_id, stack.ls.masks[task_id], 1 + i % 4, rng)
        before = while_running() if while_running else True
        t0 = time.perf_counter()
        response = session.post(f"{url}/predict", json=body, timeout=100)
        seconds = time.perf_counter() - t0
        after = while_running() if while_running else True
        ok = response.status_code == 200
        regions = len(response.json()["results"][0]["result"]) if ok else 0
        records.append({"task": task_id, "clicks": 1 + i % 4, "ms": 1e3 * seconds, "status": response.status_code,
                        "regions": regions, "during": bool(before and after)})
    return records


def worker_lines(stack: Stack) -> list[tuple[float, float, str]]:
    """(total ms, decode ms, what) of every click the predict worker answered, in order."""
    out = []
    for line in stack.workers[0].output().splitlines():
        match = LINE.search(line)
        if match:
            out.append((float(match.group(1)), float(match.group(2)), match.group(3)))
    return out


def summarize(records: list[dict[str, Any]], lines: list[tuple[float, float, str]]) -> dict[str, Any]:
    """Latency, decode and overhead percentiles of the counted clicks."""
    counted = [(r, line) for r, line in zip(records, lines, strict=True) if r["during"] and r["status"] == 200]
    rtt = [r["ms"] for r, _ in counted]
    decode = [line[1] for _, line in counted]
    over = [r["ms"] - line[1] for r, line in counted]
    worker = [line[0] - line[1] for _, line in counted]

    def q(values: list[float], p: float) -> float | None:
        v = pct(values, p)
        return None if v is None else round(v, 1)

    return {
        "clicks": len(records), "counted": len(counted), "non_200": sum(r["status"] != 200 for r in records),
        "empty_answers": sum(r["regions"] == 0 for r, _ in counted),
        "click_to_answer_ms": {"p50": q(rtt, 50), "p95": q(rtt, 95), "max": q(rtt, 100)},
        "sam_decode_ms": {"p50": q(decode, 50), "p95": q(decode, 95)},
        "overhead_ms": {"p50": q(over, 50), "p95": q(over, 95), "max": q(over, 100)},
        "worker_overhead_ms": {"p50": q(worker, 50), "p95": q(worker, 95)},
        "strategies": sorted({line[2] for _, line in counted}),
        "target_met": bool(over) and (pct(over, 50) or 0) <= TARGET_P50_MS and (pct(over, 95) or 0) <= TARGET_P95_MS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=120, help="measured clicks per phase (default 120)")
    parser.add_argument("--warm-tasks", type=int, default=8, help="tasks clicked on (annotated for training)")
    parser.add_argument("--prelabel-tasks", type=int, default=80, help="further tasks the prelabel job predicts "
                        "(0: skip the prelabel phase)")
    parser.add_argument("--preset", default="small", help="SAM preset of the workers (default small)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="interactive")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    rng = random.Random(args.seed)
    n_tasks = args.warm_tasks + args.prelabel_tasks
    settings = {"SAM_PRESET": args.preset, "TRAIN_EPISODES": "4", "TRAIN_STEPS": "4", "TRAIN_EPOCHS": "2",
                "TRAIN_BRANCH": "implicit", "TRAIN_MIN_LABEL_EXAMPLES": "4", "TRAIN_MIN_TASKS": "100000",
                "INTERACTIVE_WAIT_S": "30", "LOG_LEVEL": "INFO"}
    results: dict[str, Any] = {"preset": args.preset, "torch_threads": 1, "warm_tasks": args.warm_tasks,
                               "prelabel_tasks": args.prelabel_tasks, "load_avg_1m_start": load_avg(),
                               "targets_ms": {"overhead_p50": TARGET_P50_MS, "overhead_p95": TARGET_P95_MS}}
    print(f"starting Redis, the Label Studio stub ({n_tasks} tasks), gunicorn and 2 workers ({args.preset})...",
          flush=True)
    with Stack({PROJECT: n_tasks}, n_workers=1, settings=settings) as stack:
        train_worker = stack.add_worker("train")
        train_worker.wait_ready(stack.conn, timeout=180)
        bodies = Bodies(stack.ls)
        url = stack.web.url
        warm = stack.task_ids(PROJECT)[: args.warm_tasks]
        with requests.Session() as session:
            assert session.post(f"{url}/setup", json=bodies.setup(PROJECT), timeout=10).ok
            send_clicks(session, url, bodies, stack, warm, len(warm), rng)  # encodes each image once
            idle = send_clicks(session, url, bodies, stack, warm, args.clicks, rng)
            lines = worker_lines(stack)
            results["idle"] = summarize(idle, lines[len(warm):len(warm) + len(idle)])
            print(f"idle: {results['idle']}", flush=True)
            if args.prelabel_tasks:
                for task_id in warm:
                    stack.ls.annotate(task_id)
                    assert session.post(f"{url}/webhook", json=bodies.webhook("ANNOTATION_CREATED", PROJECT,
                                                                             task_id), timeout=10).ok
                ticket = session.post(f"{url}/webhook", json=bodies.webhook("START_TRAINING", PROJECT, warm[0]),
                                      timeout=10).json()
                print(f"training: {ticket}", flush=True)
                deadline = time.monotonic() + 600
                job_key = None
                while time.monotonic() < deadline:  # the prelabel job the training queues, running
                    keys = [k.decode() for k in stack.conn.scan_iter("rq:job:prelabel-*")]
                    if keys and stack.conn.hget(keys[0], "status") == b"started":
                        job_key = keys[0]
                        break
                    time.sleep(0.2)
                assert job_key is not None, "the prelabel job never started"
                before = len(worker_lines(stack))

                def running() -> bool:
                    return stack.conn.hget(job_key, "status") == b"started"

                send_clicks(session, url, bodies, stack, warm, len(warm), rng)  # the policy's starts, once per task
                during = send_clicks(session, url, bodies, stack, warm, args.clicks, rng, while_running=running)
                lines = worker_lines(stack)[before + len(warm):]
                results["during_prelabel"] = summarize(during, lines[:len(during)])
                results["prelabel_still_running_at_end"] = running()
                print(f"during prelabel: {results['during_prelabel']}", flush=True)
        results["load_avg_1m_end"] = load_avg()
    results["notes"] = args.note
    rows = []
    for phase in ("idle", "during_prelabel"):
        if phase not in results:
            continue
        r = results[phase]
        rows.append((phase, f"{r['counted']} of {r['clicks']}", f"{r['click_to_answer_ms']['p50']}",
                     f"{r['click_to_answer_ms']['p95']}", f"{r['sam_decode_ms']['p50']}",
                     f"{r['overhead_ms']['p50']}", f"{r['overhead_ms']['p95']}",
                     "yes" if r["target_met"] else "**no**"))
    write_results(args.name, results, rows, ("phase", "clicks counted", "click-to-answer p50 ms", "p95 ms",
                                             "SAM decode p50 ms", "overhead p50 ms", "overhead p95 ms",
                                             "target (<= 25 / 60 ms)"), out_dir=Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
