"""worker.factory.ReconnectingBatches, in-process: what a broker reconnection does to buffered tasks."""

from types import SimpleNamespace
from unittest import mock

from celery import Celery

from worker import factory


def test_a_reconnection_queues_the_buffered_tasks_again_and_starts_a_new_flush_timer(monkeypatch):
    """The buffered messages belong to the lost connection: they can no longer be acknowledged,
    and celery-batches' flush timer belongs to the old consumer. Left alone, a lone task waited
    for a full batch (the soak caught it) or for the visibility timeout."""
    app = Celery("t", broker="memory://")
    app.state = SimpleNamespace(store=mock.Mock())

    @app.task(base=factory.ReconnectingBatches, name="predict", flush_every=64, flush_interval=1, shared=False)
    def predict(requests):
        pass

    task = app.tasks["predict"]
    for job_id in ("j1", "j2"):
        task._buffer.put(SimpleNamespace(id=job_id, kwargs={"job_id": job_id, "pixels": "AAAA", "top_k": 2}))
    old_timer = task._tref = mock.Mock()
    queued = []
    monkeypatch.setattr(factory, "requeue_tasks", lambda state, tasks: queued.extend(tasks))
    consumer = SimpleNamespace(
        pool=mock.Mock(), hostname="w@h", connection_errors=(), event_dispatcher=None, timer=None
    )

    handler = task.Strategy(task, app, consumer)

    assert callable(handler)
    old_timer.cancel.assert_called_once()
    assert task._tref is None  # the next message starts a timer on the new consumer's timer
    assert task._buffer.empty() and task._pending.empty()
    assert [(t.job_id, t.pixels, t.top_k) for t in queued] == [("j1", "AAAA", 2), ("j2", "AAAA", 2)]


def test_a_reconnection_queues_again_the_batches_no_pool_child_had_taken(monkeypatch):
    """On a lost connection Celery's consumer empties the pool's outgoing buffer, trusting the
    broker to redeliver (after the visibility timeout): the compose Redis-restart test found 112
    jobs held by a live worker, never started, waiting out that minute."""
    app = Celery("t", broker="memory://")
    app.state = SimpleNamespace(store=mock.Mock())

    @app.task(base=factory.ReconnectingBatches, name="predict", flush_every=64, flush_interval=1, shared=False)
    def predict(requests):
        pass

    class Job:  # billiard's ApplyResult, as far as this goes
        def __init__(self, accepted, ready=False):
            self._accepted, self._ready = accepted, ready

        def accepted(self):
            return self._accepted

        def ready(self):
            return self._ready

    jobs = iter([Job(accepted=True, ready=True), Job(accepted=True), Job(accepted=False)])
    task = app.tasks["predict"]
    task._pool = mock.Mock(apply_async=lambda *a, **kw: next(jobs))
    monkeypatch.setattr(factory.SimpleRequest, "from_request", lambda r: r.id)

    def message(*ids):
        return SimpleNamespace(id=ids[0], kwargs={"jobs": [{"job_id": i, "pixels": "AAAA", "top_k": 3} for i in ids]})

    task.flush([message("done1")])  # finished
    task.flush([message("running1", "running2")])  # a child is on it
    task.flush([message("waiting1", "waiting2"), message("waiting3")])  # still in the pool's buffer
    queued = []
    monkeypatch.setattr(factory, "requeue_tasks", lambda state, tasks: queued.extend(tasks))
    consumer = SimpleNamespace(
        pool=mock.Mock(), hostname="w@h", connection_errors=(), event_dispatcher=None, timer=None
    )

    task.Strategy(task, app, consumer)

    assert [t.job_id for t in queued] == ["waiting1", "waiting2", "waiting3"]
    queued.clear()
    task.Strategy(task, app, consumer)  # a second reconnection: nothing left to redo
    assert queued == []


def test_a_batch_whose_pool_child_died_is_queued_again_at_once_and_its_messages_let_go(monkeypatch):
    """celery-batches handed its batches to the pool without an error callback: when the pool
    child died (OOM killer, hard time limit) the messages were neither acknowledged nor rejected,
    so the jobs waited for the visibility timeout and each loss kept a prefetch slot."""
    app = Celery("t", broker="memory://")
    app.state = SimpleNamespace(store=mock.Mock())

    @app.task(base=factory.ReconnectingBatches, name="predict", flush_every=64, flush_interval=1, shared=False)
    def predict(requests):
        pass

    task = app.tasks["predict"]
    task._pool = mock.Mock()
    requests = [
        mock.Mock(id=i, kwargs={"jobs": [{"job_id": i, "pixels": "AAAA", "top_k": 3}]}, request_dict={})
        for i in ("a", "b")
    ]
    monkeypatch.setattr(factory.SimpleRequest, "from_request", lambda r: r.id)
    queued = []
    monkeypatch.setattr(factory, "requeue_tasks", lambda state, tasks: queued.extend(tasks))

    task.flush(requests)
    on_error = task._pool.apply_async.call_args.kwargs["error_callback"]
    assert not any(r.acknowledge.called for r in requests)
    on_error(SimpleNamespace(exception=RuntimeError("Worker exited prematurely: signal 9 (SIGKILL)")))

    assert [t.job_id for t in queued] == ["a", "b"]
    assert all(r.acknowledge.called for r in requests)


def test_a_lost_batch_that_cannot_be_queued_again_keeps_its_messages(monkeypatch):
    """Redis away: the messages stay held, and the jobs' deadlines bring them back."""
    app = Celery("t", broker="memory://")
    app.state = SimpleNamespace(store=mock.Mock())

    @app.task(base=factory.ReconnectingBatches, name="predict", flush_every=64, flush_interval=1, shared=False)
    def predict(requests):
        pass

    task = app.tasks["predict"]
    request = mock.Mock(id="a", kwargs={"jobs": [{"job_id": "a", "pixels": "AAAA", "top_k": 3}]})

    def refuse(state, tasks):
        raise ConnectionError("Redis is away")

    monkeypatch.setattr(factory, "requeue_tasks", refuse)
    task.on_batch_lost([request], None)
    assert not request.acknowledge.called
