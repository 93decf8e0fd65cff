"""The Celery app's configuration and the task messages, shared by producer (web) and workers.

Messages are JSON only. A prediction message carries its images themselves, preprocessed
(32x32x3 uint8, base64: 4 KB each), so a worker needs nothing but Redis and the model.

A prediction message carries up to PREDICT_CHUNK jobs (kwargs {"jobs": [...]}): Celery and
kombu cost about 4 ms of CPU per message, web and worker together, more than the model spends
on an image. Its task id is its first job's id, and its `job_ids` header names every job, so
that what watches the queue (worker/janitor.py) knows which jobs a message holds without
decoding its body; its `queued_at` header says when it was sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import NamedTuple

from celery import Celery

from shared.schemas import TOP_K_DEFAULT
from shared.settings import Settings

PREDICT_TASK, PREDICT_QUEUE = "predict", "predict"
FETCH_TASK, FETCH_QUEUE = "fetch", "fetch"
WEBHOOK_TASK = "webhook"  # on the fetch queue: network waits, like fetching
QUEUES = (PREDICT_QUEUE, FETCH_QUEUE)
JOB_IDS_HEADER = "job_ids"
QUEUED_AT_HEADER = "queued_at"  # when the message was sent (Unix time): how far its queue has moved


class PredictTask(NamedTuple):
    job_id: str
    pixels: str  # base64 (shared.images.encode_pixels), encoded once by whoever prepared the image
    top_k: int


class FetchTask(NamedTuple):
    job_id: str
    url: str
    top_k: int


def celery_init_app(settings: Settings) -> Celery:
    app = Celery("cifar_svc", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # a pickled message is refused, never executed
        result_backend=None,
        task_ignore_result=True,  # status lives in our own job records
        task_acks_late=True,  # acknowledge after the work: a message whose worker died is redelivered
        # A killed pool child's task is rejected and requeued by the broker. (This covers plain
        # tasks only: celery-batches hands its batches to the pool itself, and a dead child's
        # batch is queued again by worker.factory.ReconnectingBatches.)
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_routes={
            PREDICT_TASK: {"queue": PREDICT_QUEUE},
            FETCH_TASK: {"queue": FETCH_QUEUE},
            WEBHOOK_TASK: {"queue": FETCH_QUEUE},
        },
        task_default_queue=PREDICT_QUEUE,
        # Kombu's Redis transport puts a message back in its queue when it has been held this
        # long unacknowledged, whether its worker died or not: longer than a message is ever held
        # (Settings checks), so that a slow batch is never redelivered while it runs. A dead
        # worker's jobs do not wait for it: the janitor's deadlines come first (worker/janitor.py).
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Look for abandoned tasks every fifth of that (kombu's default is every 100 s).
            "unacked_restore_interval": max(1, settings.visibility_timeout // 5),
            "unacked_restore_throttle": 1,
            # A worker killed while it held the restore lock would block every restore for the
            # lock's lifetime (kombu's default: 5 minutes). A restore takes milliseconds.
            "unacked_mutex_expire": 10,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep reconnecting while Redis is away
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        worker_send_task_events=True,  # for Flower
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        predict_chunk=max(1, settings.predict_chunk),  # read by enqueue, producer and worker alike
    )
    return app


def enqueue(app: Celery, predictions: list[PredictTask], fetches: list[FetchTask]) -> None:
    """Queue predictions (in messages of up to predict_chunk jobs) and fetches on one connection."""
    chunk, queued_at = app.conf.predict_chunk, time.time()
    with app.producer_or_acquire() as producer:
        for i in range(0, len(predictions), chunk):
            jobs = predictions[i : i + chunk]
            app.send_task(
                PREDICT_TASK,
                kwargs={"jobs": [t._asdict() for t in jobs]},
                producer=producer,
                task_id=jobs[0].job_id,
                queue=PREDICT_QUEUE,
                headers={JOB_IDS_HEADER: [t.job_id for t in jobs], QUEUED_AT_HEADER: queued_at},
            )
        for t in fetches:
            app.send_task(
                FETCH_TASK,
                kwargs=t._asdict(),
                producer=producer,
                task_id=t.job_id,
                queue=FETCH_QUEUE,
                headers={QUEUED_AT_HEADER: queued_at},
            )


def predict_jobs_of(kwargs: dict) -> list[dict]:
    """The jobs of a prediction message: {"job_id", "pixels", "top_k"} each."""
    jobs = kwargs.get("jobs")
    return list(jobs) if isinstance(jobs, list) else [kwargs]  # a message of one job, as queued before chunking


def job_ids_of(headers: dict) -> list[str]:
    """The jobs a queued message holds, from its headers (its task id, for one job)."""
    ids = headers.get(JOB_IDS_HEADER)
    return list(ids) if isinstance(ids, list) else [headers["id"]]


def tasks_of(requests: Iterable) -> list[PredictTask]:
    """The prediction tasks of received messages, to queue them again."""
    return [
        PredictTask(j["job_id"], j["pixels"], j.get("top_k", TOP_K_DEFAULT))
        for r in requests
        for j in predict_jobs_of(r.kwargs)
    ]


def enqueue_webhooks(app: Celery, batch_ids: list[str], countdown: float = 0) -> None:
    """Queue the completion webhook of each batch (worker/webhooks.py delivers it)."""
    with app.producer_or_acquire() as producer:
        for batch_id in batch_ids:
            app.send_task(
                WEBHOOK_TASK,
                kwargs={"batch_id": batch_id},
                producer=producer,
                queue=FETCH_QUEUE,
                countdown=countdown or None,
            )
