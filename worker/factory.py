"""How a worker's Celery app is made (worker/app.py makes the one `python -m worker` runs).

Tasks are thin: they unpack the message and call worker.prediction or worker.fetching. The
model is loaded once per worker process, after the fork (TensorFlow must not be imported
before forking). Every worker process beats: the model processes for readiness (/readyz), the
processes that take tasks with the ids they received, so that the janitor can queue a dead
worker's jobs again (worker/janitor.py).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from queue import Queue

import numpy as np
from celery import signals
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from shared.images import PIXELS_SHAPE, DecodeBudget
from shared.jobstore import JobStore
from shared.logs import setup_logging
from shared.queue import (
    FETCH_TASK,
    PREDICT_TASK,
    WEBHOOK_TASK,
    FetchTask,
    celery_init_app,
    enqueue_webhooks,
    predict_jobs_of,
    tasks_of,
)
from shared.schemas import TOP_K_DEFAULT
from shared.settings import Settings
from shared.storage import ImageStore
from worker.fetching import fetch_job
from worker.janitor import run_image_sweeper, run_janitor
from worker.prediction import predict_jobs
from worker.state import WorkerState, requeue_tasks, until_redis_answers
from worker.webhooks import deliver_webhook

log = logging.getLogger(__name__)


def node_name() -> str:
    """This process, uniquely: a restarted container has the same host name and often the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class ReceivedTasks:
    """Job (task) ids this process received and has not recorded yet (thread-safe)."""

    def __init__(self):
        self._ids, self._lock, self.arrived = [], threading.Lock(), threading.Event()

    def add(self, *task_ids: str) -> None:
        with self._lock:
            self._ids.extend(task_ids)
        self.arrived.set()

    def take(self) -> list[str]:
        with self._lock:
            ids, self._ids = self._ids, []
            self.arrived.clear()
        return ids


def served_predictor(settings: Settings):
    """The served model, as the settings ask for it."""
    from shared.predictor import load_predictor  # loads TensorFlow or OpenVINO: only ever after the fork

    return load_predictor(
        settings.model_dir,
        precision=settings.predict_precision,
        threads=settings.predict_threads,
        tta_level=None if settings.predict_tta_level < 0 else settings.predict_tta_level,
        runtime=settings.predict_runtime,
    )


def create_worker_app(settings: Settings, make_predictor: Callable[[Settings], object] = served_predictor):
    """settings.worker_role "predict" loads the model (make_predictor) in each pool process;
    "fetch" (many threads) never does. The tasks and signal handlers below are plain functions:
    this wires them to the app and to its WorkerState (app.state)."""
    app = celery_init_app(settings)
    # celery-batches counts messages, and a message holds up to predict_chunk jobs.
    flush_every = math.ceil(settings.predict_batch_size / app.conf.predict_chunk)
    if settings.worker_role == "predict":
        # celery-batches gathers the messages it has received: the prefetch window must hold a batch.
        app.conf.worker_prefetch_multiplier = 2 * flush_every
        # A pool child loads the model before it reports for work; Celery kills one that takes
        # longer than 4 s by default, and a slow or busy machine loads TensorFlow slower than that.
        app.conf.worker_proc_alive_timeout = 120
    state = WorkerState(
        settings,
        JobStore.from_url(settings.redis_url, settings.retention_seconds),
        ImageStore(settings.storage_dir),
        app,
        decode_budget=DecodeBudget(settings.decode_budget_bytes),
    )
    app.state = state
    state.store.on_webhooks_due = lambda batch_ids: until_redis_answers(enqueue_webhooks, app, batch_ids)

    # bind=True: a task finds its state as task.app.state. shared=False: the tasks belong to this
    # app alone (Celery's default adds a task to every app made afterwards, so a second app in one
    # process would run the first one's tasks).
    batches = dict(flush_every=flush_every, flush_interval=settings.predict_batch_wait_ms / 1000.0)
    app.task(name=PREDICT_TASK, base=ReconnectingBatches, bind=True, acks_late=True, shared=False, **batches)(predict)
    app.task(name=WEBHOOK_TASK, bind=True, acks_late=True, shared=False)(webhook)
    app.task(name=FETCH_TASK, bind=True, acks_late=True, shared=False)(fetch)

    received = ReceivedTasks()
    handlers = [
        (signals.setup_logging, partial(configure_logging, settings)),  # connected: Celery leaves logging to us
        (signals.worker_process_init, partial(start_pool_process, state, make_predictor)),
        (signals.worker_init, partial(start_main_process, state, make_predictor)),
        (signals.task_received, partial(remember_received, received)),  # in the process taking messages
        (signals.worker_ready, partial(start_beating, state, received)),
    ]
    for signal, handler in handlers:
        signal.connect(handler, weak=False)
    return app


