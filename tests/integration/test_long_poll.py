"""?wait and ?since over HTTP, against the real gunicorn (no worker: the jobs stay queued unless a
test moves them)."""

import threading
import time

import pytest
import requests

from shared.jobstore import JobStore
from tests.helpers import noise_png, post_images


@pytest.fixture
def stack(stack_factory):
    return stack_factory(long_poll_max_seconds=2)


@pytest.fixture
def batch(stack):
    return post_images(stack, [("a.png", noise_png(1)), ("b.png", noise_png(2))]).json()


def timed(fn):
    t0 = time.monotonic()
    result = fn()
    return result, time.monotonic() - t0


def get(stack, path, **params):
    return requests.get(stack.url + path, params=params, timeout=30)


@pytest.mark.parametrize(
    "params, status",
    [
        ({"wait": "-1"}, 400),
        ({"wait": "abc"}, 400),
        ({"wait": "nan"}, 400),
        ({"since": "abc"}, 400),
        ({"since": "1.5"}, 400),
        ({"wait": "0"}, 200),
        ({"since": "-1"}, 200),
    ],
)
def test_bad_parameters_are_400_and_good_ones_answer_at_once(stack, batch, params, status):
    resp, took = timed(lambda: get(stack, f"/api/v1/batches/{batch['batch_id']}", **params))
    assert resp.status_code == status and took < 2
    if status == 400:
        assert resp.json()["error"]["code"] == "invalid_parameter"


def test_since_minus_one_and_no_since_give_every_job(stack, batch):
    path = f"/api/v1/batches/{batch['batch_id']}"
    assert len(get(stack, path, since=-1).json()["jobs"]) == len(get(stack, path).json()["jobs"]) == 2


def test_a_wait_longer_than_the_cap_is_cut_to_the_cap(stack, batch):
    resp, took = timed(lambda: get(stack, f"/api/v1/batches/{batch['batch_id']}", wait=100, since=0))
    assert resp.status_code == 200 and 1.9 < took < 10  # LONG_POLL_MAX_SECONDS is 2 here


def test_waiting_since_the_current_version_answers_with_only_what_changed(stack, batch):
    store = JobStore.from_url(stack.settings.redis_url, 3600)
    path = f"/api/v1/batches/{batch['batch_id']}"
    version = get(stack, path).json()["version"]
    second = batch["jobs"][1]["job_id"]
    threading.Timer(0.5, store.mark_running, args=([second],)).start()
    resp, took = timed(lambda: get(stack, path, wait=10, since=version))
    body = resp.json()
    assert took < 2.0  # woken by the change, long before the 2 s cap
    assert [j["job_id"] for j in body["jobs"]] == [second] and body["version"] > version
    assert body["counts"]["running"] == 1 and body["total"] == 2


def test_nothing_new_since_the_latest_version_is_an_empty_answer_after_the_wait(stack, batch):
    path = f"/api/v1/batches/{batch['batch_id']}"
    version = get(stack, path).json()["version"]
    resp, took = timed(lambda: get(stack, path, wait=1, since=version))
    assert resp.json()["jobs"] == [] and 0.9 < took < 10


def test_a_finished_batch_and_an_unknown_one_answer_at_once(stack, batch):
    store = JobStore.from_url(stack.settings.redis_url, 3600)
    store.fail([j["job_id"] for j in batch["jobs"]], "x", "y")
    resp, took = timed(lambda: get(stack, f"/api/v1/batches/{batch['batch_id']}", wait=10))
    assert resp.json()["finished"] and took < 2
    resp, took = timed(lambda: get(stack, f"/api/v1/batches/{'e' * 32}", wait=10))
    assert resp.status_code == 404 and took < 2
    resp, took = timed(lambda: get(stack, f"/api/v1/jobs/{'e' * 32}", wait=10))
    assert resp.status_code == 404 and took < 2
    resp, took = timed(lambda: get(stack, f"/api/v1/jobs/{batch['jobs'][0]['job_id']}", wait=10))
    assert resp.json()["status"] == "failed" and took < 2
