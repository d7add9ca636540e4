"""The one way to send "run these jobs" to the broker: a ``trainyard.run_job(job_id)`` message
per ``(job_id, queue)``, by task name (the API never imports the worker). Every sender of job
messages (the API's dispatcher, the reconciler, the outbox relay, the sweeps, the stall watchdog)
uses :func:`send_jobs`, or a :data:`Send` made by :func:`sender`."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from store.broker import RUN_JOB_TASK
from store.outbox import Send

__all__ = ["Send", "send_jobs", "sender"]


def send_jobs(celery_app: Any, jobs: Sequence[tuple[str, str]], *, max_retries: int = 3) -> None:
    """Publish one message per ``(job_id, queue)`` over one producer connection; raise what the
    broker raised if it did not accept them (after ``max_retries`` quick retries). Call only after
    the jobs' rows are committed, so a worker never sees an id whose row does not exist yet."""
    with celery_app.producer_or_acquire() as producer:
        for job_id, queue in jobs:
            celery_app.send_task(
                RUN_JOB_TASK, args=[job_id], queue=queue, producer=producer, retry=max_retries > 0,
                retry_policy={"max_retries": max_retries, "interval_start": 0.1, "interval_step": 0.5},
            )


def sender(celery_app: Any) -> Send:
    """:func:`send_jobs` bound to ``celery_app``."""
    return partial(send_jobs, celery_app)
