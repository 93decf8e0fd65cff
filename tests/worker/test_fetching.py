"""The fetch worker's job handling, in-process, with a real Redis: time limits and poison URLs."""

import time

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from shared.jobstore import JobStore, NewJob
from shared.queue import FetchTask, celery_init_app
from shared.storage import ImageStore
from tests.helpers import noise_png, public_job
from worker import fetching
from worker.fetching import fetch_job
from worker.state import WorkerState


@pytest.fixture
def state(settings_factory):
    s = settings_factory(task_max_attempts=2)
    return WorkerState(s, JobStore.from_url(s.redis_url, 3600), ImageStore(s.storage_dir), celery_init_app(s))


def url_job(state) -> str:
    _, [rec] = state.store.create_batch([NewJob("url", "https://example.com/a.jpg", status="fetching")], 3)
    return rec["job_id"]


def test_a_fetch_over_the_soft_time_limit_fails_the_job_and_frees_the_worker(state, monkeypatch):
    def slow(*a, **kw):
        raise SoftTimeLimitExceeded()  # what Celery raises in the task when TASK_SOFT_TIME_LIMIT passes

    monkeypatch.setattr(fetching, "fetch", slow)
    job_id = url_job(state)
    fetch_job(state, FetchTask(job_id, "https://example.com/a.jpg", 3))
    job = public_job(state.store, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "fetch_timeout"


def test_a_url_whose_fetch_never_finishes_fails_as_poison_after_bounded_attempts(state, monkeypatch):
    monkeypatch.setattr(fetching, "fetch", lambda *a, **kw: pytest.fail("must not fetch again"))
    job_id = url_job(state)
    state.store.redis.hset(f"job:{job_id}", "fetch_attempts", 2)  # two fetchers died on it already
    fetch_job(state, FetchTask(job_id, "https://example.com/a.jpg", 3))
    job = public_job(state.store, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "poison"


def test_a_second_copy_of_a_fetch_that_fails_does_not_fail_a_job_the_first_copy_fetched(state, monkeypatch):
    """`fail` could move a job from `queued`: copy A fetched it (queued), copy B's fetch then
    failed, and the job ended `failed` with its prediction refused."""
    job_id = url_job(state)

    def first_copy_finishes_then_this_one_fails(*a, **kw):
        state.store.mark_fetched(job_id, "f" * 64, "AAAA")  # copy A, meanwhile
        raise fetching.UrlRefused("fetch_failed", "The download broke off.", 502)

    monkeypatch.setattr(fetching, "fetch", first_copy_finishes_then_this_one_fails)
    fetch_job(state, FetchTask(job_id, "https://example.com/a.jpg", 3))
    assert public_job(state.store, job_id)["status"] == "queued"


def test_an_unexpected_error_in_a_fetch_leaves_the_job_to_its_deadline(state, monkeypatch):
    """An error nobody expected was acknowledged with the job left `fetching` and no deadline."""
    monkeypatch.setattr(fetching, "fetch", lambda *a, **kw: 1 / 0)
    job_id = url_job(state)
    fetch_job(state, FetchTask(job_id, "https://example.com/a.jpg", 3))
    [deadline] = state.store.deadlines([job_id])
    assert public_job(state.store, job_id)["status"] == "fetching"
    assert 0 < deadline - time.time() <= state.settings.fetch_deadline_seconds


def test_a_publish_that_fails_once_is_retried(monkeypatch):
    """Publishing raises kombu's OperationalError, which until_redis_answers did not retry: a
    publish that failed inside a batch's completion aborted the rest of the batch."""
    from kombu.exceptions import OperationalError

    from worker.state import until_redis_answers

    calls = []

    def publish():
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return "sent"

    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert until_redis_answers(publish) == "sent" and len(calls) == 2


def test_a_fetch_is_recorded_before_its_prediction_is_queued(state, monkeypatch):
    """The soak found a URL job `running` forever: the prediction was queued before the fetch
    was recorded, a predict worker started it in between (so the record never got its pixels),
    then died; the janitor had nothing to queue again from the record."""
    monkeypatch.setattr(fetching, "fetch", lambda *a, **kw: noise_png(0))
    seen = []

    def enqueue(celery, predictions, fetches):
        seen.extend(state.store.redis.hmget(f"job:{t.job_id}", "status", "pixels") for t in predictions)

    monkeypatch.setattr(fetching, "enqueue", enqueue)
    job_id = url_job(state)
    fetch_job(state, FetchTask(job_id, "https://example.com/a.jpg", 3))
    [(status, pixels)] = seen
    assert status == "queued" and pixels  # whatever happens next, the record can be run again


def test_a_second_copy_that_fetched_too_queues_no_second_prediction(state, monkeypatch):
    job_id = url_job(state)
    queued = []
    monkeypatch.setattr(fetching, "enqueue", lambda celery, predictions, fetches: queued.extend(predictions))

    def first_copy_finishes_meanwhile(*a, **kw):
        state.store.mark_fetched(job_id, "f" * 64, "AAAA")
        return noise_png(0)

    monkeypatch.setattr(fetching, "fetch", first_copy_finishes_meanwhile)
    fetch_job(state, FetchTask(job_id, "https://example.com/a.jpg", 3))
    assert queued == [] and public_job(state.store, job_id)["status"] == "queued"
