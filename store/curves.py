"""Finished jobs' curves, compacted: when a job reaches a terminal status, its epochs' stored JSON
texts are joined, in epoch order, into one JSON array in ``job_curves`` (one row per job).

Why: ``POST /v1/metrics/bulk`` answers the curves of up to 1,000 jobs, and a dashboard's jobs are
mostly finished. Read one row per epoch, 1,000 jobs x 100 epochs is 100,000 rows to fetch and
aggregate on every request; read one row per job, it is 1,000 (bench/dashboards.py, BENCHMARKS.md).
A terminal job's epochs do not change (terminal statuses move nowhere, :mod:`store.lifecycle`);
should one be written anyway, :func:`drop` (called by every epoch write) removes the compacted
curve and readers fall back to the rows.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import Text, cast, delete, insert, select

from store.models import JobCurve, JobMetric


def compact(conn: Any, job_id: str) -> None:
    """Store the job's whole curve as one row (a Session or a Connection; in its transaction)."""
    compact_many(conn, [job_id])


def compact_many(conn: Any, job_ids: Collection[str]) -> None:
    """:func:`compact` of several jobs (a pack's members that ended together): one read, one
    delete, one insert."""
    ids = list(job_ids)
    texts: dict[str, list[str]] = {}
    for job_id, text in conn.execute(
        select(JobMetric.job_id, cast(JobMetric.values, Text)).where(JobMetric.job_id.in_(ids))
        .order_by(JobMetric.job_id, JobMetric.epoch)
    ):
        texts.setdefault(job_id, []).append(text)
    conn.execute(delete(JobCurve).where(JobCurve.job_id.in_(ids)))
    if texts:
        conn.execute(insert(JobCurve), [{"job_id": j, "n": len(t), "body": f"[{','.join(t)}]"} for j, t in texts.items()])


def drop(conn: Any, job_ids: Collection[str]) -> None:
    """Forget the compacted curves of jobs whose epochs are being written."""
    conn.execute(delete(JobCurve).where(JobCurve.job_id.in_(list(job_ids))).execution_options(synchronize_session=False))
