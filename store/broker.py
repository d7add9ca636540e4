"""Celery configuration shared by the API (which only sends tasks, by name) and the worker.

No Celery import here: these are plain dicts, so ``store`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from config.settings import Settings

RUN_JOB_TASK = "trainyard.run_job"
#: export a job's checkpoint to another format (args: the artifact id, store.artifacts)
EXPORT_TASK = "trainyard.export"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings: late acks, one message prefetched, JSON only, a visibility timeout longer
    than any job, and key prefixes on Redis so deployments sharing a Redis do not collide."""
    transport: dict[str, Any] = {}
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://", "sentinel://")):
        transport["visibility_timeout"] = settings.visibility_timeout_s
        if settings.visibility_timeout_s < 600:
            # kombu sweeps for expired unacked messages every interval x throttle (100 s by
            # default); a short visibility timeout (tests, chaos runs) needs the sweep to match
            transport["unacked_restore_interval"] = max(1, settings.visibility_timeout_s // 2)
            transport["unacked_restore_throttle"] = 1
        if settings.queue_prefix:
            transport["global_keyprefix"] = settings.queue_prefix
    return {
        "broker_url": url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue_name("cpu"),
        "task_create_missing_queues": True,
        "worker_send_task_events": False,
        "broker_heartbeat": 0,
    }


#: How often a worker polls the embedded (SQLAlchemy) broker while its queues are empty (it drains
#: them without waiting otherwise). Set on the transport class because kombu's SQLAlchemy transport
#: passes every transport option on to ``create_engine``. An idle poll asks SQLite whether the
#: broker's file changed and queries the queues only when it did (``worker.embedded_broker``):
#: an idle worker took 8.75 % of a core polling every 0.05 s without that, 0.55 % with it, 1.3 %
#: every 0.02 s; a job's wait from queued to running (one at a time, the worker idle) went from
#: a median of 40 ms (0.05 s, querying) to 24 ms (0.02 s).
SQLA_POLLING_INTERVAL_S = 0.02


def embedded_broker_path(url: str) -> Path | None:
    """The SQLite file of an embedded broker's URL (``sqla+sqlite:///PATH``), or None for any
    other broker (or an in-memory one)."""
    prefix = "sqla+sqlite:///"
    if not url.startswith(prefix) or url == prefix or ":memory:" in url:
        return None
    return Path(url[len(prefix):].split("?", 1)[0])


def prepare_embedded_broker(url: str) -> None:
    """Put the embedded broker's SQLite file (``sqla+sqlite:///...``) in WAL mode (it persists in
    the file; a no-op for any other broker, or once done). In SQLite's default rollback-journal
    mode a commit costs several fsyncs, in WAL one (durable): kombu's SQLAlchemy transport commits
    each message on its own, and a 200-job batch's sends took 0.40-0.46 s, 0.24 s in WAL;
    ``orchestration.messages.send_jobs`` now stores one call's messages in one commit (~0.04 s).
    Called by whatever sends or consumes (the API's dispatcher, the worker)."""
    path = embedded_broker_path(url)
    if path is None:
        return
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()

