"""The Celery app the workers run (`celery -A worker.app worker ...`; `python -m worker` wraps it).

Tasks are thin: they unpack the message and call worker.jobs. The model is loaded once per
worker process, after the fork (TensorFlow must not be imported before forking).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from queue import Queue

from celery import signals
from celery_batches import Batches

from shared.jobs import JobStore
from shared.logs import setup_logging
from shared.queue import FETCH_TASK, PREDICT_TASK, celery_init_app
from shared.settings import Settings
from shared.storage import ImageStore
from worker.janitor import rescue_lost_tasks
from worker.jobs import WorkerState, fetch_job, predict_jobs

log = logging.getLogger("worker")


def create_worker_app(settings: Settings, role: str = "predict"):
    """role "predict" loads the model in each pool process; "fetch" (many threads) never does."""
    app = celery_init_app(settings)
    if role == "predict":
        # celery-batches gathers the messages it has received: the prefetch window must hold a batch.
        app.conf.worker_prefetch_multiplier = 2 * settings.predict_batch_size
    state = WorkerState(settings, JobStore.from_url(settings.redis_url, settings.retention_seconds),
                        ImageStore(settings.storage_dir), app)
    app.state = state

    @app.task(name=PREDICT_TASK, base=ReconnectingBatches, flush_every=settings.predict_batch_size,
              flush_interval=settings.predict_batch_wait_ms / 1000.0, acks_late=True)
    def predict(requests):
        # Every message that arrived within the wait (up to the batch size): one model call.
        predict_jobs(state, [dict(r.kwargs) for r in requests])

    @app.task(name=FETCH_TASK, acks_late=True)
    def fetch(job_id: str, url: str, top_k: int = 3):
        fetch_job(state, job_id, url, top_k)

    @signals.setup_logging.connect(weak=False)
    def configure_logging(**_):  # connected: Celery leaves logging to us
        setup_logging("worker", settings.log_json)

    @signals.worker_process_init.connect(weak=False)
    def load_model(**_):
        if role == "predict":
            _load_model(state)

    @signals.worker_init.connect(weak=False)
    def load_model_in_main(sender=None, **_):
        # Pools without child processes (solo, threads) never fire worker_process_init.
        if role == "predict" and sender is not None and \
                sender.pool_cls.__module__.split(".")[-1] in ("solo", "thread"):
            _load_model(state)

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


def _load_model(state: WorkerState) -> None:
    from shared.predictor import Predictor  # TensorFlow is imported here, after the fork
    t0 = time.perf_counter()
    s = state.settings
    state.predictor = Predictor(s.model_dir, precision=s.predict_precision, threads=s.predict_threads,
                                tta_level=None if s.predict_tta_level < 0 else s.predict_tta_level)
    # Warm up: the first call traces and compiles; do it now, not on a user's request.
    import numpy as np
    state.predictor.predict_proba(np.zeros((1, 32, 32, 3), np.uint8))
    log.info("model %s %s ready in %.1fs", state.predictor.info.name, state.predictor.info.version,
             time.perf_counter() - t0)
    delay = float(os.environ.get("WORKER_TEST_DELAY_S", "0"))
    crash = os.environ.get("WORKER_TEST_CRASH_ON_BLACK") == "1"
    if delay or crash:  # fault injection, for the tests only
        state.predictor = _FaultInjected(state.predictor, delay, crash)
    threading.Thread(target=_heartbeat, args=(state,), daemon=True, name="heartbeat").start()


class _FaultInjected:
    """Tests only: every model call is `delay` seconds slower; an all-black image kills the process."""

    def __init__(self, predictor, delay: float, crash_on_black: bool):
        self.info, self._predictor = predictor.info, predictor
        self._delay, self._crash = delay, crash_on_black

    def predict_proba(self, images):
        if self._crash and (images.reshape(len(images), -1).max(axis=1) == 0).any():
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self._delay)
        return self._predictor.predict_proba(images)


def _heartbeat(state: WorkerState) -> None:
    """Tell the web tier (/readyz) that a worker with the model loaded is alive; and, in one
    worker at a time, look for jobs whose task was lost (worker/janitor.py)."""
    node = f"{socket.gethostname()}:{os.getpid()}"
    period = state.settings.worker_heartbeat_seconds
    while True:
        try:
            now = time.time()
            with state.store.r.pipeline() as p:
                p.zadd("workers:heartbeat", {node: now})
                p.zremrangebyscore("workers:heartbeat", "-inf", now - 3600)
                p.execute()
            if state.store.r.set("janitor:lock", node, nx=True, px=int(period * 1000)):
                rescue_lost_tasks(state, now)
        except Exception as exc:  # noqa: BLE001 - keep beating through a Redis restart
            log.debug("heartbeat failed: %s", exc)
        time.sleep(period)


# WORKER_ROLE is set by `python -m worker` for each Celery worker it starts.
app = create_worker_app(Settings.from_env(), os.environ.get("WORKER_ROLE", "predict"))
