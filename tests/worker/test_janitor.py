"""Lost task messages are queued again from the job record; nothing else is."""

import json
import os
import time

import numpy as np
import pytest

from shared.images import encode_pixels
from shared.jobstore import JobStore, NewJob
from shared.queue import PredictTask, celery_init_app, enqueue, job_ids_of
from shared.storage import ImageStore
from worker.janitor import rescue_dead_workers, rescue_lost_tasks, rescue_unrecorded_tasks, sweep_expired_images
from worker.state import WorkerState


@pytest.fixture
def state(settings_factory):
    s = settings_factory(visibility_timeout=10)
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


def test_a_job_whose_message_vanished_is_queued_again(state):
    lost = make_jobs(state)  # records written, no task queued: as if Redis lost the messages
    assert rescue_lost_tasks(state, now=time.time() + 15) == 0  # too young: leave it alone
    assert rescue_lost_tasks(state, now=time.time() + 21) == 2
    assert sorted(queued_ids(state, "predict")) == sorted(lost)
    assert rescue_lost_tasks(state, now=time.time() + 22) == 0  # re-queued just now: not again


def test_lost_fetches_are_queued_again_with_their_url(state):
    lost = make_jobs(state, 1, status="fetching")
    assert rescue_lost_tasks(state, now=time.time() + 21) == 1
    msg = json.loads(state.store.redis.lindex("fetch", 0))
    assert msg["headers"]["id"] == lost[0] and msg["headers"]["task"] == "fetch"


def test_jobs_still_waiting_behind_the_queue_head_are_left_alone(state):
    older = make_jobs(state, 1)
    time.sleep(0.05)
    newer = make_jobs(state, 1)
    enqueue(state.celery, [PredictTask(newer[0], encode_pixels(np.zeros((32, 32, 3), np.uint8)), 3)], [])  # waits
    assert rescue_lost_tasks(state, now=time.time() + 21) == 1  # only the older one, lost
    assert sorted(queued_ids(state, "predict")) == sorted(older + newer)


def test_finished_and_started_jobs_are_not_queued_again(state):
    done, running = make_jobs(state)
    state.store.complete([done], [[{"label": "cat", "probability": 1.0}]], {"name": "m", "version": "1"})
    state.store.mark_running([running])  # its message is unacknowledged: Celery redelivers it
    assert rescue_lost_tasks(state, now=time.time() + 21) == 0
    assert state.store.pending_score(done) is None
    assert state.store.redis.hget(f"job:{done}", "pixels") is None  # the image copy goes when done


def test_messages_a_worker_holds_are_left_to_celery(state):
    held = make_jobs(state, 1)[0]
    message = {"headers": {"id": held, "task": "predict"}, "body": ""}
    state.store.redis.hset("unacked", "some-delivery-tag", json.dumps([message, "", "predict"]))
    assert rescue_lost_tasks(state, now=time.time() + 21) == 0


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
    state.store.record_consumer("alive", now + 8, [recorded], 120)
    state.store.record_consumer("dead", now - 30, [recorded_by_dead], 120)
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
    state.store.record_consumer("dead", handed, [recorded], 120)
    state.store.record_consumer("alive", now, [live_workers], 120)
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
    state.store.record_consumer("dead", now - 30, [dead_done, dead_waiting, dead_fetching], 120)
    state.store.record_consumer("alive", now, [live_waiting], 120)
    assert rescue_dead_workers(state, now) == 2  # the waiting prediction and the fetch
    assert queued_ids(state, "predict") == [dead_waiting] and queued_ids(state, "fetch") == [dead_fetching]
    assert state.store.silent_consumers(now - 10) == []  # the dead one is forgotten, the live one kept
    assert state.store.held_by("dead") == [] and state.store.held_by("alive") == [live_waiting]
    assert rescue_dead_workers(state, now) == 0  # handled once
