"""Claiming a pack: the queued jobs a worker may train fused with the job it claimed.

A worker that claims a packable job (``worker/packs.py``) reads the next queued jobs of the same
queue, in claim order (:mod:`store.scheduling`: priority, then age), and claims those of the same
shape, each through :func:`store.repo.claim_job` (the compare-and-set of ``store/lifecycle.py``;
queued jobs only, no take-over). On PostgreSQL the read is ``SELECT ... FOR UPDATE SKIP LOCKED``,
so two workers never read the same candidates at once; SQLite serializes writers. Kept apart from
:func:`store.scheduling.pick_next`, which picks one job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store import repo
from store.models import Job


@dataclass(frozen=True)
class Candidate:
    """A queued job that might join a pack."""

    id: str
    spec: dict[str, Any]


def queued_candidates(session: Session, job_id: str, limit: int) -> list[Candidate]:
    """Up to ``limit`` queued jobs of ``job_id``'s queue and project, in claim order, row-locked on
    PostgreSQL (skipping rows another worker holds). First attempts and jobs that resume from a
    snapshot alike (a sweep's promoted trials, the requeued members of a pack whose worker died):
    the worker resumes each member from its own snapshot. Other projects' jobs are left out: the
    fair share between projects (:mod:`store.scheduling`) picks whose job runs next, and a pack
    never carries another project's jobs past it."""
    lead = select(Job.queue, Job.project_id).where(Job.id == job_id).subquery()
    q = (
        select(Job.id, Job.spec)
        .where(Job.queue == select(lead.c.queue).scalar_subquery(),
               Job.project_id == select(lead.c.project_id).scalar_subquery(),
               Job.status == "queued", Job.cancel_requested.is_(False), Job.id != job_id)
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [Candidate(i, dict(spec)) for i, spec in session.execute(q)]


def mark_pack(session: Session, ids: list[str]) -> None:
    """Record on each member of a pack (``ids``, the claimed job first) which pack it trains in,
    as soon as the pack is formed: ``info.pack`` (``id``: the job whose claim formed it, ``jobs``,
    ``size``, ``index``; the worker's reporter keeps it when the run's own info is written) and a
    ``pack`` event."""
    for k, job_id in enumerate(ids):
        pack = {"id": ids[0], "jobs": list(ids), "size": len(ids), "index": k}
        info = session.scalar(select(Job.info).where(Job.id == job_id)) or {}
        session.execute(update(Job).where(Job.id == job_id).values(info={**info, "pack": pack})
                        .execution_options(synchronize_session=False))
        repo.add_event(session, job_id, "pack", {"pack": ids[0], "size": len(ids), "index": k})


def claim_members(session: Session, job_ids: list[str], worker: str, stale_after_s: float) -> list[Job]:
    """Claim each of ``job_ids`` (queued -> running, a new lease token each); the jobs claimed, in
    order (one another worker took meanwhile is left out)."""
    claimed = []
    for job_id in job_ids:
        job = repo.claim_job(session, job_id, worker, stale_after_s, take_over=False)
        if job is not None:
            claimed.append(job)
    return claimed
