"""Which queued job a free worker starts next, and where a queued job stands.

The database decides, not the broker: every message ``trainyard.run_job(id)`` is a token for "a
slot of this queue is free"; the worker that receives it claims the *best* queued job of the
message's queue (:func:`pick_next`: highest ``priority``, then the oldest, then the id), which
need not be the message's job. The message of the job it took stays in the broker and later starts
whichever job is best then, so each queued job still has one message and each message starts at
most one job (a duplicate message starts none or an early one, never a job twice: the claim is a
compare-and-set). On PostgreSQL the pick is ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent
workers pick different jobs without waiting for one another; SQLite serializes writers
(``BEGIN IMMEDIATE``) and needs no lock clause.

The order is the one :func:`position_sql` counts, so ``queue_position`` in the job view is the
number of claims before this job's (1 = next)."""

from __future__ import annotations

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from store.models import Job, Project, Sweep

#: the range PATCH and create accept (higher runs first)
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000


def pick_next(session: Session, job_id: str) -> str | None:
    """The id of the best queued job in the queue of ``job_id`` (the message that arrived), row-locked
    on PostgreSQL (skipping rows another worker is claiming), or None when none is queued."""
    queue = select(Job.queue).where(Job.id == job_id).scalar_subquery()
    q = (
        select(Job.id)
        .where(Job.queue == queue, Job.status == "queued")
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return session.scalar(q)


def position_sql(alias: str) -> str:
    """SQL for the 1-based queue position of the job row ``alias`` (NULL unless it is queued): the
    queued jobs of its queue that :func:`pick_next` takes before it, plus one."""
    a = alias
    return (
        f"CASE WHEN {a}.status = 'queued' THEN (SELECT count(*) + 1 FROM jobs ahead "
        f"WHERE ahead.queue = {a}.queue AND ahead.status = 'queued' AND (ahead.priority > {a}.priority "
        f"OR (ahead.priority = {a}.priority AND (ahead.created_at < {a}.created_at "
        f"OR (ahead.created_at = {a}.created_at AND ahead.id < {a}.id))))) END"
    )


def queue_position(session: Session, job_id: str) -> int | None:
    return session.execute(
        text(f"SELECT {position_sql('j')} FROM jobs j WHERE j.id = :id"), {"id": job_id}
    ).scalar()


def set_priority(session: Session, job_id: str, priority: int) -> bool:
    """Change a queued job's priority; False if it is not queued (then it is too late)."""
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued").values(priority=priority)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def set_sweep_priority(session: Session, sweep: Sweep, priority: int) -> None:
    """A sweep's priority: its queued trials now, its next trials when they are created."""
    sweep.priority = priority
    session.execute(
        update(Job).where(Job.sweep_id == sweep.id, Job.status == "queued").values(priority=priority)
        .execution_options(synchronize_session=False)
    )


def queued_by_project(session: Session) -> list[tuple[str, str, int]]:
    """(project name, queue, queued jobs) for /metrics."""
    q = (
        select(Project.name, Job.queue, func.count())
        .join(Project, Project.id == Job.project_id)
        .where(Job.status == "queued")
        .group_by(Project.name, Job.queue)
    )
    return [(p, qn, int(n)) for p, qn, n in session.execute(q)]
