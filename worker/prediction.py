"""What a worker does with a task, as plain functions (the Celery tasks only call these)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery
from redis import RedisError

from shared.fetch import UrlRefused, fetch
from shared.images import ImageRejected, check_image, thumbnail_jpeg, to_model_input
from shared.jobs import JobStore
from shared.logs import job_context
from shared.metrics import BATCH_SIZE, FETCH_FAILURES, FETCH_LATENCY, JOBS_FINISHED, MODEL_LATENCY
from shared.queue import decode_pixels, encode_pixels, enqueue
from shared.settings import Settings
from shared.storage import ImageStore

log = logging.getLogger("worker")


@dataclass
class WorkerState:
    settings: Settings
    store: JobStore
    images: ImageStore
    celery: Celery
    predictor: object = None  # shared.predictor.Predictor, loaded once per process
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=1000))  # recent, for tests and logs


def until_redis_answers(fn, *args, deadline_s: float = 600.0):
    """Results must not be lost while Redis restarts: retry the write until it answers."""
    delay, deadline = 0.2, time.monotonic() + deadline_s
    while True:
        try:
            return fn(*args)
        except RedisError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("redis unavailable (%s); retrying in %.1fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _finished(results: list[tuple[int, int]], job_ids: list[str], status: str, code: str = "") -> None:
    """Count and log the jobs whose final status this call really wrote (not duplicates)."""
    for job_id, (result, _) in zip(job_ids, results):
        if result == 1:
            JOBS_FINISHED.labels(status, code).inc()
            log.info("job %s", status, extra={"job_id": job_id, **({"error_code": code} if code else {})})


def _fail(state: WorkerState, job_ids: list[str], code: str, message: str) -> None:
    _finished(until_redis_answers(state.store.fail, job_ids, code, message), job_ids, "failed", code)


def predict_jobs(state: WorkerState, items: list[dict]) -> None:
    """Predict the jobs of one task batch and record each result exactly once.

    First deliveries are predicted together, in one model call. A job delivered again was in a
    batch whose worker died or timed out: it is a suspect, and runs alone, so that an image
    that kills or hangs the model takes down only itself and, after TASK_MAX_ATTEMPTS solo
    runs, fails as `poison` instead of looping.
    """
    store = state.store
    marks = until_redis_answers(store.mark_running, [it.get("job_id", "") for it in items])
    fresh, suspects = [], []
    for it, (result, attempts) in zip(items, marks):
        job_id = it.get("job_id", "")
        if result != 1:
            continue  # finished already (a duplicate delivery) or expired: nothing to do
        try:
            job = (job_id, decode_pixels(it["pixels"]), min(10, max(1, int(it.get("top_k", 3)))))
        except (KeyError, ValueError, TypeError):
            _fail(state, [job_id], "bad_task", "The task message was malformed.")
            continue
        (fresh if attempts <= 1 else suspects).append(job)
    if fresh and not _predict_and_record(state, fresh):
        # The batch ran out of time: queue each job again; they come back as suspects.
        until_redis_answers(enqueue, state.celery, fresh, [])
    for job in suspects:
        job_id = job[0]
        solo = until_redis_answers(store.count_solo_attempt, job_id)
        if solo > state.settings.task_max_attempts:
            _fail(state, [job_id], "poison", f"Prediction was attempted {solo - 1} times on its own "
                  "and never finished; giving up on this image.")
        elif not _predict_and_record(state, [job]):
            _fail(state, [job_id], "timeout",
                  f"Prediction took longer than {state.settings.task_soft_time_limit:g} s.")


def _predict_and_record(state: WorkerState, jobs: list[tuple]) -> bool:
    """One model call for these (job_id, pixels, top_k); False if it hit the soft time limit.

    Results are cached by the image's pixels and the model version: the same image again (in
    this batch or within the retention period) is answered without the model."""
    from shared.predictor import top_k
    info = state.predictor.info
    keys = [f"cache:{info.version}:{hashlib.sha256(px.tobytes()).hexdigest()}" for _, px, _ in jobs]
    cached = until_redis_answers(state.store.r.mget, keys) if state.settings.result_cache else [None] * len(keys)
    probs_by_key = {k: np.array(json.loads(c)) for k, c in zip(keys, cached) if c}
    todo = list({k: px for k, (_, px, _) in zip(keys, jobs) if k not in probs_by_key}.items())
    if todo:
        t0 = time.perf_counter()
        try:
            probs = _predict_isolating(state, np.stack([px for _, px in todo]))
        except SoftTimeLimitExceeded:
            log.warning("model call over the soft time limit", extra={"job_ids": [j for j, _, _ in jobs]})
            return False
        MODEL_LATENCY.observe(time.perf_counter() - t0)
        BATCH_SIZE.observe(len(todo))
        state.batch_sizes.append(len(todo))
        fresh = {k: p for (k, _), p in zip(todo, probs) if p is not None}
        probs_by_key.update(fresh)
        if state.settings.result_cache and fresh:
            with state.store.r.pipeline(transaction=False) as pipe:
                for k, p in fresh.items():
                    pipe.set(k, json.dumps([round(float(x), 7) for x in p]), ex=state.store.ttl)
                until_redis_answers(pipe.execute)
    probs = [probs_by_key.get(k) for k in keys]
    done = [(job_id, top_k(p[None], info.classes, k)[0]) for (job_id, _, k), p in zip(jobs, probs) if p is not None]
    failed = [job_id for (job_id, _, _), p in zip(jobs, probs) if p is None]
    ids = [j for j, _ in done]
    model = {"name": info.name, "version": info.version}
    _finished(until_redis_answers(state.store.complete, ids, [p for _, p in done], model), ids, "done")
    if failed:
        _fail(state, failed, "prediction_failed", "The model could not process this image.")
    return True


def _predict_isolating(state: WorkerState, images: np.ndarray) -> list:
    """One call for the batch; if it raises, one call per image, so one bad input fails alone."""
    try:
        return list(state.predictor.predict_proba(images))
    except SoftTimeLimitExceeded:
        raise
    except Exception:  # noqa: BLE001 - the model's failure modes are open-ended
        if len(images) == 1:
            log.exception("prediction failed")
            return [None]
        log.warning("batch prediction failed; retrying image by image", exc_info=True)
        return [p for img in images for p in _predict_isolating(state, img[None])]


def fetch_job(state: WorkerState, job_id: str, url: str, top_k: int) -> None:
    with job_context(job_id=job_id):
        _fetch_job(state, job_id, url, top_k)


def _fetch_job(state: WorkerState, job_id: str, url: str, top_k: int) -> None:
    """Download a URL (SSRF-checked), check and store the image, then queue its prediction."""
    store, s = state.store, state.settings
    result, attempts = until_redis_answers(store.mark_fetching, job_id)
    if result != 1:
        return  # finished already, or expired
    if attempts > s.task_max_attempts:
        _fail(state, [job_id], "poison", f"Fetching was attempted {attempts - 1} times and never "
              "finished; giving up on this URL.")
        return
    t0 = time.perf_counter()
    try:
        data = fetch(url, allow_hosts=s.fetch_allow_hosts, timeout=s.fetch_timeout,
                     max_bytes=s.fetch_max_bytes, max_redirects=s.fetch_max_redirects)
        checked = check_image(data, s.max_image_pixels)
        pixels = to_model_input(checked.image)
        try:
            state.images.put(checked.sha256, data, thumbnail_jpeg(checked.image))
        except OSError as exc:  # no shared storage here: predictions need none, thumbnails do
            log.warning("could not store the image: %s", exc)
    except (UrlRefused, ImageRejected) as exc:
        FETCH_FAILURES.labels(exc.code).inc()
        _fail(state, [job_id], exc.code, exc.message)
        return
    except SoftTimeLimitExceeded:
        FETCH_FAILURES.labels("fetch_timeout").inc()
        _fail(state, [job_id], "fetch_timeout", f"Fetching took longer than {s.task_soft_time_limit:g} s.")
        return
    FETCH_LATENCY.observe(time.perf_counter() - t0)
    # Queue the prediction first, then record the fetch: a crash in between still predicts.
    until_redis_answers(enqueue, state.celery, [(job_id, pixels, top_k)], [])
    until_redis_answers(store.mark_fetched, job_id, checked.sha256, encode_pixels(pixels))
    log.info("fetched", extra={"bytes": len(data), "seconds": round(time.perf_counter() - t0, 3)})
