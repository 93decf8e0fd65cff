"""Prometheus metrics of the web tier."""

import io

from tests.helpers import metric as sample
from tests.helpers import noise_png


def test_metrics_count_requests_jobs_and_queue_depth(client):
    before = client.get("/metrics").data.decode()
    client.get("/healthz")
    client.post(
        "/api/v1/batches",
        data={"images": [(io.BytesIO(noise_png(1)), "a.png"), (io.BytesIO(b"junk"), "b.jpg")]},
        content_type="multipart/form-data",
    )
    after = client.get("/metrics").data.decode()
    # Counters are per process (this one runs other tests too): compare before and after.
    delta = lambda name: sample(after, name) - sample(before, name)
    assert delta('http_requests_total{method="GET",route="/healthz",status="200"}') == 1
    assert delta('http_requests_total{method="POST",route="/api/v1/batches",status="202"}') == 1
    assert delta('jobs_submitted_total{source="upload"}') == 2
    assert delta('jobs_finished_total{code="unsupported_format",status="failed"}') == 1
    assert sample(after, 'queue_depth{queue="predict"}') == 1  # the good image waits for a worker
    assert "http_request_duration_seconds_bucket" in after
