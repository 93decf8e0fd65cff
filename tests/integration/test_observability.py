"""Worker metrics on their own port, batching across tasks, and JSON logs that carry the job id."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from shared.images import encode_pixels
from shared.jobstore import JobStore, NewJob
from shared.queue import PredictTask, celery_init_app, enqueue
from tests.helpers import metric, noise_png, post_images, scrape_until, wait_until
from tools.stack import free_port


def test_worker_metrics_batching_and_job_ids_in_logs(stack_factory, image_server):
    stack = stack_factory(fetch_allow_hosts=frozenset({f"127.0.0.1:{image_server.port}"}))
    metrics_port = free_port()
    # A one-second gathering window: the five uploads of one request are queued well within it.
    stack.add_worker(worker_metrics_port=metrics_port, log_json=True, predict_batch_wait_ms=1000)
    stack.wait_ready()
    batch_id = post_images(stack, [(f"{i}.png", noise_png(i)) for i in range(5)]).json()["batch_id"]
    stack.wait_batch(batch_id)
    url = image_server.url(3)
    url_batch = requests.post(stack.url + "/api/v1/batches", json={"urls": [url]}, timeout=30).json()
    job_id = url_batch["jobs"][0]["job_id"]
    stack.wait_batch(url_batch["batch_id"])

    done = 'jobs_finished_total{code="",status="done"}'
    text = scrape_until(f"http://127.0.0.1:{metrics_port}/metrics", done, 6)
    count = lambda name: metric(text, name)
    assert count("prediction_batch_size_count") == 2  # two model calls: the 5 uploads together, then the URL
    assert count("prediction_batch_size_sum") == 6
    assert count('prediction_batch_size_bucket{le="4.0"}') == 1 and count('prediction_batch_size_bucket{le="8.0"}') == 2
    assert count("model_latency_seconds_count") == 2
    assert count(done) == 6
    assert count("fetch_duration_seconds_count") == 1

    def lines():
        return [json.loads(line) for line in stack.worker_logs(full=True).splitlines() if line.startswith("{")]

    def about_job():
        recs = [rec for rec in lines() if job_id in json.dumps(rec)]
        return recs if {"fetched", "job done"} <= {rec["event"] for rec in recs} else None

    about = wait_until(about_job, 10, "the job's log lines")
    assert all(rec.get("job_id") == job_id for rec in about)  # the id is a field on every line
    assert all({"time", "level", "event"} <= set(rec) for rec in lines())


def test_a_batch_never_exceeds_predict_batch_size(stack_factory):
    stack = stack_factory()
    metrics_port = free_port()
    stack.add_worker("predict", worker_metrics_port=metrics_port, predict_batch_size=4, predict_batch_wait_ms=500)
    stack.wait_ready()
    stack.wait_batch(post_images(stack, [(f"{i}.png", noise_png(i)) for i in range(10)]).json()["batch_id"])
    text = scrape_until(f"http://127.0.0.1:{metrics_port}/metrics", "prediction_batch_size_sum", 10)
    calls = metric(text, "prediction_batch_size_count")
    assert metric(text, "prediction_batch_size_sum") == 10 and calls >= 3  # at most 4 per call: 3 calls or more
    assert metric(text, 'prediction_batch_size_bucket{le="4.0"}') == calls  # none larger than 4
    assert calls <= 5  # and they were batched: 10 images in far fewer than 10 calls


def test_web_metrics_add_up_every_gunicorn_worker(stack_factory):
    """gunicorn runs two worker processes: /metrics must count the requests of both (multiprocess
    mode), not those of whichever process answers the scrape."""
    stack = stack_factory()
    folder = Path(stack.settings.prometheus_multiproc_dir)
    writers = lambda: {p.name.split("_")[-1] for p in folder.glob("counter_*.db")}  # noqa: E731
    sent = 0
    # Fresh connections, 8 at a time, until both processes have answered some: which process
    # accepts a connection is the kernel's choice (once, all of 40 sequential ones went to one).
    with ThreadPoolExecutor(8) as pool:
        while len(writers()) < 2 and sent < 800:
            list(
                pool.map(
                    lambda _: requests.get(stack.url + "/healthz", timeout=10, headers={"Connection": "close"}),
                    range(40),
                )
            )
            sent += 40
    assert len(writers()) == 2, f"{sent} requests all went to one process"
    text = requests.get(stack.url + "/metrics", timeout=10).text
    # The scrape is answered by one process; the count covers both.
    assert metric(text, 'http_requests_total{method="GET",route="/healthz",status="200"}') == sent
    assert "process_cpu_seconds_total" not in text  # a single process's own collector is not what is served


def test_a_failed_fetch_is_counted_by_reason(stack_factory, image_server):
    stack = stack_factory(fetch_allow_hosts=frozenset({f"127.0.0.1:{image_server.port}"}))
    metrics_port = free_port()
    stack.add_worker("fetch", worker_metrics_port=metrics_port)
    missing = f"http://127.0.0.1:{image_server.port}/missing"  # the image server answers 404 here
    body = requests.post(stack.url + "/api/v1/batches", json={"urls": [missing]}, timeout=30).json()
    job = stack.wait_job(body["jobs"][0]["job_id"])
    assert job["status"] == "failed" and job["error"]["code"] == "fetch_failed"
    text = scrape_until(f"http://127.0.0.1:{metrics_port}/metrics", 'fetch_failures_total{reason="fetch_failed"}', 1)
    assert metric(text, 'fetch_failures_total{reason="fetch_failed"}') == 1


def test_task_events_say_whether_each_batched_prediction_succeeded_or_failed(stack_factory):
    """What Flower shows: celery-batches sends no events for the tasks of a batch, so Flower
    listed every prediction as PENDING; the worker now sends each one's end."""
    stack = stack_factory()
    stack.add_worker("predict")
    stack.wait_ready()
    app = celery_init_app(stack.settings)
    seen: dict[str, str] = {}

    def listen():
        with app.connection() as conn:
            app.events.Receiver(
                conn,
                handlers={
                    "task-succeeded": lambda e: seen.setdefault(e["uuid"], "succeeded"),
                    "task-failed": lambda e: seen.setdefault(e["uuid"], e.get("exception", "")),
                },
            ).capture(limit=None, timeout=None, wakeup=False)

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(1)  # subscribed before anything is sent (task events are broadcast, not queued)
    store = JobStore.from_url(stack.settings.redis_url, 3600)
    # One message of two good jobs (its task id is its first job's), one of a bad job, and one
    # of a good and a bad job: a message succeeds only if all its jobs were done.
    good = post_images(stack, [("a.png", noise_png(1)), ("b.png", noise_png(2))]).json()["jobs"]
    _, [bad, fine, bad_too] = store.create_batch([NewJob("upload", f"{i}.png", pixels="AAAA") for i in range(3)], 3)
    enqueue(app, [PredictTask(bad["job_id"], "not base64!", 3)], [])  # fails as bad_task
    pixels = encode_pixels(np.zeros((32, 32, 3), np.uint8))
    enqueue(app, [PredictTask(fine["job_id"], pixels, 3), PredictTask(bad_too["job_id"], "not base64!", 3)], [])
    want = {good[0]["job_id"]: "succeeded", bad["job_id"]: "bad_task", fine["job_id"]: "bad_task"}
    wait_until(lambda: all(k in seen for k in want), 30, "the task events")
    assert {k: seen[k] for k in want} == want
    assert good[1]["job_id"] not in seen  # no event of its own: it travelled in good[0]'s message
