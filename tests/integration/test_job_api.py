"""The job API a script can rely on, against the real service: idempotent submissions, cancel,
and signed completion webhooks."""

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from shared.jobstore import JobStore
from tests.helpers import noise_png, post_images, queued_jobs, wait_until

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def submit(stack, files, key=None, **form):
    headers = {"Idempotency-Key": key} if key else {}
    return requests.post(
        stack.url + "/api/v1/batches", files=[("images", f) for f in files], data=form, headers=headers, timeout=60
    )


def batches_in_redis(stack) -> int:
    return len([k for k in JobStore.from_url(stack.settings.redis_url, 60).redis.keys("batch:*") if k.count(":") == 1])


# --- idempotency keys -------------------------------------------------------------------------------
def test_a_replay_returns_the_same_batch_and_queues_nothing_again(stack_factory):
    stack = stack_factory()  # no worker: what was queued stays visible
    first = submit(stack, [("a.png", noise_png(1))], key="chunk-1")
    again = submit(stack, [("a.png", noise_png(1))], key="chunk-1")
    assert first.status_code == again.status_code == 202
    assert first.headers["Idempotent-Replayed"] == "false" and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json() and again.headers["Location"] == first.headers["Location"]
    assert batches_in_redis(stack) == 1 and len(queued_jobs(stack.redis.client())) == 1


def test_the_same_key_with_another_body_is_a_422(stack_factory):
    stack = stack_factory()
    assert submit(stack, [("a.png", noise_png(1))], key="k").status_code == 202
    other = submit(stack, [("a.png", noise_png(2))], key="k")  # same name, other image
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert submit(stack, [("a.png", noise_png(1))], key="k", top_k="5").status_code == 422


@pytest.mark.parametrize("key", ["", "a" * 201, "has space", "tab\there"])
def test_a_malformed_key_is_a_400(stack_factory, key):
    stack = stack_factory()
    resp = (
        submit(stack, [("a.png", noise_png(1))], key=key)
        if key
        else requests.post(
            stack.url + "/api/v1/batches",
            files=[("images", ("a.png", noise_png(1)))],
            headers={"Idempotency-Key": ""},
            timeout=30,
        )
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_idempotency_key"


def test_concurrent_requests_with_one_key_create_one_batch(stack_factory):
    stack = stack_factory()
    files = [(f"{i}.png", noise_png(i)) for i in range(20)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: submit(stack, files, key="together"), range(8)))
    assert all(a.status_code == 202 for a in answers), [a.text for a in answers]
    assert len({a.json()["batch_id"] for a in answers}) == 1
    assert sum(a.headers["Idempotent-Replayed"] == "false" for a in answers) == 1
    assert batches_in_redis(stack) == 1 and len(queued_jobs(stack.redis.client())) == 20


def test_another_client_may_use_the_same_key(stack_factory):
    stack = stack_factory(trusted_proxies=1)  # behind a proxy: the client is X-Forwarded-For
    one = requests.post(
        stack.url + "/api/v1/batches",
        files=[("images", ("a.png", noise_png(1)))],
        headers={"Idempotency-Key": "k", "X-Forwarded-For": "192.0.2.1"},
        timeout=30,
    )
    two = requests.post(
        stack.url + "/api/v1/batches",
        files=[("images", ("a.png", noise_png(1)))],
        headers={"Idempotency-Key": "k", "X-Forwarded-For": "192.0.2.2"},
        timeout=30,
    )
    assert one.json()["batch_id"] != two.json()["batch_id"]


# --- cancel ---------------------------------------------------------------------------------------------
def snapshot(stack, batch_id):
    return {j["job_id"]: (j["status"], j["predictions"], j["finished_at"]) for j in stack.get_batch(batch_id)["jobs"]}


