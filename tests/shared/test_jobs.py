"""Job records in a real Redis: creation, transitions, counts, exactly-once results, expiry."""

import threading
import time

import pytest

from shared.jobstore import JobStore, NewJob
from tests.helpers import public_batch, public_job

MODEL = {"name": "m", "version": "1"}


@pytest.fixture
def store(redis_url):
    return JobStore.from_url(redis_url, retention_seconds=3600)


def test_a_batch_is_created_with_counts_and_jobs_in_order(store):
    batch_id, records = store.create_batch(
        [
            NewJob("upload", "a.png", "f" * 64),
            NewJob("url", "http://x/y.jpg", status="fetching"),
            NewJob("upload", "bad.txt", status="failed", error_code="unsupported_format", error_message="no"),
        ],
        3,
    )
    batch = public_batch(store, batch_id)
    assert batch["total"] == 3 and not batch["finished"]
    assert batch["counts"] == {"queued": 1, "fetching": 1, "running": 0, "done": 0, "failed": 1, "cancelled": 0}
    assert [j["job_id"] for j in batch["jobs"]] == [r["job_id"] for r in records]
    assert batch["jobs"][2]["error"] == {"code": "unsupported_format", "message": "no"}
    assert batch["jobs"][0]["source"] == {"type": "upload", "value": "a.png"}


def test_unknown_ids_are_none(store):
    assert public_job(store, "0" * 32) is None and public_batch(store, "0" * 32) is None


def test_lifecycle_counts_and_attempts(store):
    batch_id, [rec] = store.create_batch([NewJob("upload", "a.png")], 3)
    job_id = rec["job_id"]
    assert store.mark_running([job_id]) == [(1, 1)]
    assert public_batch(store, batch_id)["counts"]["running"] == 1
    assert store.mark_running([job_id]) == [(1, 2)]  # a redelivery counts another attempt
    preds = [{"label": "cat", "probability": 0.9}]
    assert store.complete([job_id], [preds], MODEL) == [(1, 0)]
    job = public_job(store, job_id)
    assert job["status"] == "done" and job["predictions"] == preds and job["model"] == MODEL
    assert job["finished_at"] and job["attempts"] == 2
    batch = public_batch(store, batch_id)
    assert batch["finished"] and batch["counts"]["done"] == 1 and batch["counts"]["running"] == 0


def test_a_finished_job_never_changes_again(store):
    _, [rec] = store.create_batch([NewJob("upload", "a.png")], 3)
    job_id = rec["job_id"]
    store.complete([job_id], [[{"label": "cat", "probability": 0.9}]], MODEL)
    assert store.complete([job_id], [[{"label": "dog", "probability": 0.8}]], MODEL) == [(0, 0)]
    assert store.fail([job_id], "x", "y") == [(0, 0)]
    assert store.mark_running([job_id]) == [(0, 0)]
    job = public_job(store, job_id)
    assert job["status"] == "done" and job["predictions"][0]["label"] == "cat"


def test_a_retried_write_with_the_same_write_id_answers_as_the_first_did(store):
    batch_id, [rec] = store.create_batch([NewJob("upload", "a.png")], 3)
    job_id = rec["job_id"]
    assert store.mark_running([job_id], write_id="w1") == [(1, 1)]
    assert store.mark_running([job_id], write_id="w1") == [(1, 1)]  # the same attempt, not a second
    preds = [{"label": "cat", "probability": 0.9}]
    assert store.complete([job_id], [preds], MODEL, write_id="w2") == [(1, 0)]
    assert store.complete([job_id], [preds], MODEL, write_id="w2") == [(1, 0)]
    assert store.complete([job_id], [preds], MODEL, write_id="w3") == [(0, 0)]  # another writer
    assert store.complete([job_id], [preds], MODEL) == [(0, 0)]
    batch = public_batch(store, batch_id)
    assert batch["counts"]["done"] == 1 and sum(batch["counts"].values()) == 1
    assert batch["jobs"][0]["attempts"] == 1


