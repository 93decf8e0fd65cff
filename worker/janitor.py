"""Housekeeping one worker at a time does: re-queue the jobs of a worker that died, re-queue
jobs whose task message was lost, and delete stored images past the retention period.

A worker that dies (SIGKILL, OOM, a lost machine) leaves the messages it had taken with the
broker, unacknowledged, until the visibility timeout (60 s) brings them back. Every worker
process records the task ids it receives with its heartbeat (worker/factory.py), so when its
heartbeat stops for WORKER_DEAD_AFTER_SECONDS the unfinished ones are queued again at once,
from the job records. Their old messages still come back later, and find the jobs finished.
A worker records a task id some milliseconds after kombu hands it the message; one killed in
between leaves an unacknowledged message that no worker recorded, and when its death is found,
such jobs are queued again too.

Kombu's Redis transport takes a message off the queue (BRPOP) and then, in a second command,
records it as unacknowledged. If Redis goes away between the two, the message is gone while
the job record still says queued: the soak test caught exactly that during a Redis restart.
The job record is the source of truth (it keeps the preprocessed image or the URL until the
job finishes), so a lost task is simply queued again. A job counts as lost when it has
waited longer than twice the visibility timeout, is older than the oldest message still waiting in
its queue (queues are first in, first out), and no worker holds its message. A spurious
re-queue would cost only work: results are written once.
"""

from __future__ import annotations

import logging
import math
import time

from shared.queue import FETCH_QUEUE, PREDICT_QUEUE, FetchTask, PredictTask, enqueue, enqueue_webhooks
from shared.schemas import FINAL_STATUSES, TOP_K_DEFAULT

log = logging.getLogger(__name__)


def oldest_waiting(store, queue: str) -> float | None:
    """When the oldest message still in `queue` was queued (inf if none; None if unknown)."""
    task_id = store.oldest_waiting_task_id(queue)
    if task_id == "":
        return math.inf
    return None if task_id is None else store.pending_score(task_id)


def tasks_for(job_ids: list[str], records: list[dict]) -> tuple[list[PredictTask], list[FetchTask]]:
    """The task each unfinished job needs next, from its record: a prediction (the record keeps
    the preprocessed image until the job finishes) or a fetch."""
    predictions, fetches = [], []
    for job_id, rec in zip(job_ids, records, strict=True):
        top_k = int(rec["top_k"] or TOP_K_DEFAULT)
        if rec["status"] in ("queued", "running") and rec["pixels"]:
            predictions.append(PredictTask(job_id, rec["pixels"], top_k))
        elif rec["status"] == "fetching":
            fetches.append(FetchTask(job_id, rec["source"], top_k))
    return predictions, fetches


def requeue(state, predictions: list[PredictTask], fetches: list[FetchTask], now: float, why: str) -> int:
    """Queue these tasks again, mark their jobs as queued now, and say why in the log."""
    if not predictions and not fetches:
        return 0
    enqueue(state.celery, predictions, fetches)
    ids = [t.job_id for t in predictions + fetches]
    state.store.touch_pending(ids, now)
    log.warning("%s: re-queued %d tasks", why, len(ids), extra={"job_ids": ids})
    return len(ids)


def rescue_dead_workers(state, now: float | None = None) -> int:
    """Queue again the unfinished jobs of every worker whose heartbeat stopped."""
    store = state.store
    now = time.time() if now is None else now
    requeued = 0
    dead = store.silent_consumers(now - state.settings.worker_dead_after_seconds)
    for node in dead:
        ids = store.held_by(node)
        predictions, fetches = tasks_for(ids, store.requeue_fields(ids)) if ids else ([], [])
        requeued += requeue(state, predictions, fetches, now, f"worker {node} stopped")
        store.forget_consumer(node)
    if dead:  # a worker that died may have taken messages it had not recorded yet
        requeued += rescue_unrecorded_tasks(state, now)
    return requeued


# A live worker records what it receives within milliseconds (20 ms of gathering, one write);
# a message unrecorded after this long was taken by a process that died before it could.
RECORD_GRACE_SECONDS = 5.0


