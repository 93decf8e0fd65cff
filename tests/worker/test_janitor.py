"""The one rule: a job past its deadline is queued again from its record, at most
TASK_MAX_ATTEMPTS times, then fails; nothing else is queued again."""

import contextlib
import json
import os
import threading
import time

import numpy as np
import pytest

from shared.images import encode_pixels
from shared.jobstore import QUEUE_CHECK_SECONDS, JobStore, NewJob
from shared.queue import PredictTask, celery_init_app, enqueue, job_ids_of
from shared.storage import ImageStore
from shared.webhooks import MAX_ATTEMPTS
from worker.janitor import (
    requeue_overdue,
    rescue_dead_workers,
    rescue_lost_webhooks,
    rescue_unrecorded_tasks,
    sweep_expired_images,
)
from worker.state import WorkerState

LATER = QUEUE_CHECK_SECONDS + 1  # past a freshly queued job's first deadline


@pytest.fixture
def state(settings_factory):
    s = settings_factory()
    return WorkerState(s, JobStore.from_url(s.redis_url, 3600), ImageStore(s.storage_dir), celery_init_app(s))


def queued_ids(state, queue):
    """The job ids the messages in a queue hold."""
    return [j for m in state.store.redis.lrange(queue, 0, -1) for j in job_ids_of(json.loads(m)["headers"])]


def make_jobs(state, n=2, status="queued"):
    px = encode_pixels(np.zeros((32, 32, 3), np.uint8))
    jobs = [
        NewJob("upload", f"{i}.png", pixels=px)
        if status == "queued"
        else NewJob("url", f"https://example.com/{i}.jpg", status="fetching")
        for i in range(n)
    ]
    return [r["job_id"] for r in state.store.create_batch(jobs, 3)[1]]


def status_of(state, job_id):
    return state.store.redis.hget(f"job:{job_id}", "status")


def test_a_job_whose_message_vanished_is_queued_again(state):
    lost = make_jobs(state)  # records written, no task queued: as if Redis lost the messages
    assert requeue_overdue(state, now=time.time() + QUEUE_CHECK_SECONDS - 1) == 0  # too young
    assert requeue_overdue(state, now=time.time() + LATER) == 2
    assert sorted(queued_ids(state, "predict")) == sorted(lost)
    assert requeue_overdue(state, now=time.time() + LATER) == 0  # re-queued just now: not again
    assert state.store.redis.hget(f"job:{lost[0]}", "requeues") == "1"


def test_lost_fetches_are_queued_again_with_their_url(state):
    lost = make_jobs(state, 1, status="fetching")
    assert requeue_overdue(state, now=time.time() + LATER) == 1
    msg = json.loads(state.store.redis.lindex("fetch", 0))
    assert msg["headers"]["id"] == lost[0] and msg["headers"]["task"] == "fetch"


def test_jobs_still_waiting_behind_the_queue_head_are_left_alone_however_long_the_queue(state):
    older = make_jobs(state, 1)
    state.store.redis.hset(f"job:{older[0]}", "queued_at", repr(time.time() - 60))  # a minute before
    newer = make_jobs(state, 1)
    enqueue(state.celery, [PredictTask(newer[0], encode_pixels(np.zeros((32, 32, 3), np.uint8)), 3)], [])  # waits
    assert requeue_overdue(state, now=time.time() + LATER) == 1  # only the older one, lost
    assert sorted(queued_ids(state, "predict")) == sorted(older + newer)
    # Still waiting an hour on: never queued again for waiting, never failed.
    for hours in range(1, 4):
        assert requeue_overdue(state, now=time.time() + 3600 * hours) == 0
    assert status_of(state, newer[0]) == "queued" and state.store.redis.hget(f"job:{newer[0]}", "requeues") is None


def test_finished_jobs_leave_and_started_jobs_wait_for_their_deadline(state):
    done, running = make_jobs(state)
    state.store.complete([done], [[{"label": "cat", "probability": 1.0}]], {"name": "m", "version": "1"})
    started = time.time()
    state.store.mark_running([running], deadline=started + state.settings.run_deadline_seconds)
    assert requeue_overdue(state, now=started + state.settings.run_deadline_seconds - 1) == 0
    assert state.store.deadlines([done]) == [None]
    assert state.store.redis.hget(f"job:{done}", "pixels") is None  # the image copy goes when done
    assert requeue_overdue(state, now=started + state.settings.run_deadline_seconds + 1) == 1  # stalled
    assert queued_ids(state, "predict") == [running]


