"""The submit path: queued jobs, their first state event and their outbox rows written by ONE
statement in its own (autocommit) transaction on PostgreSQL.

Submit→running latency is the product's most visible number, and the ORM unit of work spent
four round trips (BEGIN, INSERT job, INSERT event, COMMIT) and about 2 ms of Python on it
(BENCHMARKS.md). A data-modifying CTE does it in one round trip and stays atomic: the job, its
event and its outbox row commit together or not at all. SQLite (embedded mode, no network) keeps
the ORM path in :func:`store.repo.create_jobs`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from store.ids import new_id
from store.models import DEFAULT_PROJECT, Job

#: The job columns written at submit, with their SQL types (the VALUES list is typed explicitly:
#: an all-NULL or JSON column would otherwise be read as text).
_COLUMNS = (
    ("id", "varchar"), ("project_id", "varchar"), ("name", "varchar"), ("status", "varchar"), ("queue", "varchar"),
    ("spec", "json"), ("idempotency_key", "varchar"), ("idempotency_hash", "varchar"), ("epoch", "integer"),
    ("epochs", "integer"), ("attempts", "integer"), ("max_attempts", "integer"), ("lease_token", "integer"),
    ("cancel_requested", "boolean"), ("created_at", "timestamptz"), ("updated_at", "timestamptz"),
    ("sweep_id", "varchar"), ("trial_number", "integer"), ("trial_params", "json"), ("priority", "integer"),
    ("labels", "json"), ("notes", "text"),
)
_NAMES = ", ".join(c for c, _ in _COLUMNS)
_QUEUED_EVENT = json.dumps({"status": "queued"})


class SlotsFull(Exception):
    """The project's queued + running jobs plus these would exceed its limit; nothing was written."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} active jobs, limit {limit}")
        self.active, self.limit = active, limit


def _values_sql(n: int) -> str:
    return ", ".join("(" + ", ".join(f"%({c}_{i})s::{t}" for c, t in _COLUMNS) + ")" for i in range(n))


def insert_queued_jobs(
    engine: Engine,
    items: Sequence[tuple[dict[str, Any], str, str | None]],
    *,
    project_id: str = DEFAULT_PROJECT,
    idempotency_hash: str | None = None,
    max_active: int = 0,
    max_attempts: int = 3,
    priority: int = 0,
    labels: dict[str, str] | None = None,
    notes: str | None = None,
    notice: bool = True,
) -> list[Job]:
    """Insert queued jobs (same items as :func:`store.repo.create_jobs`) with their events and
    outbox rows, on PostgreSQL, in one pipelined transaction: ``BEGIN; SELECT ... FOR UPDATE`` of
    the project's row; one ``INSERT ... RETURNING`` CTE that writes only if the project's queued +
    running jobs plus these fit its limit (``projects.max_concurrent_jobs``, else ``max_active``;
    0 = no limit); ``COMMIT``. The INSERT runs after the lock is held, so its snapshot sees every
    committed submission: the limit is exact under concurrency. Returns detached :class:`Job`
    objects holding what was written; raises :class:`SlotsFull` (nothing written) over the limit,
    and SQLAlchemy's ``IntegrityError`` for a duplicate Idempotency-Key. The change notice
    (:mod:`store.notices`) goes out as the connection returns to the pool, unless ``notice`` is
    False: then the caller publishes it (``notices.publish``), after the jobs' broker messages
    (the API: its Redis round trip is not between the commit and the send)."""
    from store.repo import utcnow

    assert engine.dialect.name == "postgresql"
    now = utcnow()
    jobs = [
        Job(
            id=new_id(), project_id=project_id, name=str(spec.get("name") or "job"), status="queued", queue=queue,
            spec=spec, idempotency_key=key, idempotency_hash=idempotency_hash if key else None, epoch=0,
            epochs=int(spec.get("epochs") or 1), attempts=0, max_attempts=max_attempts, lease_token=0,
            cancel_requested=False, created_at=now, updated_at=now, sweep_id=None, trial_number=None,
            trial_params=None, priority=priority, labels=dict(labels or {}), notes=notes,
        )
        for spec, queue, key in items
    ]
    params: dict[str, Any] = {"project": project_id, "default_limit": max_active, "adding": len(jobs)}
    for i, j in enumerate(jobs):
        for c, _ in _COLUMNS:
            v = getattr(j, c)
            if c in ("spec", "trial_params", "labels") and v is not None:
                v = json.dumps(v)
            params[f"{c}_{i}"] = v
    sql = (
        "WITH lim AS (SELECT COALESCE((SELECT max_concurrent_jobs FROM projects WHERE id = %(project)s), "
        "%(default_limit)s) AS l), "
        "act AS (SELECT count(*) AS n FROM jobs WHERE project_id = %(project)s AND status IN ('queued', 'running')), "
        "ok AS (SELECT 1 FROM lim, act WHERE lim.l <= 0 OR act.n + %(adding)s <= lim.l), "
        f"j AS (INSERT INTO jobs ({_NAMES}) SELECT * FROM (VALUES {_values_sql(len(jobs))}) AS v({_NAMES}) "
        "WHERE EXISTS (SELECT 1 FROM ok) RETURNING id, queue, created_at), "
        f"e AS (INSERT INTO job_events (job_id, kind, data, created_at) SELECT id, 'state', '{_QUEUED_EVENT}', created_at FROM j), "
        "o AS (INSERT INTO outbox (job_id, queue, attempts, created_at) SELECT id, queue, 0, created_at FROM j) "
        "SELECT (SELECT n FROM act), (SELECT l FROM lim), (SELECT count(*) FROM j)"
    )
    for attempt in range(3):
        try:
            active, limit, written = _run_pipeline(engine, project_id, sql, params, notice)
            break
        except engine.dialect.dbapi.OperationalError as exc:  # type: ignore[union-attr]
            # a deadlock or serialization failure rolled everything back: run it again (issue 18
            # saw DeadlockDetected under 40 concurrent submits of one Idempotency-Key)
            if getattr(exc, "sqlstate", None) not in ("40P01", "40001") or attempt == 2:
                raise
    if written != len(jobs):
        raise SlotsFull(int(active), int(limit))
    return jobs


def _run_pipeline(engine: Engine, project_id: str, sql: str, params: dict[str, Any],
                  notice: bool = True) -> tuple[Any, Any, Any]:
    raw = engine.raw_connection()
    dbapi = raw.driver_connection
    try:
        dbapi.autocommit = True  # the transaction is spelled out below, inside the pipeline
        try:
            with dbapi.pipeline():
                # pipelined: BEGIN, the lock, the INSERT and the COMMIT go out together and the
                # pipeline's end waits once for all the answers: one round trip (the INSERT writes
                # nothing over the limit, so committing before reading its counts is safe)
                dbapi.execute("BEGIN")
                dbapi.execute("SELECT 1 FROM projects WHERE id = %(project)s FOR UPDATE", {"project": project_id})
                counts = dbapi.execute(sql, params)
                dbapi.execute("COMMIT")
            active, limit, written = counts.fetchone()
            if written and notice:
                raw.info["ty_notify"] = True  # a change notice when the connection is back (store.notices)
        except engine.dialect.dbapi.IntegrityError as exc:  # type: ignore[union-attr]
            raise IntegrityError(sql[:200], None, exc) from exc
        finally:
            if not dbapi.broken:
                if dbapi.info.transaction_status != dbapi.info.transaction_status.IDLE:
                    dbapi.execute("ROLLBACK")  # an error inside the transaction: nothing was written
                dbapi.autocommit = False
    finally:
        raw.close()
    return active, limit, written
