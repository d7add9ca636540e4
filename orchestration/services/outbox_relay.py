"""The outbox relay: messages the broker has not accepted yet (every API and worker process)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from orchestration.services.base import LoopService
from store import outbox
from store.outbox import Send


class OutboxRelay(LoopService):
    """Every ``interval`` seconds, one :func:`store.outbox.relay` pass over ``queues``: drop the
    rows of the ids this process sent inline (``sent_job_ids``), send the rows older than
    ``resend_after_s()`` and drop them once the broker took them."""

    name = "trainyard-outbox-relay"

    def __init__(self, send: Send, queues: Sequence[str], *, interval: float,
                 sent_job_ids: Callable[[], list[str]] | None = None,
                 resend_after_s: Callable[[], float] | None = None) -> None:
        super().__init__()
        self.send, self.queues, self.interval = send, queues, interval
        self.sent_job_ids = sent_job_ids or (lambda: [])
        self.resend_after_s = resend_after_s or (lambda: outbox.RESEND_AFTER_S)

    def run_once(self) -> int:
        return outbox.relay(self.send, queues=self.queues, resend_after_s=self.resend_after_s(),
                            sent_job_ids=self.sent_job_ids())
