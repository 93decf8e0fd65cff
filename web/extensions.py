"""Flask extensions, created once and bound to each app in create_app (the usual Flask pattern)."""

from flask import current_app
from flask_limiter import HeaderNames, Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFProtect

# Per-client limits on submissions, counted in Redis so every web process shares them.
# With Redis down, the limiter logs one warning and counts in this process's memory until Redis
# answers again (it re-checks with backoff); the request itself gets the job store's real 503.
# (swallow_errors alone logged a full traceback for every request during an outage.)
# Flask-Limiter sets Retry-After on every answer of a limited route (202 and 400 too): it is
# renamed here, and web/errors.py sets the real Retry-After on the 429 alone.
limiter = Limiter(
    get_remote_address,
    headers_enabled=True,
    swallow_errors=True,
    in_memory_fallback_enabled=True,
    header_name_mapping={HeaderNames.RETRY_AFTER: "X-RateLimit-Retry-After"},
)


def submission_limit() -> str:
    return current_app.extensions["settings"].rate_limit


# One budget per client for every way of submitting (the API's two routes and the HTML form):
# a client refused on one route was served afresh by another.
submissions = limiter.shared_limit(submission_limit, scope="submissions")

# CSRF tokens on the HTML form. The JSON API stays token-free for scripts (it is exempt): it
# has no cookies or sessions for a forged cross-site request to ride on.
csrf = CSRFProtect()