def test_cancel_in_the_middle_of_a_300_image_batch(stack_factory):
    stack = stack_factory()
    stack.add_worker("predict", faults={"delay_s": 0.3})
    stack.wait_ready()
    batch_id = post_images(stack, [(f"{i}.png", noise_png(i)) for i in range(300)]).json()["batch_id"]
    wait_until(lambda: stack.get_batch(batch_id)["counts"]["done"] > 0, 60, "some jobs done")
    resp = requests.post(f"{stack.url}/api/v1/batches/{batch_id}/cancel", timeout=30)
    body = resp.json()
    assert resp.status_code == 200 and body["finished"]
    counts = body["counts"]
    assert 0 < counts["done"] < 300 and counts["done"] + counts["cancelled"] == 300 and counts["failed"] == 0
    after_cancel = snapshot(stack, batch_id)
    time.sleep(3)  # the worker goes on with what it holds: every write it tries is refused
    assert snapshot(stack, batch_id) == after_cancel
    cancelled = [v for v in after_cancel.values() if v[0] == "cancelled"]
    assert len(cancelled) == counts["cancelled"] and all(predictions is None for _, predictions, _ in cancelled)
    again = requests.post(f"{stack.url}/api/v1/batches/{batch_id}/cancel", timeout=30).json()
    assert again["counts"] == counts  # cancelling twice changes nothing


def test_cancel_a_job_and_unknown_ids(stack_factory):
    stack = stack_factory()
    job = post_images(stack, [("a.png", noise_png(1))], path="/api/v1/jobs").json()
    resp = requests.post(f"{stack.url}/api/v1/jobs/{job['job_id']}/cancel", timeout=30)
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    for path in (f"/api/v1/jobs/{'e' * 32}/cancel", f"/api/v1/batches/{'e' * 32}/cancel", "/api/v1/batches/x/cancel"):
        assert requests.post(stack.url + path, timeout=30).status_code == 404


# --- completion webhooks ----------------------------------------------------------------------------------
class Receiver:
    """A webhook receiver on loopback: answers each POST with the next status of `statuses`."""

    def __init__(self, statuses=(200,)):
        self.statuses, self.calls = list(statuses), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.calls.append((time.time(), dict(self.headers), body))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.host = f"127.0.0.1:{self.server.server_address[1]}"


def valid_signature(headers: dict, body: bytes) -> bool:
    """Standard Webhooks, checked the way a receiver would, independently of shared/webhooks.py."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return (
        headers["webhook-signature"] == f"v1,{expected}" and abs(time.time() - int(headers["webhook-timestamp"])) < 60
    )


def test_a_webhook_arrives_once_signed_and_is_retried_after_a_500(stack_factory):
    receiver = Receiver(statuses=(500, 200))
    try:
        stack = stack_factory(webhook_secret=SECRET, fetch_allow_hosts=frozenset({receiver.host}))
        stack.add_worker()
        stack.wait_ready()
        body = submit(stack, [("a.png", noise_png(1)), ("b.png", noise_png(2))], webhook_url=receiver.url).json()
        batch = stack.wait_batch(body["batch_id"])
        wait_until(lambda: len(receiver.calls) >= 2, 30, "the webhook's second attempt")
        time.sleep(2)  # and no third
        assert len(receiver.calls) == 2
        (_, first_headers, first), (_, headers, delivered) = receiver.calls
        assert first_headers["webhook-id"] == headers["webhook-id"] == f"msg_{body['batch_id']}"  # one message
        assert valid_signature(headers, delivered)
        summary = json.loads(delivered)
        assert summary["batch_id"] == body["batch_id"] and summary["finished"] and summary["counts"]["done"] == 2
        assert "jobs" not in summary
        hook = wait_until(
            lambda: (b := stack.get_batch(body["batch_id"]))["webhook"]["status"] == "delivered" and b,
            10,
            "the delivery to be recorded",
        )["webhook"]
        assert hook["attempts"] == 2 and hook["delivered_at"] and batch["counts"]["done"] == 2
    finally:
        receiver.server.shutdown()


def test_a_webhook_to_a_private_address_is_refused_at_submit(stack_factory):
    stack = stack_factory(webhook_secret=SECRET)  # nothing allowed: loopback is private
    resp = submit(stack, [("a.png", noise_png(1))], webhook_url="http://127.0.0.1:9/hook")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "url_not_allowed"
    resp = requests.post(
        stack.url + "/api/v1/batches",
        timeout=30,
        json={"urls": ["https://example.com/a.jpg"], "webhook_url": "http://10.0.0.1/hook"},
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "url_not_allowed"


def test_without_a_webhook_secret_webhooks_are_refused(stack_factory):
    stack = stack_factory()
    resp = submit(stack, [("a.png", noise_png(1))], webhook_url="https://example.com/hook")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "webhooks_not_configured"
