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

:func:`reconcile` runs in every worker and in the API: a ``running`` job whose heartbeat is older
than the lease (``heartbeat_stale_s``) is requeued (with an outbox row, so the message survives a
broker outage) or, once it used ``max_attempts`` claims, failed with a reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from store import outbox, repo
from store.db import session_scope
from store.models import Job

log = logging.getLogger("trainyard.leases")

T = TypeVar("T")

LOST_STOP_REASON = "worker_lost"


class LeaseLost(Exception):  # noqa: N818 - a state, not a programming error
    """This worker no longer holds the job (another claim bumped the token, or the job left
    ``running``): stop without writing anything."""


def fence(session: Session, job_id: str, token: int) -> bool:
    """Bump the heartbeat of ``job_id`` if ``token`` still holds its lease and return its cancel
    flag; raise :class:`LeaseLost` otherwise. Call first in every write transaction of a worker."""
    now = repo.utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token, Job.status == "running")
        .values(heartbeat_at=now)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        raise LeaseLost(f"job {job_id}: lease {token} is no longer held")
    return bool(row[0])


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


# --------------------------------------------------------------------------- reconciler


def reconcile_interval(stale_after_s: float) -> float:
    """How often reconcilers look for lost jobs: a lost job stays ``running`` at most the lease
    plus this (at most 30 s, so well within lease + 60 s)."""
    return min(30.0, max(0.5, stale_after_s / 4))


def _fail_lost(session: Session, job_id: str, stale_after_s: float) -> bool:
    now = repo.utcnow()
    job = session.get(Job, job_id)
    if job is None:
        return False
    error = (
        f"the worker running this job was lost on each of its {job.attempts} attempts (no heartbeat for "
        f"{stale_after_s:g} s); max_attempts is {job.max_attempts}. If the job itself kills its worker (memory, a crash "
        "in native code), fix the spec; otherwise submit it again"
    )
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.attempts >= Job.max_attempts,
               Job.heartbeat_at < now - timedelta(seconds=stale_after_s))
        .values(status="failed", stop_reason=LOST_STOP_REASON, error=error, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return False
    repo.add_event(session, job_id, "state", {"status": "failed", "stop_reason": LOST_STOP_REASON, "error": error}, now)
    return True


def reconcile(
    stale_after_s: float, send: outbox.Send | None = None, queues: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """Requeue or fail every ``running`` job (of ``queues``, if given) whose heartbeat is older
    than ``stale_after_s`` (compare-and-set per job, so concurrent reconcilers act once). A
    requeued job gets an outbox row in the same transaction; ``send`` (if given) then sends its
    message at once. Returns the ids requeued and failed."""
    cutoff = repo.utcnow() - timedelta(seconds=stale_after_s)
    q = select(Job.id, Job.queue, Job.attempts, Job.max_attempts).where(Job.status == "running", Job.heartbeat_at < cutoff)
    if queues is not None:
        q = q.where(Job.queue.in_(list(queues)))
    with session_scope(write=False) as s:
        rows = s.execute(q).all()
    requeued: list[tuple[str, str]] = []
    failed: list[str] = []
    for job_id, queue, attempts, max_attempts in rows:
        with session_scope() as s:
            if attempts >= max_attempts:
                if _fail_lost(s, job_id, stale_after_s):
                    failed.append(job_id)
                    log.warning("job %s: worker lost on all %d attempts; failed", job_id, attempts)
            elif repo.requeue_job(s, job_id, "worker lost", stale_after_s=stale_after_s):
                outbox.add(s, [(job_id, queue)])
                requeued.append((job_id, queue))
                log.warning("job %s: its worker was lost (no heartbeat for %.0f s); requeued", job_id, stale_after_s)
    if requeued and send is not None:
        try:
            send(requeued)
            with session_scope() as s:
                outbox.forget_jobs(s, [j for j, _ in requeued])
        except Exception as exc:  # noqa: BLE001 - the relay sends them later
            log.warning("reconciler: broker refused %d requeued job(s) (%s); the outbox relay retries", len(requeued), exc)
    return [j for j, _ in requeued], failed


class Maintenance:
    """A daemon thread that runs :func:`outbox.relay` every ``relay_every_s`` and
    :func:`reconcile` (then ``on_reconcile``, if given) every :func:`reconcile_interval` (the API
    and each worker run one)."""

    def __init__(self, send: outbox.Send, stale_after_s: float, *, queues: Sequence[str] | None = None,
                 relay_every_s: float = 1.0, sent_job_ids: Callable[[], list[str]] | None = None,
                 resend_after_s: Callable[[], float] | None = None, on_reconcile: Callable[[], Any] | None = None,
                 name: str = "trainyard-maintenance") -> None:
        self.send = send
        self.on_reconcile = on_reconcile
        self.queues = queues
        self.resend_after_s = resend_after_s or (lambda: outbox.RESEND_AFTER_S)
        self.stale_after_s = stale_after_s
        self.relay_every_s = relay_every_s
        self.sent_job_ids = sent_job_ids or (lambda: [])
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, *, reconcile_now: bool = True) -> dict[str, Any]:
        sent = outbox.relay(self.send, queues=self.queues, resend_after_s=self.resend_after_s(),
                            sent_job_ids=self.sent_job_ids())
        out: dict[str, Any] = {"relayed": sent}
        if reconcile_now:
            out["requeued"], out["failed"] = reconcile(self.stale_after_s, self.send, self.queues)
            if self.on_reconcile is not None:
                out["resent"] = self.on_reconcile()
        return out

    def _loop(self) -> None:
        every = reconcile_interval(self.stale_after_s)
        next_reconcile = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self.run_once(reconcile_now=now >= next_reconcile)
            except Exception as exc:  # noqa: BLE001 - keep going after a database or broker hiccup
                log.warning("maintenance pass failed: %s: %s", type(exc).__name__, exc)
            if now >= next_reconcile:
                next_reconcile = now + every
            self._stop.wait(min(self.relay_every_s, every))

    def start(self) -> Maintenance:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