def test_a_fetch_that_started_and_never_ended_is_fetched_again_then_fails(state):
    """A body that broke off mid-stream raised an error nobody caught: the task was acknowledged
    with the job `fetching` and one fetch attempt, and only jobs with none were ever rescued."""
    [job] = make_jobs(state, 1, status="fetching")
    now = time.time()
    for attempt in range(state.settings.task_max_attempts):
        state.store.mark_fetching(job, deadline=now + state.settings.fetch_deadline_seconds)
        now += state.settings.fetch_deadline_seconds + 1
        assert requeue_overdue(state, now=now) == 1, attempt
        state.store.redis.delete("fetch")  # taken, and lost again
        now += LATER
    state.store.mark_fetching(job, deadline=now + state.settings.fetch_deadline_seconds)
    assert requeue_overdue(state, now=now + state.settings.fetch_deadline_seconds + 1) == 0
    rec = state.store.get_job(job)
    assert rec["status"] == "failed" and rec["error_code"] == "abandoned", rec
    assert "3 times" in rec["error_message"] and state.store.deadlines([job]) == [None]


def test_a_message_a_worker_took_has_the_hold_deadline(state):
    [job] = make_jobs(state, 1)
    now = time.time()
    state.store.record_consumer("w", now, [job], 120, now + state.settings.hold_deadline_seconds)
    assert requeue_overdue(state, now=now + state.settings.hold_deadline_seconds - 1) == 0
    assert requeue_overdue(state, now=now + state.settings.hold_deadline_seconds + 1) == 1


def hand_over(state, job_id, at):
    """What kombu writes when it hands a worker a message: the message, and when."""
    message = {"headers": {"id": job_id, "task": "predict"}, "body": ""}
    state.store.redis.hset("unacked", f"tag-{job_id}", json.dumps([message, "", "predict"]))
    state.store.redis.zadd("unacked_index", {f"tag-{job_id}": at})


def test_a_message_taken_but_never_recorded_is_queued_again_after_the_grace(state):
    unrecorded, recorded, recorded_by_dead, done = make_jobs(state, 4)
    state.store.complete([done], [[{"label": "cat", "probability": 1.0}]], {"name": "m", "version": "1"})
    now = time.time() + 1
    for job_id in (unrecorded, recorded, recorded_by_dead, done):
        hand_over(state, job_id, now)
    state.store.record_consumer("alive", now + 8, [recorded], 120, now + 8 + 130)
    state.store.record_consumer("dead", now - 30, [recorded_by_dead], 120, now - 30 + 130)
    assert rescue_unrecorded_tasks(state, now + 2) == 0  # within the grace: maybe being recorded
    assert rescue_unrecorded_tasks(state, now + 8) == 2  # nobody alive recorded these two
    assert sorted(queued_ids(state, "predict")) == sorted([unrecorded, recorded_by_dead])
    assert rescue_unrecorded_tasks(state, now + 9) == 0  # queued again since that delivery: handled


def test_finding_a_dead_worker_also_queues_the_messages_it_took_but_never_recorded(state):
    recorded, unrecorded, live_workers = make_jobs(state, 3)
    handed = time.time() + 1  # after the jobs were queued
    for job_id in (recorded, unrecorded, live_workers):
        hand_over(state, job_id, handed)
    now = handed + 30
    state.store.record_consumer("dead", handed, [recorded], 120, handed + 130)
    state.store.record_consumer("alive", now, [live_workers], 120, now + 130)
    assert rescue_dead_workers(state, now) == 2
    assert sorted(queued_ids(state, "predict")) == sorted([recorded, unrecorded])
    state.store.forget_consumer("dead")
    assert rescue_dead_workers(state, now + 1) == 0  # nobody died since: no scan, nothing twice


def test_stored_images_older_than_the_retention_period_are_swept(settings_factory):
    settings = settings_factory(retention_days=1)
    state = WorkerState(
        settings,
        JobStore.from_url(settings.redis_url, 3600),
        ImageStore(settings.storage_dir),
        celery_init_app(settings),
    )
    old = settings.storage_dir / "ab" / ("ab" + "0" * 62)
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    fresh = settings.storage_dir / "cd" / ("cd" + "0" * 62)
    fresh.parent.mkdir(parents=True)
    fresh.write_bytes(b"y")
    assert sweep_expired_images(state) == 1
    assert not old.exists() and fresh.exists()


