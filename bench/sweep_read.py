"""Benchmark: reading a big sweep (``GET /v1/sweeps/{id}``'s ``sweep_read``), in-process.

Usage (repo root, in the venv)::

    python bench/sweep_read.py                          # SQLite in a temp dir, 1,000 trials x 27 epochs
    python bench/sweep_read.py --db postgresql+psycopg://postgres@127.0.0.1:5432/postgres --rounds 9

Builds a sweep of ``--trials`` finished trials with ``--epochs`` epochs of metrics each (seven
metrics an epoch, as the engine records them) in a fresh database (``--db``: a PostgreSQL server
database to create a scratch database in; default SQLite), then times, round by round and
alternating, ``api.routers.sweeps.sweep_read`` (trials, objective series, leaderboard, the
response model) as the API runs it, and the same read with the objective series taken the way it
was before (each epoch row's whole metrics object decoded in Python, the metric picked out):
the baseline. Prints each round and the medians, and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=27)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--db", default=None, help="a PostgreSQL URL to create a scratch database next to (default: SQLite)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-read-"))
    url, drop = f"sqlite:///{tmp}/db.sqlite", None
    if args.db:
        from sqlalchemy import create_engine, text

        name = f"bench_sweep_read_{uuid.uuid4().hex[:8]}"
        admin = create_engine(args.db, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        url = args.db.rsplit("/", 1)[0] + f"/{name}"
        drop = (admin, name)
    os.environ.update(TRAINYARD_DATABASE_URL=url, TRAINYARD_ARTIFACTS_URL=str(tmp / "art"), TRAINYARD_DATA_DIR=str(tmp),
                      TRAINYARD_AUTH="off")
    try:
        run(args, url)
    finally:
        if drop is not None:
            from sqlalchemy import text

            from store.db import reset_caches

            reset_caches()
            with drop[0].connect() as c:
                c.execute(text(f'DROP DATABASE "{drop[1]}" WITH (FORCE)'))


def run(args: argparse.Namespace, url: str) -> None:
    out = subprocess.run([sys.executable, "-m", "client.cli", "migrate"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from api.routers.sweeps import check_sweep, sweep_read
    from bench.packing import BASE, SPACE
    from config.settings import get_settings
    from store import repo
    from store import sweeps as store_sweeps
    from store.db import session_scope
    from store.floats import decode_float
    from store.models import Job, JobMetric

    n, epochs = args.trials, args.epochs
    body = {"name": "bench-read", "base": copy.deepcopy(BASE), "method": "random", "seed": 1, "parameters": SPACE,
            "objective": {"metric": "val_accuracy", "mode": "max"}, "max_trials": n, "max_concurrent": 100}
    with session_scope() as s:
        config = check_sweep(body, s, "default", get_settings())
        sweep_id = store_sweeps.create_sweep(
            s, project_id="default", name="bench-read", method="random", config=config, objective_metric="val_accuracy",
            objective_mode="max", max_trials=n, max_concurrent=100).id
        ids = [j.id for j in repo.create_jobs(s, [(dict(BASE, name=f"t{k}"), "bench", None) for k in range(n)],
                                              project_id="default", sweep_id=sweep_id, trials=[(k, {}) for k in range(n)])]
    for k, job_id in enumerate(ids):
        with session_scope() as s:
            repo.record_progress(s, job_id, [
                {"epoch": e, "loss": 1 / e, "accuracy": 0.5, "val_loss": 1.1 / e, "val_accuracy": 0.5 + e / 100 + k / 1e5,
                 "lr": 0.001, "seconds": 0.01} for e in range(1, epochs + 1)])
            s.get(Job, job_id).status = "succeeded"

    def whole_objects(session, sid, metric):  # the read before: every row's object decoded
        from sqlalchemy import select

        q = select(JobMetric.job_id, JobMetric.epoch, JobMetric.values).join(Job, Job.id == JobMetric.job_id).where(Job.sweep_id == sid)
        series: dict[str, dict[int, float]] = {}
        for job_id, epoch, values in session.execute(q):
            v = decode_float(values.get(metric))
            if v is not None:
                series.setdefault(job_id, {})[int(epoch)] = float(v)
        return series

    current = store_sweeps.objective_series
    times: dict[str, list[float]] = {"now": [], "baseline": []}
    for r in range(args.rounds):
        for case in (("now", "baseline") if r % 2 == 0 else ("baseline", "now")):
            store_sweeps.objective_series = current if case == "now" else whole_objects
            with session_scope(write=False) as s:
                t = time.perf_counter()
                read = sweep_read(s, store_sweeps.get_sweep(s, sweep_id, "default"))
                read.model_dump_json()
                times[case].append(time.perf_counter() - t)
        store_sweeps.objective_series = current
        print(f"round {r + 1}: now {times['now'][-1] * 1e3:.1f} ms, baseline {times['baseline'][-1] * 1e3:.1f} ms", flush=True)
    assert len(read.leaderboard) == n
    now, base = statistics.median(times["now"]), statistics.median(times["baseline"])
    print(f"{url.split(':', 1)[0]}, {n} trials x {epochs} epochs: sweep read median {now * 1e3:.1f} ms, "
          f"baseline (whole objects decoded) {base * 1e3:.1f} ms, ratio {now / base:.2f}")


if __name__ == "__main__":
    main()
