"""Exported models (rows only): one row per (job, format, source checkpoint), produced by a
worker. The API creates the ``pending`` row and sends ``trainyard.export(artifact_id)``; the
worker fills in the bytes (``ready``) or the reason (``failed``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from store.models import Artifact, Checkpoint, Job
from store.repo import sha256_hex, utcnow


def find(session: Session, job_id: str, fmt: str, checkpoint_sha256: str, *, with_data: bool = True) -> Artifact | None:
    q = select(Artifact).where(
        Artifact.job_id == job_id, Artifact.format == fmt, Artifact.checkpoint_sha256 == checkpoint_sha256
    )
    if not with_data:
        q = q.options(defer(Artifact.data))
    return session.scalars(q).first()


def get(session: Session, artifact_id: int) -> Artifact | None:
    return session.get(Artifact, artifact_id)


def data_of(session: Session, artifact_id: int) -> bytes | None:
    """The exported bytes of an artifact (None until it is ready)."""
    return session.scalar(select(Artifact.data).where(Artifact.id == artifact_id))


def request(session: Session, job_id: str, fmt: str, checkpoint_sha256: str, checkpoint_epoch: int) -> tuple[Artifact, bool]:
    """The artifact row for this export, created ``pending`` if there is none (a concurrent
    request that created it first wins). Returns ``(row, created)``; the caller commits."""
    existing = find(session, job_id, fmt, checkpoint_sha256, with_data=False)
    if existing is not None:
        return existing, False
    now = utcnow()
    row = Artifact(job_id=job_id, format=fmt, checkpoint_sha256=checkpoint_sha256, checkpoint_epoch=checkpoint_epoch,
                   status="pending", created_at=now, updated_at=now)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        found = find(session, job_id, fmt, checkpoint_sha256, with_data=False)
        assert found is not None
        return found, False
    return row, True


def retry(session: Session, artifact_id: int) -> None:
    """Mark a failed or stalled export pending again (its message is sent anew)."""
    session.execute(
        update(Artifact).where(Artifact.id == artifact_id)
        .values(status="pending", error=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def complete(session: Session, artifact_id: int, data: bytes, card: dict[str, Any] | None) -> str:
    """Store the exported bytes; returns their sha256."""
    digest = sha256_hex(data)
    session.execute(
        update(Artifact).where(Artifact.id == artifact_id)
        .values(status="ready", data=data, size=len(data), sha256=digest, card=card, error=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return digest


def fail(session: Session, artifact_id: int, error: str) -> None:
    session.execute(
        update(Artifact).where(Artifact.id == artifact_id)
        .values(status="failed", error=error[:10_000], updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def checkpoint_ref(session: Session, job_id: str, which: str, project_id: str | None = None) -> tuple[str, int] | None:
    """``(sha256, epoch)`` of a job's stored checkpoint: ``best``, ``last`` (the newest stored) or
    an epoch number (the newest stored at that epoch); None if there is none with its bytes."""
    q = select(Checkpoint.sha256, Checkpoint.epoch).where(Checkpoint.job_id == job_id, Checkpoint.data.is_not(None))
    if project_id is not None:
        q = q.join(Job, Job.id == Checkpoint.job_id).where(Job.project_id == project_id)
    if which == "best":
        q = q.where(Checkpoint.is_best.is_(True))
    elif which != "last":
        q = q.where(Checkpoint.epoch == int(which))
    row = session.execute(q.order_by(Checkpoint.id.desc()).limit(1)).first()
    return None if row is None else (row[0], int(row[1]))
