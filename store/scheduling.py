"""Which queued job a free worker starts next, where a queued job stands, and when it may start.

The database decides, not the broker: every message ``trainyard.run_job(id)`` is a token for "a
slot of this queue is free"; the worker that receives it claims the *best* queued job of the
message's queue (:func:`pick_next`), which need not be the message's job. The message of the job
it took stays in the broker and later starts whichever job is best then, so each queued job still
has one message and each message starts at most one job (a duplicate message starts none or an
early one, never a job twice: the claim is a compare-and-set). On PostgreSQL the pick is
``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent workers pick different jobs without waiting
for one another; SQLite serializes writers (``BEGIN IMMEDIATE``) and needs no lock clause.

**Fair share between projects, then priority within a project.** The best job is chosen in two
steps (README "Scheduler"; the idea is stride scheduling with the usage accounting of Slurm's
fair-share factor and the per-queue weighted share of Kueue):

1. the project: among the projects with a queued job in the queue, the one with the lowest
   *charged usage / weight*, where a project's charged usage in this queue is the worker time
   (``run_seconds``) of its jobs that finished in the last ``fair_share_window_s`` seconds, plus,
   for each of its running jobs, ``max(elapsed, typical job)``: a job is charged a typical job's
   length (the mean ``run_seconds`` of the queue's recent jobs) the moment it starts, so workers
   that pick at the same time spread over the projects; ties go to the project id;
2. the job: that project's highest ``priority``, then the oldest, then the id.

So when projects compete, the worker time they receive follows their weights (``projects.weight``,
``trainyard projects set-weight``), and a project with one queued job is next as soon as its
usage/weight is the lowest, however many jobs the others have queued (queued jobs weigh nothing;
only worker time does). A project alone in its queue gets every slot (the share is
work-conserving).

``queue_position`` (1 = the next job its queue's next free worker starts) plays the same rule
forward from the queue's state now, charging each future claim a typical job: it is exact for
the claims made before any running job ends, and an estimate after that (a job's real length
changes its project's usage). ``estimated_start_at`` runs the queue's slots forward: each running
job frees its slot after its estimated time left (from its progress, epochs done over elapsed
time, or a typical job's length before its first epoch), and each claim ahead occupies a slot for a
typical job's length."""

from __future__ import annotations

import heapq
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, func, select, text, update
from sqlalchemy.orm import Session, aliased

from config.settings import get_settings
from store import repo
from store.models import Job, Project, Sweep
from store.repo import as_utc, to_utc, utcnow

#: the range PATCH and create accept (higher runs first)
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
#: a typical job's length (seconds) in a queue with no job finished in the window yet
DEFAULT_JOB_S = 60.0
#: usage/weight scores are compared rounded to this many decimals, so that the pick and the
#: position's forward play order equal scores the same way whatever the float rounding
_DECIMALS = 6
#: how long the job view reuses a queue's state (polls of queued jobs add one query a second per
#: queue and process, not one per poll)
VIEW_STATE_TTL_S = 1.0


def _within(job: Any = Job) -> tuple[Any, ...]:
    """The order within a project (the same as :func:`position_sql` counts), of ``job`` (an alias)."""
    return job.priority.desc(), job.created_at, job.id


