import pytest

from web.extensions import limiter


@pytest.fixture(autouse=True)
def _limiter_counts_in_redis_again():
    """The limiter is one object for every app a process creates, and Flask-Limiter 4.1's
    init_app does not clear its "storage dead" flag: after a test whose Redis was down, the next
    app counted in memory until a recovery check moved it back to Redis mid-test, and a client's
    third submission in a minute passed (test_submissions_are_rate_limited..., 1 run in 3)."""
    limiter._storage_dead = False
    yield
