"""Repositories: every query of the service lives here. Functions take a session and never
commit; the request or task boundary owns the transaction."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, overload

from sqlalchemy import and_, case, delete, func, insert, select, tuple_, update
from sqlalchemy.orm import Session, defer

from store import curves, lifecycle
from store.artifact_store import (
    Stored,
    checkpoint_key,
    discard_after_commit,
    get_store,
    job_prefix,
    snapshot_key,
)
from store.floats import encode_metrics, finite_or_none, to_text
from store.ids import new_id
from store.models import (
    DEFAULT_PROJECT,
    TERMINAL_STATUSES,
    Checkpoint,
    Dataset,
    Job,
    JobEvent,
    JobMetric,
    Outbox,
    Project,
    Snapshot,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def as_utc(dt: datetime) -> datetime: ...
@overload
def as_utc(dt: None) -> None: ...
def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def to_utc(dt: datetime) -> datetime:
    """A bound for comparing with stored times: naive means UTC; an aware time is converted to
    UTC (SQLite compares the wall-clock text, PostgreSQL reads a naive value in the session's
    time zone, so neither may see a non-UTC or naive value)."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


# --------------------------------------------------------------------------- jobs


def create_jobs(
    session: Session,
    items: Sequence[tuple[dict[str, Any], str, str | None]],
    *,
    project_id: str = DEFAULT_PROJECT,
    idempotency_hash: str | None = None,
    sweep_id: str | None = None,
    trials: Sequence[tuple[int, dict[str, Any]]] | None = None,
    priority: int = 0,
    labels: dict[str, str] | None = None,
    notes: str | None = None,
) -> list[Job]:
    """Insert queued jobs from ``(spec, queue, idempotency_key)`` items, each with its first state
    event, in one flush (ids are made here, so no round trip per row). ``trials`` gives each item's
    ``(trial_number, trial_params)`` when the jobs are trials of sweep ``sweep_id``."""
    now = utcnow()
    jobs = [
        Job(
            id=new_id(), project_id=project_id, name=str(spec.get("name") or "job"), status="queued", queue=queue,
            spec=spec, idempotency_key=key, idempotency_hash=idempotency_hash if key else None, epoch=0,
            epochs=int(spec.get("epochs") or 1), attempts=0, cancel_requested=False, created_at=now, updated_at=now,
            sweep_id=sweep_id, priority=priority,
            trial_number=trials[i][0] if trials else None,
            trial_params=trials[i][1] if trials else None,
            labels=dict(labels or {}), notes=notes,
        )
        for i, (spec, queue, key) in enumerate(items)
    ]
    session.add_all(jobs)
    session.flush()
    if sweep_id is not None:  # the sweep's own "trial added" events (GET /v1/events), before the trials' own
        _insert_events(session, [dict(job_id=None, sweep_id=sweep_id, kind="trial",
                                      data={"job_id": j.id, "trial_number": j.trial_number}, created_at=now) for j in jobs])
    _insert_events(session, [dict(job_id=j.id, sweep_id=None, kind="state", data={"status": "queued"}, created_at=now)
                             for j in jobs])
    # the dispatch outbox (store.outbox): each job owes the broker a message, in this transaction
    session.execute(insert(Outbox), [dict(job_id=j.id, queue=j.queue, attempts=0, created_at=now) for j in jobs])
    return jobs


def create_job(
    session: Session, *, spec: dict[str, Any], queue: str, idempotency_key: str | None = None,
    idempotency_hash: str | None = None, project_id: str = DEFAULT_PROJECT, priority: int = 0,
    labels: dict[str, str] | None = None, notes: str | None = None,
) -> Job:
    """Insert one queued job (see :func:`create_jobs`); ``idempotency_hash`` is the digest of the
    request body sent with ``idempotency_key``."""
    return create_jobs(
        session, [(spec, queue, idempotency_key)], project_id=project_id, idempotency_hash=idempotency_hash,
        priority=priority, labels=labels, notes=notes,
    )[0]


def request_hash(body: Any) -> str:
    """sha256 of a request body's canonical JSON (sorted keys, no spaces)."""
    import json

    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    ).hexdigest()


def get_job(session: Session, job_id: str, project_id: str | None = None) -> Job | None:
    """The job, if it exists (and, given ``project_id``, belongs to that project)."""
    if project_id is None:
        return session.get(Job, job_id)
    return session.scalars(select(Job).where(Job.id == job_id, Job.project_id == project_id)).one_or_none()


def project_job_slots(session: Session, project_id: str, default_limit: int) -> tuple[int, int]:
    """``(active, limit)`` of a project: its queued + running jobs, and its own
    ``max_concurrent_jobs`` else ``default_limit`` (<= 0: no limit). Locks the project's row until
    the caller's transaction ends, so concurrent submissions (and sweeps) cannot both squeeze in."""
    own = session.execute(
        select(Project.max_concurrent_jobs).where(Project.id == project_id).with_for_update()
    ).first()
    limit = own[0] if own is not None and own[0] is not None else default_limit
    if limit <= 0:
        return 0, limit
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.project_id == project_id, Job.status.in_(("queued", "running")))
    ) or 0
    return int(active), int(limit)


def get_job_by_idempotency_key(session: Session, key: str, project_id: str = DEFAULT_PROJECT) -> Job | None:
    """The project's job made with this Idempotency-Key (keys are unique per project)."""
    return session.scalars(
        select(Job).where(Job.idempotency_key == key, Job.project_id == project_id)
    ).one_or_none()


@dataclass(frozen=True)
class JobFilter:
    status: Sequence[str] = ()
    name: str | None = None
    name_prefix: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    updated_after: datetime | None = None
    sweep_id: str | None = None  # only the trials of this sweep
    stop_reason: Sequence[str] = ()
    labels: Sequence[tuple[str, str]] = ()  # every (key, value) must match
    ids: Sequence[str] = ()  # only these jobs


