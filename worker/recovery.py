"""Recovering jobs whose worker was lost (killed without a chance to requeue them)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from store import repo
from store.broker import RUN_JOB_TASK
from store.db import session_scope
from store.settings import Settings

log = logging.getLogger("trainyard.worker")


def requeue_lost_jobs(app: Any, settings: Settings) -> list[str]:
    """Put running jobs with a stale heartbeat back in their queue (compare-and-set, so several
    workers starting at once requeue each job once); they resume from their latest snapshot.
    The message is sent after the row is committed."""
    with session_scope(write=False) as s:
        candidates = repo.stale_running_jobs(s, settings.heartbeat_stale_s)
    requeued = []
    for job_id, queue in candidates:
        with session_scope() as s:
            ok = repo.requeue_job(s, job_id, "worker lost", stale_after_s=settings.heartbeat_stale_s)
        if ok:
            app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)
            requeued.append(job_id)
            log.warning("job %s: its worker was lost (no heartbeat for %.0f s); requeued", job_id, settings.heartbeat_stale_s)
    return requeued


def start_reaper(app: Any, settings: Settings) -> threading.Thread:
    """Requeue lost jobs now and then every half heartbeat-staleness period, from a daemon
    thread (so a worker busy training still recovers jobs of workers that died)."""

    def loop() -> None:
        while True:
            try:
                requeue_lost_jobs(app, settings)
            except Exception:  # noqa: BLE001 - keep reaping after a database hiccup
                log.exception("could not check for lost jobs")
            time.sleep(max(10.0, settings.heartbeat_stale_s / 2))

    thread = threading.Thread(target=loop, name="trainyard-reaper", daemon=True)
    thread.start()
    return thread
