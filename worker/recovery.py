"""Recovering jobs whose worker was lost (killed without a chance to requeue them), and relaying
outbox messages: every worker runs :class:`store.leases.Maintenance` in a daemon thread.

Why a reconciler and not the broker: with ``task_acks_late`` and ``task_reject_on_worker_lost``
off, Celery acknowledges the message of a prefork child that was SIGKILLed (the task fails with
WorkerLostError), and the message of a whole worker that was SIGKILLed stays unacknowledged in
Redis until the visibility timeout (days). Neither brings the job back in time, so the database is
the truth: a ``running`` job whose heartbeat is older than ``heartbeat_stale_s`` is requeued with a
new message (or, after ``max_attempts`` claims, failed with a reason). ``task_reject_on_worker_lost``
stays off: a message handed straight back would only find the job still leased (fresh heartbeat)
and be dropped, and a job that kills its worker would be redelivered without bound.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from config.settings import Settings
from store import leases
from store.broker import RUN_JOB_TASK

log = logging.getLogger("trainyard.worker")

#: Workers relay the outbox less often than the API (which sends every submission): the API's
#: relay does the work; a worker's covers an API that is down while a reconciler requeues.
WORKER_RELAY_EVERY_S = 5.0


def _sender(app: Any) -> Any:
    def send(jobs: Sequence[tuple[str, str]]) -> None:
        for job_id, queue in jobs:
            app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)

    return send


def _queues(settings: Settings) -> list[str]:
    return settings.queue_names()


def requeue_lost_jobs(app: Any, settings: Settings) -> list[str]:
    """Requeue (or, after max_attempts, fail) running jobs with a stale heartbeat, once each
    (compare-and-set); they resume from their latest snapshot. Returns the ids requeued."""
    requeued, _failed = leases.reconcile(settings.heartbeat_stale_s, _sender(app), _queues(settings))
    return requeued


def start_reaper(app: Any, settings: Settings) -> leases.Maintenance:
    """Reconcile lost jobs now and every :func:`store.leases.reconcile_interval` (at most 30 s),
    and relay the outbox, from a daemon thread (so a worker busy training still recovers the jobs
    of workers that died)."""
    return leases.Maintenance(
        _sender(app), settings.heartbeat_stale_s, queues=_queues(settings),
        relay_every_s=min(WORKER_RELAY_EVERY_S, leases.reconcile_interval(settings.heartbeat_stale_s)),
        name="trainyard-reaper",
    ).start()
