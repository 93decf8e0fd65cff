"""Prometheus metrics, all defined here.

Web and worker roles run several processes (gunicorn workers; Celery's main process, pool
children and fetch threads), so metrics use prometheus-client's multiprocess mode whenever
PROMETHEUS_MULTIPROC_DIR is set (the library reads that variable itself, at import): each
process writes its own files there and one endpoint per role (web: /metrics; `python -m
worker --metrics-port`) adds them up.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily

from shared.queue import QUEUES

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests, by route, method and status.", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
JOBS_SUBMITTED = Counter("jobs_submitted_total", "Jobs created, by source.", ["source"])
JOBS_FINISHED = Counter(
    "jobs_finished_total", "Jobs that reached a final status, by status and error code.", ["status", "code"]
)
BATCH_SIZE = Histogram(
    "prediction_batch_size",
    "Images per model call (batches formed by the worker).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
MODEL_LATENCY = Histogram(
    "model_latency_seconds",
    "Time of one model call (all its images).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FETCH_FAILURES = Counter("fetch_failures_total", "URL fetches that failed, by reason.", ["reason"])
WEBHOOK_DELIVERIES = Counter("webhook_deliveries_total", "Webhook delivery attempts, by outcome.", ["outcome"])
FETCH_LATENCY = Histogram(
    "fetch_duration_seconds", "Time to download one URL.", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
)


class QueueDepth:
    """queue_depth{queue}: tasks waiting in Redis, read when scraped."""

    def __init__(self, store, queues=QUEUES):
        self.store, self.queues = store, queues

    def collect(self):
        g = GaugeMetricFamily("queue_depth", "Tasks waiting in each queue.", labels=["queue"])
        for q in self.queues:
            try:
                g.add_metric([q], self.store.queue_length(q))
            except Exception:  # noqa: BLE001 - Redis down: no sample rather than a failed scrape
                pass
        yield g


def scrape_registry(multiproc_dir: str, *collectors) -> CollectorRegistry:
    """The registry an endpoint exposes: every process's metrics of this role (those in
    multiproc_dir, or this process's alone without one), plus `collectors`."""
    if multiproc_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    for c in collectors:
        registry.register(c)
    return registry


class _Forward:
    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()
