"""Fair share between projects (issue 14): the pick (store.scheduling.pick_next) against real
database rows on PostgreSQL and SQLite, with a virtual clock so that a few hundred jobs of a few
simulated seconds each run in seconds; queue positions agree with the pick order; one project's
thousand queued jobs do not starve another's single job; estimated start times. The end-to-end
run with a real API, a real worker and two keyed projects is in test_fair_share_stack.py."""

from __future__ import annotations

import heapq
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session

from store import auth, lifecycle, repo, scheduling
from store.db import make_engine
from store.migrate import upgrade
from store.models import Job

QUEUE = "fair-cpu"


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg").create(f"fair_{uuid.uuid4().hex[:6]}")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('fair') / 'fair.db'}"
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def _projects(s: Session, weights: dict[str, float]) -> dict[str, str]:
    """name -> id of fresh projects with these weights."""
    ids = {}
    for name, weight in weights.items():
        row = auth.ensure_project(s, f"{name}-{uuid.uuid4().hex[:6]}")
        auth.set_project_weight(s, row.id, weight)
        ids[name] = row.id
    return ids


def _queue(s: Session, project_id: str, n: int, queue: str, priority: int = 0) -> list[str]:
    items = [({"name": f"j{i}", "epochs": 1}, queue, None) for i in range(n)]
    return [j.id for j in repo.create_jobs(s, items, project_id=project_id, priority=priority)]


def _start(s: Session, job_id: str, at: datetime) -> None:
    assert lifecycle.move(s, job_id, (lifecycle.QUEUED,), lifecycle.RUNNING, values={"started_at": at, "attempts": 1})


def _finish(s: Session, job_id: str, at: datetime, seconds: float) -> None:
    assert lifecycle.move(s, job_id, (lifecycle.RUNNING,), lifecycle.SUCCEEDED,
                          values={"finished_at": at, "run_seconds": seconds})


def _project_of(s: Session, job_id: str) -> str:
    return s.scalar(select(Job.project_id).where(Job.id == job_id))


def test_worker_time_follows_the_weights_over_a_few_hundred_jobs(engine: Engine) -> None:
    """Weights 1:3, three worker slots, 300 queued jobs each of 1-3 simulated seconds (the same
    random lengths for both projects): over the first 240 claims, while both projects still have
    queued jobs, each project's worker time is its weight's share within 10%."""
    queue = f"{QUEUE}-{uuid.uuid4().hex[:6]}"
    rng = random.Random(14)
    t0 = repo.utcnow()
    with Session(engine) as s, s.begin():
        p = _projects(s, {"light": 1.0, "heavy": 3.0})
        # interleaved submissions, light first: FIFO would give each half
        for _ in range(300):
            _queue(s, p["light"], 1, queue)
            _queue(s, p["heavy"], 1, queue)
        message = s.scalar(select(Job.id).where(Job.queue == queue).limit(1))
    length: dict[str, float] = {}
    running: list[tuple[float, str]] = []  # (finish time, job id)
    claims: list[tuple[float, str]] = []  # (start time, project id)
    now = 0.0
    for _ in range(240):
        if len(running) == 3:  # every slot is busy: the next one frees up
            now, done = heapq.heappop(running)
            with Session(engine) as s, s.begin():
                _finish(s, done, t0 + timedelta(seconds=now), length[done])
        with Session(engine) as s, s.begin():
            job = scheduling.pick_next(s, message, now=t0 + timedelta(seconds=now))
            assert job is not None
            _start(s, job, t0 + timedelta(seconds=now))
            claims.append((now, _project_of(s, job)))
        length[job] = rng.choice([1.0, 2.0, 3.0])
        heapq.heappush(running, (now + length[job], job))
    # worker time inside [0, end]: each job's run clipped to the end of the measured stretch
    end = now
    used = {p["light"]: 0.0, p["heavy"]: 0.0}
    with Session(engine) as s:
        rows = s.execute(select(Job.id, Job.project_id, Job.started_at).where(Job.queue == queue,
                                                                               Job.started_at.is_not(None))).all()
    for job_id, project, started in rows:
        begin = (repo.as_utc(started) - t0).total_seconds()
        used[project] += max(0.0, min(begin + length[job_id], end) - begin)
    total = sum(used.values())
    share = {name: used[pid] / total for name, pid in p.items()}
    assert share["light"] == pytest.approx(0.25, rel=0.10), share
    assert share["heavy"] == pytest.approx(0.75, rel=0.10), share
    # and the claims alternate at the weights' rate from the start (no long run of one project)
    first = [project for _, project in claims[:40]]
    assert 8 <= first.count(p["light"]) <= 12, first.count(p["light"])