#: The list's sort orders: the column, and whether its natural direction is descending.
JOB_ORDERS = {"created": (Job.id, True), "updated": (Job.updated_at, True), "best": (Job.best_number, False)}


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def list_jobs(
    session: Session, flt: JobFilter, *, limit: int, cursor: Any = None, project_id: str | None = None,
    order_by: str = "created", descending: bool | None = None,
) -> list[Job]:
    """Jobs in ``order_by`` order (created: newest first; updated: most recent first; best: the
    smallest best value first, jobs without one last), keyset-paged: ``cursor`` is the
    ``(sort value, id)`` of the previous page's last row (:func:`job_cursor`), or for
    ``created`` its id alone. Returns up to ``limit + 1`` rows so the caller can tell whether a
    next page exists."""
    q = select(Job).options(defer(Job.spec), defer(Job.info))
    if project_id is not None:
        q = q.where(Job.project_id == project_id)
    if flt.status:
        q = q.where(Job.status.in_(list(flt.status)))
    if flt.name is not None:
        q = q.where(Job.name == flt.name)
    if flt.name_prefix:
        q = q.where(Job.name.like(_like_prefix(flt.name_prefix), escape="\\"))
    if flt.sweep_id is not None:
        q = q.where(Job.sweep_id == flt.sweep_id)
    if flt.stop_reason:
        q = q.where(Job.stop_reason.in_(list(flt.stop_reason)))
    if flt.ids:
        q = q.where(Job.id.in_(list(flt.ids)))
    for key, value in flt.labels:
        q = q.where(Job.labels[key].as_string() == value)
    if flt.created_after is not None:
        q = q.where(Job.created_at >= to_utc(flt.created_after))
    if flt.created_before is not None:
        q = q.where(Job.created_at < to_utc(flt.created_before))
    if flt.updated_after is not None:
        q = q.where(Job.updated_at > to_utc(flt.updated_after))
    column, natural_desc = JOB_ORDERS[order_by]
    desc = natural_desc if descending is None else descending
    if order_by == "created":
        if cursor:
            q = q.where(Job.id < cursor if desc else Job.id > cursor)
        return list(session.scalars(q.order_by(Job.id.desc() if desc else Job.id.asc()).limit(limit + 1)))
    if cursor is not None:
        value, last_id = cursor
        if value is None:  # past every row with a value: the NULLs (always last), by id
            q = q.where(column.is_(None), Job.id < last_id if desc else Job.id > last_id)
        else:
            value = to_utc(datetime.fromisoformat(value)) if order_by == "updated" else float(value)
            after = (column < value) if desc else (column > value)
            same = (column == value) & ((Job.id < last_id) if desc else (Job.id > last_id))
            q = q.where(after | same | column.is_(None))
    ordering = (column.desc().nulls_last(), Job.id.desc()) if desc else (column.asc().nulls_last(), Job.id.asc())
    return list(session.scalars(q.order_by(*ordering).limit(limit + 1)))


def job_cursor(job: Job, order_by: str) -> Any:
    """The keyset cursor after ``job`` in ``order_by`` order (see :func:`list_jobs`)."""
    if order_by == "created":
        return job.id
    if order_by == "updated":
        return [as_utc(job.updated_at).isoformat(), job.id]
    return [job.best_number, job.id]


def annotate(
    session: Session, model: Any, object_id: str, project_id: str, *, labels: dict[str, str] | None = None,
    notes: str | None = None, set_notes: bool = False,
) -> bool:
    """Replace the labels (when given) and the notes (when ``set_notes``) of a job or sweep of
    the project; False if there is no such row. Touches ``updated_at`` so lists and streams see it."""
    values: dict[str, Any] = {"updated_at": utcnow()}
    if labels is not None:
        values["labels"] = labels
    if set_notes:
        values["notes"] = notes
    res = session.execute(
        update(model).where(model.id == object_id, model.project_id == project_id).values(**values)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined,no-any-return]


