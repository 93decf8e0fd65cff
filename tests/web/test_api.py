"""The HTTP API's contract, through Flask's test client against a real Redis (no worker)."""

import base64
import hashlib
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from redis import RedisError

from shared.images import decode_pixels, preprocess
from shared.queue import celery_init_app
from shared.settings import REPO_ROOT
from tests.helpers import assert_thumbnail, image_bytes, noise_png, queued_jobs, upload
from tools.stack import free_port
from web.app import create_app


def queued_tasks(app, queue="predict"):
    """The jobs waiting in a queue (a prediction message holds several)."""
    return queued_jobs(app.extensions["jobs"].redis, queue)


def test_batch_upload_answers_202_with_jobs_links_and_location(client, app):
    resp = upload(client, [("a.png", noise_png(1)), ("b.jpg", image_bytes("JPEG"))])
    assert resp.status_code == 202
    body = resp.get_json()
    assert len(body["jobs"]) == 2 and all(j["status"] == "queued" for j in body["jobs"])
    assert body["jobs"][0]["source"] == {"type": "upload", "value": "a.png"}
    assert resp.headers["Location"] == body["links"]["self"] == f"/api/v1/batches/{body['batch_id']}"
    assert body["links"]["page"] == f"/batches/{body['batch_id']}"
    assert len(queued_tasks(app)) == 2


def test_the_task_carries_the_preprocessed_image_as_json(client, app):
    data = noise_png(1, size=(48, 40))  # not 32x32: the message must carry the crop and downscale
    upload(client, [("a.png", data)])
    [raw] = app.extensions["jobs"].redis.lrange("predict", 0, -1)
    msg = json.loads(raw)
    assert msg["headers"]["task"] == "predict"
    assert msg["content-type"] == "application/json"
    args, kwargs, _ = json.loads(base64.b64decode(msg["body"]))
    [job] = kwargs["jobs"]
    assert np.array_equal(decode_pixels(job["pixels"]), preprocess(data))  # the model's input itself


