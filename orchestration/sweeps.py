"""Advancing sweeps: when a trial job ends (whatever way), the worker that ran it advances its
sweep under the sweep's row lock (``store.sweeps.advance_sweep``), commits, then sends the new
trials' messages. If advancing fails, the error is recorded on the sweep. The sweep keeper
(:mod:`orchestration.services.sweep_keeper`) advances sweeps whose last trial ended without a
worker to do it."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from sqlalchemy.orm import Session

from config.settings import Settings
from orchestration.admission import admit_trial_spec, dataset_resolver
from store import sweeps as store_sweeps
from store.db import session_scope
from store.models import TERMINAL_STATUSES
from store.outbox import Send

log = logging.getLogger("trainyard.sweeps")


def advance_sweep(session: Session, sweep_id: str, settings: Settings) -> list[tuple[str, str]]:
    """:func:`store.sweeps.advance_sweep` with the trials admitted like any job
    (:func:`orchestration.admission.admit_trial_spec`, the sweep's project's datasets)."""

    def admitter(s: Session, sweep: Any) -> Any:
        resolver = dataset_resolver(s, sweep.project_id)
        return partial(admit_trial_spec, metric=sweep.objective_metric, resolver=resolver, settings=settings)

    return store_sweeps.advance_sweep(session, sweep_id, settings, admitter)


def advance(sweep_id: str, settings: Settings, send: Send) -> list[tuple[str, str]]:
    """Advance the sweep in one transaction, then send the new trials' messages. A failure is
    recorded on the sweep (which ends ``failed`` if no trial is left to retry it)."""
    try:
        with session_scope() as s:
            jobs = advance_sweep(s, sweep_id, settings)
    except Exception as exc:  # noqa: BLE001 - recorded on the sweep; the worker carries on
        log.exception("sweep %s: advancing failed", sweep_id)
        try:
            with session_scope() as s:
                store_sweeps.record_error(s, sweep_id, f"advancing the sweep failed: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001
            log.exception("sweep %s: could not record the error", sweep_id)
        return []
    if jobs:
        try:
            send(jobs)
        except Exception:  # noqa: BLE001 - the trials' outbox rows were committed; the relay sends them
            log.exception("sweep %s: sending %d new trial(s) failed; the outbox relay retries", sweep_id, len(jobs))
    return jobs


def after_job(job_id: str, settings: Settings, send: Send) -> None:
    """Called after the worker handled ``job_id``: if it is a trial of a sweep and has ended,
    advance the sweep. Never raises."""
    try:
        with session_scope(write=False) as s:
            sweep_id, status = store_sweeps.sweep_of_job(s, job_id)
    except Exception:  # noqa: BLE001
        log.exception("job %s: could not look up its sweep", job_id)
        return
    if sweep_id and (status in TERMINAL_STATUSES or status == "paused"):
        advance(sweep_id, settings, send)


def advance_stalled(settings: Settings, send: Send) -> list[str]:
    """Advance every running sweep that has no unfinished trial (so none would advance it when it
    ends). Returns their ids."""
    with session_scope(write=False) as s:
        ids = store_sweeps.stalled_sweep_ids(s)
    for sweep_id in ids:
        log.warning("sweep %s has no unfinished trial; advancing it", sweep_id)
        advance(sweep_id, settings, send)
    return ids
