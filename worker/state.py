"""What a worker process holds, and how it writes outcomes: retried through Redis restarts,
counted and logged once per job."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from celery import Celery
from kombu.exceptions import OperationalError
from redis import RedisError

from shared.images import DecodeBudget
from shared.jobstore import JobStore, ResultCache, new_id
from shared.logs import finished_event
from shared.metrics import JOBS_FINISHED
from shared.queue import PredictTask, enqueue
from shared.settings import Settings
from shared.storage import ImageStore

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    settings: Settings
    store: JobStore
    images: ImageStore
    celery: Celery
    predictor: object = None  # shared.predictor.Predictor, loaded once per process after the fork
    cache: ResultCache | None = None  # results of this predictor's configuration (RESULT_CACHE on)
    outcomes: dict = field(default_factory=dict)  # job id -> (status, error code) this process wrote
    decode_budget: DecodeBudget | None = None  # fetch threads share one (worker/factory.py)


def until_redis_answers(fn, *args, deadline_s: float = 600.0, **kwargs):
    """Results must not be lost while Redis restarts: retry the write until it answers. A status
    change passes a write_id (new_id()), made once here, so that a retry of a write whose answer
    was lost counts as that write (see JobStore.transition). Publishing a task raises kombu's
    OperationalError, not RedisError: retried too (a publish that failed once would abort the
    rest of a batch whose results are written, and leave its other jobs `running`)."""
    delay, deadline = 0.2, time.monotonic() + deadline_s
    while True:
        try:
            return fn(*args, **kwargs)
        except (RedisError, OperationalError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("redis unavailable (%s); retrying in %.1fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def requeue_tasks(state: WorkerState, tasks: list[PredictTask]) -> None:
    """Queue these jobs' predictions again now, and say so on their records (their deadlines
    and the janitor's rules then go by the new message)."""
    enqueue(state.celery, tasks, [])
    state.store.requeued([t.job_id for t in tasks], time.time())


def count_outcomes(
    state: WorkerState, results: list[tuple[int, int]], job_ids: list[str], status: str, code: str = ""
) -> None:
    """Count, log and remember the jobs whose final status this call really wrote (not duplicates)."""
    for job_id, (result, _) in zip(job_ids, results, strict=True):
        if result == 1:
            state.outcomes[job_id] = (status, code)
            JOBS_FINISHED.labels(status, code).inc()
            log.info(finished_event(status), extra={"job_id": job_id, **({"error_code": code} if code else {})})


def fail_jobs(state: WorkerState, job_ids: list[str], code: str, message: str, **only) -> None:
    """Fail these jobs (`only`: JobStore.fail's allowed_from), counted and logged once each."""
    written = until_redis_answers(state.store.fail, job_ids, code, message, write_id=new_id(), **only)
    count_outcomes(state, written, job_ids, "failed", code)
