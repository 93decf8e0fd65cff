"""Re-queue jobs whose task message was lost.

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

import json
import logging
import math
import time

from shared.queue import FETCH_QUEUE, PREDICT_QUEUE, decode_pixels, enqueue

log = logging.getLogger("worker.janitor")


def oldest_waiting(store, queue: str) -> float | None:
    """When the oldest message still in `queue` was queued (inf if none; None if unknown)."""
    raw = store.r.lindex(queue, -1)  # kombu LPUSHes and BRPOPs: the right end is the oldest
    if raw is None:
        return math.inf
    try:
        job_id = json.loads(raw)["headers"]["id"]  # task ids are job ids
    except (ValueError, KeyError, TypeError):
        return None
    return store.pending_score(job_id)


def unacknowledged(store) -> set[str]:
    """Job ids of messages a worker holds (kombu keeps them in the `unacked` hash as
    [message, exchange, routing_key]): those come back by themselves if their worker dies."""
    ids = set()
    for _, raw in store.r.hscan_iter("unacked", count=500):
        try:
            ids.add(json.loads(raw)[0]["headers"]["id"])
        except (ValueError, KeyError, TypeError, IndexError):
            pass
    return ids


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
    held = unacknowledged(store)
    predictions, fetches, gone = [], [], []
    for (job_id, score), rec in zip(candidates, store.requeue_fields([j for j, _ in candidates])):
        top_k = int(rec["top_k"] or 3)
        if rec["status"] is None or rec["status"] in ("done", "failed"):
            gone.append(job_id)  # expired or finished: nothing to wait for
        elif job_id in held and score > now - 3 * vt:
            continue  # Celery redelivers it if its worker died; past three timeouts, stop trusting that
        elif rec["status"] == "queued" and rec["pixels"] and oldest[PREDICT_QUEUE] is not None \
                and score < oldest[PREDICT_QUEUE]:
            predictions.append((job_id, decode_pixels(rec["pixels"]), top_k))
        elif rec["status"] == "fetching" and not int(rec["fetch_attempts"] or 0) \
                and oldest[FETCH_QUEUE] is not None and score < oldest[FETCH_QUEUE]:
            fetches.append((job_id, rec["source"], top_k))
    store.forget_pending(gone)
    if predictions or fetches:
        enqueue(state.celery, predictions, fetches)
        ids = [j for j, *_ in predictions + fetches]
        store.touch_pending(ids, now)
        log.warning("re-queued %d lost tasks", len(ids), extra={"job_ids": ids})
    return len(predictions) + len(fetches)
