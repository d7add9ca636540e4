"""Sweeps: their rows and their trials (jobs with ``sweep_id``), as queries. Functions take a
session and never commit. The decisions (which trials to start, promote or end, when the sweep is
over) are :mod:`orchestration.sweeps`'.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlalchemy import String, func, literal, select, update
from sqlalchemy.orm import Session, defer

from store import repo, webhooks
from store.floats import decode_float
from store.ids import new_id
from store.models import Job, JobMetric, Sweep

log = logging.getLogger("trainyard.sweeps")

SWEEP_TERMINAL = ("succeeded", "failed", "cancelled")
#: trial statuses that hold one of the sweep's ``max_concurrent`` slots (a paused trial does not)
ACTIVE = ("queued", "running")


# --------------------------------------------------------------------------- rows


def create_sweep(
    session: Session, *, project_id: str, name: str, method: str, config: dict[str, Any], objective_metric: str,
    objective_mode: str, max_trials: int, max_concurrent: int, priority: int = 0,
    labels: dict[str, str] | None = None, notes: str | None = None,
) -> Sweep:
    now = repo.utcnow()
    sweep = Sweep(
        id=new_id(), project_id=project_id, name=name, status="running", method=method, config=config,
        objective_metric=objective_metric, objective_mode=objective_mode, max_trials=max_trials,
        max_concurrent=max_concurrent, trials_created=0, created_at=now, updated_at=now, priority=priority,
        labels=dict(labels or {}), notes=notes,
    )
    session.add(sweep)
    session.flush()
    repo.add_sweep_event(session, sweep.id, "created", {"status": "running", "name": name}, now)
    return sweep


def get_sweep(session: Session, sweep_id: str, project_id: str | None = None, *, lock: bool = False) -> Sweep | None:
    """The sweep (of ``project_id`` when given); ``lock`` takes its row lock for the rest of the
    transaction and reads it fresh."""
    q = select(Sweep).where(Sweep.id == sweep_id)
    if project_id is not None:
        q = q.where(Sweep.project_id == project_id)
    if lock:
        q = q.with_for_update().execution_options(populate_existing=True)
    return session.scalars(q).one_or_none()


def list_sweeps(
    session: Session, project_id: str, *, limit: int, cursor: str | None, status: Sequence[str] = ()
) -> list[Sweep]:
    """Newest first (ids are time-ordered); up to ``limit + 1`` rows (a next page exists if more)."""
    q = select(Sweep).options(defer(Sweep.config)).where(Sweep.project_id == project_id)
    if status:
        q = q.where(Sweep.status.in_(list(status)))
    if cursor:
        q = q.where(Sweep.id < cursor)
    return list(session.scalars(q.order_by(Sweep.id.desc()).limit(limit + 1)))


def trials(session: Session, sweep_id: str) -> list[Job]:
    """The sweep's trial jobs by trial number (without spec and info)."""
    q = (
        select(Job).options(defer(Job.spec), defer(Job.info))
        .where(Job.sweep_id == sweep_id).order_by(Job.trial_number)
        .execution_options(populate_existing=True)  # statuses changed by UPDATEs in this transaction
    )
    return list(session.scalars(q))


#: a metric name the databases' JSON paths take as it is (every metric the engine reports)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]{1,100}")


def _metric_of(session: Session, metric: str) -> Any:
    """The column of each ``JobMetric`` row's value of ``metric``: its JSON text cut out of the
    row's object by the database (``->``, the stored text verbatim, so exact; PostgreSQL, and SQLite
    from 3.38 on), decoded alone (:func:`_metric_value`). Decoding every row's whole metrics
    object took ~0.2 s of a 1,000-trial x 27-epoch sweep's 0.25 s read. An unusual name, or an
    older SQLite: the whole object (the caller takes the metric out)."""
    sqlite = session.get_bind().dialect.name == "sqlite"
    if _PLAIN_KEY.fullmatch(metric) is None or (sqlite and sqlite3.sqlite_version_info < (3, 38, 0)):
        return JobMetric.values
    path = f'$."{metric}"' if sqlite else metric
    # as text: SQLite gives the JSON text itself, which _metric_value parses (PostgreSQL's driver
    # decodes a json value on its own, whatever SQLAlchemy's type)
    return JobMetric.values.op("->", return_type=String)(literal(path, String))


def _metric_value(value: Any, metric: str) -> float | None:
    """A value of :func:`_metric_of`'s column as a float (None: the row has no such metric): a
    JSON number's text by ``float()``, as ``json.loads`` reads it and exact; a JSON string (a
    non-finite value, stored as ``"NaN"``...) by ``json.loads``; a decoded value or the whole
    metrics object by :func:`store.floats.decode_float`."""
    if isinstance(value, dict):
        return decode_float(value.get(metric))
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            value = json.loads(value) if value.startswith('"') else value
    return decode_float(value)


def objective_series(session: Session, sweep_id: str, metric: str) -> dict[str, dict[int, float]]:
    """job id -> {epoch: value of the objective metric} for every trial of the sweep (non-finite
    values as floats; epochs without the metric left out). Read on the session's connection
    (plain rows, no ORM loading: a 27-trial x 27-epoch sweep's read 2.6-3.6 -> 1.7-2.7 ms on
    SQLite, measured with other work beside it)."""
    q = (
        select(JobMetric.job_id, JobMetric.epoch, _metric_of(session, metric))
        .join(Job, Job.id == JobMetric.job_id)
        .where(Job.sweep_id == sweep_id)
    )
    out: dict[str, dict[int, float]] = {}
    session.flush()  # what the session holds unwritten, as session.execute's autoflush would
    for job_id, epoch, value in session.connection().execute(q).all():
        v = _metric_value(value, metric)
        if v is not None:
            out.setdefault(job_id, {})[int(epoch)] = float(v)
    return out