def test_a_job_named_twice_in_one_call_changes_once(store):
    batch_id, [rec] = store.create_batch([NewJob("upload", "a.png")], 3)
    job_id = rec["job_id"]
    assert store.mark_running([job_id, job_id], write_id="w1") == [(1, 1), (0, 0)]
    preds = [{"label": "cat", "probability": 0.9}]
    assert store.complete([job_id, job_id], [preds, preds], MODEL, write_id="w2") == [(1, 0), (0, 0)]
    assert public_batch(store, batch_id)["counts"]["done"] == 1


def test_concurrent_duplicate_completions_count_once(store):
    batch_id, records = store.create_batch([NewJob("upload", f"{i}.png") for i in range(50)], 3)
    ids = [r["job_id"] for r in records]
    preds = [[{"label": "cat", "probability": 1.0}]] * len(ids)
    threads = [threading.Thread(target=store.complete, args=(ids, preds, MODEL)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batch = public_batch(store, batch_id)
    assert batch["counts"]["done"] == 50 and sum(batch["counts"].values()) == 50


def test_url_jobs_move_from_fetching_to_queued(store):
    _, [rec] = store.create_batch([NewJob("url", "http://x/a.jpg", status="fetching")], 3)
    job_id = rec["job_id"]
    assert store.mark_fetching(job_id) == (1, 1)
    assert store.mark_fetched(job_id, "a" * 64, "cGl4ZWxz")[0] == 1
    job = public_job(store, job_id)
    assert job["status"] == "queued" and job["image"] == "a" * 64


def test_records_expire_after_the_retention_period(redis_url):
    store = JobStore.from_url(redis_url, retention_seconds=1)
    batch_id, [rec] = store.create_batch([NewJob("upload", "a.png")], 3)
    time.sleep(2.1)
    assert public_job(store, rec["job_id"]) is None and public_batch(store, batch_id) is None


def test_wait_for_change_returns_on_a_change_and_times_out_otherwise(store):
    batch_id, [rec] = store.create_batch([NewJob("upload", "a.png")], 3)
    t0 = time.monotonic()
    store.wait_for_change(batch_id, store.batch_version(batch_id), 0.5)
    assert 0.45 < time.monotonic() - t0 < 5  # waited out the timeout, and not much longer
    threading.Timer(0.3, store.mark_running, args=([rec["job_id"]],)).start()
    t0 = time.monotonic()
    store.wait_for_change(batch_id, store.batch_version(batch_id), 10)
    assert time.monotonic() - t0 < 5  # woken by the change, not by the 10 s timeout


def test_long_polls_share_one_subscription_and_wake_at_the_change(store):
    """Each long-poll subscribed on a PubSub of its own, and redis-py closes a PubSub's
    connection when done: every poll opened a TCP connection to Redis (issue 23)."""
    batches = [store.create_batch([NewJob("upload", f"{i}.png")], 3) for i in range(20)]
    store.wait_for_change(batches[0][0], store.batch_version(batches[0][0]), 0.1)  # the listener starts
    opened = store.redis.info("stats")["total_connections_received"]
    for batch_id, [rec] in batches:
        threading.Timer(0.05, store.mark_running, args=([rec["job_id"]],)).start()
        t0 = time.monotonic()
        store.wait_for_change(batch_id, store.batch_version(batch_id), 10)
        assert time.monotonic() - t0 < 0.8  # woken by its event, not by the once-a-second check
    assert store.redis.info("stats")["total_connections_received"] - opened <= 2


def test_since_a_version_only_changed_jobs_are_read(store):
    batch_id, records = store.create_batch([NewJob("upload", f"{i}.png") for i in range(5)], 3)
    v0 = public_batch(store, batch_id)["version"]
    store.mark_running([records[1]["job_id"], records[3]["job_id"]])
    changed = public_batch(store, batch_id, since=v0)
    assert [j["job_id"] for j in changed["jobs"]] == [records[1]["job_id"], records[3]["job_id"]]
    assert changed["counts"]["running"] == 2 and changed["total"] == 5
    assert public_batch(store, batch_id, since=changed["version"])["jobs"] == []
    assert len(public_batch(store, batch_id)["jobs"]) == 5
