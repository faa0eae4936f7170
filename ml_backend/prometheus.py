"""Metrics for operators in Prometheus' text format (``GET /metrics/prometheus``); Label Studio's JSON ``/metrics``
stays as it is.

Series:

- ``alignsam_http_requests_total{route, method, status}`` and ``alignsam_http_request_duration_seconds{route,
  method}`` (a histogram): every request this process answered, by Flask route rule (``/status/<int:project_id>``,
  never the raw path, so the label set stays small; ``unmatched`` for a 404);
- ``alignsam_queue_jobs{queue, state}``: jobs ``queued``, ``running`` (started registry), ``failed`` and
  ``finished`` (RQ's registries keep these for the jobs' result / failure TTL) per queue, read from Redis at each
  scrape;
- ``alignsam_job_duration_seconds{queue}``: sum and count of the run times of the finished jobs still in each
  queue's finished registry (at most :data:`DURATION_SAMPLE` newest per scrape);
- ``alignsam_workers{state}``: live RQ workers by state (``idle``, ``busy``, ...).

Request series are per process: with several gunicorn workers each one counts its own requests, so scrape the
backend as one target per process, or read the queue and worker series (the same from every process, they come
from Redis).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from ml_backend.job_queue import QUEUES, fetch_jobs, product_queue
from ml_backend.status_page import live_workers, lookup_connection, queue_depths

DURATION_SAMPLE = 200
"""Newest finished jobs per queue whose run time a scrape reads."""


class QueueCollector(Collector):
    """Queue depths, job outcomes and durations per queue, and worker counts, read from Redis at each scrape.
    While Redis is unreachable it yields only ``alignsam_redis_up 0``."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.lookup = lookup_connection(redis)

    def collect(self) -> Iterator[GaugeMetricFamily | SummaryMetricFamily]:
        up = GaugeMetricFamily("alignsam_redis_up", "1 when the backend reached Redis during this scrape")
        try:
            depths = queue_depths(self.redis)
            workers = live_workers(self.lookup)
            durations = {name: self._durations(name) for name in QUEUES}
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("alignsam_queue_jobs", "Jobs per queue and state (failed/finished: those RQ still "
                                 "keeps in its registries)", labels=["queue", "state"])
        for name, depth in depths.items():
            for state, count in depth.items():
                jobs.add_metric([name, state], count)
        yield jobs
        summary = SummaryMetricFamily("alignsam_job_duration_seconds", "Run time of the finished jobs kept in each "
                                      "queue's finished registry", labels=["queue"])
        for name, (count, total) in durations.items():
            summary.add_metric([name], count_value=count, sum_value=total)
        yield summary
        by_state = GaugeMetricFamily("alignsam_workers", "Live RQ workers by state", labels=["state"])
        counts: dict[str, int] = {}
        for worker in workers:
            counts[worker["state"]] = counts.get(worker["state"], 0) + 1
        for state in ("idle", "busy"):
            counts.setdefault(state, 0)
        for state, count in sorted(counts.items()):
            by_state.add_metric([state], count)
        yield by_state

    def _durations(self, queue_name: str) -> tuple[int, float]:
        registry = product_queue(queue_name, self.redis).finished_job_registry
        ids = registry.get_job_ids(0, DURATION_SAMPLE - 1)
        times = [(job.ended_at - job.started_at).total_seconds() for job in fetch_jobs(self.redis, ids)
                 if job is not None and job.started_at is not None and job.ended_at is not None]
        return len(times), float(sum(times))


def install(app: Flask, redis: Redis) -> CollectorRegistry:
    """Count and time every request of ``app`` and serve ``GET /metrics/prometheus`` (endpoint
    ``prometheus_metrics``). Call it before the auth hook, so refused requests are counted too. Each app has a
    registry of its own."""
    registry = CollectorRegistry(auto_describe=False)  # describing would read Redis at start-up
    requests_total = Counter("alignsam_http_requests", "HTTP requests answered, by route, method and status",
                             ["route", "method", "status"], registry=registry)
    latency = Histogram("alignsam_http_request_duration_seconds", "Time to answer an HTTP request, by route",
                        ["route", "method"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100))
    registry.register(QueueCollector(redis))

    @app.before_request
    def start_timer() -> None:
        g.alignsam_request_started = time.perf_counter()

    @app.after_request
    def count_request(response: Response) -> Response:
        started = g.pop("alignsam_request_started", None)
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        requests_total.labels(route, request.method, str(response.status_code)).inc()
        if started is not None:
            latency.labels(route, request.method).observe(time.perf_counter() - started)
        return response

    def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), mimetype=None, content_type=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics/prometheus", "prometheus_metrics", prometheus_metrics, methods=["GET"])
    return registry