def test_a_dead_workers_unfinished_jobs_are_queued_again_and_a_live_workers_are_not(state):
    dead_done, dead_waiting, dead_fetching, live_waiting = make_jobs(state, 4)
    state.store.redis.hset(f"job:{dead_fetching}", mapping={"status": "fetching", "source": "https://x.test/a.jpg"})
    state.store.complete([dead_done], [[{"label": "cat", "probability": 1.0}]], {"name": "m", "version": "1"})
    now = time.time()
    for job_id in (dead_waiting, dead_fetching, live_waiting):  # queued a minute ago, taken since
        state.store.redis.hset(f"job:{job_id}", "queued_at", repr(now - 60))
    state.store.record_consumer("dead", now - 30, [dead_done, dead_waiting, dead_fetching], 120, now - 30 + 130)
    state.store.record_consumer("alive", now, [live_waiting], 120, now + 130)
    assert rescue_dead_workers(state, now) == 2  # the waiting prediction and the fetch
    assert queued_ids(state, "predict") == [dead_waiting] and queued_ids(state, "fetch") == [dead_fetching]
    assert state.store.silent_consumers(now - 10) == []  # the dead one is forgotten, the live one kept
    assert state.store.held_by("dead") == [] and [j for j, _ in state.store.held_by("alive")] == [live_waiting]
    assert rescue_dead_workers(state, now) == 0  # handled once


def test_a_webhook_whose_delivery_keeps_getting_lost_is_counted_and_given_up(state):
    """The janitor's backstop re-queued an overdue webhook without counting an attempt: one whose
    delivery task kept dying was re-sent every 30 s for the whole retention period."""
    batch_id, _ = state.store.create_batch([], 3, webhook_url="https://example.com/hook")
    state.store.redis.hset(f"batch:{batch_id}", "webhook_status", "queued")
    state.store.redis.zadd("webhooks:due", {batch_id: time.time()})
    now = time.time()
    for _ in range(MAX_ATTEMPTS - 1):
        now += 60
        assert rescue_lost_webhooks(state, now) == 1
    now += 60
    assert rescue_lost_webhooks(state, now) == 1  # the last one: given up
    rec = state.store.redis.hgetall(f"batch:{batch_id}")
    assert rec["webhook_status"] == "failed" and rec["webhook_attempts"] == str(MAX_ATTEMPTS)
    assert rescue_lost_webhooks(state, now + 3600) == 0 and state.store.redis.zcard("webhooks:due") == 0


def test_a_due_webhook_of_an_expired_batch_is_dropped(state):
    state.store.redis.zadd("webhooks:due", {"gone": time.time() - 3600})
    assert rescue_lost_webhooks(state, time.time()) == 1
    assert state.store.redis.zcard("webhooks:due") == 0


def test_a_late_job_whose_record_holds_nothing_to_run_fails_instead_of_waiting_forever(state):
    """A record that could not be turned into a task (a running URL job without its pixels: the
    soak made one) was looked at on every pass, for ever, and its batch never finished."""
    [job_id] = make_jobs(state, 1)
    state.store.mark_running([job_id])
    state.store.redis.hdel(f"job:{job_id}", "pixels")
    requeue_overdue(state, now=time.time() + state.settings.run_deadline_seconds + 1)
    assert status_of(state, job_id) == "failed"
    assert state.store.deadlines([job_id]) == [None]


def test_a_janitor_lock_left_by_a_killed_worker_stops_the_janitor_no_longer_than_a_dead_worker(state, monkeypatch):
    """A fresh-clone CI found a dead worker's jobs done 70.8 s after its SIGKILL: the worker was
    killed holding the janitor's lock, which lived 60 s, so no one judged it dead for a minute."""
    from worker import janitor

    passes = []

    class Stop(BaseException):
        """Ends the janitor's loop, which carries on through any Exception."""

    def one_pass(*a, **kw):
        passes.append(time.monotonic())
        raise Stop

    def janitor_until_its_first_pass():
        with contextlib.suppress(Stop):
            janitor.run_janitor(state, "live-node")

    monkeypatch.setattr(janitor, "run_pass", one_pass)
    s = state.settings
    assert state.store.take_lock("janitor", "killed-node", janitor.janitor_lock_seconds(s))  # and never let go
    started = time.monotonic()
    thread = threading.Thread(target=janitor_until_its_first_pass, daemon=True)
    thread.start()
    thread.join(timeout=s.worker_dead_after_seconds + 2 * s.worker_heartbeat_seconds)
    assert passes, "no janitor pass while a killed worker's lock was held"
    assert passes[0] - started <= s.worker_dead_after_seconds + 2 * s.worker_heartbeat_seconds
