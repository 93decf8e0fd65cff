"""Housekeeping one worker at a time does: the one rule that ends every job, and the deletion
of stored images past the retention period.

The rule: every unfinished job has a deadline (its score in `jobs:pending`), set by its last
step: queued (its message sent), QUEUE_CHECK_SECONDS; taken by a worker, HOLD (it may wait
behind one batch, then run as one); fetching, the fetch timeout and a margin; running, the task
time limit and a margin (shared/settings.py). Past its deadline a job is queued again from its
record (which keeps the preprocessed image or the URL until the job finishes), at most
TASK_MAX_ATTEMPTS times; after that it fails with `abandoned` and a reason the user can read.
Whatever broke on the way (a worker killed, a task body that raised, a message lost), the job
ends in this rule. A spurious re-queue costs only work: results are written once.

Two things make the rule quicker than its deadlines, and one keeps it from firing too soon:
- A job still waiting in its queue is not late: while its message is at or behind the queue's
  oldest one (`queued_at` headers; queues are first in, first out), its deadline moves on. So a
  long queue never counts against a job; a queued job's clock starts when its message is taken.
- A worker that dies (SIGKILL, OOM, a lost machine) stops its heartbeat. Every worker process
  records the task ids it receives with it (worker/factory.py), so after
  WORKER_DEAD_AFTER_SECONDS its unfinished jobs are due at once, instead of after HOLD.
- A worker records a task id some milliseconds after kombu's Redis transport hands it the
  message; one killed in between leaves a message that no heartbeat names. When a death is
  found, such messages (kombu's unacknowledged index) are due at once too. This reads the Redis
  transport's internals and is needed only for it; without it they would wait for their
  queued deadline, a few seconds more.
"""

from __future__ import annotations

import logging
import time

from shared.queue import FETCH_QUEUE, PREDICT_QUEUE, FetchTask, PredictTask, enqueue, enqueue_webhooks
from shared.schemas import FINAL_STATUSES, TOP_K_DEFAULT
from shared.webhooks import MAX_ATTEMPTS as WEBHOOK_MAX_ATTEMPTS
from worker.state import fail_jobs

log = logging.getLogger(__name__)

# A live worker records what it receives within milliseconds (20 ms of gathering, one write);
# a message unrecorded after this long was taken by a process that died before it could.
RECORD_GRACE_SECONDS = 5.0
QUEUE_SLACK_SECONDS = 5.0


IMAGE_SWEEP_SECONDS = 3600


def janitor_lock_seconds(settings) -> float:
    """How long the janitor's lock lives: it is let go at the end of each pass (it lived one
    heartbeat and was never released, so a long pass overlapped the next), and a worker killed
    holding it stops the janitor no longer than a dead worker goes unnoticed (at 60 s, a killed
    holder kept its own jobs waiting a minute). A pass handles a few hundred jobs at most, far
    below this; one that overran it would cost a spurious re-queue, never a second result."""
    return settings.worker_dead_after_seconds


def run_janitor(state, node: str) -> None:
    """Once a heartbeat, in one worker process at a time: the janitor's pass (a thread of every
    worker process, started by worker/factory.py)."""
    s = state.settings
    reachable_since = time.monotonic()  # since when this process has reached Redis without a break
    while True:
        time.sleep(s.worker_heartbeat_seconds)
        try:
            if state.store.take_lock("janitor", node, janitor_lock_seconds(s)):
                try:
                    # Judge other workers' silence only after a whole dead-worker period of our own
                    # reaching Redis: after an outage, every other worker looked dead to the first
                    # one back, and the janitor queued live workers' jobs again.
                    judge = time.monotonic() - reachable_since > s.worker_dead_after_seconds
                    run_pass(state, time.time(), judge_workers=judge)
                finally:
                    state.store.release_lock("janitor", node)
        except Exception as exc:  # noqa: BLE001 - keep going through a Redis restart
            log.warning("janitor pass failed: %s", exc)  # not debug: a pass that always fails ends nothing
            reachable_since = time.monotonic()


def run_image_sweeper(state, node: str) -> None:
    """Fetch workers share the image volume: one of them, hourly, deletes expired images."""
    while True:
        try:
            if state.store.take_lock("image-sweep", node, IMAGE_SWEEP_SECONDS):
                sweep_expired_images(state)
        except Exception as exc:  # noqa: BLE001 - try again next time
            log.warning("image sweep failed: %s", exc)
        time.sleep(60)


def run_pass(state, now: float, judge_workers: bool) -> int:
    """One janitor pass. judge_workers: this process has reached Redis for long enough to tell
    a silent worker from its own outage (after one, every other worker looks silent)."""
    due = rescue_dead_workers(state, now) if judge_workers else 0
    return due + requeue_overdue(state, now) + rescue_lost_webhooks(state, now)


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


def _waiting_in_queue(rec: dict, heads: dict[str, float | None]) -> bool:
    """The job's latest message is still in its queue: at or behind the oldest waiting one."""
    head = heads[FETCH_QUEUE if rec["status"] == "fetching" else PREDICT_QUEUE]
    # A head that does not say when it was queued (a message from before the header): wait.
    # The slack: the web tier writes a job's record a moment before it sends the message, and
    # clocks of two machines differ; a lost job within it is only found a look or two later.
    return head is None or float(rec["queued_at"] or 0) >= head - QUEUE_SLACK_SECONDS