@pytest.mark.parametrize("chunk", [16, 1])
def test_a_batch_is_queued_in_messages_of_up_to_predict_chunk_jobs_in_order(settings_factory, chunk):
    app = create_app(settings_factory(predict_chunk=chunk))
    resp = upload(app.test_client(), [(f"{i}.png", noise_png(i)) for i in range(40)])
    ids = [j["job_id"] for j in resp.get_json()["jobs"]]
    messages = [json.loads(m) for m in reversed(app.extensions["jobs"].redis.lrange("predict", 0, -1))]
    assert len(messages) == -(-40 // chunk)  # 3 messages of 16, 16 and 8 jobs; or 40 of one
    assert [j["job_id"] for j in queued_tasks(app)] == ids
    # The header names every job of a message, without its body; the task id is the first job's.
    assert [j for m in messages for j in m["headers"]["job_ids"]] == ids
    assert all(m["headers"]["id"] == m["headers"]["job_ids"][0] for m in messages)


def test_each_upload_header_is_read_once(client, monkeypatch):
    """The request's pixel budget read each header, then decoding read it again (issue 24)."""
    import shared.images

    opened = []
    real_open = shared.images.Image.open
    monkeypatch.setattr(shared.images.Image, "open", lambda *a, **kw: opened.append(1) or real_open(*a, **kw))
    r = upload(client, [("a.png", noise_png(1)), ("b.png", noise_png(2))])
    assert r.status_code == 202
    assert len(opened) == 2


def test_single_job_endpoint(client):
    resp = upload(client, [("a.png", noise_png(2))], path="/api/v1/jobs")
    assert resp.status_code == 202
    job = resp.get_json()
    assert job["status"] == "queued" and resp.headers["Location"] == f"/api/v1/jobs/{job['job_id']}"
    got = client.get(f"/api/v1/jobs/{job['job_id']}").get_json()
    assert got["status"] == "queued" and got["predictions"] is None and got["created_at"]


def test_single_job_endpoint_takes_exactly_one_item(client):
    resp = upload(client, [("a.png", noise_png(1)), ("b.png", noise_png(2))], path="/api/v1/jobs")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "too_many_items"


def test_urls_from_json_and_from_a_form_field(client, app):
    resp = client.post("/api/v1/batches", json={"urls": ["https://example.com/a.jpg"], "top_k": 5})
    assert resp.status_code == 202 and resp.get_json()["jobs"][0]["status"] == "fetching"
    resp = client.post("/api/v1/batches", data={"urls": "https://example.com/b.jpg\n\nhttps://example.com/c.png\n"})
    assert len(resp.get_json()["jobs"]) == 2
    assert len(queued_tasks(app, "fetch")) == 3


def test_unknown_ids_are_404_not_pending(client):
    for path in ("/api/v1/jobs/" + "0" * 32, "/api/v1/batches/" + "0" * 32, "/api/v1/jobs/nope"):
        resp = client.get(path)
        assert resp.status_code == 404 and resp.get_json()["error"]["code"].endswith("not_found")


def test_a_non_image_is_415_with_a_json_error(client):
    resp = upload(client, [("cat.jpg", b"this is text, not a jpeg")])
    assert resp.status_code == 415
    assert resp.get_json()["error"]["code"] == "unsupported_format"


def test_a_bad_file_in_a_batch_fails_alone(client, app):
    resp = upload(client, [("good.png", noise_png(1)), ("bad.jpg", b"nope")])
    assert resp.status_code == 202
    jobs = resp.get_json()["jobs"]
    assert [j["status"] for j in jobs] == ["queued", "failed"]
    assert jobs[1]["error"]["code"] == "unsupported_format"
    assert len(queued_tasks(app)) == 1


def test_an_empty_file_with_an_idempotency_key_fails_alone_not_500(client, app):
    """Schemathesis found this one: an empty file is neither refused on arrival nor has bytes to
    hash, and fingerprinting the request for its Idempotency-Key raised AttributeError (a 500)."""
    headers = {"Idempotency-Key": "empty-1"}
    first = upload(client, [("empty.png", b""), ("good.png", noise_png(1))], headers=headers)
    again = upload(client, [("empty.png", b""), ("good.png", noise_png(1))], headers=headers)
    assert first.status_code == again.status_code == 202, first.get_json()
    assert [j["status"] for j in first.get_json()["jobs"]] == ["failed", "queued"]
    assert again.get_json() == first.get_json() and len(queued_tasks(app)) == 1


def batches_stored(app) -> int:
    return len([k for k in app.extensions["jobs"].redis.keys("batch:*") if k.count(":") == 1])


def test_a_failure_after_the_batch_is_written_keeps_the_idempotency_key(client, app, monkeypatch):
    """Issue 21, defect 7: the claim was dropped on any exception, even after the batch was
    created and queued (a RedisError while answering gave a 503, and the client's retry made a
    second batch). The key is now answered in the batch's own transaction."""
    images, calls = app.extensions["images"], []

    def keep_fails_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RedisError("connection lost while answering")
        return type(images).keep(images, *args)

    monkeypatch.setattr(images, "keep", keep_fails_once)
    headers = {"Idempotency-Key": "after-create"}
    first = upload(client, [("a.png", noise_png(1))], headers=headers)
    assert first.status_code == 503
    again = upload(client, [("a.png", noise_png(1))], headers=headers)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert batches_stored(app) == 1 and len(queued_tasks(app)) == 1


def test_the_claim_is_not_held_while_a_slow_request_decodes(settings_factory, monkeypatch):
    """Issue 21, defect 7: the claim (60 s) was taken before the images were decoded, so a
    request slower than that lost it and a retry made a second batch. Decoding holds no claim
    now; the claim covers only writing the batch."""
    from web import idempotency, submit

    monkeypatch.setattr(idempotency, "CLAIM_SECONDS", 1)
    decode = submit._RequestDecoder.__call__

    def slow(self, item):
        time.sleep(1.5)  # longer than the claim lives
        return decode(self, item)

    monkeypatch.setattr(submit._RequestDecoder, "__call__", slow)
    app = create_app(settings_factory())
    answers = []

    def send(delay):
        time.sleep(delay)
        answers.append(upload(app.test_client(), [("a.png", noise_png(1))], headers={"Idempotency-Key": "slow"}))

    threads = [threading.Thread(target=send, args=(d,)) for d in (0, 1.2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [202, 202]
    assert len({a.get_json()["batch_id"] for a in answers}) == 1
    assert batches_stored(app) == 1 and len(queued_tasks(app)) == 1


def test_a_failed_queueing_lets_the_key_go_and_a_retry_creates_the_batch(settings_factory):
    settings = settings_factory()
    app = create_app(settings)
    working = app.extensions["celery"]
    app.extensions["celery"] = celery_init_app(settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    headers = {"Idempotency-Key": "broker-down"}
    assert upload(app.test_client(), [("a.png", noise_png(1))], headers=headers).status_code == 503
    app.extensions["celery"] = working
    again = upload(app.test_client(), [("a.png", noise_png(1))], headers=headers)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "false"
    assert batches_stored(app) == 1 and len(queued_tasks(app)) == 1


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        (dict(data={}, content_type="multipart/form-data"), 400, "no_images"),
        (dict(data=b"{not json", content_type="application/json"), 400, "invalid_json"),
        (dict(json=["a", "list"]), 400, "invalid_json"),
        (dict(json={"urls": "https://x/a.jpg"}), 400, "invalid_field"),
        (dict(json={"urls": ["https://x/a.jpg"], "top_k": 11}), 400, "invalid_top_k"),
        (dict(json={"urls": ["https://x/a.jpg"], "top_k": "three"}), 400, "invalid_top_k"),
        (dict(data=b"raw bytes", content_type="image/png"), 415, "unsupported_media_type"),
        (dict(json={"urls": ["ftp://example.com/a.jpg"]}), 400, "url_not_allowed"),
        (dict(json={"urls": ["http://127.0.0.1/a.jpg"]}), 400, "url_not_allowed"),
    ],
)
def test_bad_requests_get_specific_errors(client, kwargs, status, code):
    resp = client.post("/api/v1/batches", **kwargs)
    assert resp.status_code == status, resp.get_json()
    assert resp.get_json()["error"]["code"] == code and resp.get_json()["error"]["message"]


def test_more_items_than_the_batch_limit_is_413(settings_factory):
    client = create_app(settings_factory(max_batch_items=3)).test_client()
    resp = client.post("/api/v1/batches", json={"urls": [f"https://example.com/{i}.jpg" for i in range(4)]})
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "too_many_items"


def test_a_request_over_the_size_limit_is_413_json(settings_factory):
    client = create_app(settings_factory(max_request_bytes=50_000)).test_client()
    resp = upload(client, [("big.png", noise_png(3, size=(200, 200)))])
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "request_too_large"


def test_a_file_over_the_per_image_limit_is_refused(settings_factory):
    client = create_app(settings_factory(max_upload_bytes=1000)).test_client()
    resp = upload(client, [("big.png", noise_png(3, size=(100, 100)))])
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "file_too_large"


def test_uploads_are_stored_under_content_addressed_names(client, app):
    data = noise_png(4)
    upload(client, [("../../etc/passwd.png", data)])
    stored = [p for p in app.extensions["settings"].storage_dir.rglob("*") if p.is_file()]
    sha = hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in stored) == [sha, f"{sha}.thumb.jpg"]
    assert_thumbnail(client.get(f"/images/{sha}.jpg"))


def test_batch_long_poll_returns_when_the_timeout_passes(client):
    batch_id = upload(client, [("a.png", noise_png(1))]).get_json()["batch_id"]
    t0 = time.monotonic()
    resp = client.get(f"/api/v1/batches/{batch_id}?wait=1")
    assert resp.status_code == 200 and 0.9 < time.monotonic() - t0 < 5
    assert client.get(f"/api/v1/batches/{batch_id}?wait=abc").status_code == 400


def test_health_and_readiness(client, app):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    resp = client.get("/readyz")
    assert resp.status_code == 503 and resp.get_json()["checks"]["workers"] == 0
    app.extensions["jobs"].record_heartbeat("w1", time.time())
    assert client.get("/readyz").status_code == 200


def test_redis_down_gives_503_json_and_nothing_stored(settings_factory, tmp_path, caplog):
    settings = settings_factory(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = create_app(settings).test_client()
    limiter_log = logging.getLogger("flask-limiter")
    limiter_log.addHandler(caplog.handler)  # create_app replaced the root logger's handlers
    try:
        for _ in range(3):
            resp = upload(client, [("a.png", noise_png(1))])
            assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "service_unavailable"
            assert int(resp.headers["Retry-After"]) > 0
    finally:
        limiter_log.removeHandler(caplog.handler)
    assert not settings.storage_dir.exists() or not any(settings.storage_dir.rglob("*.*"))  # no image kept
    assert client.get("/readyz").status_code == 503
    # The outage is logged once per process, not as a traceback per request.
    limiter_logs = [r for r in caplog.records if r.name == "flask-limiter"]
    assert not [r for r in limiter_logs if r.exc_info], [r.getMessage() for r in limiter_logs]
    assert len(limiter_logs) <= 1


def test_pages_render(client):
    assert b'id="submit-form"' in client.get("/").data
    batch_id = upload(client, [("a.png", noise_png(1))]).get_json()["batch_id"]
    page = client.get(f"/batches/{batch_id}")
    assert page.status_code == 200 and batch_id.encode() in page.data
    assert client.get("/batches/" + "0" * 32).status_code == 404


def test_the_web_tier_never_imports_tensorflow():
    code = (
        "import sys; from web.app import create_app; from shared.settings import Settings; "
        "create_app(Settings.from_env({})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_submissions_are_rate_limited_per_client_with_retry_after(settings_factory):
    client = create_app(settings_factory(rate_limit="2/minute")).test_client()
    codes = [upload(client, [("a.png", noise_png(1))]).status_code for _ in range(3)]
    assert codes == [202, 202, 429]
    resp = upload(client, [("a.png", noise_png(1))])
    assert resp.get_json()["error"]["code"] == "rate_limited" and int(resp.headers["Retry-After"]) > 0
    assert client.get("/healthz").status_code == 200  # reading is not limited


def test_behind_a_trusted_proxy_clients_are_told_apart_by_x_forwarded_for(settings_factory):
    from web.app import create_app

    def submit(client, ip):
        return client.post(
            "/api/v1/batches",
            data={"images": [(io.BytesIO(noise_png(1)), "a.png")]},
            content_type="multipart/form-data",
            headers={"X-Forwarded-For": ip},
        ).status_code

    behind = create_app(settings_factory(rate_limit="1/minute", trusted_proxies=1)).test_client()
    assert [submit(behind, ip) for ip in ("203.0.113.1", "203.0.113.2", "203.0.113.1")] == [202, 202, 429]
    # Without a trusted proxy the header is only the client's own claim: ignored.
    direct = create_app(settings_factory(rate_limit="1/minute")).test_client()
    assert [submit(direct, ip) for ip in ("203.0.113.3", "203.0.113.4")] == [202, 429]


def test_pages_carry_security_headers(client):
    resp = client.get("/")
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert b"<script>" not in resp.data  # no inline script for the CSP to allow


def test_job_long_poll_answers_when_the_job_finishes(client, app):
    job = upload(client, [("a.png", noise_png(1))], path="/api/v1/jobs").get_json()
    store = app.extensions["jobs"]
    threading.Timer(
        0.5,
        store.complete,
        args=([job["job_id"]], [[{"label": "cat", "probability": 1.0}]], {"name": "m", "version": "1"}),
    ).start()
    t0 = time.monotonic()
    got = client.get(f"/api/v1/jobs/{job['job_id']}?wait=10").get_json()
    assert got["status"] == "done" and 0.4 < time.monotonic() - t0 < 5  # woken by the change, not the 10 s wait


def test_the_html_form_needs_its_csrf_token_and_the_api_does_not(client):
    data = {"images": [(io.BytesIO(noise_png(1)), "a.png")]}
    resp = client.post("/batches", data=data, content_type="multipart/form-data")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "csrf_failed"
    token = re.search(rb'name="csrf_token" value="([^"]+)"', client.get("/").data).group(1).decode()
    resp = client.post(
        "/batches",
        data={"csrf_token": token, "images": [(io.BytesIO(noise_png(1)), "a.png")]},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 303 and resp.headers["Location"].startswith("/batches/")
    assert upload(client, [("a.png", noise_png(2))]).status_code == 202  # the JSON API: no token


def test_without_secret_key_every_web_process_shares_one_from_redis(settings_factory):
    a, b = create_app(settings_factory()), create_app(settings_factory())
    assert a.config["SECRET_KEY"] == b.config["SECRET_KEY"] and len(a.config["SECRET_KEY"]) == 64


def test_malformed_multipart_is_a_400(client):
    body = b'--XYZ\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\nabc'  # never closed
    resp = client.post("/api/v1/batches", data=body, content_type="multipart/form-data; boundary=XYZ")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] in ("bad_request", "no_images")


def test_when_queueing_fails_the_batch_is_rolled_back_and_nothing_is_kept(settings_factory):
    """Records are written first, then the tasks queued: if queueing fails, the records go again
    and the client gets a 503 (and no image is stored)."""
    settings = settings_factory()
    app = create_app(settings)
    away = settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app.extensions["celery"] = celery_init_app(away)  # a broker that does not answer
    t0 = time.monotonic()
    resp = upload(app.test_client(), [("a.png", noise_png(1))])
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "service_unavailable"
    assert int(resp.headers["Retry-After"]) > 0 and time.monotonic() - t0 < 30
    r = app.extensions["jobs"].redis
    assert r.keys("batch:*") == [] and r.keys("job:*") == [] and r.zcard("jobs:pending") == 0
    assert not settings.storage_dir.exists() or not any(settings.storage_dir.rglob("*.*"))


def test_a_job_long_poll_sees_a_job_that_finished_just_before_it_waits():
    """The race the benchmark found: the job read as running, then it finished (version 5),
    then the poll read version 5 and waited for a change past it that never came."""
    from web.api import _wait_for_job

    class FinishedMeanwhile:  # the batch is at version 5, which finished the job
        def batch_version(self, batch_id):
            return 5

        def get_job(self, job_id):
            return {"job_id": job_id, "batch_id": "b", "status": "done"}

        def wait_for_change(self, batch_id, since, timeout):
            time.sleep(timeout)  # nothing changes any more

    t0 = time.monotonic()
    record = _wait_for_job(FinishedMeanwhile(), {"job_id": "j", "batch_id": "b", "status": "running"}, t0 + 5)
    assert record["status"] == "done" and time.monotonic() - t0 < 1
