"""The job lifecycle: one table of the allowed status transitions, and :func:`move`, the one
compare-and-set that every change of a job's status goes through.

```
queued ──claim──> running ──finish──> succeeded | failed | cancelled
  ▲                                      │
  └──────────continue (more epochs)──────┘ (succeeded, all its epochs run: POST /v1/jobs/{id}/continue)
  │  ▲              │ │ └──pause (sweep trial at a rung)──> paused ──promote──> queued
  │  └──requeue─────┘ └──take-over (a new attempt)──> running      └──end──> succeeded | failed | cancelled
  └──cancel / fail unstarted──> cancelled | failed
```

Why here and not with the decisions: the table is enforced by the compare-and-set itself (the
``WHERE status IN (...)`` of each UPDATE), which is a query, and ``store/`` must not import the
decision layer. *When* a job moves (requeue a lost worker's job, promote a trial, fail after
``max_attempts``) is decided in ``orchestration/``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, func, update
from sqlalchemy.orm import Session

from store import curves
from store.artifact_store import drop_snapshots
from store.models import Job

QUEUED, RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "paused", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELLED)

#: status -> the statuses it may move to. Terminal statuses move nowhere, but for a continued job
#: (succeeded -> queued).
TRANSITIONS: Mapping[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),  # claimed; cancelled; could not be enqueued
    RUNNING: frozenset({RUNNING, QUEUED, PAUSED, SUCCEEDED, FAILED, CANCELLED}),  # RUNNING: a take-over
    PAUSED: frozenset({QUEUED, SUCCEEDED, FAILED, CANCELLED}),  # promoted; ended by its sweep; cancelled
    # continued (store.continuation): a job that ran all its epochs is queued again with more of
    # them, resuming from the state after its last one. Failed and cancelled jobs stay ended (a
    # clone is a new job).
    SUCCEEDED: frozenset({QUEUED}),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    """A status change the lifecycle does not allow (a programming error, raised before any SQL)."""


def allowed(source: str, target: str) -> bool:
    """Whether a job may move from ``source`` to ``target``."""
    return target in TRANSITIONS.get(source, frozenset())


def check(sources: Collection[str], target: str) -> None:
    """Raise :class:`IllegalTransition` unless every status of ``sources`` may move to ``target``."""
    bad = [s for s in sources if not allowed(s, target)]
    if bad or not sources:
        raise IllegalTransition(
            f"a job cannot move from {', '.join(bad) or 'nothing'} to {target}; "
            f"allowed into {target}: {', '.join(s for s in STATUSES if allowed(s, target)) or 'none'}")


def move(session: Session, job_id: str, sources: Collection[str], target: str, *, where: Sequence[Any] = (),
         values: Mapping[str, Any] | None = None) -> bool:
    """Compare-and-set the job's status from one of ``sources`` to ``target`` (each pair checked
    against :data:`TRANSITIONS` first), if the row also matches ``where``, setting ``values`` too.
    Returns whether the row moved (False: it was in another status, or ``where`` did not hold).
    A job that ends (a terminal ``target``) loses its resume snapshot here, in the same
    transaction (its file after the commit), unless it ran all its epochs (succeeded,
    ``completed``) and ``keep_final_snapshot`` is on: that job keeps the state of its last epoch
    for ``POST /v1/jobs/{id}/continue`` (store.continuation)."""
    res = session.execute(_update(job_id, sources, target, where, values))
    moved = res.rowcount == 1  # type: ignore[attr-defined]
    if moved:
        _ended(session, job_id, target, values)
    return moved


def move_many(session: Session, moves: Mapping[str, Mapping[str, Any]], sources: Collection[str], target: str, *,
              values: Mapping[str, Any] | None = None, added: Collection[str] = (), where: Sequence[Any] = ()) -> list[str]:
    """:func:`move` of several jobs (a pack's members): ``moves`` gives each job's own values
    (plain values; a column in ``added`` is added to the stored value, taken as 0 when NULL),
    ``values`` those common to all, ``where`` what each row must also match. The compare-and-set is one ``UPDATE ... WHERE id IN (...)
    RETURNING id``, each moved job's own values one executemany (one statement for a single job);
    then what ending does, for all of them at once. Returns the ids moved, in ``moves``' order."""
    if not moves:
        return []
    table = Job.__table__

    def own(column: str, value: Any) -> Any:
        return func.coalesce(table.c[column], 0) + value if column in added else value

    common = dict(values or {})
    if len(moves) == 1:  # a solo run's every end: one statement, as move() always was
        [(one, mine)] = moves.items()
        common.update({k: own(k, v) for k, v in mine.items()})
    check(sources, target)
    moved = set(session.execute(
        update(Job).where(Job.id.in_(list(moves)), Job.status.in_(list(sources)), *where)
        .values(status=target, **common).returning(Job.id).execution_options(synchronize_session=False)
    ).scalars())
    if len(moves) > 1:
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for job_id, mine in moves.items():
            if job_id in moved and mine:
                groups.setdefault(tuple(sorted(mine)), []).append({"b_id": job_id, **{f"b_{k}": v for k, v in mine.items()}})
        for keys, params in groups.items():
            session.connection().execute(
                update(table).where(table.c.id == bindparam("b_id"))
                .values({k: own(k, bindparam(f"b_{k}", type_=table.c[k].type)) for k in keys}), params)
    order = [j for j in moves if j in moved]
    _ended_many(session, {j: {**common, **moves[j]} for j in order}, target)
    return order


def move_chosen(session: Session, chosen: Any, sources: Collection[str], target: str, *,
                values: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None) -> Job | None:
    """:func:`move` of the job that ``chosen``, a scalar subquery (bound by ``params``), picks in
    the same statement (``UPDATE ... WHERE id = (SELECT ...) RETURNING *``: a pick, its
    compare-and-set and the row as it is now in one round trip, :func:`store.scheduling.claim_next`).
    Returns the job moved (its row as the UPDATE left it), or None."""
    moved = session.execute(_update(chosen, sources, target, (), values).returning(Job), dict(params or {}))
    job = moved.scalars().one_or_none()
    if job is not None:
        _ended(session, job.id, target, values)
    return job


def _update(job_id: Any, sources: Collection[str], target: str, where: Sequence[Any],
            values: Mapping[str, Any] | None) -> Any:
    """The compare-and-set UPDATE (the move checked against :data:`TRANSITIONS` first)."""
    check(sources, target)
    return (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(list(sources)), *where)
        .values(status=target, **(values or {}))
        .execution_options(synchronize_session=False)
    )


def _ended(session: Session, job_id: str, target: str, values: Mapping[str, Any] | None) -> None:
    _ended_many(session, {job_id: values or {}}, target)


def _ended_many(session: Session, values: Mapping[str, Mapping[str, Any]], target: str) -> None:
    """What ending does to each of these jobs (``values``: what moved it, by job id): its curve
    compacted; its snapshot dropped unless it may be continued."""
    if target in (SUCCEEDED, FAILED, CANCELLED) and values:
        curves.compact_many(session, list(values))  # their epochs are final: one row each for bulk reads
        drop_snapshots(session, [j for j, v in values.items() if not _continuable(target, v)])


def _continuable(target: str, values: Mapping[str, Any] | None) -> bool:
    from config.settings import get_settings

    return target == SUCCEEDED and (values or {}).get("stop_reason") == "completed" and get_settings().keep_final_snapshot