def requeue_overdue(state, now: float | None = None) -> int:
    """The rule: jobs past their deadline are queued again, or fail after TASK_MAX_ATTEMPTS."""
    store, s = state.store, state.settings
    now = time.time() if now is None else now
    ids = store.overdue(now)
    if not ids:
        return 0
    records = store.requeue_fields(ids)
    heads = {q: store.queue_head_queued_at(q) for q in (PREDICT_QUEUE, FETCH_QUEUE)}
    gone, waiting, late, late_records, abandoned = [], {}, [], [], []
    for job_id, rec in zip(ids, records, strict=True):
        if rec["status"] is None or rec["status"] in FINAL_STATUSES:
            gone.append(job_id)  # expired, or finished by a write that raced this read
        elif _waiting_in_queue(rec, heads):
            # Look again after as long as it has waited so far: a long queue costs few looks.
            waited = now - float(rec["queued_at"] or now)
            waiting[job_id] = now + min(max(waited, 1.0), s.hold_deadline_seconds)
        elif int(rec["requeues"] or 0) >= s.task_max_attempts:
            abandoned.append(job_id)
        else:
            late.append(job_id)
            late_records.append(rec)
    store.forget_pending(gone)
    store.postpone(waiting)
    if abandoned:
        fail_jobs(
            state,
            abandoned,
            "abandoned",
            f"The job's task was queued again {s.task_max_attempts} times after its worker died, stalled or "
            "lost it, and never finished; giving up on it.",
        )
    return requeue(state, late, late_records, now, "past its deadline")


def requeue(state, job_ids: list[str], records: list[dict], now: float, why: str) -> int:
    """Queue these unfinished jobs' tasks again, count it on their records, and say why in the log."""
    predictions, fetches = tasks_for(job_ids, records)
    stranded = sorted(set(job_ids) - {t.job_id for t in predictions + fetches})
    if stranded:  # looked at on every pass, for ever, its batch never finishing: end it instead
        message = "The job's record no longer holds what it needs to run again; giving up on it."
        fail_jobs(state, stranded, "abandoned", message)
    if not predictions and not fetches:
        return 0
    enqueue(state.celery, predictions, fetches)
    ids = [t.job_id for t in predictions + fetches]
    state.store.requeued(ids, now, rescued=True)
    log.warning("%s: re-queued %d tasks", why, len(ids), extra={"job_ids": ids})
    return len(ids)


def rescue_dead_workers(state, now: float | None = None) -> int:
    """Queue again at once the unfinished jobs of every worker whose heartbeat stopped."""
    store = state.store
    now = time.time() if now is None else now
    requeued = 0
    dead = store.silent_consumers(now - state.settings.worker_dead_after_seconds)
    for node in dead:
        held = store.held_by(node)
        requeued += _requeue_taken(state, held, now, f"worker {node} stopped")
        store.forget_consumer(node)
    if dead:  # a worker that died may have taken messages it had not recorded yet
        requeued += rescue_unrecorded_tasks(state, now)
    return requeued


def _requeue_taken(state, taken: list[tuple[str, float]], now: float, why: str) -> int:
    """Of these (job id, when a worker took its message), queue again the jobs still unfinished
    and not queued again since they were taken."""
    if not taken:
        return 0
    ids = [job_id for job_id, _ in taken]
    records = state.store.requeue_fields(ids)
    keep = [
        (job_id, rec)
        for (job_id, taken_at), rec in zip(taken, records, strict=True)
        if rec["status"] is not None
        and rec["status"] not in FINAL_STATUSES
        and float(rec["queued_at"] or 0) <= taken_at
    ]
    return requeue(state, [j for j, _ in keep], [r for _, r in keep], now, why)


def rescue_unrecorded_tasks(state, now: float | None = None) -> int:
    """Queue again the unfinished jobs whose message a worker took but no live worker recorded
    (kombu's Redis transport: its unacknowledged index says when it handed each one over): a
    worker killed between taking a message and recording it leaves a held set that does not
    name it."""
    store = state.store
    now = time.time() if now is None else now
    handed = store.unacknowledged_before(now - RECORD_GRACE_SECONDS)
    if not handed:
        return 0
    held = store.held_by_live_consumers(now - state.settings.worker_dead_after_seconds)
    return _requeue_taken(state, [(j, at) for j, at in handed if j not in held], now, "taken but never recorded")


def rescue_lost_webhooks(state, now: float | None = None) -> int:
    """Queue again the webhooks that have been due for a while with nobody delivering them (the
    task was lost, or its enqueueing failed when the batch finished). Each such loss counts as
    an attempt, so that a delivery that keeps getting lost ends too (failed)."""
    store = state.store
    now = time.time() if now is None else now
    overdue = store.webhooks_overdue(now - state.settings.webhook_timeout - 20)
    again = []
    for batch_id in overdue:
        attempts = store.webhook_lost(batch_id, "The delivery was interrupted.", now, WEBHOOK_MAX_ATTEMPTS)
        if attempts is not None:
            again.append(batch_id)
    if again:
        enqueue_webhooks(state.celery, again)
        log.warning("re-queued %d webhooks", len(again), extra={"batch_ids": again})
    return len(overdue)


def sweep_expired_images(state) -> int:
    """Job records expire in Redis by themselves; the stored images they point at are deleted
    here, by the fetch worker that takes the hourly lock."""
    removed = state.images.sweep(state.settings.retention_seconds)
    if removed:
        log.info("swept %d expired image files", removed)
    return removed
