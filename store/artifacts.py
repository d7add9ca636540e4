"""Exported models: one row per (job, format, source checkpoint), produced by a worker. The API
creates the ``pending`` row and sends ``trainyard.export(artifact_id)``; the worker writes the
file to the artifact store (store/artifact_store.py) and marks the row ``ready``, or records the
reason (``failed``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.artifact_store import export_key, get_store
from store.models import Artifact, Checkpoint, Job
from store.repo import STORED, sha256_hex, utcnow


def find(session: Session, job_id: str, fmt: str, checkpoint_sha256: str) -> Artifact | None:
    """The export's row (its bytes: :func:`data_of`)."""
    q = select(Artifact).where(
        Artifact.job_id == job_id, Artifact.format == fmt, Artifact.checkpoint_sha256 == checkpoint_sha256
    )
    return session.scalars(q).first()


def get(session: Session, artifact_id: int) -> Artifact | None:
    return session.get(Artifact, artifact_id)


def data_of(session: Session, artifact_id: int) -> bytes | None:
    """The exported bytes of an artifact, verified (None until it is ready; an
    :class:`~store.artifact_store.ArtifactError` if its file is missing or corrupt)."""
    row = session.execute(
        select(Artifact.uri, Artifact.sha256, Artifact.size, Artifact.format, Artifact.job_id)
        .where(Artifact.id == artifact_id)
    ).first()
    if row is None or row.uri is None or row.sha256 is None:
        return None
    return get_store().read(row.uri, row.sha256, row.size, what=f"the {row.format} export of job {row.job_id}")


def request(session: Session, job_id: str, fmt: str, checkpoint_sha256: str, checkpoint_epoch: int) -> tuple[Artifact, bool]:
    """The artifact row for this export, created ``pending`` if there is none (a concurrent
    request that created it first wins). Returns ``(row, created)``; the caller commits."""
    existing = find(session, job_id, fmt, checkpoint_sha256)
    if existing is not None:
        return existing, False
    now = utcnow()
    row = Artifact(job_id=job_id, format=fmt, checkpoint_sha256=checkpoint_sha256, checkpoint_epoch=checkpoint_epoch,
                   status="pending", created_at=now, updated_at=now)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        found = find(session, job_id, fmt, checkpoint_sha256)
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
    """Write the exported bytes to the artifact store and mark the row ready; returns their
    sha256."""
    digest = sha256_hex(data)
    row = session.get(Artifact, artifact_id)
    if row is None:
        return digest
    stored = get_store().put(export_key(row.job_id, row.format, digest), data, digest)
    session.execute(
        update(Artifact).where(Artifact.id == artifact_id)
        .values(status="ready", uri=stored.uri, size=stored.size, sha256=digest, card=card, error=None,
                updated_at=utcnow())
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
    q = select(Checkpoint.sha256, Checkpoint.epoch).where(Checkpoint.job_id == job_id, STORED)
    if project_id is not None:
        q = q.join(Job, Job.id == Checkpoint.job_id).where(Job.project_id == project_id)
    if which == "best":
        q = q.where(Checkpoint.is_best.is_(True))
    elif which != "last":
        q = q.where(Checkpoint.epoch == int(which))
    row = session.execute(q.order_by(Checkpoint.id.desc()).limit(1)).first()
    return None if row is None else (row[0], int(row[1]))
