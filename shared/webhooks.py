"""Signed webhooks: the signature auth puts on every delivery, and the check a receiver makes.

A delivery is a POST whose body is JSON, with the header

    x-inferswarm-signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}." + raw body)>

(Stripe's scheme): the key is the endpoint's whole secret as text (`whsec_...`,
UTF-8), the message the timestamp, a dot and the body's bytes exactly as
received. The timestamp is signed with the body so a recorded delivery cannot
be replayed later than `tolerance` seconds; the receiver should also drop an
event id (`x-inferswarm-event-id`) it has already handled, since a delivery may
be retried. Several `v1=` entries may appear (none today; kept for rotations).

`verify_signature` depends on the standard library only: a customer may copy it.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["SIGNATURE_HEADER", "EVENT_ID_HEADER", "sign", "signature_header", "verify_signature"]

SIGNATURE_HEADER = "x-inferswarm-signature"
EVENT_ID_HEADER = "x-inferswarm-event-id"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of `f"{timestamp}."` + `body`, keyed by `secret`."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The value of `x-inferswarm-signature` for `body`, signed now (or at `timestamp`)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={sign(secret, t, body)}"


def verify_signature(secret: str, header: str, body: bytes, tolerance: int = 300,
                     now: float | None = None) -> bool:
    """Whether `header` signs `body` (the raw bytes received) with `secret`, at a time within
    `tolerance` seconds of `now`. Compared in constant time; anything malformed is False."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected.encode(), c.encode()) for c in candidates)
