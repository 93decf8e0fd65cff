"""The Flask app factory of the web tier. No TensorFlow here: it starts in about a second."""

from __future__ import annotations

import logging
import secrets

import redis
from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from shared.fetch import MAX_URL_LENGTH
from shared.images import DecodeBudget
from shared.jobstore import JobStore
from shared.logs import setup_logging
from shared.queue import celery_init_app, enqueue_webhooks
from shared.settings import Settings
from shared.storage import ImageStore
from web.api import Slots, api
from web.errors import register_error_handlers
from web.extensions import csrf, limiter
from web.forms import TolerantRequest
from web.middleware import register_middleware
from web.pages import pages

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    setup_logging("web", settings.log_json)
    store = JobStore.from_url(settings.redis_url, settings.retention_seconds)
    app = Flask(__name__)
    app.request_class = TolerantRequest
    app.config.update(
        SECRET_KEY=settings.secret_key or _shared_secret_key(store),
        MAX_CONTENT_LENGTH=settings.max_request_bytes,  # 413 before the body is read
        # Text fields are held in memory: room for a whole batch of the longest URLs, one per line.
        MAX_FORM_MEMORY_SIZE=settings.max_batch_items * (MAX_URL_LENGTH + 2) + 64 * 1024,
        MAX_FORM_PARTS=settings.max_batch_items * 2 + 100,
        SESSION_COOKIE_SAMESITE="Lax",  # the form's CSRF token lives in the session cookie
        DEBUG=settings.debug,
        RATELIMIT_STORAGE_URI=settings.redis_url,
        RATELIMIT_STORAGE_OPTIONS={"socket_connect_timeout": 2, "socket_timeout": 5},
    )
    app.extensions.update(
        settings=settings,
        jobs=store,
        images=ImageStore(settings.storage_dir),
        celery=celery_init_app(settings),
        decode_budget=DecodeBudget(settings.decode_budget_bytes),
        long_polls=Slots(settings.long_poll_max_waiters),
    )
    if settings.trusted_proxies:
        # Behind reverse proxies (docker-compose: nginx) the client is the address the nearest
        # one put in X-Forwarded-For; per-client rate limits would otherwise count all clients as one.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
    # A cancel that finishes a batch makes its webhook due (workers queue it when they finish one).
    store.on_webhooks_due = lambda batch_ids: _queue_webhooks(app, batch_ids)
    limiter.init_app(app)
    csrf.init_app(app)
    csrf.exempt(api)
    app.register_blueprint(api)
    app.register_blueprint(pages)
    register_middleware(app)
    register_error_handlers(app)
    return app


def _queue_webhooks(app: Flask, batch_ids: list[str]) -> None:
    try:
        enqueue_webhooks(app.extensions["celery"], batch_ids)
    except Exception as exc:  # noqa: BLE001 - the workers' janitor queues overdue webhooks again
        log.warning("could not queue webhooks %s: %s", batch_ids, exc)


def _shared_secret_key(store: JobStore) -> str:
    """Without SECRET_KEY every web process must still sign with the same key: one kept in Redis."""
    try:
        return store.shared_secret_key()
    except redis.RedisError:
        log.warning("no SECRET_KEY and Redis unavailable: using a per-process key")
        return secrets.token_hex(32)
