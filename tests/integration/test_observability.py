"""Worker metrics on their own port, and JSON logs that carry the job id."""

import json
import time

import requests

from tests.helpers import metric, noise_png, post_images
from tools.stack import free_port


def test_worker_metrics_and_job_ids_in_logs(stack_factory, image_server):
    stack = stack_factory(fetch_allow_hosts=frozenset({f"127.0.0.1:{image_server.port}"}))
    metrics_port = free_port()
    stack.add_worker(worker_metrics_port=metrics_port, log_json=True)
    stack.wait_ready()
    batch_id = post_images(stack, [(f"{i}.png", noise_png(i)) for i in range(5)]).json()["batch_id"]
    stack.wait_batch(batch_id)
    url = image_server.url(3)
    url_batch = requests.post(stack.url + "/api/v1/batches", json={"urls": [url]}, timeout=30).json()
    job_id = url_batch["jobs"][0]["job_id"]
    stack.wait_batch(url_batch["batch_id"])

    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    count = lambda name: metric(text, name)
    assert count("prediction_batch_size_count") >= 2  # batches formed: the 5 images, then the URL's
    assert count("prediction_batch_size_sum") == 6
    assert count("model_latency_seconds_count") >= 2
    assert count('jobs_finished_total{code="",status="done"}') == 6
    assert count("fetch_duration_seconds_count") == 1

    time.sleep(0.5)  # let the log lines reach the file
    lines = [json.loads(line) for line in stack.worker_logs(full=True).splitlines() if line.startswith("{")]
    about_job = [rec for rec in lines if job_id in json.dumps(rec)]
    assert {rec["event"] for rec in about_job} >= {"fetched", "job done"}
    assert all(rec.get("job_id") == job_id for rec in about_job)  # the id is a field on every line
    assert all({"time", "level", "event"} <= set(rec) for rec in lines)
