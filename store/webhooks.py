"""Webhooks: a project's subscriptions, and the deliveries owed to them (an outbox).

A delivery row is written in the transaction of the state change that causes it (:func:`on_job_state`
from :func:`store.repo.add_event`, :func:`on_job_epochs` from :func:`store.repo.record_progress`,
:func:`on_sweep_finished` from :mod:`store.sweeps`): if that transaction commits, the event is
owed; if it rolls back, it never happened. The API's delivery loop (:mod:`api.webhook_delivery`)
claims due rows (:func:`claim_due`), POSTs them, and records each outcome (:func:`record_outcome`):
2xx ends the row ``delivered``; anything else retries it with exponential backoff until
``webhook_max_age_s`` after the event, when it ends ``failed``. A claim pushes ``next_attempt_at``
a lease ahead, so a process killed mid-delivery leaves its rows to be sent again after the lease:
delivery is at least once, and a receiver de-duplicates by the event id (the same on every try).

Events: ``job.started``, ``job.succeeded``, ``job.failed``, ``job.cancelled``, ``sweep.finished``,
and metric thresholds such as ``val_accuracy >= 0.98`` (delivered as ``metric.threshold``, once per
job and webhook: the first epoch whose value meets it).
"""

from __future__ import annotations

import math
import operator
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from store.floats import from_text
from store.ids import new_id
from store.models import Job, Sweep, Webhook, WebhookDelivery

JOB_EVENTS = {"running": "job.started", "succeeded": "job.succeeded", "failed": "job.failed",
              "cancelled": "job.cancelled"}
EVENTS = (*JOB_EVENTS.values(), "sweep.finished")
THRESHOLD_EVENT = "metric.threshold"
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
}
_THRESHOLD_TEXT = (
    r" *([A-Za-z_][A-Za-z0-9_.]{0,99}) *(>=|<=|==|>|<) *([-+]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][-+]?[0-9]{1,2})?) *"
)
THRESHOLD = re.compile("^" + _THRESHOLD_TEXT + "$")
#: what an item of a webhook's ``events`` may be, as a regular expression (the OpenAPI document
#: publishes it; :func:`parse_event` accepts exactly this)
EVENT_PATTERN = "^(?:" + "|".join(re.escape(e) for e in (
    "job.started", "job.succeeded", "job.failed", "job.cancelled", "sweep.finished")) + "|" + _THRESHOLD_TEXT + ")$"
#: a claimed row is not claimed again for this long (a delivery in flight when its process died
#: is sent again after it); Settings.webhook_lease_s
LEASE_S = 60.0


@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str
    value: float

    @property
    def text(self) -> str:
        value = repr(self.value)  # the shortest text that reads back as the same float
        return f"{self.metric} {self.op} {value[:-2] if value.endswith('.0') else value}"

    def met(self, value: Any) -> bool:
        try:
            v = float(value)
        except (TypeError, ValueError):
            return False
        return math.isfinite(v) and _OPS[self.op](v, self.value)


def parse_event(text: str) -> str | Threshold:
    """An event name, or a metric threshold; ValueError (with what is allowed) otherwise."""
    if text in EVENTS:
        return text
    m = THRESHOLD.match(text)
    if m is None:
        raise ValueError(
            f"unknown event {text!r}; allowed: {', '.join(EVENTS)}, or a metric threshold such as "
            "'val_accuracy >= 0.98' (operators >=, >, <=, <, ==)"
        )
    return Threshold(m.group(1), m.group(2), float(m.group(3)))  # finite: at most 2 exponent digits


def normalize_events(events: Sequence[str]) -> list[str]:
    """The events as stored (thresholds spelled ``metric op value``), without repeats, in order."""
    out: list[str] = []
    for e in events:
        p = parse_event(e)
        text = p.text if isinstance(p, Threshold) else p
        if text not in out:
            out.append(text)
    return out


# --------------------------------------------------------------------------- subscriptions


def create(session: Session, *, project_id: str, url: str, events: Sequence[str], secret: str,
           description: str | None = None) -> Webhook:
    from store.repo import utcnow

    hook = Webhook(id=new_id(), project_id=project_id, url=url, events=normalize_events(events), secret=secret,
                   description=description, created_at=utcnow())
    session.add(hook)
    session.flush()
    return hook


def get(session: Session, webhook_id: str, project_id: str) -> Webhook | None:
    return session.scalars(
        select(Webhook).where(Webhook.id == webhook_id, Webhook.project_id == project_id)
    ).one_or_none()


def list_for_project(session: Session, project_id: str) -> list[Webhook]:
    return list(session.scalars(select(Webhook).where(Webhook.project_id == project_id).order_by(Webhook.id)))


