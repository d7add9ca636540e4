"""Claiming a pack: the queued jobs a worker may train fused with the job it claimed.

A worker that claims a packable job (``worker/packs.py``) reads the next queued jobs of the same
queue, in claim order (:mod:`store.scheduling`: priority, then age), and claims those of the same
shape, all in one compare-and-set (:func:`store.repo.claim_queued`, ``store/lifecycle.py``;
queued jobs only, no take-over). On PostgreSQL the read is ``SELECT ... FOR UPDATE SKIP LOCKED``,
so two workers never read the same candidates at once; SQLite serializes writers. Kept apart from
:func:`store.scheduling.pick_next`, which picks one job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from store import repo
from store.models import Job, JobEvent

#: the stop reasons of an attempt that a fault ended: its worker was lost, or its training stalled
#: (``orchestration.recovery.end_attempt`` writes them into the job's move back to the queue)
FAULT_STOP_REASONS = ("worker_lost", "stalled")


def _after_a_fault() -> Any:
    """True for a job whose latest move back to the queue ended an attempt by a fault. Such a job
    runs alone (its claim forms no pack, and no pack takes it in): a pack that brought its worker
    down (memory, a crash in native code) is not formed again as it was, attempt after attempt;
    alone, each member gets the retry a solo job gets. A promotion, a preemption or a worker's
    shutdown is no fault: those jobs are packed."""
    moves = aliased(JobEvent)
    last = (select(func.max(moves.id))
            .where(moves.job_id == Job.id, moves.kind == "state", moves.data["status"].as_string() == "queued")
            .scalar_subquery())
    return exists().where(JobEvent.id == last, JobEvent.data["stop_reason"].as_string().in_(FAULT_STOP_REASONS))


def resumes_alone(session: Session, job_id: str) -> bool:
    """Whether ``job_id`` must run alone: its last attempt ended by a fault (:func:`_after_a_fault`)."""
    return session.scalar(select(Job.id).where(Job.id == job_id, _after_a_fault())) is not None


@dataclass(frozen=True)
class Candidate:
    """A queued job that might join a pack."""

    id: str
    spec: dict[str, Any]


def queued_candidates(session: Session, job_id: str, limit: int) -> list[Candidate]:
    """Up to ``limit`` queued jobs of ``job_id``'s queue and project, in claim order, row-locked on
    PostgreSQL (skipping rows another worker holds). First attempts and jobs that resume from a
    snapshot alike (a sweep's promoted trials, the jobs of a worker that shut down): the worker
    resumes each member from its own snapshot. Not those whose last attempt a fault ended (a lost
    worker, a stall): they run alone (:func:`resumes_alone`). Other projects' jobs are left out: the
    fair share between projects (:mod:`store.scheduling`) picks whose job runs next, and a pack
    never carries another project's jobs past it."""
    lead = select(Job.queue, Job.project_id).where(Job.id == job_id).subquery()
    q = (
        select(Job.id, Job.spec)
        .where(Job.queue == select(lead.c.queue).scalar_subquery(),
               Job.project_id == select(lead.c.project_id).scalar_subquery(),
               Job.status == "queued", Job.cancel_requested.is_(False), Job.id != job_id,
               (Job.attempts == 0) | ~_after_a_fault())
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [Candidate(i, dict(spec)) for i, spec in session.execute(q)]


def mark_pack(session: Session, ids: list[str]) -> None:
    """Record on each member of a pack (``ids``, the claimed job first) which pack it trains in,
    as soon as the pack is formed: ``info.pack`` (``id``: the job whose claim formed it, ``jobs``,
    ``size``, ``index``; the worker's reporter keeps it when the run's own info is written) and a
    ``pack`` event. One read, one executemany and one insert of events for all members."""
    infos = dict(session.execute(select(Job.id, Job.info).where(Job.id.in_(ids))).all())
    table = Job.__table__
    session.connection().execute(
        update(table).where(table.c.id == bindparam("b_id")).values(info=bindparam("b_info", type_=table.c.info.type)),
        [{"b_id": job_id, "b_info": {**(infos.get(job_id) or {}),
                                     "pack": {"id": ids[0], "jobs": list(ids), "size": len(ids), "index": k}}}
         for k, job_id in enumerate(ids)])
    repo.add_events(session, [(job_id, "pack", {"pack": ids[0], "size": len(ids), "index": k}) for k, job_id in enumerate(ids)])


def claim_members(session: Session, job_ids: list[str], worker: str, stale_after_s: float) -> list[Job]:
    """Claim those of ``job_ids`` still queued (queued -> running, a new lease token each) in one
    compare-and-set for all (:func:`store.repo.claim_queued`); the jobs claimed, in order (one
    another worker took meanwhile is left out)."""
    return repo.claim_queued(session, job_ids, worker)
