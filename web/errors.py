"""Every error the web tier answers: HTTP status + a stable code + a message, as JSON."""

from __future__ import annotations

import logging
import time

import redis
from flask import Flask, jsonify, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from web.extensions import limiter

log = logging.getLogger(__name__)

# Codes for errors Werkzeug raises before our code runs.
_HTTP_CODES = {
    403: "forbidden",
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


class ApiError(Exception):
    """An error the client should see: HTTP status + stable code + human message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def unavailable(what: str = "nothing was stored") -> ApiError:
    """Redis (the job queue) is away: the client may try again shortly."""
    return ApiError(
        503,
        "service_unavailable",
        f"The job queue is unavailable right now; {what}. Try again shortly.",
        {"Retry-After": "5"},
    )


def error_response(status: int, code: str, message: str, headers: dict | None = None):
    resp = jsonify(error={"code": code, "message": message})
    resp.status_code = status
    resp.headers.update(headers or {})
    return resp


def _too_large_message(app: Flask) -> str:
    """Which limit the request hit: the whole body, or (Werkzeug raises the same 413 for them)
    one form field or the number of form parts."""
    limit = app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None or request.content_length > limit:
        return f"The request is larger than {limit // (1024 * 1024)} MB; send fewer or smaller images per request."
    return (
        f"A form field is larger than {app.config['MAX_FORM_MEMORY_SIZE'] // 1024} KB, or the form has more than "
        f"{app.config['MAX_FORM_PARTS']} parts; send at most {app.extensions['settings'].max_batch_items} images "
        "or URLs per request."
    )


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return error_response(e.status, e.code, e.message, e.headers)

    @app.errorhandler(CSRFError)
    def _csrf_error(e):
        return error_response(
            400, "csrf_failed", "The form expired or did not come from this site; reload the page and submit again."
        )

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        message, headers = e.description or e.name, {}
        if e.code == 413:
            message = _too_large_message(app)
        if e.code == 429:
            limit = limiter.current_limit
            headers["Retry-After"] = str(max(1, int(limit.reset_at - time.time())) if limit else 60)
            message = f"Too many submissions from this client ({message}); try again in {headers['Retry-After']} s."
        return error_response(e.code, _HTTP_CODES.get(e.code, "http_error"), message, headers)

    @app.errorhandler(TimeoutError)
    def _client_too_slow(e):  # a read of the body waited longer than the worker's read deadline
        return error_response(408, "request_timeout", "The request arrived too slowly; send it again.")

    @app.errorhandler(redis.RedisError)
    def _redis_down(e):
        log.warning("redis unavailable: %s", e)
        err = unavailable()
        return error_response(err.status, err.code, err.message, err.headers)

    @app.errorhandler(Exception)
    def _unexpected(e):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "Something went wrong on our side.")
