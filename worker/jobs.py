"""What a worker does with a task, as plain functions (the Celery tasks only call these)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery
from redis import RedisError

from shared.fetch import UrlRefused, fetch
from shared.images import ImageRejected, check_image, thumbnail_jpeg, to_model_input
from shared.jobs import JobStore
from shared.queue import decode_pixels, enqueue
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
    batch_sizes: list = field(default_factory=list)


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


def predict_jobs(state: WorkerState, items: list[dict]) -> None:
    """Predict every image in one model call and record each job's result exactly once."""
    store, settings = state.store, state.settings
    marks = until_redis_answers(store.mark_running, [it.get("job_id", "") for it in items])
    ready = []
    for it, (result, attempts) in zip(items, marks):
        job_id = it.get("job_id", "")
        if result != 1:
            continue  # finished already (a duplicate delivery) or expired: nothing to do
        if attempts > settings.task_max_attempts:
            # Delivered again and again: it kills or hangs whoever takes it. Stop here.
            until_redis_answers(store.fail, [job_id], "poison", f"Prediction was attempted "
                                f"{attempts - 1} times and never finished; giving up on this image.")
            continue
        try:
            pixels = decode_pixels(it["pixels"])
            top_k = min(10, max(1, int(it.get("top_k", 3))))
        except (KeyError, ValueError, TypeError):
            until_redis_answers(store.fail, [job_id], "bad_task", "The task message was malformed.")
            continue
        ready.append((job_id, pixels, top_k))
    if not ready:
        return
    info = state.predictor.info
    model = {"name": info.name, "version": info.version}
    try:
        probs = _predict_isolating(state, np.stack([px for _, px, _ in ready]))
    except SoftTimeLimitExceeded:
        until_redis_answers(store.fail, [j for j, _, _ in ready], "timeout",
                            f"Prediction took longer than {settings.task_soft_time_limit:g} s.")
        return
    state.batch_sizes.append(len(ready))
    from shared.predictor import top_k as top_k_of
    done, failed = [], []
    for (job_id, _, k), p in zip(ready, probs):
        (failed if p is None else done).append((job_id, None if p is None else top_k_of(p[None], info.classes, k)[0]))
    until_redis_answers(store.complete, [j for j, _ in done], [p for _, p in done], model)
    if failed:
        until_redis_answers(store.fail, [j for j, _ in failed], "prediction_failed",
                            "The model could not process this image.")


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
    """Download a URL (SSRF-checked), check and store the image, then queue its prediction."""
    store, s = state.store, state.settings
    result, attempts = until_redis_answers(store.mark_fetching, job_id)
    if result != 1:
        return  # finished already, or expired
    if attempts > s.task_max_attempts:
        until_redis_answers(store.fail, [job_id], "poison", "Fetching was attempted "
                            f"{attempts - 1} times and never finished; giving up on this URL.")
        return
    try:
        data = fetch(url, allow_hosts=s.fetch_allow_hosts, timeout=s.fetch_timeout,
                     max_bytes=s.fetch_max_bytes, max_redirects=s.fetch_max_redirects)
        checked = check_image(data, s.max_image_pixels)
        pixels = to_model_input(checked.image)
        try:
            state.images.put(checked.sha256, data, thumbnail_jpeg(checked.image))
        except OSError as exc:  # no shared storage here: predictions need none, thumbnails do
            log.warning("could not store image for job %s: %s", job_id, exc)
    except (UrlRefused, ImageRejected) as exc:
        until_redis_answers(store.fail, [job_id], exc.code, exc.message)
        return
    except SoftTimeLimitExceeded:
        until_redis_answers(store.fail, [job_id], "fetch_timeout",
                            f"Fetching took longer than {s.task_soft_time_limit:g} s.")
        return
    # Queue the prediction first, then record the fetch: a crash in between still predicts.
    until_redis_answers(enqueue, state.celery, [(job_id, pixels, top_k)], [])
    until_redis_answers(store.mark_fetched, job_id, checked.sha256)
