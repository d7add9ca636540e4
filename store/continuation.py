"""Continuing a job that ran all its epochs: more epochs, from the state after its last one.

The worker keeps that state (a snapshot of the last epoch, written with the result: see
``Settings.keep_final_snapshot``). :func:`continue_job` puts the job back in the queue with its
``epochs`` raised, in one transaction with its event and outbox row; its next claim is a new
attempt, which resumes from the snapshot, so the job's metrics, checkpoints and best value carry
on as if it had been submitted with the total from the start.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store import lifecycle, outbox
from store.models import Job, Snapshot


def why_not(session: Session, job: Job) -> str | None:
    """Why ``job`` cannot be continued (None if it can)."""
    if job.status != "succeeded" or job.stop_reason != "completed":
        return (f"job {job.id} ended {job.status} ({job.stop_reason or 'no stop reason'}); only a job that ran all "
                "its epochs can be continued (clone it instead)")
    if job.sweep_id is not None:
        return f"job {job.id} is a trial of sweep {job.sweep_id}; extend the sweep instead"
    snap_epoch = session.scalar(select(Snapshot.epoch).where(Snapshot.job_id == job.id))
    if snap_epoch != job.epoch:
        return (f"job {job.id} has no training state of its last epoch ({job.epoch}) to continue from "
                "(it ran with keep_final_snapshot off, or before continuing existed); clone it instead")
    return None


def continue_job(session: Session, job: Job, spec: dict[str, Any]) -> bool:
    """Queue ``job`` again with ``spec`` (its spec with more epochs), if it is still as it was
    (succeeded, completed). Its event and outbox row are written in this transaction. The run
    is one more attempt (``max_attempts`` grows by one, as a sweep's promotion does)."""
    from store.repo import add_event, utcnow

    now = utcnow()
    moved = lifecycle.move(
        session, job.id, (lifecycle.SUCCEEDED,), lifecycle.QUEUED, where=[Job.stop_reason == "completed"],
        values={"spec": spec, "epochs": int(spec["epochs"]), "stop_reason": None, "error": None, "finished_at": None,
                "cancel_requested": False, "max_attempts": Job.max_attempts + 1, "updated_at": now},
    )
    if not moved:
        return False
    add_event(session, job.id, "state", {"status": "queued", "reason": "continued", "epochs": int(spec["epochs"])}, now)
    outbox.add(session, [(job.id, job.queue)])
    return True
