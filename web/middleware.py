"""What every response gets: request metrics, and security headers."""

from __future__ import annotations

import time

from flask import Flask, g, request

from shared.metrics import HTTP_LATENCY, HTTP_REQUESTS

# Pages load only our own scripts and styles (no inline script), and cannot be framed.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def register_middleware(app: Flask) -> None:
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
