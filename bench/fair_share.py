"""Benchmark: fair share between projects (issue 14), the pick of ``store.scheduling.pick_next``
on real database rows, against first come, first served (the pick before fair share: priority,
then age, over the whole queue) measured in the same run.

Usage (repo root, in the venv)::

    python bench/fair_share.py                                    # SQLite file, ~1 min
    python bench/fair_share.py --url postgresql+psycopg://postgres@127.0.0.1:5432/some_empty_db

The database must be empty or migrated (the script migrates it). For each scenario the projects
queue ``--jobs`` jobs each, interleaved (first come, first served would alternate them); ``--slots``
workers then claim and run them on a virtual clock (job lengths drawn from the same seeded
distribution for every project): a free slot calls the pick with the virtual time, the job
"runs" for its length, and its finished row (``run_seconds``, ``finished_at``) is what the next
picks read. Worker time is counted until the ``--claims``-th claim, while every project still has
queued jobs. Printed per scenario and pick: each project's share of the worker time against its
weight's share, the largest relative error, and the median time of one pick (ms) with about
``2 x --jobs`` queued jobs, as a ratio to the first-come pick's.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from store import auth, lifecycle, repo, scheduling
from store.db import make_engine
from store.migrate import upgrade
from store.models import Job

Pick = Callable[[Session, str, object], "str | None"]


def fifo_pick(s: Session, job_id: str, now: object) -> str | None:
    """The pick before fair share: the queue's highest priority, then the oldest, then the id."""
    queue = select(Job.queue).where(Job.id == job_id).scalar_subquery()
    return s.scalar(select(Job.id).where(Job.queue == queue, Job.status == "queued")
                    .order_by(Job.priority.desc(), Job.created_at, Job.id).limit(1).with_for_update(skip_locked=True))


def fair_pick(s: Session, job_id: str, now: object) -> str | None:
    return scheduling.pick_next(s, job_id, now=now)  # type: ignore[arg-type]


def run(engine: Engine, weights: list[float], pick: Pick, *, jobs: int, slots: int, claims: int,
        lengths: list[float], seed: int) -> tuple[list[float], float]:
    """(each project's share of the worker time, median ms per pick)."""
    queue = f"bench-fair-{uuid.uuid4().hex[:8]}"
    rng = random.Random(seed)
    t0 = repo.utcnow()
    with Session(engine) as s, s.begin():
        projects = []
        for i, w in enumerate(weights):
            row = auth.ensure_project(s, f"bench-{i}-{uuid.uuid4().hex[:6]}")
            auth.set_project_weight(s, row.id, w)
            projects.append(row.id)
        for _ in range(jobs):
            for p in projects:
                repo.create_jobs(s, [({"name": "b", "epochs": 1}, queue, None)], project_id=p)
        message = s.scalar(select(Job.id).where(Job.queue == queue).limit(1))
    owner: dict[str, str] = {}
    length: dict[str, float] = {}
    started: dict[str, float] = {}
    running: list[tuple[float, str]] = []
    pick_ms: list[float] = []
    now = 0.0
    for _ in range(claims):
        if len(running) == slots:
            now, done = heapq.heappop(running)
            with Session(engine) as s, s.begin():
                lifecycle.move(s, done, (lifecycle.RUNNING,), lifecycle.SUCCEEDED,
                               values={"finished_at": t0 + timedelta(seconds=now), "run_seconds": length[done]})
        with Session(engine) as s, s.begin():
            t = time.perf_counter()
            job = pick(s, message, t0 + timedelta(seconds=now))
            pick_ms.append((time.perf_counter() - t) * 1000)
            assert job is not None
            lifecycle.move(s, job, (lifecycle.QUEUED,), lifecycle.RUNNING,
                           values={"started_at": t0 + timedelta(seconds=now), "attempts": 1})
            owner[job] = s.scalar(select(Job.project_id).where(Job.id == job))
        length[job], started[job] = rng.choice(lengths), now
        heapq.heappush(running, (now + length[job], job))
    used = dict.fromkeys(projects, 0.0)
    for job, begin in started.items():
        used[owner[job]] += max(0.0, min(begin + length[job], now) - begin)
    total = sum(used.values())
    return [used[p] / total for p in projects], statistics.median(pick_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="database URL (default: a temporary SQLite file)")
    ap.add_argument("--jobs", type=int, default=400, help="queued jobs per project")
    ap.add_argument("--claims", type=int, default=300)
    ap.add_argument("--seed", type=int, default=14)
    args = ap.parse_args()
    url = args.url or f"sqlite:///{Path(tempfile.mkdtemp()) / 'fair.db'}"
    upgrade(url)
    engine = make_engine(url)
    scenarios = [
        ("1:3, 1 slot, jobs 1-3 s", [1.0, 3.0], 1, [1.0, 2.0, 3.0]),
        ("1:3, 4 slots, jobs 1-3 s", [1.0, 3.0], 4, [1.0, 2.0, 3.0]),
        ("1:1:2, 3 slots, jobs 1-30 s (heavy tail)", [1.0, 1.0, 2.0], 3, [1.0] * 6 + [5.0] * 3 + [30.0]),
    ]
    print(f"database: {engine.dialect.name}; {args.jobs} queued jobs per project, {args.claims} claims")
    print("| scenario | pick | worker-time shares (target) | largest relative error | ms per pick (median) | × first-come |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, weights, slots, lengths in scenarios:
        target = [w / sum(weights) for w in weights]
        base_ms = None
        for label, pick in (("first come", fifo_pick), ("fair share", fair_pick)):
            shares, ms = run(engine, weights, pick, jobs=args.jobs, slots=slots, claims=args.claims,
                             lengths=lengths, seed=args.seed)
            base_ms = base_ms or ms
            err = max(abs(s - t) / t for s, t in zip(shares, target, strict=True))
            print(f"| {name} | {label} | {' / '.join(f'{s:.3f}' for s in shares)} "
                  f"({' / '.join(f'{t:.3f}' for t in target)}) | {err:.1%} | {ms:.2f} | {ms / base_ms:.2f} |")
    engine.dispose()


if __name__ == "__main__":
    main()