def bulk_metrics(
    session: Session, since: dict[str, int], project_id: str
) -> dict[str, list[dict[str, Any]]]:
    """The epochs of several jobs of the project (``{job_id: since_epoch}``), each job's after its
    own ``since_epoch``, in epoch order, in one query. Jobs not in the project are left out."""
    if not since:
        return {}
    ids = list(since)
    rows = session.execute(
        select(JobMetric.job_id, JobMetric.epoch, JobMetric.values)
        .join(Job, Job.id == JobMetric.job_id)
        .where(JobMetric.job_id.in_(ids), Job.project_id == project_id)
        .order_by(JobMetric.job_id, JobMetric.epoch)
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for job_id, epoch, values in rows:
        if epoch > since[job_id]:
            out.setdefault(job_id, []).append(values)
    return out


def existing_job_ids(session: Session, ids: Sequence[str], project_id: str) -> set[str]:
    """Which of ``ids`` are jobs of the project."""
    return set(session.scalars(select(Job.id).where(Job.id.in_(list(ids)), Job.project_id == project_id)))


def add_event(session: Session, job_id: str, kind: str, data: dict[str, Any], at: datetime | None = None) -> None:
    """Record a job event (what the event stream serves); a state change is also owed to the
    project's webhooks that asked for it, in this same transaction (store.webhooks)."""
    add_events(session, [(job_id, kind, data)], at)


def add_events(session: Session, items: Sequence[tuple[str, str, dict[str, Any]]], at: datetime | None = None) -> None:
    """:func:`add_event` of several ``(job_id, kind, data)`` events at once (a pack's members):
    one query for the webhooks their state changes are owed to."""
    from store import webhooks

    at = at or utcnow()
    _insert_events(session, [dict(job_id=job_id, sweep_id=None, kind=kind, data=data, created_at=at)
                             for job_id, kind, data in items])
    states = [(job_id, data) for job_id, kind, data in items if kind == "state"]
    if states:
        webhooks.on_jobs_state(session, states, at)


def _insert_events(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert event rows (``job_id``, ``sweep_id``, ``kind``, ``data``, ``created_at`` each), in
    their order, as one executemany: their ids are not read back (an ORM flush reads back each
    new row's id, which on SQLite costs one statement per row: 200 for a 200-job batch)."""
    if rows:
        session.execute(insert(JobEvent), rows)


def add_sweep_event(session: Session, sweep_id: str, kind: str, data: dict[str, Any], at: datetime | None = None) -> None:
    """A sweep's own event on the project's stream: ``created``, ``trial`` (added; written by
    :func:`create_jobs`) or ``state`` (it ended), in the job events' table and id order."""
    session.add(JobEvent(sweep_id=sweep_id, kind=kind, data=data, created_at=at or utcnow()))


def events_after(session: Session, job_id: str, after_id: int, limit: int = 500) -> list[JobEvent]:
    q = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id)
        .limit(limit)
    )
    return list(session.scalars(q))


def request_cancel(session: Session, job_id: str) -> str | None:
    """Cancel a job: a queued (or paused) one becomes ``cancelled`` at once (a worker's claim then
    fails, so it never starts); a running one is flagged and its worker stops it. Returns the status the
    job is now in, or None if it does not exist."""
    now = utcnow()
    if lifecycle.move(session, job_id, (lifecycle.QUEUED, lifecycle.PAUSED), lifecycle.CANCELLED,
                      values=dict(stop_reason="cancelled", cancel_requested=True, finished_at=now, updated_at=now)):
        add_event(session, job_id, "state", {"status": "cancelled", "stop_reason": "cancelled"}, now)
        return "cancelled"
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return session.scalar(select(Job.status).where(Job.id == job_id))


def claim_job(session: Session, job_id: str, worker: str, stale_after_s: float, *, take_over: bool = True) -> Job | None:
    """Compare-and-set queued -> running (or take over a running job whose heartbeat is older
    than ``stale_after_s``: its worker was lost and the broker redelivered). None if the job is
    not claimable, so delivering the task twice runs it once. Every claim bumps ``lease_token``
    (the fencing token of this attempt, see :mod:`store.leases`); a lost job that already used
    ``max_attempts`` claims is not taken over (the reconciler fails it). ``take_over=False``:
    queued jobs only (the members of a pack, :mod:`store.packing`)."""
    claimed = claim_queued(session, [job_id], worker)
    if claimed:
        return claimed[0]
    now = utcnow()
    taken_over = take_over and lifecycle.move(session, job_id, (lifecycle.RUNNING,), lifecycle.RUNNING,
                                              values=_claim_values(worker, now), where=(
        Job.cancel_requested.is_(False),
        Job.heartbeat_at < now - timedelta(seconds=stale_after_s),
        Job.attempts < Job.max_attempts,
    ))
    if not taken_over:
        return None
    return _claimed(session, job_id, now)


def claim_queued(session: Session, job_ids: Sequence[str], worker: str) -> list[Job]:
    """Claim those of ``job_ids`` that are queued (queued -> running, a new lease token each; no
    take-over) in one compare-and-set for all of them (:func:`store.lifecycle.move_many`: a pack's
    members), each with its state event; the jobs claimed, as they are now, in ``job_ids``' order."""
    now = utcnow()
    moved = lifecycle.move_many(session, {j: {} for j in job_ids}, (lifecycle.QUEUED,), lifecycle.RUNNING,
                                values={"started_at": now, **_claim_values(worker, now)})
    if not moved:
        return []
    rows = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(moved))
                                              .execution_options(populate_existing=True))}
    jobs = [rows[j] for j in moved]
    add_events(session, [(j.id, "state", {"status": "running", "attempt": j.attempts}) for j in jobs], now)
    return jobs


def claim_chosen(session: Session, chosen: Any, params: dict[str, Any], worker: str) -> Job | None:
    """Claim the queued job that ``chosen`` (a scalar subquery bound by ``params``) picks, in the
    same statement as the pick (:func:`store.lifecycle.move_chosen`); None if it picks none.
    Queued jobs only (no take-over)."""
    now = utcnow()
    job = lifecycle.move_chosen(session, chosen, (lifecycle.QUEUED,), lifecycle.RUNNING,
                                values={"started_at": now, **_claim_values(worker, now)}, params=params)
    if job is not None:
        _claimed_event(session, job, now)
    return job


def _claim_values(worker: str, now: datetime) -> dict[str, Any]:
    return dict(attempts=Job.attempts + 1, lease_token=Job.lease_token + 1, heartbeat_at=now, worker=worker, updated_at=now)


def _claimed(session: Session, job_id: str, now: datetime) -> Job | None:
    job = session.get(Job, job_id, populate_existing=True)
    if job is not None:
        _claimed_event(session, job, now)
    return job


def _claimed_event(session: Session, job: Job, now: datetime) -> None:
    add_event(session, job.id, "state", {"status": "running", "attempt": job.attempts}, now)


def is_preempt_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.preempt_requested).where(Job.id == job_id)))


def is_cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def stale_running_jobs(session: Session, older_than_s: float) -> list[tuple[str, str]]:
    """(id, queue) of running jobs whose heartbeat is older than ``older_than_s``: their worker
    was lost."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    q = select(Job.id, Job.queue).where(Job.status == "running", Job.heartbeat_at < cutoff)
    return [(i, qn) for i, qn in session.execute(q)]


def _upsert_metrics(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert epoch rows, replacing any with the same (job, epoch): a resumed run that redoes an
    epoch overwrites its row. One statement, executed for the batch's rows (``session.merge`` read
    each row first; one multi-row VALUES statement was compiled anew for every flush: 27 rows
    1.7-2.0 ms against 0.22 ms on SQLite, BENCHMARKS.md "2026-12-06 (seventh session)")."""
    curves.drop(session, {r["job_id"] for r in rows})  # a finished job's compacted curve is stale now
    dialect = session.get_bind().dialect.name
    if dialect not in ("postgresql", "sqlite"):  # pragma: no cover - the two supported databases
        for r in rows:
            session.merge(JobMetric(**r))
        return
    session.connection().execute(_metrics_upsert(dialect), rows)


