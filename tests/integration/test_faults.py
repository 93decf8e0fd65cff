"""Faults injected into the running system: nothing lost, nothing written twice.

Real redis-server, real worker processes, the web server over HTTP, with the default
VISIBILITY_TIMEOUT (300 s): what comes back comes back by the deadlines (worker/janitor.py).
"""

import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import requests

from shared.images import encode_pixels
from shared.jobstore import JobStore, NewJob
from shared.queue import PredictTask, celery_init_app, enqueue
from shared.settings import REPO_ROOT
from tests.helpers import RedisServer, Stack, black_png, child_env, noise_png, post_images, wait_status, wait_until


def pool_child(worker: subprocess.Popen) -> psutil.Process:
    """The process holding the model: the grandchild of `python -m worker` (its Celery's pool)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for celery in psutil.Process(worker.pid).children():
            kids = celery.children()
            if kids:
                return kids[0]
        time.sleep(0.1)
    raise AssertionError("no pool child")


def test_a_killed_pool_child_loses_nothing(stack_factory):
    stack = stack_factory()
    worker = stack.add_worker("predict", faults={"delay_s": 2})
    stack.wait_ready()
    batch_id = post_images(stack, [(f"{i}.png", noise_png(i)) for i in range(3)]).json()["batch_id"]
    wait_status(stack, batch_id, "running")
    pool_child(worker).kill()  # as the OOM killer would
    batch = stack.wait_batch(batch_id, timeout=90)
    assert batch["counts"]["done"] == 3, batch["counts"]
    assert any(j["attempts"] >= 2 for j in batch["jobs"])  # what was running ran again
    assert worker.poll() is None  # the worker itself lives on with a new pool child


def test_sigterm_finishes_the_job_in_hand_then_exits(stack_factory):
    stack = stack_factory()
    worker = stack.add_worker("predict", faults={"delay_s": 2})
    stack.wait_ready()
    batch_id = post_images(stack, [("a.png", noise_png(1))]).json()["batch_id"]
    wait_status(stack, batch_id, "running")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    job = requests.get(f"{stack.url}/api/v1/batches/{batch_id}", timeout=10).json()["jobs"][0]
    assert job["status"] == "done" and job["attempts"] == 1  # finished by that worker, once


def test_a_poison_image_fails_alone_after_bounded_attempts(stack_factory):
    # An all-black image kills the process that predicts it, every time.
    stack = stack_factory(task_max_attempts=2)
    stack.add_worker("predict", faults={"crash_on_black": 1})
    stack.wait_ready()
    files = [("poison.png", black_png())] + [(f"{i}.png", noise_png(i)) for i in range(3)]
    batch = stack.wait_batch(post_images(stack, files).json()["batch_id"], timeout=150)
    by_name = {j["source"]["value"]: j for j in batch["jobs"]}
    assert by_name["poison.png"]["status"] == "failed" and by_name["poison.png"]["error"]["code"] == "poison"
    assert all(by_name[f"{i}.png"]["status"] == "done" for i in range(3))


def test_a_slow_model_call_fails_with_timeout_instead_of_holding_the_worker(stack_factory):
    stack = stack_factory(task_soft_time_limit=1.0)
    stack.add_worker("predict", faults={"delay_s": 3})
    stack.wait_ready()
    batch = stack.wait_batch(post_images(stack, [("a.png", noise_png(1))]).json()["batch_id"], timeout=60)
    job = batch["jobs"][0]
    assert job["status"] == "failed" and job["error"]["code"] == "timeout"


def drained(store) -> bool:
    """The predict queue is empty and no worker holds a message: every task was consumed."""
    return store.queue_length("predict") == 0 and store.redis.hlen("unacked") == 0  # kombu's held messages


def test_the_same_task_delivered_twice_gives_one_result(stack_factory):
    stack = stack_factory()
    stack.add_worker("predict")
    stack.wait_ready()
    store = JobStore.from_url(stack.settings.redis_url, 3600)
    body = post_images(stack, [("a.png", noise_png(1))]).json()
    batch = stack.wait_batch(body["batch_id"])
    first = batch["jobs"][0]
    # Deliver the same job's task again, as a broker might after a lost acknowledgement.
    enqueue(
        celery_init_app(stack.settings),
        [PredictTask(first["job_id"], encode_pixels(np.zeros((32, 32, 3), np.uint8)), 3)],
        [],
    )
    # Consumed and acknowledged (seen twice, half a second apart: kombu takes a message off the
    # queue and records it as held in two steps): only then is the comparison a test.
    wait_until(lambda: drained(store) and (time.sleep(0.5) or drained(store)), 30, "the duplicate to be consumed")
    again = stack.get_batch(body["batch_id"])
    assert again["jobs"][0] == first and again["counts"]["done"] == 1 and sum(again["counts"].values()) == 1


def test_a_pickled_message_is_refused_not_run(stack_factory):
    stack = stack_factory()
    stack.add_worker("predict")
    stack.wait_ready()
    # A real job, queued, whose only task is the pickled one: running it would change the job.
    store = JobStore.from_url(stack.settings.redis_url, 3600)
    pixels = encode_pixels(np.full((32, 32, 3), 7, np.uint8))
    batch_id, [record] = store.create_batch([NewJob("upload", "a.png", pixels=pixels)], 3)
    app = celery_init_app(stack.settings)
    app.conf.accept_content = ["json", "pickle"]  # a producer that would send pickle
    app.send_task(
        "predict",
        kwargs={"job_id": record["job_id"], "pixels": pixels, "top_k": 3},
        serializer="pickle",
        queue="predict",
    )
    wait_until(lambda: "disallowed" in stack.worker_logs().lower(), 20, "the worker to refuse the pickle")
    job = requests.get(f"{stack.url}/api/v1/jobs/{record['job_id']}", timeout=10).json()
    assert job["status"] == "queued" and job["attempts"] == 0 and job["predictions"] is None
    # ...and the worker still serves JSON tasks.
    batch = stack.wait_batch(post_images(stack, [("a.png", noise_png(1))]).json()["batch_id"])
    assert batch["counts"]["done"] == 1


def test_redis_restarted_mid_batch_with_aof_loses_nothing(settings_factory, tmp_path):
    redis_server = RedisServer(tmp_path / "aof", appendonly=True)
    try:
        stack = Stack(settings_factory(redis_url=redis_server.url), redis_server, tmp_path)
        try:
            stack.add_worker("predict", faults={"delay_s": 0.5})  # about 4 s for the 500
            stack.wait_ready()
            batch_id = post_images(stack, [(f"{i}.png", noise_png(i)) for i in range(500)]).json()["batch_id"]
            before = wait_status(stack, batch_id, "done", timeout=60)
            time.sleep(1.1)  # appendfsync everysec: what was acknowledged a second ago is on disk
            assert before["counts"]["done"] < 500  # the restart lands mid-batch
            redis_server.stop()
            time.sleep(1)
            redis_server.start()
            batch = stack.wait_batch(batch_id, timeout=180)
            assert batch["counts"]["done"] == 500, batch["counts"]
            assert sum(batch["counts"].values()) == 500
        finally:
            stack.close()
    finally:
        redis_server.stop()


def test_redis_down_refuses_quickly_stores_nothing_and_recovers(settings_factory, tmp_path):
    # A Redis that keeps its data (AOF), so that "nothing new after the outage" can be seen.
    redis_server = RedisServer(tmp_path / "aof", appendonly=True)
    stack = Stack(settings_factory(redis_url=redis_server.url), redis_server, tmp_path)
    try:
        stack.add_worker("predict")
        stack.wait_ready()
        earlier = post_images(stack, [("earlier.png", noise_png(1))]).json()["batch_id"]
        stack.wait_batch(earlier)
        time.sleep(1.1)  # appendfsync everysec: the earlier batch is on disk
        keys_before = set(redis_server.client().keys("*batch:*"))
        assert f"batch:{earlier}" in keys_before
        files_before = sorted(p.name for p in stack.settings.storage_dir.rglob("*") if p.is_file())
        redis_server.stop()
        try:
            t0 = time.monotonic()
            resp = post_images(stack, [("during.png", noise_png(2))])
            assert resp.status_code == 503 and time.monotonic() - t0 < 5
            assert int(resp.headers["Retry-After"]) > 0
            assert requests.get(stack.url + "/readyz", timeout=10).status_code == 503
        finally:
            redis_server.start()
        assert set(redis_server.client().keys("*batch:*")) == keys_before  # no record of the refused upload
        assert sorted(p.name for p in stack.settings.storage_dir.rglob("*") if p.is_file()) == files_before
        resp = wait_until(
            lambda: (r := post_images(stack, [("after.png", noise_png(3))])).status_code == 202 and r,
            60,
            "submissions to work again",
            interval=0.5,
        )
        assert stack.wait_batch(resp.json()["batch_id"], timeout=60)["counts"]["done"] == 1
    finally:
        stack.close()
        redis_server.stop()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_worker_with_a_bad_model_exits_at_once_with_a_clear_message(
    settings_factory, tiny_model_dir, tmp_path, damage
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if damage == "missing":
        (model / "model.keras").unlink()
    else:
        (model / "model.keras").write_bytes(b"\0" * 1000)
    env = child_env(settings_factory(model_dir=model))
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "worker"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and time.monotonic() - t0 < 15
    assert str(model) in run.stderr and ("expected" in run.stderr or "checksum" in run.stderr)


def test_after_redis_restarts_a_lone_image_is_still_predicted_without_waiting_for_a_full_batch(stack_factory):
    """celery-batches kept the flush timer of the connection Redis took down, so after a restart
    a lone task waited for a full batch of 64 that never came (the soak caught it;
    worker.factory.ReconnectingBatches)."""
    stack = stack_factory()
    stack.add_worker("predict", predict_batch_size=64, predict_batch_wait_ms=50)
    stack.wait_ready()
    stack.wait_batch(post_images(stack, [("before.png", noise_png(1))]).json()["batch_id"])
    stack.redis.stop()
    time.sleep(1)
    stack.redis.start()  # this Redis keeps nothing: the worker reconnects to an empty one
    stack.wait_ready(timeout=60)  # heartbeats again: the worker is back
    resp = wait_until(
        lambda: (r := post_images(stack, [("after.png", noise_png(2))])).status_code == 202 and r,
        30,
        "submissions to work again",
        interval=0.5,
    )
    job = stack.wait_job(resp.json()["jobs"][0]["job_id"], timeout=30)
    assert job["status"] == "done"
