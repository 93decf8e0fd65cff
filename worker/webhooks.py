"""Delivering a finished batch's completion webhook, as a plain function (the Celery task on the
fetch queue only calls it). Retried with backoff on 5xx, 429, timeouts and refused connections,
at most shared.webhooks.MAX_ATTEMPTS times; never on the prediction workers' time."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from shared.metrics import WEBHOOK_DELIVERIES
from shared.queue import enqueue_webhooks
from shared.schemas import BatchSummary
from shared.webhooks import BACKOFF_SECONDS, MAX_ATTEMPTS, DeliveryFailed, deliver
from worker.state import WorkerState, until_redis_answers

log = logging.getLogger(__name__)


def deliver_webhook(state: WorkerState, batch_id: str) -> None:
    # One delivery of a batch at a time (a retry and the janitor's backstop could meet).
    lock, owner = f"webhook:{batch_id}", f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
    if not state.store.take_lock(lock, owner, state.settings.webhook_timeout + 5):
        return
    try:
        _deliver(state, batch_id)
    finally:
        until_redis_answers(state.store.release_lock, lock, owner)


def _deliver(state: WorkerState, batch_id: str) -> None:
    store, s = state.store, state.settings
    found = store.webhook_target(batch_id)
    if found is None:  # delivered or given up already, or expired: due no more
        until_redis_answers(store.forget_webhook, batch_id)
        return
    rec, url = found
    attempt = int(rec.get("webhook_attempts") or 0) + 1
    body = BatchSummary.from_record(rec).model_dump_json().encode()
    t0 = time.perf_counter()
    try:
        deliver(
            url,
            body,
            f"msg_{batch_id}",
            s.webhook_secret,
            allow_hosts=s.fetch_allow_hosts,
            timeout=s.webhook_timeout,
            ca_bundle=s.fetch_ca_bundle,
        )
    except Exception as exc:  # noqa: BLE001 - any failure is one attempt: counted, retried or given up
        if not isinstance(exc, DeliveryFailed):
            log.exception("webhook attempt raised", extra={"batch_id": batch_id})
            exc = DeliveryFailed(f"The delivery failed ({type(exc).__name__}).", retry=True)
        if exc.retry and attempt < MAX_ATTEMPTS:
            delay = BACKOFF_SECONDS[attempt - 1]
            until_redis_answers(store.webhook_attempt, batch_id, exc.message, time.time() + delay)
            until_redis_answers(enqueue_webhooks, state.celery, [batch_id], delay)
            WEBHOOK_DELIVERIES.labels("retried").inc()
        else:
            until_redis_answers(store.webhook_attempt, batch_id, exc.message, None)
            WEBHOOK_DELIVERIES.labels("failed").inc()
        log.warning("webhook attempt %d failed: %s", attempt, exc.message, extra={"batch_id": batch_id})
        return
    until_redis_answers(store.webhook_delivered, batch_id)
    WEBHOOK_DELIVERIES.labels("delivered").inc()
    log.info(
        "webhook delivered",
        extra={"batch_id": batch_id, "attempt": attempt, "seconds": round(time.perf_counter() - t0, 3)},
    )
