"""Webhook signatures, for receivers (and the server, which signs with :func:`sign`).

Every delivery is a POST of a JSON event ``{"id", "type", "created_at", "data"}`` with headers

* ``Trainyard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the secret>``
  (as Stripe does: the timestamp is signed too, so an old delivery cannot be replayed later);
* ``Trainyard-Event-Id``: the event's id, the same on every retry (de-duplicate by it: delivery
  is at least once);
* ``Trainyard-Event``: the event type.

A receiver checks it with :func:`verify` on the raw body bytes, before parsing them.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Trainyard-Signature"
EVENT_ID_HEADER = "Trainyard-Event-Id"
EVENT_HEADER = "Trainyard-Event"
#: a signature older (or newer) than this is refused by :func:`verify`
TOLERANCE_S = 300


class SignatureError(ValueError):
    """The signature header is missing, malformed, stale, or does not match the body."""


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Trainyard-Signature`` header value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_mac(secret, t, body)}"


def verify(secret: str, body: bytes, header: str | None, *, tolerance_s: float = TOLERANCE_S,
           now: float | None = None) -> int:
    """Check a delivery's signature; returns its timestamp, or raises :class:`SignatureError`."""
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        k, _, v = item.strip().partition("=")
        parts.setdefault(k, []).append(v)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: {header!r}") from None
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        raise SignatureError(f"the signature's timestamp {t} is more than {tolerance_s} s away from now")
    expected = _mac(secret, t, body)
    if not any(hmac.compare_digest(expected, v) for v in parts.get("v1", ())):
        raise SignatureError("the signature does not match the body")
    return t