def predict(task, requests):
    """Every message that arrived within the wait: their jobs in model calls of at most
    PREDICT_BATCH_SIZE images (one call, unless the messages hold more)."""
    t0 = time.perf_counter()
    outcomes = predict_jobs(task.app.state, [dict(job) for r in requests for job in predict_jobs_of(r.kwargs)])
    send_task_events(task.app, requests, outcomes, time.perf_counter() - t0)


def webhook(task, batch_id: str):
    deliver_webhook(task.app.state, batch_id)


def fetch(task, job_id: str, url: str, top_k: int = TOP_K_DEFAULT):
    fetch_job(task.app.state, FetchTask(job_id, url, top_k))


def configure_logging(settings: Settings, **_):
    setup_logging("worker", settings.log_json)


def start_pool_process(state: WorkerState, make_predictor, **_):
    if state.settings.worker_role == "predict":
        _start_predicting(state, make_predictor)


def start_main_process(state: WorkerState, make_predictor, sender=None, **_):
    # Pools without child processes (solo, threads) never fire worker_process_init.
    pool = sender.pool_cls.__module__.split(".")[-1] if sender is not None else ""
    if state.settings.worker_role == "predict" and pool in ("solo", "thread"):
        _start_predicting(state, make_predictor)


def remember_received(received: ReceivedTasks, request=None, **_):
    if request.name == PREDICT_TASK:
        received.add(*(job.get("job_id", "") for job in predict_jobs_of(request.kwargs)))
    else:
        received.add(request.id)


def start_beating(state: WorkerState, received: ReceivedTasks, **_):
    node = node_name()
    threading.Thread(target=_consumer_heartbeat, args=(state, received, node), daemon=True, name="consumer").start()
    threading.Thread(target=run_janitor, args=(state, node), daemon=True, name="janitor").start()
    if state.settings.worker_role == "fetch":
        threading.Thread(target=run_image_sweeper, args=(state, node), daemon=True, name="image-sweep").start()


def send_task_events(app, requests, outcomes: dict[str, tuple[str, str]], runtime: float) -> None:
    """Flower (and `celery events`) learn a task's end from task events; celery-batches runs the
    batch as one task and sends none for the tasks in it, which Flower then shows as PENDING
    forever. Send each task's own: succeeded, or failed with the job's error code."""
    if not app.conf.worker_send_task_events or not requests:
        return
    try:
        with app.pool.acquire(block=True) as conn, app.events.Dispatcher(conn, hostname=requests[0].hostname) as events:
            for r in requests:
                # A message of several jobs: succeeded if this call finished them all as done.
                written = [outcomes.get(job.get("job_id"), ("", "")) for job in predict_jobs_of(r.kwargs)]
                codes = sorted({code for status, code in written if status == "failed"})
                if codes:
                    events.send("task-failed", uuid=r.id, exception=",".join(codes), traceback="")
                elif written and all(status == "done" for status, _ in written):
                    events.send("task-succeeded", uuid=r.id, result="done", runtime=runtime)
    except Exception as exc:  # noqa: BLE001 - events are for dashboards: never fail a batch for them
        log.debug("task events not sent: %s", exc)


