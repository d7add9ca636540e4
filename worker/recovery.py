"""A worker's background loops of recovery: the reconciler of lost jobs (including, at once on
start-up, the jobs of this host's workers whose process is gone) and the outbox relay, each in a
daemon thread (:mod:`orchestration.services`), so a worker busy training still recovers the jobs
of workers that died.

Why a reconciler and not the broker: with ``task_acks_late`` and ``task_reject_on_worker_lost``
off, Celery acknowledges the message of a prefork child that was SIGKILLed (the task fails with
WorkerLostError), and the message of a whole worker that was SIGKILLed stays unacknowledged in
Redis until the visibility timeout (days). Neither brings the job back in time, so the database is
the truth (:mod:`orchestration.recovery`). ``task_reject_on_worker_lost`` stays off: a message
handed straight back would only find the job still leased (fresh heartbeat) and be dropped, and a
job that kills its worker would be redelivered without bound.
"""

from __future__ import annotations

import socket
from typing import Any

from config.settings import Settings
from orchestration.messages import sender
from orchestration.recovery import reconcile, reconcile_interval
from orchestration.services.base import LoopService
from orchestration.services.outbox_relay import OutboxRelay
from orchestration.services.reconciler import Reconciler

#: Workers relay the outbox less often than the API (which sends every submission): the API's
#: relay does the work; a worker's covers an API that is down while a reconciler requeues.
WORKER_RELAY_EVERY_S = 5.0


def _queues(settings: Settings) -> list[str]:
    return settings.queue_names()


def requeue_lost_jobs(app: Any, settings: Settings) -> list[str]:
    """One reconciler pass now (lost jobs of this worker's queues, and those of this host's dead
    workers); they resume from their latest snapshot. Returns the ids requeued."""
    requeued, _failed = reconcile(settings.heartbeat_stale_s, sender(app), _queues(settings), socket.gethostname())
    return requeued


def start_reaper(app: Any, settings: Settings) -> list[LoopService]:
    """Start the reconciler (its first pass at once) and the outbox relay of this worker."""
    send = sender(app)
    return [
        Reconciler(send, settings.heartbeat_stale_s, _queues(settings), host=socket.gethostname()).start(),
        OutboxRelay(send, _queues(settings),
                    interval=min(WORKER_RELAY_EVERY_S, reconcile_interval(settings.heartbeat_stale_s))).start(),
    ]
