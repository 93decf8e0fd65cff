"""The web tier: Flask app factory. No TensorFlow here: it starts in about a second."""
from __future__ import annotations

import logging
import secrets
import threading
import time

import redis
from flask import Flask, g, jsonify, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from shared.jobs import JobStore
from shared.logs import setup_logging
from shared.metrics import HTTP_LATENCY, HTTP_REQUESTS
from shared.queue import celery_init_app
from shared.settings import Settings
from shared.storage import ImageStore


class ApiError(Exception):
    """An error the client should see: HTTP status + stable code + human message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict | None = None):
    resp = jsonify(error={"code": code, "message": message})
    resp.status_code = status
    resp.headers.update(headers or {})
    return resp


# Codes for errors Werkzeug raises before our code runs.
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "request_too_large", 415: "unsupported_media_type", 429: "rate_limited"}


# Pages load only our own scripts and styles (no inline script), and cannot be framed.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")


def shared_secret_key(redis_url: str) -> str:
    """Without SECRET_KEY, every web process must still sign with the same key (a form
    rendered by one gunicorn worker is posted to another): keep one random key in Redis."""
    try:
        r = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
        r.set("web:secret-key", secrets.token_hex(32), nx=True)
        return r.get("web:secret-key").decode()
    except redis.RedisError:
        logging.getLogger("web").warning("no SECRET_KEY and Redis unavailable: using a per-process key")
        return secrets.token_hex(32)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    setup_logging("web", settings.log_json)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key or shared_secret_key(settings.redis_url),
        MAX_CONTENT_LENGTH=settings.max_request_bytes,  # 413 before the body is read
        MAX_FORM_MEMORY_SIZE=1024 * 1024,               # text fields (a URL list) in memory
        MAX_FORM_PARTS=settings.max_batch_items * 2 + 100,
        JSON_SORT_KEYS=False,
        DEBUG=settings.debug,
    )
    if settings.trusted_proxies:
        # Behind reverse proxies (docker-compose: nginx) the client is the address the nearest
        # one put in X-Forwarded-For; per-client rate limits would otherwise count all clients as one.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
    app.extensions["settings"] = settings
    app.extensions["jobs"] = JobStore.from_url(settings.redis_url, settings.retention_seconds)
    app.extensions["images"] = ImageStore(settings.storage_dir)
    app.extensions["celery"] = celery_init_app(settings)
    app.config["RATELIMIT_STORAGE_URI"] = settings.redis_url
    app.config["RATELIMIT_STORAGE_OPTIONS"] = {"socket_connect_timeout": 2, "socket_timeout": 5}
    from web.extensions import csrf, limiter
    limiter.init_app(app)
    csrf.init_app(app)

    from web.api import api
    from web.pages import pages
    app.register_blueprint(api)
    app.register_blueprint(pages)
    csrf.exempt(api)

    @app.before_request
    def _expire_stored_images():
        # Job records expire in Redis by themselves; stored images are swept here, at most
        # hourly, by whichever web process gets the Redis lock.
        now = time.monotonic()
        if now < app.extensions.get("next_image_sweep", 0):
            return
        app.extensions["next_image_sweep"] = now + 3600
        try:
            if app.extensions["jobs"].r.set("images:sweep-lock", "1", nx=True, ex=3600):
                threading.Thread(target=app.extensions["images"].sweep,
                                 args=(settings.retention_seconds,), daemon=True).start()
        except redis.RedisError:
            app.extensions["next_image_sweep"] = 0  # try again on a later request

    @app.before_request
    def _start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def _count_request(resp):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        HTTP_REQUESTS.labels(route, request.method, str(resp.status_code)).inc()
        if "started" in g:
            HTTP_LATENCY.labels(route).observe(time.perf_counter() - g.started)
        return resp

    @app.after_request
    def _security_headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        if resp.mimetype == "text/html":
            resp.headers.setdefault("Content-Security-Policy", CSP)
            resp.headers.setdefault("X-Frame-Options", "DENY")
        return resp

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return error_response(e.status, e.code, e.message, e.headers)

    @app.errorhandler(CSRFError)
    def _csrf_error(e):
        return error_response(400, "csrf_failed", "The form expired or did not come from this site; "
                              "reload the page and submit again.")

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        code = _HTTP_CODES.get(e.code, "http_error")
        message = e.description or e.name
        if e.code == 413:
            message = (f"The request is larger than {settings.max_request_bytes // (1024 * 1024)} MB; "
                       "send fewer or smaller images per request.")
        return error_response(e.code, code, message)

    @app.errorhandler(redis.RedisError)
    def _redis_down(e):
        logging.getLogger("web").warning("redis unavailable: %s", e)
        return error_response(503, "service_unavailable", "The job queue is unavailable right now; "
                              "nothing was stored. Try again shortly.", {"Retry-After": "5"})

    @app.errorhandler(Exception)
    def _unexpected(e):
        logging.getLogger("web").exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "Something went wrong on our side.")

    return app
