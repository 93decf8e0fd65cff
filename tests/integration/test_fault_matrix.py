"""The fault matrix of issue 21: every job ends, whatever breaks, within a bound, written once.

Real redis-server, real `python -m worker` processes, the web tier over HTTP, and servers on
loopback that break mid-answer (tools/badservers.py). The visibility timeout is the default
(300 s) throughout: a recovery that leaned on it would blow every bound here.
"""

import time
from collections import Counter

import psutil
import pytest
import requests

from shared.logs import final_writes
from tests.helpers import RedisServer, Stack, noise_png, parse_time, post_images, wait_until
from tools.badservers import BreakingServer
from tools.stack import model_processes

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


def results_written(stack) -> Counter:
    """How many times a worker wrote each job's final status."""
    return final_writes(stack.worker_logs(full=True))


def test_image_servers_that_break_mid_body_fail_their_jobs_with_the_reason(stack_factory):
    """A body that broke off (reset, or closed before its Content-Length) raised urllib3's
    ProtocolError, a stalled one ReadTimeoutError: neither was caught, the task was acknowledged,
    and the job stayed `fetching` for good, with its batch and webhook."""
    servers = {b: BreakingServer(b) for b in ("reset", "stall", "short")}
    try:
        allowed = frozenset(f"127.0.0.1:{s.port}" for s in servers.values())
        stack = stack_factory(fetch_allow_hosts=allowed, fetch_timeout=2.0, log_json=True)
        stack.add_worker()
        stack.wait_ready()
        urls = [s.url() for s in servers.values()]
        body = requests.post(f"{stack.url}/api/v1/batches", json={"urls": urls}, timeout=30).json()
        t0 = time.monotonic()
        batch = stack.wait_batch(body["batch_id"], timeout=30)
        by_url = {j["source"]["value"]: j for j in batch["jobs"]}
        codes = {b: by_url[s.url()]["error"]["code"] for b, s in servers.items()}
        assert codes == {"reset": "fetch_failed", "stall": "fetch_timeout", "short": "fetch_failed"}, codes
        assert time.monotonic() - t0 < 15  # the stall costs its 2 s fetch timeout, no more
        assert all(n == 1 for n in results_written(stack).values()) and len(results_written(stack)) == 3
    finally:
        for s in servers.values():
            s.close()


def test_a_webhook_receiver_that_answers_then_stalls_its_body_is_delivered_once(stack_factory):
    """The answer's body was read outside any `try`: ReadTimeoutError escaped the delivery, the
    attempt went uncounted, and the janitor's backstop re-sent the webhook every 30 s for 7 days."""
    receiver = BreakingServer("stall", stall_s=30, content_type="application/json")
    try:
        stack = stack_factory(
            webhook_secret=SECRET, webhook_timeout=2.0, fetch_allow_hosts=frozenset({f"127.0.0.1:{receiver.port}"})
        )
        stack.add_worker()
        stack.wait_ready()
        files = [("images", ("a.png", noise_png(1)))]
        form = {"webhook_url": receiver.url("/hook")}
        body = requests.post(f"{stack.url}/api/v1/batches", files=files, data=form, timeout=30).json()
        hook = wait_until(
            lambda: (
                (w := stack.get_batch(body["batch_id"]).get("webhook"))
                and w["status"] not in ("pending", "queued")
                and w
            ),
            20,
            "the webhook to be delivered",
        )
        assert hook["status"] == "delivered" and hook["attempts"] == 1, hook
        time.sleep(3)
        assert receiver.requests == 1
    finally:
        receiver.close()


def pool_child(worker) -> psutil.Process:
    return wait_until(lambda: next(iter(model_processes(worker)), None), 30, "a pool child")


def test_a_pool_child_killed_mid_batch_costs_its_batch_seconds_not_the_visibility_timeout(stack_factory):
    """celery-batches handed the batch to the pool with no error callback: the killed child's
    messages were neither acknowledged nor rejected, and waited for the visibility timeout."""
    stack = stack_factory(log_json=True, predict_batch_size=64)
    worker = stack.add_worker("predict", faults={"delay_s": 0.3})
    stack.wait_ready()
    batch_id = post_images(stack, [(f"{i}.png", noise_png(i)) for i in range(600)]).json()["batch_id"]
    wait_until(lambda: stack.get_batch(batch_id)["counts"]["done"] >= 64, 60, "the first results")
    child = pool_child(worker)
    child.kill()  # as the OOM killer would
    killed = time.time()
    assert stack.get_batch(batch_id)["counts"]["done"] < 600  # the kill landed mid-batch
    batch = stack.wait_batch(batch_id, timeout=60)
    assert batch["counts"]["done"] == 600, batch["counts"]
    written = results_written(stack)
    assert len(written) == 600 and set(written.values()) == {1}  # each result written once
    assert worker.poll() is None  # the worker lives on with a new pool child
    lost = [j for j in batch["jobs"] if j["attempts"] >= 2]  # the killed child's: started twice
    assert lost
    recovered = max(parse_time(j["finished_at"]) for j in lost) - killed
    finished = max(parse_time(j["finished_at"]) for j in batch["jobs"]) - killed
    print(f"pool child killed: its {len(lost)} jobs done {recovered:.1f} s later, the batch {finished:.1f} s")
    # A new child loads the model, then the lost jobs run again as one group (each model call
    # slowed by 0.3 s here). Before the fix: the visibility timeout (300 s); with the lost jobs
    # run one at a time, 24.7 s on Zen 4 for the whole batch. The target is 15 s (README): 8.4 to
    # 10.3 s in 5 runs alone on an Intel Xeon, but 16.0 s once inside the full suite there, so the
    # bound leaves room for a slower CPU and a busy machine, far below the 300 s it guards against.
    assert recovered <= 25, recovered


@pytest.fixture
def aof_redis(tmp_path):
    server = RedisServer(tmp_path / "aof", appendonly=True)
    yield server
    server.stop()


def test_a_redis_outage_longer_than_the_dead_worker_threshold_fails_nothing_and_ends_everything(
    settings_factory, aof_redis, tmp_path
):
    """After an outage longer than WORKER_DEAD_AFTER_SECONDS, the first worker back took the
    janitor's lock and found every other one silent: it queued live workers' jobs again."""
    stack = Stack(settings_factory(redis_url=aof_redis.url, log_json=True), aof_redis, tmp_path)
    try:
        for _ in range(3):
            stack.add_worker("predict", faults={"delay_s": 0.3})
        stack.wait_ready(workers=3)
        batch_id = post_images(stack, [(f"{i}.png", noise_png(i)) for i in range(400)]).json()["batch_id"]
        wait_until(lambda: stack.get_batch(batch_id)["counts"]["done"] >= 32, 60, "the first results")
        time.sleep(1.1)  # appendfsync everysec
        aof_redis.stop()
        time.sleep(stack.settings.worker_dead_after_seconds + 4)
        aof_redis.start()
        back = time.monotonic()
        batch = stack.wait_batch(batch_id, timeout=120)
        recovered = time.monotonic() - back
        assert batch["counts"]["done"] == 400, batch["counts"]  # none failed, none left unfinished
        assert "stopped: re-queued" not in stack.worker_logs(full=True)  # no live worker judged dead
        written = results_written(stack)
        assert set(written.values()) == {1}
        print(f"redis outage: batch done {recovered:.1f} s after Redis was back")
        assert recovered <= 20, recovered
    finally:
        stack.close()
