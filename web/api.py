"""The JSON API, version 1."""
from __future__ import annotations

import re
import time

from flask import Blueprint, current_app, jsonify, request, url_for

from shared.jobs import FINAL
from web import ApiError
from web.extensions import limiter, submission_limit
from web.submit import create_submission, parse_submission

api = Blueprint("api", __name__)
_ID = re.compile(r"^[0-9a-f]{32}$")
READY_WINDOW_FACTOR = 3  # a worker is alive if it sent a heartbeat in the last 3 periods


def _ext(name):
    return current_app.extensions[name]


def _links(batch_id: str) -> dict:
    return {"self": url_for("api.get_batch", batch_id=batch_id),
            "page": url_for("pages.batch_page", batch_id=batch_id)}


@api.post("/api/v1/batches")
@limiter.limit(submission_limit)
def post_batch():
    items, top_k = parse_submission(request, _ext("settings"), single=False)
    batch_id, jobs = create_submission(items, top_k)
    body = {"batch_id": batch_id, "jobs": jobs, "links": _links(batch_id)}
    return jsonify(body), 202, {"Location": body["links"]["self"]}


@api.post("/api/v1/jobs")
@limiter.limit(submission_limit)
def post_job():
    items, top_k = parse_submission(request, _ext("settings"), single=True)
    batch_id, jobs = create_submission(items, top_k)
    job = dict(jobs[0], links={"self": url_for("api.get_job", job_id=jobs[0]["job_id"]),
                               "batch": url_for("api.get_batch", batch_id=batch_id)})
    return jsonify(job), 202, {"Location": job["links"]["self"]}


@api.get("/api/v1/jobs/<job_id>")
def get_job(job_id: str):
    store = _ext("jobs")
    job = store.get_job(job_id) if _ID.match(job_id) else None
    if job is None:
        raise ApiError(404, "job_not_found", f"No job {job_id!r} (unknown, or expired after the "
                       "retention period).")
    wait = _float_arg("wait", 0.0, 0.0, _ext("settings").long_poll_max_seconds)
    deadline = time.monotonic() + wait
    # Long-poll: answer as soon as the job finishes (its batch's channel says when it changes).
    while job["status"] not in FINAL and (left := deadline - time.monotonic()) > 0:
        version = store.batch_version(job["batch_id"])
        if version is None:
            break
        store.wait_for_change(job["batch_id"], version, left)
        job = store.get_job(job_id) or job
    return jsonify(job)


@api.get("/api/v1/batches/<batch_id>")
def get_batch(batch_id: str):
    store, settings = _ext("jobs"), _ext("settings")
    if not _ID.match(batch_id):
        raise ApiError(404, "batch_not_found", f"No batch {batch_id!r}.")
    wait = _float_arg("wait", 0.0, 0.0, settings.long_poll_max_seconds)
    since = request.args.get("since", type=int)
    if wait > 0:
        version = store.batch_version(batch_id)
        if version is not None and not _finished(store, batch_id):
            store.wait_for_change(batch_id, version if since is None else since, wait)
    batch = store.get_batch(batch_id, since)
    if batch is None:
        raise ApiError(404, "batch_not_found", f"No batch {batch_id!r} (unknown, or expired after "
                       "the retention period).")
    batch["links"] = _links(batch_id)
    return jsonify(batch)


def _finished(store, batch_id: str) -> bool:
    counts = store.r.hmget(f"batch:{batch_id}", "total", "n_done", "n_failed")
    return None not in counts and int(counts[1]) + int(counts[2]) >= int(counts[0])


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
        from web.openapi import build
        current_app.extensions["openapi"] = build(_ext("settings"))
    return jsonify(current_app.extensions["openapi"])


@api.get("/metrics")
def metrics():
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    if "metrics_registry" not in current_app.extensions:
        from shared.metrics import QueueDepth, scrape_registry
        current_app.extensions["metrics_registry"] = scrape_registry(QueueDepth(_ext("jobs").r))
    return generate_latest(current_app.extensions["metrics_registry"]), 200, {"Content-Type": CONTENT_TYPE_LATEST}


@api.get("/healthz")
def healthz():
    return jsonify(status="ok")


@api.get("/readyz")
def readyz():
    store, settings = _ext("jobs"), _ext("settings")
    checks = {}
    try:
        store.ping()
        checks["redis"] = "ok"
        since = time.time() - READY_WINDOW_FACTOR * settings.worker_heartbeat_seconds
        workers = store.r.zrangebyscore("workers:heartbeat", since, "+inf")
        checks["workers"] = len(workers)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        checks["redis"] = f"unavailable: {type(exc).__name__}"
        checks["workers"] = 0
    ready = checks["redis"] == "ok" and checks["workers"] > 0
    return jsonify(status="ready" if ready else "not_ready", checks=checks), 200 if ready else 503