def rescue_unrecorded_tasks(state, now: float | None = None) -> int:
    """Queue again the unfinished jobs whose message a worker took but no live worker recorded.

    The compose kill test found it: 2 of the 128 messages the killed container held had been
    handed over but not yet recorded, so the dead worker's held set did not name them, and they
    waited for the visibility timeout (the batch finished 61 s after the kill instead of 12).
    Only a worker that died leaves such messages, so rescue_dead_workers runs this when it finds
    one; on every janitor pass it would read each message that a slow worker holds for more than
    the grace, for nothing."""
    store = state.store
    now = time.time() if now is None else now
    handed = store.unacknowledged_before(now - RECORD_GRACE_SECONDS)
    if not handed:
        return 0
    held = store.held_by_live_consumers(now - state.settings.worker_dead_after_seconds)
    handed = [(job_id, at) for job_id, at in handed if job_id not in held]
    ids = [job_id for job_id, _ in handed]
    records, scores = store.requeue_fields(ids), store.pending_scores(ids)
    orphans, orphan_records = [], []
    for (job_id, delivered_at), rec, queued_at in zip(handed, records, scores, strict=True):
        # Not pending: finished or expired. Queued after that delivery: already handled.
        if rec["status"] not in FINAL_STATUSES and queued_at is not None and queued_at <= delivered_at:
            orphans.append(job_id)
            orphan_records.append(rec)
    return requeue(state, *tasks_for(orphans, orphan_records), now, "taken by a worker but never recorded")


def rescue_lost_tasks(state, now: float | None = None) -> int:
    store = state.store
    now = time.time() if now is None else now
    vt = state.settings.visibility_timeout
    # Twice the timeout: Celery's own redelivery gets the first chance (restored messages go
    # to the far end of the queue, so "older than the oldest waiting" alone would catch them).
    candidates = store.pending_before(now - 2 * vt)
    if not candidates:
        return 0
    oldest = {q: oldest_waiting(store, q) for q in (PREDICT_QUEUE, FETCH_QUEUE)}
    held = store.unacknowledged_task_ids()
    predictions, fetches, gone = [], [], []
    for (job_id, score), rec in zip(candidates, store.requeue_fields([j for j, _ in candidates]), strict=True):
        top_k = int(rec["top_k"] or TOP_K_DEFAULT)
        if rec["status"] is None or rec["status"] in FINAL_STATUSES:
            gone.append(job_id)  # expired or finished: nothing to wait for
        elif job_id in held and score > now - 3 * vt:
            continue  # Celery redelivers it if its worker died; past three timeouts, stop trusting that
        elif (
            rec["status"] == "queued"
            and rec["pixels"]
            and oldest[PREDICT_QUEUE] is not None
            and score < oldest[PREDICT_QUEUE]
        ):
            predictions.append(PredictTask(job_id, rec["pixels"], top_k))
        elif (
            rec["status"] == "fetching"
            and not int(rec["fetch_attempts"] or 0)
            and oldest[FETCH_QUEUE] is not None
            and score < oldest[FETCH_QUEUE]
        ):
            fetches.append(FetchTask(job_id, rec["source"], top_k))
    store.forget_pending(gone)
    return requeue(state, predictions, fetches, now, "message lost")


def rescue_lost_webhooks(state, now: float | None = None) -> int:
    """Queue again the webhooks that have been due for a while with nobody delivering them (the
    task was lost, or its enqueueing failed when the batch finished)."""
    now = time.time() if now is None else now
    overdue = state.store.webhooks_overdue(now - 30)
    if overdue:
        enqueue_webhooks(state.celery, overdue)
        state.store.reschedule_webhooks(overdue, now)
        log.warning("re-queued %d webhooks", len(overdue), extra={"batch_ids": overdue})
    return len(overdue)


def sweep_expired_images(state) -> int:
    """Job records expire in Redis by themselves; the stored images they point at are deleted
    here, by the fetch worker that takes the hourly lock."""
    removed = state.images.sweep(state.settings.retention_seconds)
    if removed:
        log.info("swept %d expired image files", removed)
    return removed
