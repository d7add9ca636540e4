"""Leases with fencing tokens, the reconciler of lost jobs, and retries of transient database
errors.

A worker holds a job while ``jobs.lease_token`` is the token its claim set (every claim bumps it)
and the job is ``running``. Every write it makes for the job starts with :func:`fence`, an UPDATE
conditioned on that token: it bumps the heartbeat and row-locks the job for the rest of the
transaction, so a claim by another worker waits for it and then sees a fresh heartbeat, or it came
first and the fence matches nothing: :class:`LeaseLost`, the transaction rolls back, and the
worker stops without recording anything. A duplicate delivery, a redelivery after the broker's
visibility timeout, or a worker that stalled past its heartbeat lease can therefore never write
over the attempt that owns the job.

What happens to a job whose lease ran out (requeue, or fail after ``max_attempts``) is decided in
:mod:`orchestration.recovery`; this module only holds the lease primitives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import and_, select, tuple_, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from store import repo
from store.models import Job

log = logging.getLogger("trainyard.leases")

T = TypeVar("T")



class LeaseLost(Exception):  # noqa: N818 - a state, not a programming error
    """This worker no longer holds the job (another claim bumped the token, or the job left
    ``running``): stop without writing anything."""


def fence(session: Session, job_id: str, token: int) -> bool:
    """Bump the heartbeat of ``job_id`` if ``token`` still holds its lease and return its cancel
    flag; raise :class:`LeaseLost` otherwise. Call first in every write transaction of a worker."""
    held = fence_many(session, {job_id: token})
    if job_id not in held:
        raise LeaseLost(f"job {job_id}: lease {token} is no longer held")
    return held[job_id]


def fence_many(session: Session, tokens: dict[str, int]) -> dict[str, bool]:
    """:func:`fence` for several jobs (a pack's members) in one statement: the cancel flag of each
    job whose lease its token still holds (heartbeat bumped); a job missing from the answer has
    lost its lease (nothing bumped for it)."""
    if not tokens:
        return {}
    now = repo.utcnow()
    if len(tokens) == 1:  # a solo run's every flush: the plain equality (the same plan as ever)
        [(one, token)] = tokens.items()
        held = and_(Job.id == one, Job.lease_token == token)
    else:
        held = tuple_(Job.id, Job.lease_token).in_(list(tokens.items()))
    rows = session.execute(
        update(Job)
        .where(held, Job.status == "running")
        .values(heartbeat_at=now)
        .returning(Job.id, Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).all()
    return {job_id: bool(cancel) for job_id, cancel in rows}


def check(session: Session, job_id: str, token: int) -> bool:
    """Read-only lease check: the cancel flag, or :class:`LeaseLost`."""
    row = session.execute(
        select(Job.cancel_requested, Job.lease_token, Job.status).where(Job.id == job_id)
    ).first()
    if row is None or row[1] != token or row[2] != "running":
        raise LeaseLost(f"job {job_id}: lease {token} is no longer held")
    return bool(row[0])


# --------------------------------------------------------------------------- transient errors


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: connection lost or refused, server restarting, SQLite
    busy. Integrity and programming errors are not."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_transient(fn: Callable[[], T], *, deadline_s: float, what: str, first_wait_s: float = 0.1,
                    max_wait_s: float = 5.0) -> T:
    """Call ``fn`` until it does not raise a transient database error, waiting 0.1, 0.2, 0.4 ...
    (at most ``max_wait_s``) between tries, for at most ``deadline_s``; then re-raise. The pool
    drops connections that failed with a disconnect, so the next try reconnects."""
    deadline = time.monotonic() + deadline_s
    wait = first_wait_s
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + wait > deadline:
                raise
            log.warning("%s: database unavailable (%s); retrying in %.1f s", what, type(exc).__name__, wait)
            time.sleep(wait)
            wait = min(wait * 2, max_wait_s)
