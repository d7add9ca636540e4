"""Side by side: ``store.bulkread.bulk_metrics_json`` of another revision (default ``main``,
loaded from ``git show REF:store/bulkread.py``) against this tree's, in one process on one kept
PostgreSQL database of 1,000 running jobs x 100 epochs (bench/dashboards.py's make_jobs), each
version with its own cache, alternating which goes first, after one warm-up each; both answer the same state (the
change of a case is made once per pair) and must give the same answer.

Usage (repo root, in the venv)::

    python bench/bulk_ab.py [--ref main] [--rounds 10] [--cold]

With ``--cold``, only cold cases: 1,000 finished and 1,000 running jobs x 100 epochs, every key,
one key, max_points 50, both, each request with a fresh cache (a process's first request for a
choice of keys: nothing kept, every job read whole).

Cases: running jobs asked again (nothing new); with one new epoch per job committed before each
request (as a live page's poll; the jobs' rows updated as record_progress does); the same with
``keys`` and with ``max_points``; with 10 jobs' epoch 50 rewritten (a plain UPDATE) before each
request. Per case: wall p50 / p95 ms and the process's CPU p50 ms (PostgreSQL's not included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import dashboards  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="main")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--cold", action="store_true",
                    help="only the cold cases: each request with a fresh cache (nothing kept), finished and running jobs")
    args = ap.parse_args()
    src = subprocess.run(["git", "show", f"{args.ref}:store/bulkread.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    name, admin = dashboards.setup()
    try:
        from sqlalchemy import update

        from store import bulkread as new
        from store.db import get_engine, session_scope
        from store.models import DEFAULT_PROJECT, JobMetric

        old = types.ModuleType("bulkread_old")
        exec(compile(src, f"{args.ref}:store/bulkread.py", "exec"), old.__dict__)  # noqa: S102
        running = dashboards.make_jobs(args.jobs, 100, status="running")
        done = dashboards.make_jobs(args.jobs, 100) if args.cold else []
        engine = get_engine()
        last = [100]

        def one_more_epoch() -> None:
            last[0] += 1
            dashboards.add_epoch(running, last[0])

        def rewrite_ten() -> None:
            with session_scope() as s:
                s.execute(update(JobMetric).where(JobMetric.job_id.in_(running[:10]), JobMetric.epoch == 50)
                          .values(values={"epoch": 50, "loss": float(time.time() % 1)}))

        caches = {"old": old.CurveCache(), "new": new.CurveCache()}
        mods = {"old": old, "new": new}
        since = dict.fromkeys(running, 0)
        cases: list[tuple[str, Any, dict[str, Any]]] = [
            ("running, all keys, asked again", None, {}),
            ("running, all keys, +1 epoch each", one_more_epoch, {}),
            ("running, keys=[val_loss], +1 epoch each", one_more_epoch, {"keys": ["val_loss"]}),
            ("running, max_points=50, +1 epoch each", one_more_epoch, {"max_points": 50}),
            ("running, all keys, 10 jobs' epoch 50 rewritten", rewrite_ten, {}),
        ]
        if args.cold:  # a fresh cache for every request: nothing kept, every job read whole (100 epochs)
            cases = [(f"cold, {what}, {label}", None, {**kw, "cold": ids})
                     for what, ids in (("finished", done), ("running", running))
                     for label, kw in (("all keys", {}), ("keys=[val_loss]", {"keys": ["val_loss"]}),
                                       ("max_points=50", {"max_points": 50}),
                                       ("keys=[val_loss], max_points=50", {"keys": ["val_loss"], "max_points": 50}))]
        print(f"load average {os.getloadavg()}", flush=True)
        for label, before, kw in cases:
            res: dict[str, tuple[list[float], list[float]]] = {"old": ([], []), "new": ([], [])}
            for i in range(args.rounds + 1):
                if before is not None:
                    before()  # once per pair: both versions answer the same database state
                bodies = {}
                ask = dict(kw)
                ids = ask.pop("cold", None)
                for v in ("old", "new") if i % 2 else ("new", "old"):  # either goes first every other round
                    if ids is not None:
                        caches[v] = mods[v].CurveCache()  # nothing kept
                    t, c = time.perf_counter(), time.process_time()
                    body = mods[v].bulk_metrics_json(engine, DEFAULT_PROJECT, since if ids is None else
                                                     dict.fromkeys(ids, 0), cache=caches[v], **ask)
                    dt, dc = time.perf_counter() - t, time.process_time() - c
                    if i:
                        res[v][0].append(dt * 1000)
                        res[v][1].append(dc * 1000)
                    bodies[v] = body
                # the same answer (the jobs' order in the object may differ: the old one's followed the rows')
                assert json.loads(bodies["old"]) == json.loads(bodies["new"]), label
            row = []
            for v in ("old", "new"):
                w, c = res[v]
                row.append(f"{v} {dashboards.pct(w, .5):.0f} / {dashboards.pct(w, .95):.0f} / {dashboards.pct(c, .5):.0f}")
            ratio = dashboards.pct(res["new"][0], .5) / dashboards.pct(res["old"][0], .5)
            print(f"{label}: {'; '.join(row)} (wall p50 / p95 / CPU p50 ms); new/old p50 {ratio:.2f}; "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        dashboards.teardown(name, admin)


if __name__ == "__main__":
    main()
