"""The JSON API, version 1."""

from __future__ import annotations

import ipaddress
import re
import secrets
import threading
import time
from contextlib import contextmanager

from flask import Blueprint, current_app, jsonify, request, url_for
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.metrics import QueueDepth, scrape_registry
from shared.schemas import (
    FINAL_STATUSES,
    ID_PATTERN,
    Batch,
    BatchCreated,
    Health,
    Job,
    JobCreated,
    JobSummary,
    Links,
    Readiness,
)
from web import idempotency
from web.errors import ApiError
from web.extensions import submissions
from web.openapi import SUBMIT_ERRORS, build_openapi, documented
from web.submit import create_submission, parse_submission, prepare_submission, store_submission

api = Blueprint("api", __name__)
_ID = re.compile(ID_PATTERN)
READY_WINDOW_FACTOR = 3  # a worker is alive if it sent a heartbeat in the last 3 periods
BUSY_RETRY_AFTER = "2"  # a long-poll past the cap is answered at once: poll again after this


class Slots:
    """How many long-polls this process holds at once, at most `limit`. The web tier holds a
    waiting poll in a greenlet (gunicorn's gevent worker), but each still holds a Redis
    connection: past the cap a poll is answered at once with the current state and
    Retry-After, never queued behind the others."""

    def __init__(self, limit: int):
        self.limit, self.used, self._lock = limit, 0, threading.Lock()

    @contextmanager
    def hold(self):
        with self._lock:
            granted = self.used < self.limit
            self.used += granted
        try:
            yield granted
        finally:
            if granted:
                with self._lock:
                    self.used -= 1


def _loopback() -> bool:
    return ipaddress.ip_address(request.remote_addr or "0.0.0.0").is_loopback


def _ext(name):
    return current_app.extensions[name]


def _batch_links(batch_id: str) -> Links:
    return Links(self=url_for("api.get_batch", batch_id=batch_id), page=url_for("pages.batch_page", batch_id=batch_id))


def _json(model, status: int = 200, headers: dict | None = None):
    return current_app.response_class(model.model_dump_json(), status, headers, mimetype="application/json")


@api.post("/api/v1/batches")
@documented(
    "createBatch",
    "Submit up to {settings.max_batch_items} images and/or URLs",
    {"202": ("Accepted", BatchCreated)},
    errors=SUBMIT_ERRORS,
    submits=True,
    description="Items that are not usable become failed jobs with their reason; a "
    "request in which no item is usable is answered with that error.",
)
@submissions
def post_batch():
    def answer(batch_id: str, records: list[dict]):
        body = BatchCreated(
            batch_id=batch_id, jobs=[JobSummary.from_record(r) for r in records], links=_batch_links(batch_id)
        )
        return body.model_dump(mode="json"), body.links.self

    return _submitted(parse_submission(request, _ext("settings"), single=False), answer)


@api.post("/api/v1/jobs")
@documented(
    "createJob",
    "Submit exactly one image or URL",
    {"202": ("Accepted", JobCreated)},
    errors=SUBMIT_ERRORS,
    submits=True,
)
@submissions
def post_job():
    def answer(batch_id: str, records: list[dict]):
        [record] = records
        links = Links(
            self=url_for("api.get_job", job_id=record["job_id"]), batch=url_for("api.get_batch", batch_id=batch_id)
        )
        return JobCreated.from_record(record, links=links).model_dump(mode="json"), links.self

    return _submitted(parse_submission(request, _ext("settings"), single=True), answer)


def _submitted(sub, answer):
    """A 202 with the answer; with an Idempotency-Key, the batch that key created first (as it
    is now: a replay shows the jobs' current statuses)."""
    key = request.headers.get(idempotency.HEADER)
    if key is None:
        body, location = answer(*create_submission(sub))
        return jsonify(body), 202, {"Location": location}

    def replay(batch_id: str):
        found = _ext("jobs").get_batch(batch_id)
        if found is None:  # the claim and its batch expire together; a race with expiry only
            raise ApiError(404, "batch_not_found", f"The batch of this {idempotency.HEADER} has expired.")
        return answer(batch_id, found[1])

    body, location, replayed = idempotency.answer_once(
        key,
        sub.fingerprint(request.path),
        lambda: prepare_submission(sub),
        lambda prepared, claim: answer(*store_submission(sub, prepared, claim)),
        replay,
    )
    return jsonify(body), 202, {"Location": location, idempotency.REPLAY_HEADER: "true" if replayed else "false"}


@api.post("/api/v1/batches/<batch_id>/cancel")
@documented(
    "cancelBatch",
    "Cancel every unfinished job of a batch (finished ones keep their results; again is a no-op)",
    {"200": ("The batch, cancelled", Batch)},
    errors=("404", "503"),
)
def cancel_batch(batch_id: str):
    """Every unfinished job of the batch is cancelled (finished ones keep their results)."""
    store = _ext("jobs")
    ids = store.batch_job_ids(batch_id) if _ID.match(batch_id) else []
    if not ids:
        raise ApiError(
            404, "batch_not_found", f"No batch {batch_id!r} (unknown, or expired after the retention period)."
        )
    store.cancel(ids)
    record, jobs = store.get_batch(batch_id)
    return _json(Batch.from_record(record, jobs, _batch_links(batch_id)))


