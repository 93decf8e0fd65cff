"""How a worker's Celery app is made (worker/app.py makes the one `python -m worker` runs).

Tasks are thin: they unpack the message and call worker.prediction or worker.fetching. The
model is loaded once per worker process, after the fork (TensorFlow must not be imported
before forking).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from queue import Queue

import numpy as np
from celery import signals
from celery_batches import Batches

from shared.jobstore import JobStore
from shared.logs import setup_logging
from shared.queue import FETCH_TASK, PREDICT_TASK, FetchTask, celery_init_app
from shared.settings import Settings
from shared.storage import ImageStore
from worker.fetching import fetch_job
from worker.janitor import rescue_lost_tasks, sweep_expired_images
from worker.prediction import predict_jobs
from worker.state import WorkerState

log = logging.getLogger(__name__)
IMAGE_SWEEP_SECONDS = 3600


def load_predictor(settings: Settings):
    """The served model, as the settings ask for it."""
    from shared.predictor import Predictor  # imports TensorFlow: only ever after the fork

    return Predictor(
        settings.model_dir,
        precision=settings.predict_precision,
        threads=settings.predict_threads,
        tta_level=None if settings.predict_tta_level < 0 else settings.predict_tta_level,
    )


def create_worker_app(settings: Settings, make_predictor: Callable[[Settings], object] = load_predictor):
    """settings.worker_role "predict" loads the model (make_predictor) in each pool process;
    "fetch" (many threads) never does."""
    app = celery_init_app(settings)
    role = settings.worker_role
    if role == "predict":
        # celery-batches gathers the messages it has received: the prefetch window must hold a batch.
        app.conf.worker_prefetch_multiplier = 2 * settings.predict_batch_size
        # A pool child loads the model before it reports for work; Celery kills one that takes
        # longer than 4 s by default, and a slow or busy machine loads TensorFlow slower than that.
        app.conf.worker_proc_alive_timeout = 120
    state = WorkerState(
        settings,
        JobStore.from_url(settings.redis_url, settings.retention_seconds),
        ImageStore(settings.storage_dir),
        app,
    )
    app.state = state

    @app.task(
        name=PREDICT_TASK,
        base=ReconnectingBatches,
        flush_every=settings.predict_batch_size,
        flush_interval=settings.predict_batch_wait_ms / 1000.0,
        acks_late=True,
    )
    def predict(requests):
        # Every message that arrived within the wait (up to the batch size): one model call.
        predict_jobs(state, [dict(r.kwargs) for r in requests])

    @app.task(name=FETCH_TASK, acks_late=True, shared=False)
    def fetch(job_id: str, url: str, top_k: int = 3):
        fetch_job(state, FetchTask(job_id, url, top_k))

    @signals.setup_logging.connect(weak=False)
    def configure_logging(**_):  # connected: Celery leaves logging to us
        setup_logging("worker", settings.log_json)

    @signals.worker_process_init.connect(weak=False)
    def start_pool_process(**_):
        if role == "predict":
            _start_predicting(state, make_predictor)

    @signals.worker_init.connect(weak=False)
    def start_main_process(sender=None, **_):
        if role == "fetch":
            threading.Thread(target=_sweep_images, args=(state,), daemon=True, name="image-sweep").start()
        # Pools without child processes (solo, threads) never fire worker_process_init.
        elif sender is not None and sender.pool_cls.__module__.split(".")[-1] in ("solo", "thread"):
            _start_predicting(state, make_predictor)

    return app


class ReconnectingBatches(Batches):
    """celery-batches, safe across broker reconnections.

    Celery rebuilds task strategies when its consumer reconnects, with a new timer. Batches
    keeps its flush timer from the old one (dead), so buffered messages would wait until a
    full batch arrived: the soak test left jobs stuck that way after a Redis restart. The
    buffered messages belong to the lost connection and come back from the broker (restored,
    or redelivered after the visibility timeout), so the buffer starts empty too."""

    def Strategy(self, task, app, consumer):
        if self._tref is not None:
            self._tref.cancel()
        self._tref = None
        self._buffer, self._pending = Queue(), Queue()
        return super().Strategy(task, app, consumer)


def _start_predicting(state: WorkerState, make_predictor) -> None:
    t0 = time.perf_counter()
    state.predictor = make_predictor(state.settings)
    if state.settings.result_cache:
        state.cache = state.store.result_cache(state.predictor.cache_namespace)
    # Warm up: the first call traces and compiles; do it now, not on a user's request.
    state.predictor.predict_proba(np.zeros((1, 32, 32, 3), np.uint8))
    info = state.predictor.info
    log.info("model %s %s ready in %.1fs", info.name, info.version, time.perf_counter() - t0)
    threading.Thread(target=_heartbeat, args=(state,), daemon=True, name="heartbeat").start()


def _heartbeat(state: WorkerState) -> None:
    """Tell the web tier (/readyz) that a worker with the model loaded is alive; and, in one
    worker at a time, look for jobs whose task was lost (worker/janitor.py)."""
    node = f"{socket.gethostname()}:{os.getpid()}"
    period = state.settings.worker_heartbeat_seconds
    while True:
        try:
            now = time.time()
            state.store.record_heartbeat(node, now)
            if state.store.take_lock("janitor", node, period):
                rescue_lost_tasks(state, now)
        except Exception as exc:  # noqa: BLE001 - keep beating through a Redis restart
            log.debug("heartbeat failed: %s", exc)
        time.sleep(period)


def _sweep_images(state: WorkerState) -> None:
    """Hourly, in whichever fetch worker takes the lock: fetch workers share the image volume."""
    node = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        try:
            if state.store.take_lock("image-sweep", node, IMAGE_SWEEP_SECONDS):
                sweep_expired_images(state)
        except Exception as exc:  # noqa: BLE001 - try again next time
            log.warning("image sweep failed: %s", exc)
        time.sleep(60)
