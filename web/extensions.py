"""Flask extensions, created once and bound to each app in create_app (the usual Flask pattern)."""

from flask import current_app
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFProtect

# Per-client limits on submissions, counted in Redis so every web process shares them.
# With Redis down, the limiter logs one warning and counts in this process's memory until Redis
# answers again (it re-checks with backoff); the request itself gets the job store's real 503.
# (swallow_errors alone logged a full traceback for every request during an outage.)
limiter = Limiter(get_remote_address, headers_enabled=True, swallow_errors=True, in_memory_fallback_enabled=True)


def submission_limit() -> str:
    return current_app.extensions["settings"].rate_limit


# CSRF tokens on the HTML form. The JSON API stays token-free for scripts (it is exempt): it
# has no cookies or sessions for a forged cross-site request to ride on.
csrf = CSRFProtect()
