"""What a fetch worker does with a URL task, as a plain function (the Celery task only calls it)."""

from __future__ import annotations

import logging
import time

from billiard.exceptions import SoftTimeLimitExceeded

from shared.fetch import UrlRefused, fetch
from shared.images import ImageRefused, prepare
from shared.jobstore import new_id
from shared.logs import job_context
from shared.metrics import FETCH_FAILURES, FETCH_LATENCY
from shared.queue import FetchTask, PredictTask, enqueue
from worker.state import WorkerState, fail_jobs, until_redis_answers

log = logging.getLogger(__name__)
# A fetch fails a job only while it is fetching: a second copy of the task may have fetched the
# image meanwhile (the job is then queued, and its prediction must not be refused).
FETCHING = ("fetching",)


def fetch_job(state: WorkerState, task: FetchTask) -> None:
    """Download a URL (SSRF-checked), check and store the image, then queue its prediction.

    Whatever else goes wrong here (a bug, a library's unexpected error) leaves the job to its
    fetch deadline (worker/janitor.py): queued again, then failed after TASK_MAX_ATTEMPTS."""
    with job_context(job_id=task.job_id):
        try:
            _fetch_job(state, task)
        except Exception:  # noqa: BLE001 - logged here; the job's deadline ends it
            log.exception("fetch raised; the job's deadline will queue it again")


def _fetch_job(state: WorkerState, task: FetchTask) -> None:
    store, s = state.store, state.settings
    deadline = time.time() + s.fetch_deadline_seconds
    result, attempts = until_redis_answers(store.mark_fetching, task.job_id, write_id=new_id(), deadline=deadline)
    if result != 1:
        return  # finished already, or expired
    if attempts > s.task_max_attempts:
        fail_jobs(
            state,
            [task.job_id],
            "poison",
            f"Fetching was attempted {attempts - 1} times and never finished; giving up on this URL.",
            allowed_from=FETCHING,
        )
        return
    t0 = time.perf_counter()
    try:
        data = fetch(
            task.url,
            allow_hosts=s.fetch_allow_hosts,
            timeout=s.fetch_timeout,
            max_bytes=s.fetch_max_bytes,
            max_redirects=s.fetch_max_redirects,
            ca_bundle=s.fetch_ca_bundle,
        )
        image = prepare(data, budget=state.decode_budget, **s.image_limits())
    except (UrlRefused, ImageRefused) as exc:
        FETCH_FAILURES.labels(exc.code).inc()
        fail_jobs(state, [task.job_id], exc.code, exc.message, allowed_from=FETCHING)
        return
    except SoftTimeLimitExceeded:
        FETCH_FAILURES.labels("fetch_timeout").inc()
        message = f"Fetching took longer than {s.task_soft_time_limit:g} s."
        fail_jobs(state, [task.job_id], "fetch_timeout", message, allowed_from=FETCHING)
        return
    FETCH_LATENCY.observe(time.perf_counter() - t0)
    state.images.keep(image.sha256, data, image.thumbnail)
    # Record the fetch (pixels included), then queue the prediction: the record is what the
    # janitor runs again from. The other order let a worker start the prediction before the
    # pixels were recorded; killed then, it left a job `running` with nothing to run again. A
    # crash between the two leaves a queued job without a message, which its deadline catches.
    pixels = image.pixels_b64
    moved, _ = until_redis_answers(store.mark_fetched, task.job_id, image.sha256, pixels)
    if moved != 1:
        return  # another copy of this fetch recorded it first and queued its prediction
    until_redis_answers(enqueue, state.celery, [PredictTask(task.job_id, pixels, task.top_k)], [])
    log.info("fetched", extra={"bytes": len(data), "seconds": round(time.perf_counter() - t0, 3)})