@dataclass(frozen=True)
class QueueState:
    """What the fair-share pick, the positions and the start estimates read of one queue."""

    queue: str
    now: datetime
    job_s: float  # a typical job's length: mean run_seconds of the window's finished jobs
    usage: dict[str, float]  # project id -> charged slot-seconds (see the module's docstring)
    weights: dict[str, float]  # project id -> weight
    queued: dict[str, int]  # project id -> queued jobs in the queue
    left: tuple[float, ...]  # each running job's estimated seconds left

    def key(self, project_id: str, claims: int = 0) -> tuple[float, str]:
        """The sort key of the project's claim after ``claims`` more of its own (lowest first)."""
        weight = max(self.weights.get(project_id, 1.0), 1e-9)
        return round((self.usage.get(project_id, 0.0) + claims * self.job_s) / weight, _DECIMALS), project_id

    def order(self) -> list[str]:
        """The projects with queued jobs, the one whose job starts next first."""
        return sorted(self.queued, key=self.key)

    def position(self, project_id: str, rank: int) -> int:
        """The queue position of the job that is ``rank``-th (1-based) in its project's order:
        its own project's claims before it, plus each other project's claims whose key is lower
        than its claim's (a binary search: keys grow with each claim)."""
        target = self.key(project_id, rank - 1)
        position = rank
        for other, n in self.queued.items():
            if other == project_id:
                continue
            position += bisect_left(range(n), target, key=lambda k, other=other: self.key(other, k))
        return position

    def estimated_start(self, position: int) -> datetime:
        """When the job at ``position`` may start: the slots (one per running job; one free slot
        if none runs) play forward, each claim ahead taking the first free slot for a typical job.
        Once the slots' free times lie within one typical job of each other they take the claims
        in turn, so the rest is arithmetic (a deep queue costs no loop per job ahead)."""
        free = list(self.left) or [0.0]
        heapq.heapify(free)
        ahead, top = position - 1, max(free)
        while ahead > 0 and top - free[0] > self.job_s:
            top = max(top, free[0] + self.job_s)
            heapq.heapreplace(free, free[0] + self.job_s)
            ahead -= 1
        turn = sorted(free)
        return self.now + timedelta(seconds=turn[ahead % len(turn)] + (ahead // len(turn)) * self.job_s)


def queue_state(bind: Session | Any, queue: str, now: datetime | None = None,
                window_s: float | None = None) -> QueueState:
    """The fair-share state of ``queue`` at ``now`` (default: the clock), read through ``bind``
    (a Session or a Connection) in four small indexed queries."""
    now = now or utcnow()
    window_s = get_settings().fair_share_window_s if window_s is None else window_s
    since = to_utc(now - timedelta(seconds=window_s))
    queued = {p: int(n) for p, n in bind.execute(
        select(Job.project_id, func.count()).where(Job.queue == queue, Job.status == "queued")
        .group_by(Job.project_id))}
    finished = bind.execute(
        select(Job.project_id, func.sum(Job.run_seconds), func.count(Job.run_seconds))
        .where(Job.queue == queue, Job.finished_at >= since, Job.run_seconds.is_not(None))
        .group_by(Job.project_id)).all()
    total, count = sum(float(s or 0.0) for _, s, _ in finished), sum(int(n) for _, _, n in finished)
    job_s = total / count if count and total > 0 else DEFAULT_JOB_S
    usage = {p: float(s or 0.0) for p, s, _ in finished}
    left = []
    for p, started, epoch, epochs in bind.execute(
            select(Job.project_id, Job.started_at, Job.epoch, Job.epochs)
            .where(Job.queue == queue, Job.status == "running")):
        elapsed = max(0.0, (now - as_utc(started)).total_seconds()) if started is not None else 0.0
        usage[p] = usage.get(p, 0.0) + max(elapsed, job_s)
        if epoch and epochs and epoch < epochs:
            left.append(elapsed * (epochs - epoch) / epoch)
        else:
            left.append(max(job_s - elapsed, 0.0))
    projects = set(queued) | set(usage)
    weights = {p: float(w) for p, w in bind.execute(
        select(Project.id, Project.weight).where(Project.id.in_(projects)))} if projects else {}
    return QueueState(queue=queue, now=now, job_s=job_s, usage=usage, weights=weights, queued=queued,
                      left=tuple(sorted(left)))


def pick_next(session: Session, job_id: str, now: datetime | None = None) -> str | None:
    """The id of the best queued job in the queue of ``job_id`` (the message that arrived): the
    fair-share project first, then its best job (see the module's docstring), row-locked on
    PostgreSQL (skipping rows another worker is claiming: then the project's next job, or the
    next project's), or None when none is queued.

    The common case costs two statements: when the queued jobs of the queue all belong to one
    project (``min(project_id) = max(project_id)``, two index probes), the fair-share order has one
    entry and its state is not read; the queue's state (four queries) is read only when two or more
    projects have queued jobs (:func:`pick_fair`)."""
    return _pick(session, job_id, now)[0]


def _pick(session: Session, job_id: str, now: datetime | None = None) -> tuple[str | None, bool]:
    """:func:`pick_next`'s job, and whether two or more projects had queued jobs in the queue."""
    row = session.execute(_HEAD, {"job_id": job_id}).one_or_none()
    queue, low, high = row if row is not None else (None, None, None)
    if queue is None or low is None:
        return None, False
    if low == high:
        return _best_of(session, queue, low), False
    return pick_fair(session, queue, now), True


def pick_fair(session: Session, queue: str, now: datetime | None = None) -> str | None:
    """The fair-share pick of ``queue`` from its full state (any number of competing projects)."""
    state = queue_state(session, queue, now)
    for project_id in state.order():
        found = _best_of(session, queue, project_id)
        if found is not None:
            return found
    return None


def _best_of(session: Session, queue: str, project_id: str) -> str | None:
    """The project's best queued job in the queue (priority, age, id), row-locked on PostgreSQL
    skipping the rows other workers are claiming."""
    return session.scalar(_BEST, {"queue": queue, "project_id": project_id})


#: whether this process's last claim (claim_next) found two or more projects queued: then the next
#: claim reads the fair-share state first instead of trying the one-statement claim
_competing = threading.Event()


def claim_next(session: Session, message_job_id: str, worker: str, stale_after_s: float) -> Job | None:
    """Claim the job :func:`pick_next` picks (``repo.claim_job``), or None when none is queued.

    When the queued jobs of the message's queue belong to one project (the common case), the pick
    and the claim are one statement (``UPDATE ... WHERE id = (the project's best queued job, FOR
    UPDATE SKIP LOCKED) RETURNING id``): the claim's ``started_at`` is stamped before the worker's
    first round trip, as it was before the pick existed (submit->running latency, BENCHMARKS.md).
    Otherwise (two or more projects queued, or none) that statement moves nothing and the pick
    reads the fair-share state as :func:`pick_next` does. While projects compete (the process's
    last claim found two or more queued) the pick comes first, so a claim then costs what the pick
    and ``claim_job`` cost, and the one statement is tried again once one project is left."""
    if not _competing.is_set():
        job = repo.claim_chosen(session, _CHOSEN, {"job_id": message_job_id}, worker)
        if job is not None:
            return job
    best, competing = _pick(session, message_job_id)
    if competing:
        _competing.set()
    else:
        _competing.clear()
    return None if best is None else repo.claim_job(session, best, worker, stale_after_s)


def _statements() -> tuple[Any, Any, Any]:
    """The pick's statements, built once (building them costs more CPU than running them): the
    head (the message's queue, and the lowest and highest project id with queued jobs in it), the
    best queued job of one project, and the claim's chosen job (the best queued job of the queue
    when one project has queued jobs there: the head and the best in one subquery)."""

    def bounds(queue: Any) -> tuple[Any, Any]:
        other = aliased(Job)
        queued = (other.queue == queue, other.status == "queued")
        return (select(func.min(other.project_id)).where(*queued).scalar_subquery(),
                select(func.max(other.project_id)).where(*queued).scalar_subquery())

    msg = aliased(Job)
    head = select(msg.queue, *bounds(msg.queue)).where(msg.id == bindparam("job_id"))

    def best_of(job: Any, queue: Any, project_id: Any, *also: Any) -> Any:
        return (select(job.id).where(job.queue == queue, job.status == "queued", job.project_id == project_id, *also)
                .order_by(*_within(job)).limit(1).with_for_update(skip_locked=True))

    best = best_of(Job, bindparam("queue"), bindparam("project_id"))
    queue = select(msg.queue).where(msg.id == bindparam("job_id")).scalar_subquery()
    low, high = bounds(queue)
    chosen = best_of(aliased(Job), queue, low, low == high).scalar_subquery()
    return head, best, chosen


_HEAD, _BEST, _CHOSEN = _statements()


def position_sql(alias: str) -> str:
    """SQL for the job row ``alias``'s 1-based rank in its project's order within its queue (NULL
    unless it is queued): its project's queued jobs of the queue that come before it, plus one.
    :meth:`QueueState.position` turns it into the queue position."""
    a = alias
    return (
        f"CASE WHEN {a}.status = 'queued' THEN (SELECT count(*) + 1 FROM jobs ahead "
        f"WHERE ahead.queue = {a}.queue AND ahead.status = 'queued' AND ahead.project_id = {a}.project_id "
        f"AND (ahead.priority > {a}.priority "
        f"OR (ahead.priority = {a}.priority AND (ahead.created_at < {a}.created_at "
        f"OR (ahead.created_at = {a}.created_at AND ahead.id < {a}.id))))) END"
    )


def queue_rank(session: Session, job_id: str) -> int | None:
    """The job's rank in its project's order within its queue (None unless it is queued)."""
    rank = session.execute(text(f"SELECT {position_sql('j')} FROM jobs j WHERE j.id = :id"), {"id": job_id}).scalar()
    return None if rank is None else int(rank)


def queue_position(session: Session, job_id: str, now: datetime | None = None) -> int | None:
    """The job's queue position from its queue's state now, read afresh (None unless it is queued)."""
    rank = queue_rank(session, job_id)
    if rank is None:
        return None
    queue, project_id = session.execute(select(Job.queue, Job.project_id).where(Job.id == job_id)).one()
    return queue_state(session, queue, now).position(project_id, rank)


_states: dict[tuple[str, str], tuple[float, QueueState]] = {}
_states_lock = threading.Lock()


def _cached_state(engine: Engine, queue: str) -> QueueState:
    key = (engine.url.render_as_string(hide_password=True), queue)
    with _states_lock:
        hit = _states.get(key)
        if hit is not None and time.monotonic() - hit[0] < VIEW_STATE_TTL_S:
            return hit[1]
        # a plain read (BEGIN, not IMMEDIATE, on SQLite): the caller may be a writing session of
        # this process that holds the write lock (the view of a job just submitted)
        with engine.connect() as conn:
            state = queue_state(conn.execution_options(sqlite_immediate=False), queue)
        _states[key] = (time.monotonic(), state)
        return state


def queued_view(engine: Engine, queue: str, project_id: str, rank: int | None) -> tuple[int | None, datetime | None]:
    """A queued job's (queue position, estimated start) for the job view, from its rank in its
    project (:func:`position_sql`) and its queue's state (reused for :data:`VIEW_STATE_TTL_S`);
    (None, None) for a job that is not queued."""
    if rank is None:
        return None, None
    state = _cached_state(engine, queue)
    position = state.position(project_id, int(rank))
    return position, state.estimated_start(position)


def request_preemptions(session: Session, grace_s: float, now: datetime | None = None) -> list[str]:
    """Mark running jobs to be suspended (``preempt_requested``) so that queued jobs of higher
    priority can start; returns the ids marked. A running job is marked for a queued job of the same
    project and queue that has a higher priority and was queued at least ``grace_s`` seconds ago
    (time for a worker to free up on its own), lowest priority first, then the most recently
    started (the least work redone); as many as there are such queued jobs, less the jobs already
    marked in that project and queue. Only when the project would receive the freed slot: after the
    victim's charge is taken off its usage, its fair-share key is the queue's lowest (otherwise the
    slot goes to another project by fair share and the suspension would gain it nothing). The
    worker stops the marked job at its next step, writes its snapshot and requeues it
    (worker/runner.py); the next claim resumes it exactly (deterministic mode)."""
    now = now or utcnow()
    cutoff = to_utc(now - timedelta(seconds=grace_s))
    groups: dict[tuple[str, str], list[Any]] = {}
    for row in session.execute(
            select(Job.id, Job.queue, Job.project_id, Job.priority, Job.started_at, Job.preempt_requested)
            .where(Job.status == "running")):
        groups.setdefault((row.queue, row.project_id), []).append(row)
    marked: list[str] = []
    states: dict[str, QueueState] = {}
    for (queue, project_id), rows in groups.items():
        pending = sum(1 for r in rows if r.preempt_requested)
        victims = sorted((r for r in rows if not r.preempt_requested),
                         key=lambda r: (r.priority, -(as_utc(r.started_at) or now).timestamp()))
        if not victims:
            continue
        waiting = list(session.scalars(
            select(Job.priority)
            .where(Job.queue == queue, Job.project_id == project_id, Job.status == "queued",
                   Job.priority > victims[0].priority, Job.created_at <= cutoff)
            .order_by(Job.priority.desc()).limit(len(rows))))[pending:]
        if not waiting:
            continue
        state = states.get(queue) or states.setdefault(queue, queue_state(session, queue, now))
        for priority, victim in zip(waiting, victims, strict=False):
            if priority <= victim.priority or not _gets_the_slot(state, project_id, victim, now):
                break
            if session.execute(
                    update(Job).where(Job.id == victim.id, Job.status == "running", Job.preempt_requested.is_(False))
                    .values(preempt_requested=True).execution_options(synchronize_session=False)
            ).rowcount:  # type: ignore[attr-defined]
                marked.append(victim.id)
    return marked


def _gets_the_slot(state: QueueState, project_id: str, victim: Any, now: datetime) -> bool:
    """Whether ``project_id`` is the first in the fair-share order once ``victim`` (one of its
    running jobs) no longer runs."""
    elapsed = max(0.0, (now - as_utc(victim.started_at)).total_seconds()) if victim.started_at is not None else 0.0
    usage = {**state.usage, project_id: state.usage.get(project_id, 0.0) - max(elapsed, state.job_s)}
    return replace(state, usage=usage).order()[:1] == [project_id]


def set_priority(session: Session, job_id: str, priority: int) -> bool:
    """Change a queued job's priority; False if it is not queued (then it is too late)."""
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued").values(priority=priority)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def set_sweep_priority(session: Session, sweep: Sweep, priority: int) -> None:
    """A sweep's priority: its queued trials now, its next trials when they are created."""
    sweep.priority = priority
    session.execute(
        update(Job).where(Job.sweep_id == sweep.id, Job.status == "queued").values(priority=priority)
        .execution_options(synchronize_session=False)
    )


def queued_by_project(session: Session) -> list[tuple[str, str, int]]:
    """(project name, queue, queued jobs) for /metrics."""
    q = (
        select(Project.name, Job.queue, func.count())
        .join(Project, Project.id == Job.project_id)
        .where(Job.status == "queued")
        .group_by(Project.name, Job.queue)
    )
    return [(p, qn, int(n)) for p, qn, n in session.execute(q)]
