"""The webhook delivery loop: a thread of each API process that sends what :mod:`store.webhooks`
says is owed.

Each pass claims due deliveries (a lease: rows another process claimed are skipped, and rows of a
process that died mid-send come due again when their lease ends), POSTs them concurrently with
the event as a JSON body signed as :mod:`client.webhooks` describes, and records every outcome.
A 2xx is delivered; anything else (a refused connection, a timeout, a 5xx, a 4xx) is retried with
exponential backoff until ``webhook_max_age_s`` after the event. Nothing here decides what is
owed: that is written with the state change itself.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import httpx

from client.webhooks import EVENT_HEADER, EVENT_ID_HEADER, SIGNATURE_HEADER, sign
from config.settings import Settings
from orchestration.services.base import LoopService
from store import webhooks
from store.db import session_scope

log = logging.getLogger("trainyard.webhooks")

#: deliveries claimed per pass
BATCH = 200


def event_body(due: webhooks.Due) -> bytes:
    """The JSON body of a delivery: the same bytes on every try."""
    from store.repo import as_utc

    return json.dumps(
        {"id": due.event_id, "type": due.event, "created_at": as_utc(due.created_at).isoformat(), "data": due.data},
        separators=(",", ":"), sort_keys=True, allow_nan=False,
    ).encode()


class WebhookDeliverer(LoopService):
    """Runs :meth:`run_once` every ``webhook_poll_s`` (and at once again while there is more due)."""

    def __init__(self, settings: Settings, *, name: str = "trainyard-webhooks") -> None:
        super().__init__()
        self.settings = settings
        self.name = name
        self.interval = settings.webhook_poll_s
        self._http: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None

    def _send(self, due: webhooks.Due) -> webhooks.Outcome:
        body = event_body(due)
        headers = {
            "Content-Type": "application/json", "User-Agent": "Trainyard-Webhooks/1",
            SIGNATURE_HEADER: sign(due.secret, body), EVENT_ID_HEADER: due.event_id, EVENT_HEADER: due.event,
        }
        assert self._http is not None
        try:
            r = self._http.post(due.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return webhooks.Outcome(due.id, False, None, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bad URL and the like: recorded, retried
            return webhooks.Outcome(due.id, False, None, f"{type(exc).__name__}: {exc}")
        ok = 200 <= r.status_code < 300
        return webhooks.Outcome(due.id, ok, r.status_code, None if ok else f"HTTP {r.status_code}: {r.text[:500]}")

    def run_once(self) -> int:
        """One pass: claim, send, record. Returns how many deliveries were tried."""
        from store.repo import utcnow

        s = self.settings
        with session_scope(write=False) as session:
            if not webhooks.any_due(session, utcnow()):
                return 0
        with session_scope() as session:
            due = webhooks.claim_due(session, utcnow(), limit=BATCH, lease_s=max(s.webhook_lease_s, 2 * s.webhook_timeout_s))
        if not due:
            return 0
        if self._http is None:
            self._http = httpx.Client(timeout=s.webhook_timeout_s, follow_redirects=False)
            self._pool = ThreadPoolExecutor(max(1, s.webhook_concurrency), thread_name_prefix=self.name)
        assert self._pool is not None
        outcomes = list(self._pool.map(self._send, due))
        with session_scope() as session:
            webhooks.record_outcomes(session, due, outcomes, utcnow(), retry_base_s=s.webhook_retry_base_s,
                                     retry_max_s=s.webhook_retry_max_s, max_age_s=s.webhook_max_age_s)
        failed = sum(not o.ok for o in outcomes)
        if failed:
            log.info("webhooks: %d of %d deliveries failed (retried later)", failed, len(outcomes))
        return len(due)

    def more(self, result: int) -> bool:
        return result >= BATCH  # a full batch: more may be due

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._http is not None:
            self._http.close()
            self._http = None