def remove(session: Session, webhook_id: str, project_id: str) -> bool:
    """Delete the webhook and its delivery log (undelivered events are dropped)."""
    if get(session, webhook_id, project_id) is None:
        return False
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id))
    session.execute(delete(Webhook).where(Webhook.id == webhook_id))
    return True


def deliveries(session: Session, webhook_id: str, *, status: Sequence[str] = (), before: int | None = None,
               limit: int = 50) -> list[WebhookDelivery]:
    """The webhook's delivery log, newest first (``before``: a row id, for paging)."""
    q = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
    if status:
        q = q.where(WebhookDelivery.status.in_(list(status)))
    if before is not None:
        q = q.where(WebhookDelivery.id < before)
    return list(session.scalars(q.order_by(WebhookDelivery.id.desc()).limit(limit + 1)))


# --------------------------------------------------------------------------- events (in the caller's transaction)


def _row(webhook_id: str, event: str, data: dict[str, Any], at: datetime, *, job_id: str | None = None,
         sweep_id: str | None = None, dedup_key: str | None = None) -> dict[str, Any]:
    return dict(webhook_id=webhook_id, event_id=new_id(), event=event, job_id=job_id, sweep_id=sweep_id,
                dedup_key=dedup_key, data=data, status="pending", attempts=0, next_attempt_at=at, created_at=at)


def _insert(session: Session, rows: list[dict[str, Any]], *, skip_duplicates: bool = False) -> None:
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if skip_duplicates and dialect in ("postgresql", "sqlite"):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        session.execute(dialect_insert(WebhookDelivery).values(rows).on_conflict_do_nothing())
        return
    session.execute(WebhookDelivery.__table__.insert(), rows)


def _job_subscribers(session: Session, job_id: str) -> list[tuple[str, list[Any], Job]]:
    """(webhook id, events, job) of every webhook of the job's project."""
    return _jobs_subscribers(session, [job_id])


def _jobs_subscribers(session: Session, job_ids: list[str]) -> list[tuple[str, list[Any], Job]]:
    """(webhook id, events, job) of every webhook of each job's project."""
    q = select(Webhook.id, Webhook.events, Job).join(Job, Job.project_id == Webhook.project_id).where(Job.id.in_(job_ids))
    return [(w, list(ev or ()), job) for w, ev, job in session.execute(q)]


def _job_data(job: Job, extra: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "job_id": job.id, "name": job.name, "sweep_id": job.sweep_id,
        "best": {"monitor": job.best_monitor, "value": from_text(job.best_value), "epoch": job.best_epoch}
        if job.best_monitor is not None else None,
    }
    data.update(extra)
    return data


def on_job_state(session: Session, job_id: str, data: dict[str, Any], at: datetime) -> None:
    """A job's state event (``data`` as streamed: status, stop_reason, error...): owe it to every
    webhook of the job's project that asked for it."""
    on_jobs_state(session, [(job_id, data)], at)


def on_jobs_state(session: Session, states: Sequence[tuple[str, dict[str, Any]]], at: datetime) -> None:
    """:func:`on_job_state` for several jobs' state events, ``(job id, data)`` each (a pack's
    members): one query for their webhooks."""
    owed = [(job_id, data, JOB_EVENTS.get(str(data.get("status")))) for job_id, data in states]
    owed = [(job_id, data, event) for job_id, data, event in owed if event is not None]
    if not owed:
        return
    subs: dict[str, list[tuple[str, list[Any], Job]]] = {}
    for w, events, job in _jobs_subscribers(session, list(dict.fromkeys(j for j, _, _ in owed))):
        subs.setdefault(job.id, []).append((w, events, job))
    rows = [_row(w, event, _job_data(job, data), at, job_id=job_id)
            for job_id, data, event in owed for w, events, job in subs.get(job_id, ()) if event in events]
    _insert(session, rows)


def on_job_epochs(session: Session, job_id: str, epochs: Iterable[dict[str, Any]], at: datetime) -> None:
    """Epoch metrics (in epoch order): owe each webhook threshold the first epoch that meets it
    (once per job: a second crossing, or the same epoch written again, is skipped)."""
    on_jobs_epochs(session, {job_id: list(epochs)}, at)


