"""Benchmark: the cost of one worker claim (issue 10's submit->running path), in process, on real
database rows: the fair-share pick as it was (main at bf79aa4, copied here: the message's queue,
the queue's full state, one query per project), the pick of 41a9820 (``scheduling.pick_next``: two
statements when one project has queued jobs in the queue) then ``repo.claim_job``, the claim now
(``scheduling.claim_next``: pick and claim in one UPDATE when one project has queued jobs), and
the claim before fair share (f59becf: the message's own job, ``repo.claim_job`` alone), measured in
the same run, alternated.

Usage (repo root, in the venv)::

    python bench/claim_cost.py --url postgresql+psycopg://postgres@127.0.0.1:5432/some_empty_db
    python bench/claim_cost.py                     # SQLite file

Each claim is one transaction (pick + claim + commit), as in worker/runner.py ``_claim``.
Printed per scenario and way: statements per claim, median CPU ms (process_time) and wall ms
per claim. Scenarios: ``one``: one project with ``--jobs`` queued jobs in the queue (the common
case); ``two``: two projects with ``--jobs`` each (the full state is read either way).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session

from store import auth, repo, scheduling
from store.db import make_engine
from store.migrate import upgrade
from store.models import Job


def old_pick(s: Session, job_id: str) -> str | None:
    """``scheduling.pick_next`` before this change (main at bf79aa4), verbatim."""
    queue = s.scalar(select(Job.queue).where(Job.id == job_id))
    if queue is None:
        return None
    state = scheduling.queue_state(s, queue)
    for project_id in state.order():
        found = s.scalar(
            select(Job.id)
            .where(Job.queue == queue, Job.status == "queued", Job.project_id == project_id)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if found is not None:
            return found
    return None


def new_pick(s: Session, job_id: str) -> str | None:
    return scheduling.pick_next(s, job_id)


def direct(s: Session, job_id: str) -> str | None:
    return job_id


def claim_after(pick: Callable[[Session, str], str | None]) -> Callable[[Session, str], object]:
    """A pick, then ``repo.claim_job`` of what it picked (the claim of bf79aa4 to 5a3b590)."""

    def claim(s: Session, job_id: str) -> object:
        best = pick(s, job_id)
        return None if best is None else repo.claim_job(s, best, "bench", 60.0)

    return claim


def claim_next(s: Session, job_id: str) -> object:
    """The claim now: pick and claim in one statement (``scheduling.claim_next``)."""
    return scheduling.claim_next(s, job_id, "bench", 60.0)


WAYS: dict[str, Callable[[Session, str], object]] = {
    "fair-before": claim_after(old_pick), "pick-then-claim": claim_after(new_pick), "claim-next": claim_next,
    "f59becf-direct": claim_after(direct),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--claims", type=int, default=100)
    args = ap.parse_args()
    url = args.url or f"sqlite:///{Path(tempfile.mkdtemp()) / 'claim.db'}"
    upgrade(url)
    engine: Engine = make_engine(url)
    count = [0]
    event.listen(engine, "before_cursor_execute", lambda *a: count.__setitem__(0, count[0] + 1))
    print(f"{url.split('://')[0]}  load average {open('/proc/loadavg').read().split()[:3]}")
    for scenario, nproj in (("one", 1), ("two", 2)):
        queues: dict[str, tuple[str, list[str]]] = {}
        with Session(engine) as s, s.begin():
            projects = [auth.ensure_project(s, f"claim-{i}-{uuid.uuid4().hex[:6]}").id for i in range(nproj)]
            for way in WAYS:
                q = f"claim-{way}-{uuid.uuid4().hex[:6]}"
                ids = []
                for _ in range(args.jobs):
                    for p in projects:
                        ids += [j.id for j in repo.create_jobs(s, [({"name": "c", "epochs": 1}, q, None)], project_id=p)]
                queues[way] = (q, ids)
        stats: dict[str, list[tuple[int, float, float]]] = {w: [] for w in WAYS}
        for i in range(args.claims):
            for way, claim in WAYS.items():
                message = queues[way][1][i]
                count[0] = 0
                c0, w0 = time.process_time(), time.perf_counter()
                with Session(engine) as s, s.begin():
                    assert claim(s, message) is not None
                stats[way].append((count[0], time.process_time() - c0, time.perf_counter() - w0))
        for way, rows in stats.items():
            print(f"  {scenario:3} {way:15} statements/claim {statistics.median(r[0] for r in rows):4.0f}  "
                  f"cpu {1000 * statistics.median(r[1] for r in rows):6.2f} ms  "
                  f"wall {1000 * statistics.median(r[2] for r in rows):6.2f} ms")
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    engine.dispose()


if __name__ == "__main__":
    main()
