"""The preemptor: with ``TRAINYARD_PREEMPTION=1``, asks lower-priority running jobs to make room
for higher-priority queued ones of their project (the API process runs it)."""

from __future__ import annotations

import logging

from config.settings import Settings
from orchestration.services.base import LoopService
from store import scheduling
from store.db import session_scope

log = logging.getLogger("trainyard.scheduler")


class Preemptor(LoopService):
    """Every second (at most every ``preemption_grace_s``), mark the running jobs that queued jobs
    of higher priority displace (:func:`store.scheduling.request_preemptions`); their workers stop
    them at the next step and requeue them with their snapshot."""

    name = "trainyard-preemptor"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.interval = min(1.0, max(settings.preemption_grace_s, 0.2))

    def run_once(self) -> list[str]:
        with session_scope() as s:
            marked = scheduling.request_preemptions(s, self.settings.preemption_grace_s)
        for job_id in marked:
            log.info("job %s: preempted for a queued job of higher priority; it will be requeued", job_id)
        return marked