@functools.cache
def _metrics_upsert(dialect: str) -> Any:
    """The upsert of one epoch row (``job_id``, ``epoch``, ``values``, ``created_at``) on
    ``dialect``, built and compiled once."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(JobMetric.__table__)
    return stmt.on_conflict_do_update(
        index_elements=["job_id", "epoch"], set_={"values": stmt.excluded["values"], "created_at": stmt.excluded.created_at}
    )


def record_progress(
    session: Session, job_id: str, epochs: Iterable[dict[str, Any]], *, info: dict[str, Any] | None = None
) -> bool:
    """Write a batch of epoch metrics (1-based ``epoch`` key), bump the heartbeat and progress,
    and return whether a cancel was requested: one transaction per batch."""
    return record_progress_many(session, [(job_id, epochs, info)])[job_id]


def record_progress_many(
    session: Session, items: Sequence[tuple[str, Iterable[dict[str, Any]], dict[str, Any] | None]]
) -> dict[str, bool]:
    """:func:`record_progress` for several jobs at once, each ``(job_id, epochs, info)`` (a pack's
    flush: its members' rows in a few statements for all of them, not ~7 per member). Returns
    each job's cancel flag."""
    from sqlalchemy import bindparam

    from store import webhooks

    now = utcnow()
    rows: list[dict[str, Any]] = []
    written: dict[str, list[dict[str, Any]]] = {}
    updates: dict[tuple[bool, bool], list[dict[str, Any]]] = {}
    for job_id, epochs, info in items:
        mine = []
        for m in epochs:
            enc = encode_metrics(m)
            mine.append({"job_id": job_id, "epoch": int(m["epoch"]), "values": enc, "created_at": now})
        rows += mine
        if mine:
            written[job_id] = [r["values"] for r in mine]
        params: dict[str, Any] = {"b_id": job_id, "b_now": now}
        if mine:
            # the metrics revision (0006, store.bulkread): epochs above the highest ever written are
            # appended; any at or below it overwrite or fill in what a reader may have kept. Both SET
            # expressions see the row's old metrics_top; the row lock orders concurrent writers.
            params.update(b_last=mine[-1]["epoch"], b_low=min(r["epoch"] for r in mine),
                          b_high=max(r["epoch"] for r in mine))
        if info is not None:
            params["b_info"] = info
        updates.setdefault((bool(mine), info is not None), []).append(params)
    if rows:
        _insert_events(session, [dict(job_id=r["job_id"], sweep_id=None, kind="epoch", data=r["values"], created_at=now)
                                 for r in rows])
        _upsert_metrics(session, rows)
        webhooks.on_jobs_epochs(session, written, now)  # metric thresholds
    for (has_rows, has_info), params_list in updates.items():
        values: dict[str, Any] = {"heartbeat_at": bindparam("b_now"), "updated_at": bindparam("b_now")}
        if has_rows:
            values["epoch"] = bindparam("b_last")
            values["metrics_top"] = case((Job.metrics_top < bindparam("b_high"), bindparam("b_high")),
                                         else_=Job.metrics_top)
            values["metrics_rewrites"] = Job.metrics_rewrites + case((Job.metrics_top >= bindparam("b_low"), 1), else_=0)
        if has_info:
            values["info"] = bindparam("b_info", type_=Job.__table__.c.info.type)
        # Core executemany: one statement, one round of parameters (an ORM update would want
        # primary-key parameters and no expressions)
        session.connection().execute(update(Job.__table__).where(Job.__table__.c.id == bindparam("b_id")).values(**values),
                                     params_list)
    ids = [job_id for job_id, _, _ in items]
    flags = dict(session.execute(select(Job.id, Job.cancel_requested).where(Job.id.in_(ids))).all())
    return {job_id: bool(flags.get(job_id)) for job_id in ids}


def finish_job(
    session: Session,
    job_id: str,
    *,
    status: str,
    stop_reason: str | None = None,
    error: str | None = None,
    best: tuple[str | None, Any, int | None] | None = None,
    steps: int | None = None,
    epochs_run: int | None = None,
    run_seconds: float | None = None,
    info: dict[str, Any] | None = None,
) -> bool:
    """Record a terminal state (only from ``running``). Returns False if the job had already
    left ``running`` (e.g. taken over by another worker)."""
    return bool(finish_jobs(session, {job_id: dict(status=status, stop_reason=stop_reason, error=error, best=best,
                                                   steps=steps, epochs_run=epochs_run, run_seconds=run_seconds,
                                                   info=info)}))


def finish_jobs(session: Session, ends: dict[str, dict[str, Any]]) -> list[str]:
    """:func:`finish_job` of several jobs, each with its keywords (``ends``, by job id; a pack's
    members): one compare-and-set per final status for all of them, their own values in one
    executemany, their state events and webhooks together. Returns the ids that ended (those
    still ``running``)."""
    now = utcnow()
    by_status: dict[str, dict[str, dict[str, Any]]] = {}
    for job_id, end in ends.items():
        assert end["status"] in TERMINAL_STATUSES
        values: dict[str, Any] = dict(stop_reason=end.get("stop_reason"), error=end.get("error"), **_run_values(end))
        if end.get("info") is not None:
            values["info"] = end["info"]
        by_status.setdefault(end["status"], {})[job_id] = values
    ended: list[str] = []
    events: list[tuple[str, str, dict[str, Any]]] = []
    for status, moves in by_status.items():
        for job_id in lifecycle.move_many(session, moves, (lifecycle.RUNNING,), status, added=("run_seconds",),
                                          values=dict(finished_at=now, updated_at=now, heartbeat_at=now)):
            event: dict[str, Any] = {"status": status, "stop_reason": ends[job_id].get("stop_reason")}
            if ends[job_id].get("error"):
                event["error"] = ends[job_id]["error"]
            events.append((job_id, "state", event))
            ended.append(job_id)
    add_events(session, events, now)
    return ended


def _run_values(run: Mapping[str, Any]) -> dict[str, Any]:
    """The columns of how far a run got (``steps``, ``epochs_run``, ``best``, ``run_seconds``: the
    keywords of :func:`finish_job` and :func:`pause_job`), for :func:`store.lifecycle.move_many`
    (``run_seconds`` is added to what earlier runs of the job recorded: a sweep trial paused and
    resumed runs several times; other jobs record it once)."""
    values: dict[str, Any] = {}
    best = run.get("best")
    if best is not None:
        values.update(best_monitor=best[0], best_value=to_text(best[1]), best_epoch=best[2],
                      best_number=finite_or_none(best[1]))
    if run.get("steps") is not None:
        values["steps"] = run["steps"]
    if run.get("epochs_run") is not None:
        values["epoch"] = run["epochs_run"]
    if run.get("run_seconds") is not None:
        values["run_seconds"] = run["run_seconds"]
    return values


def pause_job(
    session: Session, job_id: str, *, steps: int, epochs_run: int, best: tuple[str | None, Any, int | None] | None = None,
    run_seconds: float | None = None,
) -> bool:
    """running -> paused (a sweep trial stopped at an ASHA rung, its snapshot written in the same
    transaction). Not terminal: the sweep promotes it (:func:`promote_job`) or ends it
    (:func:`end_paused_job`). False if the job is no longer running or a cancel was requested
    (the worker then ends it ``cancelled``: a cancel never leaves a paused trial behind)."""
    return bool(pause_jobs(session, {job_id: dict(steps=steps, epochs_run=epochs_run, best=best, run_seconds=run_seconds)}))


def pause_jobs(session: Session, pauses: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """:func:`pause_job` of several jobs, each with its keywords (``pauses``, by job id; a pack's
    members that stopped at a rung): one compare-and-set for all, their own values in one
    executemany, their state events together. Returns the ids paused (those still ``running``
    and not asked to cancel)."""
    now = utcnow()
    paused = lifecycle.move_many(session, {job_id: _run_values(p) for job_id, p in pauses.items()},
                                 (lifecycle.RUNNING,), lifecycle.PAUSED, added=("run_seconds",),
                                 where=(Job.cancel_requested.is_(False),),
                                 values=dict(stop_reason="paused", updated_at=now, heartbeat_at=now))
    add_events(session, [(job_id, "state", {"status": "paused", "epoch": pauses[job_id]["epochs_run"]}) for job_id in paused], now)
    return paused


def promote_job(session: Session, job_id: str) -> bool:
    """paused -> queued: the sweep promotes the trial; its next claim resumes from the snapshot
    of the epoch it paused at. A promotion is a new run with its own attempt (``max_attempts``
    grows by one, so a promoted trial whose worker is lost is still retried)."""
    now = utcnow()
    if not lifecycle.move(session, job_id, (lifecycle.PAUSED,), lifecycle.QUEUED, where=(Job.cancel_requested.is_(False),),
                          values=dict(stop_reason=None, max_attempts=Job.max_attempts + 1, updated_at=now)):
        return False
    add_event(session, job_id, "state", {"status": "queued", "reason": "promoted"}, now)
    return True


def end_paused_job(session: Session, job_id: str, stop_reason: str = "pruned", status: str = "succeeded") -> bool:
    """paused -> ``status`` with ``stop_reason``: ``succeeded``/``pruned`` when the sweep ended
    without promoting it (like a pruned trial, it keeps its metrics and checkpoints), ``cancelled``
    when its sweep failed."""
    return bool(end_paused_jobs(session, [job_id], stop_reason, status))


def end_paused_jobs(session: Session, job_ids: Sequence[str], stop_reason: str = "pruned",
                    status: str = "succeeded") -> list[str]:
    """:func:`end_paused_job` of several jobs (a sweep's paused trials when it ends): one
    compare-and-set for all, their state events together. Returns the ids ended (those still
    ``paused``)."""
    assert status in TERMINAL_STATUSES
    now = utcnow()
    ended = lifecycle.move_many(session, {job_id: {} for job_id in job_ids}, (lifecycle.PAUSED,), status,
                                values=dict(stop_reason=stop_reason, finished_at=now, updated_at=now))
    add_events(session, [(job_id, "state", {"status": status, "stop_reason": stop_reason}) for job_id in ended], now)
    return ended


def fail_unstarted_job(session: Session, job_id: str, error: str) -> None:
    """Mark a queued job failed (it could not be enqueued, or its spec no longer resolves)."""
    now = utcnow()
    if lifecycle.move(session, job_id, (lifecycle.QUEUED,), lifecycle.FAILED,
                      values=dict(error=error, finished_at=now, updated_at=now)):
        add_event(session, job_id, "state", {"status": "failed", "error": error}, now)


def metrics(session: Session, job_id: str, since_epoch: int = 0) -> list[dict[str, Any]]:
    q = (
        select(JobMetric.values)
        .where(JobMetric.job_id == job_id, JobMetric.epoch > since_epoch)
        .order_by(JobMetric.epoch)
    )
    return list(session.scalars(q))


def job_exists(session: Session, job_id: str, project_id: str | None = None) -> bool:
    q = select(func.count()).select_from(Job).where(Job.id == job_id)
    if project_id is not None:
        q = q.where(Job.project_id == project_id)
    return session.scalar(q) == 1


def counts_by_status(session: Session) -> dict[str, int]:
    return {s: n for s, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}


def duration_buckets(session: Session, bounds: Sequence[float]) -> tuple[list[int], int, float]:
    """Cumulative counts of finished jobs' run seconds per upper bound, total count and sum."""
    cols = [func.sum(case((Job.run_seconds <= b, 1), else_=0)) for b in bounds]
    row = session.execute(
        select(*cols, func.count(Job.run_seconds), func.coalesce(func.sum(Job.run_seconds), 0.0)).where(
            Job.run_seconds.is_not(None)
        )
    ).one()
    return [int(v or 0) for v in row[: len(bounds)]], int(row[-2] or 0), float(row[-1] or 0.0)


# --------------------------------------------------------------------------- checkpoints


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: a checkpoint whose file is kept (the best and the newest of a job; see :func:`_drop_unkept`)
STORED = Checkpoint.uri.is_not(None)


def add_checkpoint(
    session: Session,
    job_id: str,
    *,
    epoch: int,
    step: int,
    monitor: str | None,
    value: Any,
    data: bytes,
    sha256: str,
    is_best: bool,
    stored: Stored | None = None,
) -> int:
    """Write the checkpoint's file to the artifact store (unless the caller did: ``stored``) and
    record it; the files of the job's other checkpoints except the best are dropped (after the
    commit)."""
    return add_checkpoints(session, job_id, [dict(epoch=epoch, step=step, monitor=monitor, value=value, data=data,
                                                  sha256=sha256, is_best=is_best, stored=stored)])[0]


def add_checkpoints(session: Session, job_id: str, items: Sequence[dict[str, Any]]) -> list[int]:
    """Record checkpoints of one job in their order (each ``items`` entry: ``add_checkpoint``'s
    keywords), leaving what ``add_checkpoint`` called once per item leaves (every row; the last
    best item marked best; files kept for the last item and the best only), with one round of
    queries for the batch instead of one per checkpoint (a run's flush writes several). An item
    with ``superseded`` true is recorded without a file (its row as the batch's own drop would
    leave it): the caller knows the batch drops it and the job does not keep every file."""
    return add_checkpoints_many(session, {job_id: items}).get(job_id, [])


def add_checkpoints_many(session: Session, batches: dict[str, Sequence[dict[str, Any]]]) -> dict[str, list[int]]:
    """:func:`add_checkpoints` of several jobs (``batches``: each job's items; a pack's members), in
    one round of queries for all of them: one clearing of their bests, one insert, one drop of
    the files they no longer keep. The ids of the rows recorded, by job id."""
    batches = {job_id: items for job_id, items in batches.items() if items}
    if not batches:
        return {}
    _clear_best_many(session, [j for j, items in batches.items() if any(it["is_best"] for it in items)])
    rows = []
    for job_id, items in batches.items():
        bests = [k for k, it in enumerate(items) if it["is_best"]]
        for k, it in enumerate(items):
            if it.get("superseded"):
                uri, size = None, len(it["data"])
            else:
                stored = it.get("stored") or get_store().put(checkpoint_key(job_id, it["sha256"]), it["data"], it["sha256"])
                uri, size = stored.uri, stored.size
            rows.append(dict(
                job_id=job_id, epoch=it["epoch"], step=it["step"], monitor=it["monitor"], value=to_text(it["value"]),
                size=size, sha256=it["sha256"], is_best=bool(bests) and k == bests[-1], uri=uri, created_at=utcnow(),
            ))
    # one multi-row insert (an ORM flush would insert row by row on SQLite to read each id back):
    # the rows get ascending ids in their order, so each job's newest is its highest new id
    out: dict[str, list[int]] = {}
    for ck_id, job_id in sorted(session.execute(insert(Checkpoint).returning(Checkpoint.id, Checkpoint.job_id), rows)):
        out.setdefault(job_id, []).append(ck_id)
    _drop_unkept_many(session, {job_id: (ids[-1],) for job_id, ids in out.items()})
    return out


def _drop_unkept(session: Session, job_id: str, keep: Sequence[int]) -> None:
    """Forget the files of the job's checkpoints other than ``keep`` and its best (their rows
    keep the metadata), unless the job's spec says ``"keep_checkpoints": "all"``; a file is
    deleted after the commit unless a kept row shares it (the same bytes recorded twice)."""
    _drop_unkept_many(session, {job_id: keep})


def _drop_unkept_many(session: Session, keep: dict[str, Sequence[int]]) -> None:
    """:func:`_drop_unkept` of several jobs (``keep``: each job's kept checkpoint ids): one read of
    their specs, one of the files dropped, one update, one read of the files still kept."""
    specs = dict(session.execute(select(Job.id, Job.spec["keep_checkpoints"].as_string()).where(Job.id.in_(list(keep)))).all())
    jobs = [j for j in keep if specs.get(j) != "all"]  # a job whose spec says "all" keeps every checkpoint's file
    if not jobs:
        return
    # checkpoint ids are unique across jobs: every job's kept ids in one list leave each job's own
    unkept = (Checkpoint.job_id.in_(jobs), Checkpoint.id.not_in([i for j in jobs for i in keep[j]]),
              Checkpoint.is_best.is_(False), STORED)
    dropped = set(session.scalars(select(Checkpoint.uri).where(*unkept)))
    if not dropped:
        return
    session.execute(update(Checkpoint).where(*unkept).values(uri=None).execution_options(synchronize_session=False))
    still = set(session.scalars(select(Checkpoint.uri).where(Checkpoint.job_id.in_(jobs), STORED)))
    discard_after_commit(session, dropped - still)


def _clear_best_many(session: Session, job_ids: Sequence[str]) -> None:
    if not job_ids:
        return
    session.execute(
        update(Checkpoint)
        .where(Checkpoint.job_id.in_(list(job_ids)), Checkpoint.is_best.is_(True))
        .values(is_best=False)
        .execution_options(synchronize_session=False)
    )


def mark_best_checkpoint(session: Session, job_id: str, sha256: str, data: bytes | None = None) -> bool:
    """Make the newest checkpoint with this digest the job's best; False if no row has it (or
    its file was dropped and ``data`` does not bring it back). Files are kept for the best and
    the newest checkpoint; the others' are dropped. The best's file is never dropped."""
    return mark_best_checkpoints(session, [(job_id, sha256, data)])[job_id]


def mark_best_checkpoints(session: Session, items: Sequence[tuple[str, str, bytes | None]]) -> dict[str, bool]:
    """:func:`mark_best_checkpoint` of several jobs, ``(job_id, sha256, data)`` each (a pack's
    members), in one round of queries for all of them; whether each job's best was marked."""
    if not items:
        return {}
    pairs = [(job_id, sha256) for job_id, sha256, _ in items]
    if len(pairs) == 1:  # a solo run's end: the plain equality (the same plan as ever)
        [(one, digest)] = pairs
        which = and_(Checkpoint.job_id == one, Checkpoint.sha256 == digest)
    else:
        which = tuple_(Checkpoint.job_id, Checkpoint.sha256).in_(pairs)
    found: dict[tuple[str, str], tuple[int, bool]] = {}
    for job_id, digest, ck_id, stored in session.execute(
        select(Checkpoint.job_id, Checkpoint.sha256, Checkpoint.id, STORED).where(which)
        .order_by(STORED.desc(), Checkpoint.id.desc())
    ):
        found.setdefault((job_id, digest), (ck_id, bool(stored)))  # the first: stored first, then the newest
    out: dict[str, bool] = {}
    marked: dict[str, int] = {}
    restored: dict[int, Stored] = {}
    for job_id, sha256, data in items:
        out[job_id] = False
        row = found.get((job_id, sha256))
        if row is None:
            continue
        ck_id, stored = row
        if not stored:
            if data is None or sha256_hex(data) != sha256:
                continue
            restored[ck_id] = get_store().put(checkpoint_key(job_id, sha256), data, sha256)
        marked[job_id] = ck_id
        out[job_id] = True
    if not marked:
        return out
    _clear_best_many(session, list(marked))
    session.execute(update(Checkpoint).where(Checkpoint.id.in_(list(marked.values()))).values(is_best=True)
                    .execution_options(synchronize_session=False))
    for ck_id, put in restored.items():
        session.execute(update(Checkpoint).where(Checkpoint.id == ck_id).values(uri=put.uri, size=put.size)
                        .execution_options(synchronize_session=False))
    newest = dict(session.execute(select(Checkpoint.job_id, func.max(Checkpoint.id))
                                  .where(Checkpoint.job_id.in_(list(marked))).group_by(Checkpoint.job_id)).all())
    _drop_unkept_many(session, {job_id: (ck_id, newest[job_id]) for job_id, ck_id in marked.items()})
    return out


def list_checkpoints(session: Session, job_id: str, project_id: str | None = None) -> list[tuple[Checkpoint, bool]]:
    """Checkpoints and whether their files are still stored (none when the job is not in
    ``project_id``, if given)."""
    q = select(Checkpoint, STORED).where(Checkpoint.job_id == job_id).order_by(Checkpoint.id)
    if project_id is not None:
        q = q.join(Job, Job.id == Checkpoint.job_id).where(Job.project_id == project_id)
    return [(ck, bool(stored)) for ck, stored in session.execute(q)]


def _job_checkpoints(job_id: str, project_id: str | None) -> Any:
    q = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if project_id is not None:
        q = q.join(Job, Job.id == Checkpoint.job_id).where(Job.project_id == project_id)
    return q


def best_checkpoint(session: Session, job_id: str, project_id: str | None = None) -> Checkpoint | None:
    """The job's best checkpoint whose file is stored (its bytes: ``get_store().read``)."""
    q = _job_checkpoints(job_id, project_id).where(Checkpoint.is_best.is_(True), STORED)
    return session.scalars(q.order_by(Checkpoint.id.desc()).limit(1)).first()


def last_checkpoint(session: Session, job_id: str, project_id: str | None = None) -> Checkpoint | None:
    """The newest checkpoint whose file is stored: the last epoch's weights once the job ended
    (the worker stores them at the end, :func:`add_last_checkpoint`)."""
    q = _job_checkpoints(job_id, project_id).where(STORED).order_by(Checkpoint.id.desc()).limit(1)
    return session.scalars(q).first()


def checkpoint_at_epoch(
    session: Session, job_id: str, epoch: int, project_id: str | None = None
) -> tuple[Checkpoint | None, bool]:
    """The newest stored checkpoint taken at ``epoch`` (1-based), and whether any checkpoint of
    that epoch was recorded (its file may have been dropped: only the best and the newest keep
    theirs)."""
    q = _job_checkpoints(job_id, project_id).where(Checkpoint.epoch == epoch)
    stored = session.scalars(q.where(STORED).order_by(Checkpoint.id.desc()).limit(1)).first()
    if stored is not None:
        return stored, True
    recorded = session.scalar(select(func.count()).select_from(q.subquery()))
    return None, bool(recorded)


def add_last_checkpoint(session: Session, job_id: str, *, epoch: int, step: int, monitor: str | None,
                        value: Any, data: bytes, sha256: str, stored: Stored | None = None) -> bool:
    """Store the last epoch's weights as the job's newest checkpoint, unless the newest one
    already is them (same digest). Returns whether a row was added."""
    return add_last_checkpoints(session, {job_id: dict(epoch=epoch, step=step, monitor=monitor, value=value, data=data,
                                                       sha256=sha256, stored=stored)})[job_id]


def add_last_checkpoints(session: Session, items: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """:func:`add_last_checkpoint` of several jobs (``items``: each job's keywords; a pack's
    members): one read of their newest digests, the rows added together
    (:func:`add_checkpoints_many`). Whether a row was added, by job id."""
    if not items:
        return {}
    ids = list(items)
    newest_ids = select(func.max(Checkpoint.id)).where(Checkpoint.job_id.in_(ids)).group_by(Checkpoint.job_id)
    newest = dict(session.execute(select(Checkpoint.job_id, Checkpoint.sha256).where(Checkpoint.id.in_(newest_ids))).all())
    added = {job_id: [dict(it, is_best=False)] for job_id, it in items.items() if newest.get(job_id) != it["sha256"]}
    add_checkpoints_many(session, added)
    return {job_id: job_id in added for job_id in items}


def save_snapshot(session: Session, job_id: str, *, epoch: int, step: int, data: bytes, sha256: str,
                  stored: Stored | None = None) -> None:
    """Write the job's training-state snapshot to the artifact store (unless the caller did:
    ``stored``) and keep only it (the previous one's file is deleted after the commit)."""
    save_snapshots(session, {job_id: dict(epoch=epoch, step=step, data=data, sha256=sha256, stored=stored)})


def save_snapshots(session: Session, items: dict[str, dict[str, Any]]) -> None:
    """:func:`save_snapshot` of several jobs (``items``: each job's keywords; a pack's members'
    final snapshots): one read of the previous ones, one delete, one insert."""
    if not items:
        return
    stored = {job_id: it.get("stored") or get_store().put(snapshot_key(job_id, it["sha256"]), it["data"], it["sha256"])
              for job_id, it in items.items()}
    previous = dict(session.execute(select(Snapshot.job_id, Snapshot.uri).where(Snapshot.job_id.in_(list(items)))).all())
    session.execute(delete(Snapshot).where(Snapshot.job_id.in_(list(items))))
    session.add_all([Snapshot(job_id=job_id, epoch=it["epoch"], step=it["step"], size=stored[job_id].size,
                              sha256=it["sha256"], uri=stored[job_id].uri, created_at=utcnow())
                     for job_id, it in items.items()])
    discard_after_commit(session, [uri for job_id, uri in previous.items() if uri != stored[job_id].uri])


def get_snapshot(session: Session, job_id: str) -> Snapshot | None:
    """The job's snapshot row (its bytes: :func:`snapshot_bytes`)."""
    return session.get(Snapshot, job_id)


def snapshot_bytes(snapshot: Snapshot) -> bytes:
    """The snapshot's bytes, verified (:class:`store.artifact_store.ArtifactError` if its file is
    missing or not the recorded one)."""
    return get_store().read(snapshot.uri, snapshot.sha256, snapshot.size,
                            what=f"the training-state snapshot of epoch {snapshot.epoch}")


def delete_jobs(session: Session, job_ids: Sequence[str]) -> list[str]:
    """Delete those of these jobs that have ended (succeeded, failed or cancelled) with their
    rows (metrics, events, checkpoints, snapshot, exports: the foreign keys cascade) and, after
    the commit, their folders in the artifact store (every file of theirs, any a rolled-back
    write left included). Returns the ids deleted; a job not ended is left alone."""
    if not job_ids:
        return []
    gone = list(session.scalars(
        delete(Job).where(Job.id.in_(list(job_ids)), Job.status.in_(TERMINAL_STATUSES)).returning(Job.id)
    ))
    discard_after_commit(session, [], prefixes=[job_prefix(j) for j in gone])
    return gone


def delete_sweep(session: Session, sweep_id: str) -> tuple[list[str], int]:
    """Delete an ended sweep with its trials (and their artifacts, :func:`delete_jobs`). Returns
    the trials deleted and how many have not ended yet: if any, the sweep is not deleted and the
    caller rolls back."""
    from store.models import Sweep

    trials = list(session.scalars(select(Job.id).where(Job.sweep_id == sweep_id)))
    gone = delete_jobs(session, trials)
    left = len(trials) - len(gone)
    if not left:
        session.execute(delete(Sweep).where(Sweep.id == sweep_id))
    return gone, left


# --------------------------------------------------------------------------- datasets


def create_dataset(session: Session, **fields: Any) -> Dataset:
    ds = Dataset(created_at=utcnow(), **fields)
    session.add(ds)
    session.flush()
    return ds


def get_dataset(session: Session, dataset_id: str, project_id: str | None = None) -> Dataset | None:
    """The dataset, if it exists (and, given ``project_id``, belongs to that project)."""
    if project_id is None:
        return session.get(Dataset, dataset_id)
    return session.scalars(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.project_id == project_id)
    ).one_or_none()


def project_dataset_bytes(session: Session, project_id: str) -> int:
    """The uploaded bytes of the project's stored datasets (its dataset quota counts these)."""
    return int(session.scalar(select(func.coalesce(func.sum(Dataset.size), 0)).where(Dataset.project_id == project_id))
               or 0)


def dataset_users(session: Session, dataset_id: str, project_id: str) -> list[str]:
    """Ids of the project's unfinished jobs (queued, running, paused) and running sweeps whose spec
    names the dataset: deleting it would fail them."""
    from store.models import Sweep

    jobs = session.scalars(
        select(Job.id).where(Job.project_id == project_id, Job.status.in_(("queued", "running", "paused")),
                             Job.spec["data"]["dataset"].as_string() == dataset_id).limit(20)
    ).all()
    sweeps = session.scalars(
        select(Sweep.id).where(Sweep.project_id == project_id, Sweep.status == "running",
                               Sweep.config["base"]["data"]["dataset"].as_string() == dataset_id).limit(20)
    ).all()
    return [*jobs, *sweeps]


def delete_dataset(session: Session, dataset_id: str) -> None:
    session.execute(delete(Dataset).where(Dataset.id == dataset_id))


def list_datasets(session: Session, limit: int = 1000, project_id: str | None = None) -> list[Dataset]:
    q = select(Dataset)
    if project_id is not None:
        q = q.where(Dataset.project_id == project_id)
    return list(session.scalars(q.order_by(Dataset.id.desc()).limit(limit)))


def select_job_status(job_id: str, project_id: str | None = None) -> Any:
    """A statement selecting one job's status (None if it does not exist, or is not in
    ``project_id`` when given)."""
    q = select(Job.status).where(Job.id == job_id)
    return q if project_id is None else q.where(Job.project_id == project_id)


def requeue_job(session: Session, job_id: str, reason: str, stale_after_s: float | None = None,
                cond: Sequence[Any] = (), stop_reason: str | None = None, detail: str | None = None,
                spare_attempt: bool = False) -> bool:
    """running -> queued: its worker is shutting down (the broker message is requeued), was lost
    (heartbeat older than ``stale_after_s``, or the extra conditions ``cond``; the caller sends a
    new message) or stalled. The event records ``reason`` (and the attempt's ``stop_reason`` and a
    ``detail``, if given). The next claim resumes from the latest snapshot. ``spare_attempt``: the
    attempt ended by a decision, not a fault (a preemption), so it does not count against
    ``max_attempts`` (like a promoted trial's new run)."""
    now = utcnow()
    where = list(cond)
    if stale_after_s is not None:
        where.append(Job.heartbeat_at < now - timedelta(seconds=stale_after_s))
    if not lifecycle.move(session, job_id, (lifecycle.RUNNING,), lifecycle.QUEUED, where=where,
                          values=dict(updated_at=now, preempt_requested=False,
                                      **({"max_attempts": Job.max_attempts + 1} if spare_attempt else {}))):
        return False
    event: dict[str, Any] = {"status": "queued", "reason": reason}
    if stop_reason is not None:
        event["stop_reason"] = stop_reason
    if detail is not None:
        event["detail"] = detail
    add_event(session, job_id, "state", event, now)
    return True


def ids_with_prefix(session: Session, model: Any, prefix: str, project_id: str | None = None, limit: int = 10) -> list[str]:
    """Ids of ``model`` rows (jobs, sweeps, datasets) that start with ``prefix``, in the project
    when given: at most ``limit``, oldest first."""
    q = select(model.id).where(model.id >= prefix, model.id.startswith(prefix, autoescape=True))
    if project_id is not None:
        q = q.where(model.project_id == project_id)
    return list(session.scalars(q.order_by(model.id).limit(limit)))


def datasets_named(session: Session, name: str, project_id: str | None = None, limit: int = 10) -> list[Dataset]:
    """The project's stored datasets called ``name`` (names need not be unique), oldest first."""
    q = select(Dataset).where(Dataset.name == name)
    if project_id is not None:
        q = q.where(Dataset.project_id == project_id)
    return list(session.scalars(q.order_by(Dataset.id).limit(limit)))