class ReconnectingBatches(Batches):
    """celery-batches, safe across broker reconnections.

    Celery rebuilds task strategies when its consumer reconnects, with a new timer. Batches
    keeps its flush timer from the old one (dead), so buffered messages would wait until a
    full batch arrived. The buffered messages belong to the lost connection (they can no longer
    be acknowledged), so the buffer starts empty, and their tasks are queued again at once:
    left to the broker, they would come back only after the visibility timeout.

    The same goes for batches already handed to the pool that no child had taken yet: on a lost
    connection Celery's consumer empties the pool's outgoing buffer ("the tasks will be
    redelivered by the broker anyway", AsynPool.flush).

    And a batch whose pool child dies (the OOM killer, the hard time limit) is queued again at
    once, and its messages acknowledged. celery-batches hands a batch to the pool without an
    error callback, so those messages would be neither acknowledged nor rejected: their jobs
    would wait for the visibility timeout (`task_reject_on_worker_lost` covers plain tasks
    only), and each loss would keep a prefetch slot."""

    def __init__(self):
        super().__init__()
        self._sent: list = []  # (pool job, its requests) handed to the pool and not finished

    def flush(self, requests):
        requests = list(requests)
        serializable = ([SimpleRequest.from_request(r) for r in requests],)  # what celery-batches sends

        def on_return(_result):  # every task here is acks_late (create_worker_app)
            for r in requests:
                r.acknowledge()

        def on_error(exc_info):
            self.on_batch_lost(requests, exc_info)

        job = self._pool.apply_async(
            apply_batches_task, (self, serializable, 0, None), callback=on_return, error_callback=on_error
        )
        self._sent = [(j, rs) for j, rs in self._sent if not j.ready()] + [(job, requests)]
        return job

    def on_batch_lost(self, requests, exc_info) -> None:
        """The pool child running this batch died: queue its jobs again (they come back as
        suspects, each run alone: worker.prediction), then let go of the messages. Called on the
        worker's event loop, so one quick try: if Redis is away, the messages stay held, and the
        jobs' deadlines bring them back."""
        tasks = tasks_of(requests)
        try:
            requeue_tasks(self.app.state, tasks)
        except Exception as exc:  # noqa: BLE001 - the deadline rule is the fallback
            log.warning("pool child lost a batch; could not queue it again now: %s", exc)
            return
        for r in requests:
            r.acknowledge()
        log.warning(
            "pool child lost a batch (%s): re-queued %d jobs",
            getattr(exc_info, "exception", exc_info),
            len(tasks),
            extra={"job_ids": [t.job_id for t in tasks]},
        )

    def Strategy(self, task, app, consumer):
        if self._tref is not None:
            self._tref.cancel()
        self._tref = None
        unstarted = [r for job, rs in self._sent if not job.accepted() for r in rs]
        stranded = list(self._buffer.queue) + list(self._pending.queue) + unstarted
        self._buffer, self._pending, self._sent = Queue(), Queue(), []
        if stranded:
            tasks = tasks_of(stranded)
            # Their old messages stay unacknowledged: the records say they were queued again.
            until_redis_answers(requeue_tasks, app.state, tasks, deadline_s=60)
            log.warning("reconnected: re-queued %d buffered or unstarted tasks", len(tasks))
        return super().Strategy(task, app, consumer)


def _start_predicting(state: WorkerState, make_predictor) -> None:
    t0 = time.perf_counter()
    state.predictor = make_predictor(state.settings)
    if state.settings.result_cache:
        state.cache = state.store.result_cache(state.predictor.cache_namespace)
    # Warm up: the first call traces and compiles; do it now, not on a user's request.
    state.predictor.predict_proba(np.zeros((1, *PIXELS_SHAPE), np.uint8))
    info = state.predictor.info
    log.info("model %s %s ready in %.1fs", info.name, info.version, time.perf_counter() - t0)
    threading.Thread(target=_model_heartbeat, args=(state,), daemon=True, name="heartbeat").start()


def _model_heartbeat(state: WorkerState) -> None:
    """Tell the web tier (/readyz) that a process with the model loaded is alive."""
    node = node_name()
    while True:
        try:
            state.store.record_heartbeat(node, time.time())
        except Exception as exc:  # noqa: BLE001 - keep beating through a Redis restart
            log.debug("heartbeat failed: %s", exc)
        time.sleep(state.settings.worker_heartbeat_seconds)


def _consumer_heartbeat(state: WorkerState, received: ReceivedTasks, node: str) -> None:
    """Record what this process received as soon as it arrives (a worker killed a second after
    taking its messages must have said which they were), with the deadline of its jobs, and beat.
    Nothing else runs here: a slow janitor pass or image sweep would make a live worker look dead."""
    s = state.settings
    keep = s.hold_deadline_seconds  # by then a task is finished, or its job is past its deadline
    pending: list[str] = []  # received, but not yet recorded (Redis was away)
    next_beat = 0.0
    while True:
        received.arrived.wait(timeout=max(0.0, next_beat - time.monotonic()))  # new tasks, or time to beat
        time.sleep(0.02)  # a burst of messages: one write for all of it
        pending += received.take()
        try:
            now = time.time()
            state.store.record_consumer(node, now, pending, keep, now + s.hold_deadline_seconds)
            pending = []
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + s.worker_heartbeat_seconds
        except Exception as exc:  # noqa: BLE001 - keep beating through a Redis restart
            log.debug("heartbeat failed: %s", exc)
            time.sleep(min(1.0, s.worker_heartbeat_seconds))