def objective_values(epochs: Sequence[dict[str, Any]], metric: str) -> dict[int, float]:
    """{epoch: value of ``metric``} of metric dicts as the engine reports them (each has
    ``epoch``); epochs without a value of the metric are left out, as in :func:`objective_series`."""
    out: dict[int, float] = {}
    for m in epochs:
        v = decode_float(m.get(metric))
        if v is not None and "epoch" in m:
            out[int(m["epoch"])] = float(v)
    return out


def cancel_sweep(session: Session, sweep: Sweep) -> list[str]:
    """End a running sweep as ``cancelled`` (call with its row lock): no new trials. Returns the
    ids of its unfinished trials, for the caller to cancel AFTER this transaction commits, one
    short transaction each (:func:`store.repo.request_cancel`: queued ones at once, running ones
    flagged for their workers). Cancelling them inside the sweep's lock, several job rows in one
    transaction, deadlocked against workers claiming or fencing those rows."""
    now = repo.utcnow()
    ids = list(session.scalars(
        select(Job.id).where(Job.sweep_id == sweep.id, Job.status.in_((*ACTIVE, "paused"))).order_by(Job.id)
    ))
    sweep.status = "cancelled"
    sweep.stop_reason = "cancelled"
    sweep.finished_at = now
    sweep.updated_at = now
    session.flush()
    sweep_ended(session, sweep, now)
    return ids


def sweep_ended(session: Session, sweep: Sweep, at: Any) -> None:
    """What every end of a sweep records, in the transaction that ends it (call after its row has
    its final status): the ``state`` event on the project stream and the ``sweep.finished`` webhook
    deliveries. Cancel, failure to advance and the decision layer's normal end all call this."""
    repo.add_sweep_event(session, sweep.id, "state", {"status": sweep.status, "stop_reason": sweep.stop_reason}, at)
    webhooks.on_sweep_finished(session, sweep, at)


def record_error(session: Session, sweep_id: str, error: str) -> None:
    """Note why advancing the sweep failed; a sweep left with no unfinished trial cannot recover by
    itself, so it ends ``failed``. (The next trial that ends tries to advance it again.)"""
    now = repo.utcnow()
    unfinished = session.scalar(
        select(func.count()).select_from(Job).where(Job.sweep_id == sweep_id, Job.status.in_(("queued", "running")))
    )
    values: dict[str, Any] = {"error": error[:10_000], "updated_at": now}
    if not unfinished:
        values.update(status="failed", stop_reason="error", finished_at=now)
    res = session.execute(
        update(Sweep).where(Sweep.id == sweep_id, Sweep.status == "running").values(**values)
        .execution_options(synchronize_session=False)
    )
    if not unfinished and res.rowcount == 1:  # type: ignore[attr-defined]
        ended = session.get(Sweep, sweep_id, populate_existing=True)
        if ended is not None:
            sweep_ended(session, ended, now)
        # nothing will promote its paused trials any more: they end with it
        repo.end_paused_jobs(session, list(session.scalars(select(Job.id).where(Job.sweep_id == sweep_id,
                                                                               Job.status == "paused"))),
                             "sweep_failed", status="cancelled")


def sweeps_of_jobs(session: Session, job_ids: list[str]) -> list[tuple[str | None, str | None]]:
    """(sweep_id, status) of each job, in their order (``(None, None)`` for one that does not
    exist), in one query."""
    rows = {i: (sw, st) for i, sw, st in session.execute(select(Job.id, Job.sweep_id, Job.status).where(Job.id.in_(job_ids)))}
    return [rows.get(i, (None, None)) for i in job_ids]


def sweeps_with_moves(session: Session, sweep_ids: list[str], settled: list[str]) -> set[str]:
    """Of ``sweep_ids``, the running sweeps that an advance could move now: one that may still
    create trials, or that has a paused trial outside ``settled`` (trials whose pause was just
    decided with everything the sweep knows: an advance would not promote them), in one query."""
    paused = select(Job.id).where(Job.sweep_id == Sweep.id, Job.status == "paused", Job.id.not_in(settled)).exists()
    return set(session.scalars(select(Sweep.id).where(
        Sweep.id.in_(sweep_ids), Sweep.status == "running", (Sweep.trials_created < Sweep.max_trials) | paused)))


def stalled_sweep_ids(session: Session) -> list[str]:
    """Running sweeps with no queued or running trial: nothing will advance them (e.g. their last
    trial was failed by the reconciler after its worker was lost on every attempt)."""
    active = (
        select(Job.id).where(Job.sweep_id == Sweep.id, Job.status.in_(("queued", "running"))).exists()
    )
    return list(session.scalars(select(Sweep.id).where(Sweep.status == "running", ~active)))


def extend_sweep(session: Session, sweep: Sweep, max_trials: int) -> None:
    """Raise ``max_trials`` (call with the sweep's row lock, then :func:`advance_sweep`). A sweep
    that ended because its trials ran out (stop reason ``completed``) runs again; its sampler is
    rebuilt from every stored trial, as always, so the new trials use what the old ones found."""
    now = repo.utcnow()
    sweep.max_trials = max_trials
    config = dict(sweep.config)
    config["max_trials"] = max_trials
    sweep.config = config
    if sweep.status != "running":
        sweep.status, sweep.stop_reason, sweep.finished_at = "running", None, None
    sweep.updated_at = now
    session.flush()
