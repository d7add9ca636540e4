"""ORM rows to response models (ORM objects never leak into responses)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import object_session

from api.schemas.jobs import CheckpointRead, JobRead, JobSummary
from api.schemas.misc import DatasetRead
from store import scheduling
from store.fastread import JOB_COLUMNS, job_view
from store.floats import from_text
from store.models import Checkpoint, Dataset, Job
from store.repo import as_utc


def _summary_fields(job: Job) -> dict[str, Any]:
    """The job's view, built as every poll builds it (:func:`store.fastread.job_view`)."""
    return job_view({c: getattr(job, c) for c in JOB_COLUMNS}, when=as_utc)


def job_summary(job: Job) -> JobSummary:
    return JobSummary(**_summary_fields(job))


def job_read(job: Job) -> JobRead:
    session = object_session(job)
    position = start = None
    if session is not None and job.status == "queued":
        rank = scheduling.queue_rank(session, job.id)
        position, start = scheduling.queued_view(session.get_bind(), job.queue, job.project_id, rank)
    return JobRead(**_summary_fields(job), spec=job.spec, info=job.info, queue_position=position,
                   estimated_start_at=start)


def checkpoint_read(ck: Checkpoint, stored: bool) -> CheckpointRead:
    return CheckpointRead(
        id=ck.id, epoch=ck.epoch, step=ck.step, monitor=ck.monitor, value=from_text(ck.value), size=ck.size,
        sha256=ck.sha256, is_best=ck.is_best, stored=stored, created_at=as_utc(ck.created_at),
    )


def dataset_read(ds: Dataset) -> DatasetRead:
    return DatasetRead(
        id=ds.id, name=ds.name, filename=ds.filename, format=ds.format, task=ds.task,
        input_shape=list(ds.input_shape), n_classes=ds.n_classes, n_targets=ds.n_targets,
        n_samples=ds.n_samples, size=ds.size, sha256=ds.sha256, created_at=as_utc(ds.created_at),
    )
