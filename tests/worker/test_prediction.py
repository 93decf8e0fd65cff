"""The worker's job handling, in-process, with a real Redis and the tiny model."""

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from shared.images import decode_pixels, encode_pixels
from shared.jobstore import JobStore, NewJob
from shared.predictor import load_predictor
from shared.queue import celery_init_app
from shared.storage import ImageStore
from tests.helpers import public_batch
from worker.prediction import predict_jobs
from worker.state import WorkerState


class ModelCalls:
    """The prediction_batch_size histogram of this process, since this object was made:
    how many model calls, how many images in all, and how many calls of one image."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        value = lambda name, **labels: REGISTRY.get_sample_value(name, labels) or 0.0
        return (
            value("prediction_batch_size_count"),
            value("prediction_batch_size_sum"),
            value("prediction_batch_size_bucket", le="1.0"),
        )

    def __call__(self) -> tuple[int, int, int]:
        return tuple(int(now - then) for now, then in zip(self._read(), self.start, strict=True))


@pytest.fixture
def calls():
    return ModelCalls()


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    return load_predictor(tiny_model_dir)


@pytest.fixture
def state(settings_factory, predictor):
    s = settings_factory(task_max_attempts=2)
    store = JobStore.from_url(s.redis_url, 3600)
    return WorkerState(
        s,
        store,
        ImageStore(s.storage_dir),
        celery_init_app(s),
        predictor,
        store.result_cache(predictor.cache_namespace),
    )


def submit(state, n, top_k=3):
    batch_id, records = state.store.create_batch([NewJob("upload", f"{i}.png") for i in range(n)], top_k)
    rng = np.random.default_rng(n)
    items = [
        dict(job_id=r["job_id"], pixels=encode_pixels(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), top_k=top_k)
        for r in records
    ]
    return batch_id, items


def test_a_batch_is_predicted_in_one_call_with_descending_top_k(state, calls):
    batch_id, items = submit(state, 5, top_k=4)
    predict_jobs(state, items)
    batch = public_batch(state.store, batch_id)
    assert batch["counts"]["done"] == 5 and calls()[:2] == (1, 5)  # one call of 5 images
    classes = state.predictor.info.classes
    for job in batch["jobs"]:
        probs = [p["probability"] for p in job["predictions"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(p["label"] in classes for p in job["predictions"])
        assert job["model"]["name"] == state.predictor.info.name


def test_predictions_match_the_predictor_directly(state):
    batch_id, items = submit(state, 3)
    predict_jobs(state, items)
    direct = state.predictor.predict_proba(np.stack([decode_pixels(i["pixels"]) for i in items]))
    for job, p in zip(public_batch(state.store, batch_id)["jobs"], direct, strict=True):
        assert job["predictions"][0]["label"] == state.predictor.info.classes[int(np.argmax(p))]
        assert job["predictions"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)


def test_a_duplicate_delivery_writes_nothing_new(state, calls):
    batch_id, items = submit(state, 2)
    predict_jobs(state, items)
    before = public_batch(state.store, batch_id)
    predict_jobs(state, items)
    after = public_batch(state.store, batch_id)
    assert after["counts"] == before["counts"] and after["jobs"] == before["jobs"]
    assert calls()[:2] == (1, 2)  # the second delivery never reached the model


def test_a_write_whose_answer_was_lost_in_a_redis_restart_still_counts_once(state, calls, monkeypatch):
    """The compose Redis-restart test found a job done in Redis that no worker logged: its
    result was written, the answer was lost as Redis went down, and the retry was refused as a
    duplicate. The same happened to "running", whose retry counted a second attempt and sent
    the whole batch down the one-at-a-time suspect path."""

    def answer_lost_once(write):
        lost = []

        def call(*args, **kwargs):
            result = write(*args, **kwargs)
            if not lost:
                lost.append(True)
                raise redis.ConnectionError("Connection closed by server.")
            return result

        return call

    monkeypatch.setattr("worker.state.time.sleep", lambda s: None)
    for name in ("mark_running", "complete"):
        monkeypatch.setattr(state.store, name, answer_lost_once(getattr(state.store, name)))
    batch_id, items = submit(state, 3)
    outcomes = predict_jobs(state, items)
    assert outcomes == {i["job_id"]: ("done", "") for i in items}  # each counted as written, once
    assert calls()[:2] == (1, 3)  # one model call: nobody was taken for a suspect
    batch = public_batch(state.store, batch_id)
    assert batch["counts"]["done"] == 3 and all(j["attempts"] == 1 for j in batch["jobs"])


def test_the_same_job_twice_in_one_batch_is_predicted_and_written_once(state, calls):
    finished = lambda: REGISTRY.get_sample_value("jobs_finished_total", {"status": "done", "code": ""}) or 0.0
    batch_id, items = submit(state, 2)
    before = finished()
    outcomes = predict_jobs(state, [items[0], items[1], dict(items[0])])
    assert outcomes == {i["job_id"]: ("done", "") for i in items}
    assert finished() - before == 2  # counted (and logged) once each
    assert calls()[:2] == (1, 2)  # one call of the two distinct jobs
    assert public_batch(state.store, batch_id)["counts"]["done"] == 2


def test_jobs_delivered_again_run_together_once_then_alone(state, calls):
    """A 600-image batch whose pool child was killed ran one image at a time afterwards (25 s
    to recover on Zen 4): a second delivery now runs as one group of its own, a third alone."""
    batch_id, items = submit(state, 6)
    state.store.mark_running([i["job_id"] for i in items[:4]])  # their worker died once
    state.store.mark_running([i["job_id"] for i in items[:2]])  # these two: twice
    predict_jobs(state, items)
    assert calls() == (4, 6, 2)  # fresh 2, delivered-again 2, then 1 and 1 alone
    assert public_batch(state.store, batch_id)["counts"]["done"] == 6


def test_a_job_that_keeps_failing_alone_fails_as_poison(state, calls):
    batch_id, items = submit(state, 1)
    job_id = items[0]["job_id"]
    state.store.mark_running([job_id])
    state.store.mark_running([job_id])  # in a batch, then in the delivered-again group
    state.store.redis.hset(f"job:{job_id}", "solo_attempts", 2)  # it took the worker down twice, alone
    predict_jobs(state, items)
    job = public_batch(state.store, batch_id)["jobs"][0]
    assert job["status"] == "failed" and job["error"]["code"] == "poison"
    assert calls()[0] == 0  # the model never saw it again


def test_a_malformed_message_fails_its_job_only(state):
    batch_id, items = submit(state, 2)
    items[0]["pixels"] = "not base64!"
    predict_jobs(state, items)
    jobs = public_batch(state.store, batch_id)["jobs"]
    assert [j["status"] for j in jobs] == ["failed", "done"]
    assert jobs[0]["error"]["code"] == "bad_task"


def test_an_image_that_breaks_the_model_fails_alone(state):
    real = state.predictor

    class Fussy:
        """Wraps the real predictor; refuses any batch that holds an all-black image."""

        info = real.info

        def predict_proba(self, images):
            if (images.reshape(len(images), -1).max(1) == 0).any():
                raise RuntimeError("model blew up")
            return real.predict_proba(images)

    state.predictor = Fussy()
    batch_id, items = submit(state, 3)
    items[1]["pixels"] = encode_pixels(np.zeros((32, 32, 3), np.uint8))
    predict_jobs(state, items)
    jobs = public_batch(state.store, batch_id)["jobs"]
    assert [j["status"] for j in jobs] == ["done", "failed", "done"]
    assert jobs[1]["error"]["code"] == "prediction_failed"


def test_unknown_or_expired_jobs_are_skipped(state, calls):
    _, items = submit(state, 1)
    items[0]["job_id"] = "0" * 32
    predict_jobs(state, items)
    assert calls()[0] == 0


def test_with_the_result_cache_on_the_same_image_reaches_the_model_once(state, calls):
    _, first = submit(state, 2)
    predict_jobs(state, first)
    _, again = submit(state, 2)  # the same two images (submit's generator is seeded by n)
    predict_jobs(state, again)
    assert calls()[:2] == (1, 2)  # the second batch was answered from the cache


def test_with_the_result_cache_off_every_image_reaches_the_model(state, calls):
    state.cache = None  # RESULT_CACHE=0
    for _ in range(2):
        _, items = submit(state, 2)
        predict_jobs(state, items)
    assert calls()[:2] == (2, 4)


def test_the_cache_is_per_model_configuration(state, calls, tiny_model_dir):
    """A cached answer belongs to the model version, TTA level, precision and runtime that made it."""
    _, items = submit(state, 2)
    predict_jobs(state, items)
    other = load_predictor(tiny_model_dir, tta_level=1)
    assert other.cache_namespace != state.predictor.cache_namespace
    state.predictor, state.cache = other, state.store.result_cache(other.cache_namespace)
    _, again = submit(state, 2)
    predict_jobs(state, again)
    assert calls()[:2] == (2, 4)  # not answered from the other configuration's cache


@pytest.mark.parametrize("threshold", [0.0, 0.99])
def test_an_answer_is_uncertain_exactly_when_its_top_probability_is_below_the_model_threshold(
    state, monkeypatch, threshold
):
    import dataclasses

    monkeypatch.setattr(state.predictor, "info", dataclasses.replace(state.predictor.info, uncertain_below=threshold))
    batch_id, items = submit(state, 4)
    predict_jobs(state, items)
    jobs = public_batch(state.store, batch_id)["jobs"]
    tops = [j["predictions"][0]["probability"] for j in jobs]
    assert [j["uncertain"] for j in jobs] == [t < threshold for t in tops]
    assert all(t < 0.99 for t in tops)  # the untrained tiny model: so 0.99 flags every answer


def test_every_setting_that_changes_an_answer_changes_the_cache_namespace(predictor):
    """Model version, views (TTA level or cascade), precision and runtime: a cached answer of
    one configuration must never be served for another."""
    import dataclasses

    from shared.predictor import Cascade, Predictor

    info = predictor.info
    base = dict(info=info, net=None, runtime="keras", precision="float32", tta_level=2, cascade=None)
    variants = [
        dict(info=dataclasses.replace(info, version=info.version + "x")),
        dict(tta_level=1),
        dict(precision="bfloat16"),
        dict(runtime="openvino"),
        dict(cascade=Cascade(0, 1, 0.8)),
        dict(cascade=Cascade(0, 1, 0.7)),
    ]
    names = [Predictor(**(base | v)).cache_namespace for v in [{}, *variants]]
    assert len(set(names)) == len(names), names