def on_jobs_epochs(session: Session, epochs_by_job: dict[str, list[dict[str, Any]]], at: datetime) -> None:
    """:func:`on_job_epochs` for several jobs: one query for their webhooks."""
    epochs_by_job = {j: e for j, e in epochs_by_job.items() if e}
    if not epochs_by_job:
        return
    rows = []
    for w, events, job in _jobs_subscribers(session, list(epochs_by_job)):
        epochs = epochs_by_job[job.id]
        for text in events:
            if text in EVENTS:
                continue
            th = parse_event(text)
            assert isinstance(th, Threshold)
            hit = next((m for m in epochs if th.met(m.get(th.metric))), None)
            if hit is not None:
                value = float(hit[th.metric])
                rows.append(_row(w, THRESHOLD_EVENT, _job_data(job, {
                    "threshold": th.text, "metric": th.metric, "value": value, "epoch": hit.get("epoch"),
                }), at, job_id=job.id, dedup_key=f"{job.id}:{th.text}"))
    _insert(session, rows, skip_duplicates=True)


def on_sweep_finished(session: Session, sweep: Sweep, at: datetime) -> None:
    """A sweep ended (succeeded, failed or cancelled)."""
    hooks = session.execute(select(Webhook.id, Webhook.events).where(Webhook.project_id == sweep.project_id)).all()
    data = {
        "sweep_id": sweep.id, "name": sweep.name, "status": sweep.status, "stop_reason": sweep.stop_reason,
        "best_job_id": sweep.best_job_id, "best_value": from_text(sweep.best_value), "error": sweep.error,
        "trials_created": sweep.trials_created,
    }
    _insert(session, [_row(w, "sweep.finished", data, at, sweep_id=sweep.id)
                      for w, events in hooks if "sweep.finished" in (events or ())])


# --------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class Due:
    """A claimed delivery, with what sending it needs."""

    id: int
    event_id: str
    event: str
    data: dict[str, Any]
    created_at: datetime
    attempts: int
    url: str
    secret: str


def any_due(session: Session, now: datetime) -> bool:
    """Whether a delivery is due (a read: the loop opens a write transaction only then)."""
    q = select(WebhookDelivery.id).where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
    return session.execute(q.limit(1)).first() is not None


def claim_due(session: Session, now: datetime, *, limit: int = 100, lease_s: float = LEASE_S) -> list[Due]:
    """Claim up to ``limit`` pending deliveries whose time has come (oldest first), pushing their
    ``next_attempt_at`` a lease ahead so that no other process (or this one, later) claims them
    while they are in flight. Commit before sending. Rows locked by another claimer are skipped."""
    ids = list(session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ))
    if not ids:
        return []
    session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id.in_(ids))
        .values(next_attempt_at=now + timedelta(seconds=lease_s)).execution_options(synchronize_session=False)
    )
    q = (
        select(WebhookDelivery.id, WebhookDelivery.event_id, WebhookDelivery.event, WebhookDelivery.data,
               WebhookDelivery.created_at, WebhookDelivery.attempts, Webhook.url, Webhook.secret)
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(WebhookDelivery.id.in_(ids))
        .order_by(WebhookDelivery.id)
    )
    return [Due(*row) for row in session.execute(q)]


def retry_delay(attempts: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Seconds before try ``attempts + 1``: ``base * 2**(attempts-1)`` capped at ``max_s``, with
    up to 20 % of jitter (so receivers coming back are not hit by every sender at once)."""
    delay = min(max_s, base_s * 2 ** max(0, attempts - 1))
    return delay * (1 + 0.2 * (rng or random).random())


@dataclass(frozen=True)
class Outcome:
    id: int
    ok: bool
    status_code: int | None
    error: str | None


def record_outcomes(session: Session, due: Sequence[Due], outcomes: Sequence[Outcome], now: datetime, *,
                    retry_base_s: float, retry_max_s: float, max_age_s: float) -> None:
    """Write what each try gave: delivered, retried later, or failed for good (too old)."""
    from store.repo import as_utc

    by_id = {d.id: d for d in due}
    for code in {o.status_code for o in outcomes if o.ok}:  # one statement per status code (all 200, mostly)
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id.in_([o.id for o in outcomes if o.ok and o.status_code == code]))
            .values(status="delivered", delivered_at=now, attempts=WebhookDelivery.attempts + 1,
                    last_status_code=code, last_error=None)
            .execution_options(synchronize_session=False)
        )
    for o in outcomes:
        if o.ok:
            continue
        d = by_id[o.id]
        attempts = d.attempts + 1
        next_at = now + timedelta(seconds=retry_delay(attempts, retry_base_s, retry_max_s))
        expired = next_at > as_utc(d.created_at) + timedelta(seconds=max_age_s)
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == o.id)
            .values(status="failed" if expired else "pending", attempts=attempts, next_attempt_at=next_at,
                    last_status_code=o.status_code, last_error=(o.error or "")[:2000] or None)
            .execution_options(synchronize_session=False)
        )