def test_queue_positions_are_the_pick_order(engine: Engine) -> None:
    """Three projects (weights 1, 2, 4; two with recent usage), priorities within them: the
    positions of all queued jobs are 1..n, and claiming one job after another (none finishing)
    takes them in exactly that order."""
    queue = f"{QUEUE}-{uuid.uuid4().hex[:6]}"
    t0 = repo.utcnow()
    with Session(engine) as s, s.begin():
        p = _projects(s, {"a": 1.0, "b": 2.0, "c": 4.0})
        # in the window, a used 120 s (jobs of 30 and 90 s) and b 45 s: a typical job is 55 s
        for project, seconds in (("a", 30.0), ("a", 90.0), ("b", 45.0)):
            [done] = _queue(s, p[project], 1, queue)
            _start(s, done, t0 - timedelta(seconds=200))
            _finish(s, done, t0 - timedelta(seconds=100), seconds)
        jobs = (_queue(s, p["a"], 5, queue) + _queue(s, p["b"], 4, queue) + _queue(s, p["b"], 4, queue, priority=5)
                + _queue(s, p["c"], 3, queue) + _queue(s, p["c"], 2, queue, priority=-1))
    with Session(engine) as s:
        positions = {j: scheduling.queue_position(s, j, now=t0) for j in jobs}
    assert sorted(positions.values()) == list(range(1, len(jobs) + 1))
    picked = []
    for _ in jobs:
        with Session(engine) as s, s.begin():
            job = scheduling.pick_next(s, jobs[0], now=t0)
            assert job is not None
            _start(s, job, t0)
            picked.append(job)
    assert picked == sorted(jobs, key=positions.__getitem__)
    with Session(engine) as s:
        assert scheduling.pick_next(s, jobs[0], now=t0) is None
    # usage/weight: c's claims score 0, 13.75, 27.5, ...; b's 22.5, 50, 77.5, 105, ...; a's 120,
    # 175, ...: c first, and a's first job after b's four and c's five below 120
    with Session(engine) as s:
        owners = [_project_of(s, j) for j in picked]
    assert owners[0] == p["c"] and owners.index(p["a"]) == 9, owners
    # within a project: priority, then age, then id
    b_jobs = [j for j, o in zip(picked, owners, strict=True) if o == p["b"]]
    assert b_jobs == sorted(jobs[9:13]) + sorted(jobs[5:9])  # one batch: one created_at, then the id


def test_a_thousand_queued_jobs_do_not_starve_another_projects_single_job(engine: Engine) -> None:
    """Project big queues 1000 jobs at the highest priority and runs two; project small queues one
    job, last, at the lowest priority and with a quarter of big's weight: it is next."""
    queue = f"{QUEUE}-{uuid.uuid4().hex[:6]}"
    t0 = repo.utcnow()
    with Session(engine) as s, s.begin():
        p = _projects(s, {"big": 4.0, "small": 1.0})
        big = _queue(s, p["big"], 1000, queue, priority=scheduling.PRIORITY_MAX)
        for job in big[:2]:
            _start(s, job, t0 - timedelta(seconds=5))
        [single] = _queue(s, p["small"], 1, queue, priority=scheduling.PRIORITY_MIN)
    with Session(engine) as s:
        assert scheduling.queue_position(s, single, now=t0) == 1
        assert scheduling.queue_position(s, min(big[2:]), now=t0) == 2  # one batch: one created_at, then the id
    with Session(engine) as s, s.begin():
        assert scheduling.pick_next(s, big[500], now=t0) == single


