"""The dispatch outbox: a job row and its outbox row are written in one transaction, and the
message is sent after the commit. A broker outage therefore delays jobs; it never loses or fails
them.

Life of an outbox row (one row per message owed to the broker):

* the API inserts it with the job (one extra INSERT in the submit transaction), commits, and sends
  the message inline. On success it remembers the job id, and its relay thread deletes the rows of
  all ids sent in the last second in one DELETE (off the request path);
* the worker deletes the rows of a job in the transaction that claims it (the message arrived);
* :func:`relay` re-sends rows older than ``resend_after_s`` (the inline send failed, or the process
  died between commit and send) and deletes them once the broker has accepted them.

A message can therefore be sent twice (the API dies after sending but before deleting; two relays
race). That is harmless: claiming a job is a compare-and-set, so a second delivery is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from store.db import session_scope
from store.models import Outbox

log = logging.getLogger("trainyard.outbox")

#: A row this old was not handed to the broker by the process that wrote it: the relay sends it.
RESEND_AFTER_S = 5.0
RELAY_BATCH = 500

Send = Callable[[Sequence[tuple[str, str]]], None]


def add(session: Session, jobs: Iterable[tuple[str, str]]) -> None:
    """Owe the broker one message per ``(job_id, queue)``: written in the caller's transaction."""
    from store.repo import utcnow

    now = utcnow()
    session.add_all([Outbox(job_id=job_id, queue=queue, attempts=0, created_at=now) for job_id, queue in jobs])


def forget_jobs(session: Session, job_ids: Sequence[str]) -> None:
    """The messages of these jobs were sent (or delivered): drop their rows."""
    if job_ids:
        session.execute(delete(Outbox).where(Outbox.job_id.in_(list(job_ids))).execution_options(synchronize_session=False))


def pending(
    session: Session, older_than_s: float, queues: Sequence[str] | None = None, limit: int = RELAY_BATCH
) -> list[tuple[int, str, str]]:
    """(id, job_id, queue) of rows older than ``older_than_s`` (for ``queues`` only, if given),
    oldest first."""
    from store.repo import utcnow

    cutoff = utcnow() - timedelta(seconds=older_than_s)
    q = select(Outbox.id, Outbox.job_id, Outbox.queue).where(Outbox.created_at < cutoff)
    if queues is not None:
        q = q.where(Outbox.queue.in_(list(queues)))
    q = q.order_by(Outbox.id).limit(limit)
    return [(i, j, qn) for i, j, qn in session.execute(q)]


def relay(
    send: Send, *, queues: Sequence[str] | None = None, resend_after_s: float = RESEND_AFTER_S,
    sent_job_ids: Sequence[str] = (),
) -> int:
    """One relay pass: drop the rows of ``sent_job_ids`` (sent inline by this process), then send
    every row of ``queues`` (the queues this process's broker settings address; None: all) older
    than ``resend_after_s`` and drop it once the broker accepted it. Returns how many messages
    were sent. A broker failure leaves the rows (with the error) for the next pass."""
    if sent_job_ids:
        with session_scope() as s:
            forget_jobs(s, sent_job_ids)
    total = 0
    while True:
        with session_scope(write=False) as s:
            rows = pending(s, resend_after_s, queues)
        if not rows:
            return total
        ids = [r[0] for r in rows]
        try:
            send([(job_id, queue) for _, job_id, queue in rows])
        except Exception as exc:  # noqa: BLE001 - the broker is down: keep the rows, note why
            with session_scope() as s:
                s.execute(
                    update(Outbox).where(Outbox.id.in_(ids))
                    .values(attempts=Outbox.attempts + 1, last_error=f"{type(exc).__name__}: {exc}"[:2000])
                    .execution_options(synchronize_session=False)
                )
            log.warning("outbox: %d message(s) not sent, the broker refused: %s", len(ids), exc)
            return total
        with session_scope() as s:
            s.execute(delete(Outbox).where(Outbox.id.in_(ids)).execution_options(synchronize_session=False))
        total += len(ids)
        log.info("outbox: re-sent %d message(s)", len(ids))
        if len(rows) < RELAY_BATCH:
            return total


def queued_without_message(session: Session, queue: str, older_than_s: float, limit: int = RELAY_BATCH) -> list[str]:
    """Ids of jobs of ``queue`` that are ``queued``, untouched for ``older_than_s`` and owe the
    broker no message (no outbox row): if the broker's queue is empty, their messages were lost
    (a Redis restart without persistence) and must be sent again."""
    from store.models import Job
    from store.repo import utcnow

    cutoff = utcnow() - timedelta(seconds=older_than_s)
    has_row = select(Outbox.id).where(Outbox.job_id == Job.id).exists()
    q = (
        select(Job.id)
        .where(Job.status == "queued", Job.queue == queue, Job.updated_at < cutoff, ~has_row)
        .order_by(Job.id)
        .limit(limit)
    )
    return list(session.scalars(q))


def touch_jobs(session: Session, job_ids: Sequence[str]) -> None:
    """Bump ``updated_at`` of queued jobs whose message was just sent again."""
    from store.models import Job
    from store.repo import utcnow

    session.execute(
        update(Job).where(Job.id.in_(list(job_ids)), Job.status == "queued").values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
