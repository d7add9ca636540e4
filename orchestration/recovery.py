"""Lost and stalled attempts: the decisions of recovery.

A worker's attempt at a job ends without the worker recording it when the worker is lost (no
heartbeat for the lease, ``heartbeat_stale_s``; or its process on this host is gone) or when its
training stalls (no step for ``stall_timeout_s``). Either way the job is requeued, with an outbox
row in the same transaction so the message survives a broker outage, and resumes from its latest
snapshot; once it used ``max_attempts`` claims it is failed instead, with a reason. Each change is
a compare-and-set, so concurrent reconcilers act once. RELIABILITY.md tells the whole story.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store import lifecycle, outbox, repo
from store.db import session_scope
from store.models import Job
from store.packing import FAULT_STOP_REASONS

log = logging.getLogger("trainyard.recovery")

LOST_STOP_REASON, STALLED_STOP_REASON = FAULT_STOP_REASONS  # "worker_lost", "stalled"


def reconcile_interval(stale_after_s: float) -> float:
    """How often reconcilers look for lost jobs: a lost job stays ``running`` at most the lease
    plus this (at most 30 s, so well within lease + 60 s)."""
    return min(30.0, max(0.5, stale_after_s / 4))


def process_gone(pid: int) -> bool:
    """Whether no live process has ``pid`` on this host (a zombie, killed but not yet reaped by
    its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def worker_host_pid(worker: str | None) -> tuple[str, int] | None:
    """(host, pid) of a recorded worker name ``host:pid`` (``worker.runner.worker_name``)."""
    if not worker or ":" not in worker:
        return None
    host, _, pid = worker.rpartition(":")
    return (host, int(pid)) if pid.isdigit() else None


def _fail_attempts_used(session: Session, job_id: str, cond: list[Any], stop_reason: str, error: str) -> bool:
    now = repo.utcnow()
    if not lifecycle.move(session, job_id, (lifecycle.RUNNING,), lifecycle.FAILED,
                          where=(Job.attempts >= Job.max_attempts, *cond),
                          values=dict(stop_reason=stop_reason, error=error, finished_at=now, updated_at=now)):
        return False
    repo.add_event(session, job_id, "state", {"status": "failed", "stop_reason": stop_reason, "error": error}, now)
    return True


def end_attempt(session: Session, job_id: str, queue: str, *, attempts: int, max_attempts: int, cond: list[Any],
                stop_reason: str, reason: str, why: str) -> str | None:
    """End the running attempt of ``job_id`` whose worker was lost or stalled (``stop_reason``:
    ``worker_lost`` or ``stalled``), if the row still matches ``cond`` (a compare-and-set, so
    concurrent reconcilers act once): requeue it with an outbox row in the same transaction, or,
    once it used ``max_attempts`` claims, fail it saying so. ``reason`` ("worker lost", "stalled")
    and ``why`` (the detail) go into the job's events. Returns "requeued", "failed" or None."""
    if attempts >= max_attempts:
        error = (
            f"{reason} on each of its {attempts} attempts (the last: {why}); max_attempts is {max_attempts}. If "
            "the job itself kills or hangs its worker (memory, a crash or a deadlock in native code), fix the spec; "
            "otherwise submit it again"
        )
        return "failed" if _fail_attempts_used(session, job_id, cond, stop_reason, error) else None
    if not repo.requeue_job(session, job_id, reason, cond=cond, stop_reason=stop_reason, detail=why):
        return None
    outbox.add(session, [(job_id, queue)])
    return "requeued"


def end_stalled_attempt(job_id: str, token: int, stalled_for_s: float, send: outbox.Send | None = None) -> str | None:
    """End attempt ``token`` of ``job_id``, whose training made no step for ``stalled_for_s``:
    requeued (its message sent with ``send``, or by the outbox relay) or, once it used
    ``max_attempts`` claims, failed, with stop reason ``stalled``. None if the attempt no longer
    holds the job."""
    with session_scope() as s:
        row = s.execute(select(Job.queue, Job.attempts, Job.max_attempts).where(Job.id == job_id)).first()
        if row is None:
            return None
        done = end_attempt(s, job_id, row[0], attempts=row[1], max_attempts=row[2], cond=[Job.lease_token == token],
                           stop_reason=STALLED_STOP_REASON, reason="stalled",
                           why=f"training made no step for {stalled_for_s:.0f} s")
    if done == "requeued" and send is not None:
        send_requeued([(job_id, row[0])], send)
    return done


def _stale(stale_after_s: float) -> list[Any]:
    return [Job.heartbeat_at < repo.utcnow() - timedelta(seconds=stale_after_s)]


def reconcile(
    stale_after_s: float, send: outbox.Send | None = None, queues: Sequence[str] | None = None,
    host: str | None = None,
) -> tuple[list[str], list[str]]:
    """Requeue or fail every ``running`` job (of ``queues``, if given) whose worker is lost: its
    heartbeat is older than ``stale_after_s``, or (with ``host``) its recorded worker ran on this
    host and that process no longer exists, whatever the heartbeat says. A requeued job gets an
    outbox row in the same transaction; ``send`` (if given) then sends its message at once.
    Returns the ids requeued and failed."""
    cutoff = repo.utcnow() - timedelta(seconds=stale_after_s)
    cols = (Job.id, Job.queue, Job.attempts, Job.max_attempts, Job.lease_token, Job.worker)
    stale_q = select(*cols).where(Job.status == "running", Job.heartbeat_at < cutoff)
    host_q = select(*cols).where(Job.status == "running", Job.worker.like(f"{host}:%")) if host else None
    if queues is not None:
        stale_q = stale_q.where(Job.queue.in_(list(queues)))
        host_q = host_q.where(Job.queue.in_(list(queues))) if host_q is not None else None
    with session_scope(write=False) as s:
        rows = {r[0]: (r, f"no heartbeat for {stale_after_s:g} s", _stale(stale_after_s)) for r in s.execute(stale_q)}
        for r in s.execute(host_q) if host_q is not None else ():
            hp = worker_host_pid(r[5])
            if r[0] not in rows and hp is not None and hp[0] == host and process_gone(hp[1]):
                rows[r[0]] = (r, f"its worker process {r[5]} no longer exists", [Job.lease_token == r[4]])
    requeued: list[tuple[str, str]] = []
    failed: list[str] = []
    for (job_id, queue, attempts, max_attempts, _token, _worker), why, cond in rows.values():
        with session_scope() as s:
            done = end_attempt(s, job_id, queue, attempts=attempts, max_attempts=max_attempts, cond=cond,
                               stop_reason=LOST_STOP_REASON, reason="worker lost", why=why)
        if done == "failed":
            failed.append(job_id)
            log.warning("job %s: worker lost on all %d attempts (%s); failed", job_id, attempts, why)
        elif done == "requeued":
            requeued.append((job_id, queue))
            log.warning("job %s: its worker was lost (%s); requeued", job_id, why)
    if requeued and send is not None:
        send_requeued(requeued, send)
    return [j for j, _ in requeued], failed


def send_requeued(jobs: list[tuple[str, str]], send: outbox.Send) -> None:
    """Send the messages of requeued jobs now and drop their outbox rows; if the broker refuses,
    the rows stay and the relay sends them later."""
    try:
        send(jobs)
        with session_scope() as s:
            outbox.forget_jobs(s, [j for j, _ in jobs])
    except Exception as exc:  # noqa: BLE001 - the relay sends them later
        log.warning("broker refused %d requeued job(s) (%s); the outbox relay retries", len(jobs), exc)