def test_the_estimated_start_plays_the_slots_forward(engine: Engine) -> None:
    """Two running jobs (one half done after 40 s: 40 s left; one not past its first epoch after
    10 s: a typical job's 50 s left... of 60 s), then each claim ahead takes a typical job."""
    queue = f"{QUEUE}-{uuid.uuid4().hex[:6]}"
    t0 = repo.utcnow()
    with Session(engine) as s, s.begin():
        p = _projects(s, {"x": 1.0})
        [done] = _queue(s, p["x"], 1, queue)
        _start(s, done, t0 - timedelta(seconds=500))
        _finish(s, done, t0 - timedelta(seconds=440), 60.0)  # a typical job: 60 s
        half, early = _queue(s, p["x"], 2, queue)
        _start(s, half, t0 - timedelta(seconds=40))
        s.execute(update(Job).where(Job.id == half).values(epoch=5, epochs=10))
        _start(s, early, t0 - timedelta(seconds=10))
        _queue(s, p["x"], 4, queue)
        state = scheduling.queue_state(s, queue, now=t0)
    assert state.job_s == 60.0 and state.left == (40.0, 50.0)
    starts = [(state.estimated_start(k) - t0).total_seconds() for k in range(1, 5)]
    assert starts == [40.0, 50.0, 100.0, 110.0]


def test_preemption_marks_the_lowest_priority_newest_job_of_the_waiting_jobs_project(engine: Engine) -> None:
    """A queued job of priority 5 that waited past the grace marks one running job of its own
    project and queue: the lowest priority, then the most recently started; a second pass marks
    nothing more (the room is coming); a job queued within the grace, or whose project would not
    get the freed slot (fair share), marks nothing."""
    queue = f"{QUEUE}-{uuid.uuid4().hex[:6]}"
    t0 = repo.utcnow()
    with Session(engine) as s, s.begin():
        p = _projects(s, {"x": 1.0, "y": 1.0})
        old_low, new_low, mid = _queue(s, p["x"], 1, queue) + _queue(s, p["x"], 1, queue) + \
            _queue(s, p["x"], 1, queue, priority=3)
        _start(s, old_low, t0 - timedelta(seconds=300))
        _start(s, new_low, t0 - timedelta(seconds=100))
        _start(s, mid, t0 - timedelta(seconds=50))
        [high] = _queue(s, p["x"], 1, queue, priority=5)
        s.execute(update(Job).where(Job.id == high).values(created_at=t0 - timedelta(seconds=30)))
    with Session(engine) as s, s.begin():
        assert scheduling.request_preemptions(s, grace_s=60, now=t0) == []  # still within the grace
    with Session(engine) as s, s.begin():
        assert scheduling.request_preemptions(s, grace_s=10, now=t0) == [new_low]
    with Session(engine) as s, s.begin():
        assert scheduling.request_preemptions(s, grace_s=10, now=t0) == []
        assert repo.requeue_job(s, new_low, "preempted")  # what the worker does: the request is consumed
        assert not repo.is_preempt_requested(s, new_low)
    # now project y queues a job too: y has used nothing, so a freed slot would go to y, not to x
    with Session(engine) as s, s.begin():
        _start(s, new_low, t0)  # (new_low runs again)
        _queue(s, p["y"], 1, queue)
        assert scheduling.request_preemptions(s, grace_s=10, now=t0) == []


def _one_project_queued(engine: Engine) -> tuple[str, datetime, dict[str, str], list[str], str]:
    """A fresh queue where project "other" has a running job and project "alone" three queued ones:
    (queue, now, project ids, alone's two of priority 0, alone's one of priority 3)."""
    queue = f"{QUEUE}-{uuid.uuid4().hex[:6]}"
    t0 = repo.utcnow()
    with Session(engine) as s, s.begin():
        p = _projects(s, {"alone": 1.0, "other": 1.0})
        [ran] = _queue(s, p["other"], 1, queue)
        _start(s, ran, t0 - timedelta(seconds=5))
        low = _queue(s, p["alone"], 2, queue)
        [high] = _queue(s, p["alone"], 1, queue, priority=3)
    return queue, t0, p, low, high


@contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    """The statements ``engine`` sends meanwhile (SQLite's BEGIN IMMEDIATE left out)."""
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if not statement.lstrip().upper().startswith("BEGIN"):
            statements.append(statement.lstrip())

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_project_alone_in_its_queue_is_picked_in_two_statements(engine: Engine) -> None:
    """When one project has queued jobs in the queue (others only running or finished there), the
    pick reads no fair-share state: two statements, priority then age, the same job as the full
    state's pick; on PostgreSQL a row another worker holds is skipped for the project's next job.
    A second project's queued job brings the full state back (the fair-share order)."""
    queue, t0, p, low, high = _one_project_queued(engine)
    with _statements(engine) as statements:
        with Session(engine) as s, s.begin():
            statements.clear()
            assert scheduling.pick_next(s, low[0], now=t0) == high
            assert len(statements) == 2, statements
            assert scheduling.pick_fair(s, queue, now=t0) == high
    if engine.dialect.name == "postgresql":
        with Session(engine) as holder, holder.begin():
            assert scheduling.pick_next(holder, low[0], now=t0) == high  # row-locked until this ends
            with Session(engine) as s, s.begin():
                assert scheduling.pick_next(s, low[0], now=t0) == min(low)
    with Session(engine) as s, s.begin():
        [late] = _queue(s, p["other"], 1, queue, priority=scheduling.PRIORITY_MIN)
    with Session(engine) as s, s.begin():
        # other's usage is one running job (charged a typical job), alone's none: alone first
        assert scheduling.pick_next(s, late, now=t0) == high
        _start(s, high, t0)
        _start(s, min(low), t0)
    with Session(engine) as s, s.begin():
        # now alone runs two jobs to other's one: other's queued job, despite its priority
        assert scheduling.pick_next(s, low[0], now=t0) == late


def test_a_project_alone_in_its_queue_is_claimed_in_one_statement(engine: Engine) -> None:
    """The worker's claim (scheduling.claim_next): when one project has queued jobs in the queue,
    the pick and the claim are one UPDATE, the first statement of the claim (its started_at is
    stamped before any round trip: submit->running), and it claims pick_next's job; on PostgreSQL
    a row another worker holds is skipped. With a second project queued, or none, that statement
    claims nothing and the fair-share pick decides, as pick_next does; while projects compete the
    pick comes first."""
    scheduling._competing.clear()  # this process's earlier claims do not decide this test's way
    queue, t0, p, low, high = _one_project_queued(engine)
    with _statements(engine) as statements:
        with Session(engine) as s, s.begin():
            statements.clear()
            job = scheduling.claim_next(s, low[0], "w:1", 60.0)
            assert job is not None and job.id == high and job.status == lifecycle.RUNNING and job.attempts == 1
            assert statements[0].upper().startswith("UPDATE JOBS"), statements
            assert sum(st.upper().startswith("UPDATE JOBS") for st in statements) == 1, statements
            assert job.started_at is not None and repo.as_utc(job.started_at) >= t0
    if engine.dialect.name == "postgresql":
        with Session(engine) as holder, holder.begin():
            held = scheduling.claim_next(holder, low[0], "w:1", 60.0)  # row-locked until this ends
            assert held is not None and held.id == min(low)
            with Session(engine) as s, s.begin():
                other = scheduling.claim_next(s, low[0], "w:2", 60.0)
                assert other is not None and other.id == max(low)
            holder.rollback()
        with Session(engine) as s, s.begin():
            _start(s, min(low), t0)
            lifecycle.move(s, max(low), (lifecycle.RUNNING,), lifecycle.QUEUED, values={"attempts": 0})
    else:
        with Session(engine) as s, s.begin():
            _start(s, min(low), t0)
    with Session(engine) as s, s.begin():
        [late] = _queue(s, p["other"], 1, queue, priority=scheduling.PRIORITY_MIN)
    with Session(engine) as s, s.begin():
        # two projects queued: the fair-share pick (other's usage is one running job, alone's two)
        assert scheduling.pick_next(s, late, now=repo.utcnow()) == late
        job = scheduling.claim_next(s, late, "w:1", 60.0)
        assert job is not None and job.id == late
    with _statements(engine) as statements, Session(engine) as s, s.begin():
        # the last claim found projects competing, so the pick comes first (alone is alone again)
        job = scheduling.claim_next(s, late, "w:1", 60.0)
        assert job is not None and job.id == max(low)
        assert not statements[0].upper().startswith("UPDATE"), statements
    with Session(engine) as s, s.begin():
        [more] = _queue(s, p["alone"], 1, queue)
    with _statements(engine) as statements, Session(engine) as s, s.begin():
        job = scheduling.claim_next(s, late, "w:1", 60.0)
        assert job is not None and job.id == more
        assert statements[0].upper().startswith("UPDATE JOBS"), statements  # one project: the one statement again
        assert scheduling.claim_next(s, late, "w:1", 60.0) is None  # none queued
