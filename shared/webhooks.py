"""Completion webhooks: one signed POST of the batch summary when a batch is finished.

Signed as the Standard Webhooks specification says (www.standardwebhooks.com), so receivers can
use its libraries: `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`
("v1," + base64 of HMAC-SHA256 over "<id>.<timestamp>.<body>", keyed with WEBHOOK_SECRET; a
"whsec_" secret is base64, as the specification's are). The id is the same for every attempt
at one delivery, so a receiver can drop repeats. Delivery goes through shared.fetch: the same
address rules as image URLs, checked again, resolved and pinned at every attempt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from shared.fetch import UrlRefused, post

MAX_ATTEMPTS = 6
BACKOFF_SECONDS = (1, 2, 4, 8, 16)  # before attempts 2 to 6 (about half a minute in all)


class DeliveryFailed(Exception):
    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.message, self.retry = message, retry


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()).decode()


def deliver(url: str, body: bytes, msg_id: str, secret: str, **fetch_rules) -> None:
    """One attempt; raises DeliveryFailed (retry says whether another attempt may succeed)."""
    timestamp = int(time.time())
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, msg_id, timestamp, body),
    }
    try:
        status = post(url, body, headers, **fetch_rules)
    except UrlRefused as exc:  # refused by the address rules: permanent; could not connect: again
        raise DeliveryFailed(exc.message, retry=exc.code in ("fetch_failed", "fetch_timeout")) from None
    if 200 <= status < 300:
        return
    # 5xx and 429 may pass later; any other answer (4xx, a redirect) will not.
    raise DeliveryFailed(f"The receiver answered HTTP {status}.", retry=status >= 500 or status == 429)
