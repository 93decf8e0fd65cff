"""The fetch worker's job handling, in-process, with a real Redis: time limits and poison URLs."""

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from shared.jobstore import JobStore, NewJob
from shared.queue import FetchTask, celery_init_app
from shared.storage import ImageStore
from tests.helpers import public_job
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
