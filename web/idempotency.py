"""Idempotency keys: a submission sent again with the same `Idempotency-Key` (a client retrying
after a lost answer) gets the batch the first one created instead of a second batch.

A key belongs to one client (the rate limiter's notion of one) and lasts the retention period.
The slow part of a request (decoding its images) holds no claim. Then the request claims the key
atomically in Redis (two at once: one batch), and the batch is written together with the key's
answer, the batch id, in one transaction: whatever fails after that (queueing, answering, the
process itself), a retry finds the batch. The same key with another body is a 422; while the
first is still creating its batch, a second waits for it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import TypeVar

from flask import current_app
from flask_limiter.util import get_remote_address

from shared.jobstore import Claim
from web.errors import ApiError

HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
KEY_MAX_LENGTH = 200
KEY = re.compile(rf"^[\x21-\x7e]{{1,{KEY_MAX_LENGTH}}}$")  # printable ASCII, no spaces
# A claim covers only writing the batch (one Redis transaction, bounded by the Redis client's
# timeouts and one retry), not reading or decoding the request: a claim whose request died
# before its batch was written is free again after this.
CLAIM_SECONDS = 30
WAIT_SECONDS = 10  # a second request waits this long for the first one's batch

Prepared = TypeVar("Prepared")


def answer_once(
    key: str,
    fingerprint: str,
    prepare: Callable[[], Prepared],
    create: Callable[[Prepared, Claim], tuple[dict, str]],
    replay: Callable[[str], tuple[dict, str]],
) -> tuple[dict, str, bool]:
    """(body, location, replayed). prepare() does the work that needs no claim; create() writes
    the batch with the claim (JobStore.create_batch answers it) and returns the body and Location
    of its 202; replay(batch_id) answers a retry with the batch as it is now."""
    if not KEY.match(key):
        message = f"{HEADER} must be 1 to {KEY_MAX_LENGTH} printable characters, no spaces."
        raise ApiError(400, "invalid_idempotency_key", message)
    store = current_app.extensions["jobs"]
    claim = Claim(hashlib.sha256(f"{get_remote_address()}\0{key}".encode()).hexdigest(), fingerprint)
    found = store.claimed(claim.key)
    if found is not None and (batch_id := _settled(found, fingerprint)):
        return *replay(batch_id), True
    prepared = prepare()
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = store.claim(claim, CLAIM_SECONDS)
        if found is None:  # ours (the first request, or the first one failed and let go)
            try:
                body, location = create(prepared, claim)
            except BaseException:
                store.release_claim(claim)  # create() stored nothing: a retry may try again
                raise
            return body, location, False
        if batch_id := _settled(found, fingerprint):
            return *replay(batch_id), True
        if time.monotonic() > deadline:
            raise ApiError(
                409,
                "idempotency_key_in_use",
                f"A request with this {HEADER} is still being answered; send it again shortly.",
            )
        time.sleep(0.05)


def _settled(found: dict, fingerprint: str) -> str:
    """The batch a claim created ("" while its request is still creating it)."""
    if found["fp"] != fingerprint:
        message = f"This {HEADER} came with another request; use a new key for a new submission."
        raise ApiError(422, "idempotency_key_reused", message)
    return found.get("batch_id", "")
