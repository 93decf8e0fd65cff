"""Idempotency keys: a submission sent again with the same `Idempotency-Key` (a client retrying
after a lost answer) gets the original answer instead of a second batch.

A key belongs to one client (the rate limiter's notion of one) and lasts the retention period.
The first request claims it atomically in Redis (two at once: one batch); the same key with
another body is a 422; while the first is still being answered, a second waits for its answer.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

from flask import current_app
from flask_limiter.util import get_remote_address

from web.errors import ApiError

HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces, at most 200 characters
PENDING_SECONDS = 60  # a claim whose request died unanswered is free again after this
WAIT_SECONDS = 10  # a second request waits this long for the first one's answer


def answer_once(key: str, fingerprint: str, answer) -> tuple[dict, str, bool]:
    """(body, location, replayed): answer() runs for the first request with this key only; it
    returns the body and Location of a 202."""
    if not KEY.match(key):
        raise ApiError(400, "invalid_idempotency_key", f"{HEADER} must be 1 to 200 printable characters, no spaces.")
    store, ttl = current_app.extensions["jobs"], current_app.extensions["settings"].retention_seconds
    claim = hashlib.sha256(f"{get_remote_address()}\0{key}".encode()).hexdigest()
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = store.claim(claim, fingerprint, PENDING_SECONDS)
        if found is None:  # ours (the first request, or the first one failed and let go): answer it
            try:
                body, location = answer()
            except BaseException:
                store.drop_claim(claim)  # nothing was created: a retry may try again
                raise
            store.answer_claim(claim, fingerprint, json.dumps({"body": body, "location": location}), ttl)
            return body, location, False
        if found["fp"] != fingerprint:
            raise ApiError(
                422,
                "idempotency_key_reused",
                f"This {HEADER} came with another request; use a new key for a new submission.",
            )
        if found["answer"]:
            stored = json.loads(found["answer"])
            return stored["body"], stored["location"], True
        if time.monotonic() > deadline:
            raise ApiError(
                409,
                "idempotency_key_in_use",
                f"A request with this {HEADER} is still being answered; send it again shortly.",
            )
        time.sleep(0.05)
