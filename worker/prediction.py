"""What a prediction worker does with a batch of tasks, as plain functions (the Celery task only
calls predict_jobs)."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import NamedTuple

import numpy as np
from billiard.exceptions import SoftTimeLimitExceeded

from shared.images import decode_pixels
from shared.jobstore import new_id
from shared.metrics import BATCH_SIZE, MODEL_LATENCY
from shared.modeldir import top_k
from shared.queue import PredictTask
from shared.schemas import TOP_K_DEFAULT, TOP_K_MAX, TOP_K_MIN
from worker.state import WorkerState, count_outcomes, fail_jobs, requeue_tasks, until_redis_answers

log = logging.getLogger(__name__)


class PredictItem(NamedTuple):
    """One job of a batch, its message decoded."""

    job_id: str
    pixels: np.ndarray
    top_k: int
    task: PredictTask  # the message as it came, to queue it again


def predict_jobs(state: WorkerState, messages: list[dict]) -> dict[str, tuple[str, str]]:
    """Predict the jobs of one task batch and record each result exactly once; returns what was
    written, job id -> (final status, error code).

    First deliveries are predicted together, in one model call. A job delivered a second time
    was in a batch whose worker died or timed out: those run together once more, in a call of
    their own (most such losses are the OOM killer or a crashed machine, not the images, and a
    large batch run one image at a time takes many times its batched time). A job delivered a
    third time is a suspect and runs alone, so that an image that kills or hangs the model
    takes down only itself and, after TASK_MAX_ATTEMPTS solo runs, fails as `poison`.
    """
    state.outcomes = {}
    job_ids = [m.get("job_id", "") for m in messages]  # a job twice: its second copy is refused
    deadline = time.time() + state.settings.run_deadline_seconds
    marks = until_redis_answers(state.store.mark_running, job_ids, write_id=new_id(), deadline=deadline)
    fresh, again, suspects = [], [], []
    for message, (result, attempts) in zip(messages, marks, strict=True):
        if result != 1:
            continue  # finished already (a duplicate delivery) or expired: nothing to do
        try:
            item = _decode(message)
        except (KeyError, ValueError, TypeError):
            fail_jobs(state, [message["job_id"]], "bad_task", "The task message was malformed.")
            continue
        (fresh if attempts <= 1 else again if attempts == 2 else suspects).append(item)
    for group in (fresh, again):
        if group and not predict_and_record(state, group):
            # The call ran out of time: queue each job again; they come back one step further.
            until_redis_answers(requeue_tasks, state, [it.task for it in group])
    for item in suspects:
        solo = until_redis_answers(state.store.count_solo_attempt, item.job_id)
        if solo > state.settings.task_max_attempts:
            fail_jobs(
                state,
                [item.job_id],
                "poison",
                f"Prediction was attempted {solo - 1} times on its own and never finished; giving up on this image.",
            )
        elif not predict_and_record(state, [item]):
            fail_jobs(
                state,
                [item.job_id],
                "timeout",
                f"Prediction took longer than {state.settings.task_soft_time_limit:g} s.",
            )
    return state.outcomes


def _decode(message: dict) -> PredictItem:
    k = min(TOP_K_MAX, max(TOP_K_MIN, int(message.get("top_k", TOP_K_DEFAULT))))
    task = PredictTask(message["job_id"], message["pixels"], k)
    return PredictItem(task.job_id, decode_pixels(task.pixels), k, task)


def predict_and_record(state: WorkerState, items: list[PredictItem]) -> bool:
    """One model call for these jobs, then their results; False if it hit the soft time limit.

    With the result cache on, the same image (pixels) under the same model configuration, in
    this batch or within the retention period, is answered without the model."""
    keys = [hashlib.sha256(it.pixels.tobytes()).hexdigest() for it in items]
    probs_by_key = _cached(state, keys)
    todo = {k: it.pixels for k, it in zip(keys, items, strict=True) if k not in probs_by_key}  # one per image
    if todo:
        try:
            fresh, keys_todo, n = {}, list(todo), state.settings.predict_batch_size
            for i in range(0, len(keys_todo), n):  # messages hold several jobs: never more than n per call
                part = keys_todo[i : i + n]
                fresh |= _predict(state, part, np.stack([todo[k] for k in part]))
        except SoftTimeLimitExceeded:
            log.warning("model call over the soft time limit", extra={"job_ids": [it.job_id for it in items]})
            return False
        probs_by_key.update(fresh)
        if state.cache is not None and fresh:
            until_redis_answers(state.cache.put_many, fresh)
    _record(state, items, [probs_by_key.get(k) for k in keys])
    return True


def _cached(state: WorkerState, keys: list[str]) -> dict[str, np.ndarray]:
    if state.cache is None:
        return {}
    found = until_redis_answers(state.cache.get_many, keys)
    return {k: np.array(p) for k, p in zip(keys, found, strict=True) if p is not None}


def _predict(state: WorkerState, keys: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    """Probabilities by key; an image the model fails on has none."""
    t0 = time.perf_counter()
    probs = _predict_isolating(state, images)
    MODEL_LATENCY.observe(time.perf_counter() - t0)
    BATCH_SIZE.observe(len(images))
    return {k: p for k, p in zip(keys, probs, strict=True) if p is not None}


def _record(state: WorkerState, items: list[PredictItem], probs: list[np.ndarray | None]) -> None:
    info = state.predictor.info
    done = [(it, p) for it, p in zip(items, probs, strict=True) if p is not None]
    ids = [it.job_id for it, _ in done]
    predictions = [top_k(p[None], info.classes, it.top_k)[0] for it, p in done]
    uncertain = [float(p.max()) < info.uncertain_below for _, p in done]
    model = {"name": info.name, "version": info.version}
    written = until_redis_answers(state.store.complete, ids, predictions, model, uncertain, write_id=new_id())
    count_outcomes(state, written, ids, "done")
    failed = [it.job_id for it, p in zip(items, probs, strict=True) if p is None]
    if failed:
        fail_jobs(state, failed, "prediction_failed", "The model could not process this image.")


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