@api.post("/api/v1/jobs/<job_id>/cancel")
@documented("cancelJob", "Cancel a job if it is not finished", {"200": ("The job", Job)}, errors=("404", "503"))
def cancel_job(job_id: str):
    store = _ext("jobs")
    if not _ID.match(job_id) or store.get_job(job_id) is None:
        raise ApiError(404, "job_not_found", f"No job {job_id!r} (unknown, or expired after the retention period).")
    store.cancel([job_id])
    return _json(Job.from_record(store.get_job(job_id)))


@api.get("/api/v1/jobs/<job_id>")
@documented(
    "getJob", "A job's status and predictions", {"200": ("The job", Job)}, errors=("400", "404", "503"), query=("wait",)
)
def get_job(job_id: str):
    store = _ext("jobs")
    record = store.get_job(job_id) if _ID.match(job_id) else None
    if record is None:
        raise ApiError(404, "job_not_found", f"No job {job_id!r} (unknown, or expired after the retention period).")
    wait = _float_arg("wait", 0.0, 0.0, _ext("settings").long_poll_max_seconds)
    headers = {}
    if wait > 0 and record["status"] not in FINAL_STATUSES:
        with _ext("long_polls").hold() as granted:
            if granted:
                record = _wait_for_job(store, record, time.monotonic() + wait)
            else:
                headers["Retry-After"] = BUSY_RETRY_AFTER
    return _json(Job.from_record(record), headers=headers)


def _wait_for_job(store, record: dict, deadline: float) -> dict:
    """Long-poll: answer as soon as the job finishes (its batch's channel says when it changes).

    The batch's version is read before the job: read after, it already counted a job that
    finished in between, and the poll waited out its whole timeout (the benchmark's p99 was
    10 s, its wait=10, for one request in a hundred)."""
    while (left := deadline - time.monotonic()) > 0:
        version = store.batch_version(record["batch_id"])
        record = store.get_job(record["job_id"]) or record
        if version is None or record["status"] in FINAL_STATUSES:
            break
        store.wait_for_change(record["batch_id"], version, left)
    return record


@api.get("/api/v1/batches/<batch_id>")
@documented(
    "getBatch",
    "A batch: counts per status and every job",
    {"200": ("The batch", Batch)},
    errors=("400", "404", "503"),
    query=("wait", "since"),
)
def get_batch(batch_id: str):
    store, settings = _ext("jobs"), _ext("settings")
    if not _ID.match(batch_id):
        raise ApiError(404, "batch_not_found", f"No batch {batch_id!r}.")
    wait = _float_arg("wait", 0.0, 0.0, settings.long_poll_max_seconds)
    since = _int_arg("since")
    headers = {}
    if wait > 0:
        version = store.batch_version(batch_id)
        if version is not None and not store.batch_finished(batch_id):
            with _ext("long_polls").hold() as granted:
                if granted:
                    store.wait_for_change(batch_id, version if since is None else since, wait)
                else:
                    headers["Retry-After"] = BUSY_RETRY_AFTER
    found = store.get_batch(batch_id, since)
    if found is None:
        raise ApiError(
            404, "batch_not_found", f"No batch {batch_id!r} (unknown, or expired after the retention period)."
        )
    record, jobs = found
    return _json(Batch.from_record(record, jobs, _batch_links(batch_id)), headers=headers)


def _int_arg(name: str) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be a whole number (a batch version).") from None


def _float_arg(name: str, default: float, low: float, high: float) -> float:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be a number of seconds.") from None
    if value != value or value < low:
        raise ApiError(400, "invalid_parameter", f"{name} must be at least {low}.")
    return min(value, high)


@api.get("/api/v1/openapi.json")
def openapi():
    if "openapi" not in current_app.extensions:
        current_app.extensions["openapi"] = build_openapi(_ext("settings"), current_app)
    return jsonify(current_app.extensions["openapi"])


@api.get("/metrics")
def metrics():
    token = _ext("settings").metrics_token
    if not (
        secrets.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}") if token else _loopback()
    ):
        raise ApiError(
            403,
            "forbidden",
            "/metrics needs METRICS_TOKEN as a bearer token (or, without one, a client on this machine).",
        )
    if "metrics_registry" not in current_app.extensions:
        current_app.extensions["metrics_registry"] = scrape_registry(
            _ext("settings").prometheus_multiproc_dir, QueueDepth(_ext("jobs"))
        )
    return generate_latest(current_app.extensions["metrics_registry"]), 200, {"Content-Type": CONTENT_TYPE_LATEST}


@api.get("/healthz")
@documented("health", "The process is up", {"200": ("Up", Health)})
def healthz():
    return jsonify(status="ok")


@api.get("/readyz")
@documented(
    "ready",
    "Redis answers and a worker with the model is alive",
    {"200": ("Ready", Readiness), "503": ("Not ready", Readiness)},
)
def readyz():
    store, settings = _ext("jobs"), _ext("settings")
    checks = {}
    try:
        store.ping()
        checks["redis"] = "ok"
        checks["workers"] = len(
            store.live_workers(time.time() - READY_WINDOW_FACTOR * settings.worker_heartbeat_seconds)
        )
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        checks["redis"] = f"unavailable: {type(exc).__name__}"
        checks["workers"] = 0
    ready = checks["redis"] == "ok" and checks["workers"] > 0
    return jsonify(status="ready" if ready else "not_ready", checks=checks), 200 if ready else 503
