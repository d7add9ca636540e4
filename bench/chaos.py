"""Chaos runs (issue 4, section 3): the kill and outage scenarios of tests/service/test_faults.py,
each repeated N times with real processes, summarized as one table.

Usage (repo root, in the venv; PostgreSQL and Redis on their usual ports, redis-server and the
PostgreSQL server binaries installed)::

    python bench/chaos.py                # 3 runs of each scenario (~5 min on a 2-core box)
    python bench/chaos.py --runs 5 --only sigkill,redis
    python bench/chaos.py --json bench/out/chaos.json

Scenarios (a fresh database ``trainyard_chaos_<run>`` on the shared PostgreSQL, a unique queue
prefix on the shared Redis; the shared servers are never stopped: outages use private servers):

  sigkill   a solo worker SIGKILLed mid-epoch (so every worker is dead), a new one started at once;
            the job must resume from its per-epoch snapshot and succeed.
  redis     the broker (a private redis-server, no persistence) killed mid-job and restarted 1 s
            later; the job must finish exactly once.
  broker    the broker down while 20 jobs are submitted through ``trainyard api`` (all must be
            accepted), back 1 s after the last; every job must run exactly once.
  postgres  the database (a private PostgreSQL) stopped mid-job for 2 s and started again; the
            worker retries its writes, the job succeeds with every epoch's metrics.

Columns: ``succeeded`` jobs that ended succeeded; ``duplicated`` jobs claimed more often than the
fault explains (a kill explains one extra claim) plus epochs redone beyond one per kill; ``lost``
jobs that did not succeed plus epochs whose metrics are missing; ``recover s`` the median seconds
from the fault (kill, broker/database back) until the job trains again (a new epoch stored, or for
``broker`` every job started).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.service.test_faults_kit import (  # noqa: E402
    PrivatePostgres,
    PrivateRedis,
    Probe,
    free_port,
    kill,
    missing_servers,
    send,
    service_env,
    slow_spec,
    start_worker,
    tiny_spec,
    wait_until,
)

SHARED_PG = os.environ.get("TRAINYARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
SHARED_REDIS = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
STALE_S = "4"
EPOCHS = 16


@dataclass
class Outcome:
    jobs: int = 0
    succeeded: int = 0
    duplicated: int = 0
    lost: int = 0
    recover_s: float | None = None
    notes: list[str] = field(default_factory=list)


def _env(db: str, broker: str, tmp: Path, **extra: str) -> dict[str, str]:
    return service_env(db, broker, tmp, **{"TRAINYARD_HEARTBEAT_STALE": STALE_S, "TRAINYARD_FLUSH_INTERVAL": "0.2",
                                          "TRAINYARD_SNAPSHOT_INTERVAL": "0", **extra})


def _submit(probe: Probe, env: dict[str, str], spec: dict[str, Any]) -> str:
    from config.settings import settings_from_env

    settings = settings_from_env(env)
    job_id = probe.create(spec, settings.queue_name("cpu"))
    send(settings, [(job_id, settings.queue_name("cpu"))])
    return job_id


def _score(probe: Probe, job_id: str, out: Outcome, *, kills: int = 0) -> None:
    job = probe.job(job_id)
    out.jobs += 1
    missing = len(set(range(1, job.epochs + 1)) - set(probe.metric_epochs(job_id)))
    if job.status == "succeeded":
        out.succeeded += 1
        out.lost += missing
    else:
        out.lost += 1
        out.notes.append(f"{job_id}: {job.status} {job.error or ''}"[:200])
    runs = probe.runs(job_id)
    out.duplicated += max(0, len(runs) - 1 - kills)
    seen: dict[int, int] = {}
    for run in runs:
        for e in set(run):
            seen[e] = seen.get(e, 0) + 1
    out.duplicated += max(0, sum(n - 1 for n in seen.values()) - kills)


def _epoch_after(probe: Probe, job_id: str, epoch: int, timeout: float = 180) -> float:
    wait_until(lambda: (j := probe.try_job(job_id)) is not None and (j.epoch > epoch or j.status != "running"),
               timeout, "training again")
    return time.time()


def scenario_sigkill(db: str, tmp: Path) -> Outcome:
    out, env, probe = Outcome(), _env(db, SHARED_REDIS, tmp), Probe(db)
    worker = start_worker(env, tmp / "w1.log", f"chaos-k1-{uuid.uuid4().hex[:4]}")
    try:
        job_id = _submit(probe, env, slow_spec("chaos-sigkill", EPOCHS, deterministic=True))
        wait_until(lambda: probe.job(job_id).epoch >= 3, 120, "epoch 3")
        time.sleep(0.1)
        kill(worker)
        t0, at = time.time(), probe.job(job_id).epoch
        worker = start_worker(env, tmp / "w2.log", f"chaos-k2-{uuid.uuid4().hex[:4]}", wait=False)
        out.recover_s = _epoch_after(probe, job_id, at) - t0
        probe.wait_status(job_id, ("succeeded", "failed"), 180)
    finally:
        kill(worker, signal.SIGTERM)
    _score(probe, job_id, out, kills=1)
    probe.close()
    return out


def scenario_redis(db: str, tmp: Path) -> Outcome:
    out, redis = Outcome(), PrivateRedis().start()
    env, probe = _env(db, redis.url, tmp), Probe(db)
    worker = start_worker(env, tmp / "w.log", f"chaos-r-{uuid.uuid4().hex[:4]}")
    try:
        job_id = _submit(probe, env, slow_spec("chaos-redis", EPOCHS))
        wait_until(lambda: probe.job(job_id).epoch >= 3, 120, "epoch 3")
        redis.stop()
        at = probe.job(job_id).epoch
        time.sleep(1.0)
        redis.start()
        t0 = time.time()
        out.recover_s = max(0.0, _epoch_after(probe, job_id, at) - t0)
        probe.wait_status(job_id, ("succeeded", "failed"), 180)
    finally:
        kill(worker, signal.SIGTERM)
        redis.stop()
    _score(probe, job_id, out)
    probe.close()
    return out


def scenario_broker(db: str, tmp: Path, n: int = 20) -> Outcome:
    import httpx

    out, redis = Outcome(), PrivateRedis().start()
    env, probe = _env(db, redis.url, tmp), Probe(db)
    port = free_port()
    with (tmp / "api.log").open("wb") as f:
        api = subprocess.Popen([sys.executable, "-m", "client.cli", "api", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=f, stderr=subprocess.STDOUT)
    worker = start_worker(env, tmp / "w.log", f"chaos-b-{uuid.uuid4().hex[:4]}")
    ids: list[str] = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ok(f"{base}/healthz"), 60, "api up", every=0.3)
        redis.stop()
        with httpx.Client(base_url=base, timeout=30) as c:
            for i in range(n):
                r = c.post("/v1/jobs", json=tiny_spec(f"chaos-outage-{i}"))
                if r.status_code != 201:
                    out.notes.append(f"submission {i}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                ids.append(r.json()["id"])
        time.sleep(1.0)
        redis.start()
        t0 = time.time()
        wait_until(lambda: all(probe.job(j).attempts >= 1 for j in ids), 240, "every job started", every=0.2)
        out.recover_s = time.time() - t0
        wait_until(lambda: all(probe.job(j).status in ("succeeded", "failed") for j in ids), 240, "all finished", every=0.5)
    finally:
        kill(worker, signal.SIGTERM)
        kill(api, signal.SIGTERM)
        redis.stop()
    out.lost += n - len(ids)
    out.jobs += n - len(ids)
    for j in ids:
        _score(probe, j, out)
    probe.close()
    return out


def scenario_postgres(_db: str, tmp: Path) -> Outcome:
    from store.migrate import upgrade

    out, server = Outcome(), PrivatePostgres().start()
    try:
        url = server.create_database()
        upgrade(url)
        env, probe = _env(url, SHARED_REDIS, tmp), Probe(url)
        worker = start_worker(env, tmp / "w.log", f"chaos-p-{uuid.uuid4().hex[:4]}")
        try:
            job_id = _submit(probe, env, slow_spec("chaos-postgres", EPOCHS))
            wait_until(lambda: probe.job(job_id).epoch >= 3, 120, "epoch 3")
            at = probe.job(job_id).epoch
            probe.engine.dispose()
            server.bounce(down_s=2.0)
            t0 = time.time()
            out.recover_s = max(0.0, _epoch_after(probe, job_id, at) - t0)
            probe.wait_status(job_id, ("succeeded", "failed"), 180)
        finally:
            kill(worker, signal.SIGTERM)
        _score(probe, job_id, out)
        probe.close()
    finally:
        server.stop()
    return out


def _ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


SCENARIOS: dict[str, tuple[str, Callable[[str, Path], Outcome]]] = {
    "sigkill": ("SIGKILL every worker mid-epoch, restart", scenario_sigkill),
    "redis": ("Redis killed mid-job, back after 1 s", scenario_redis),
    "broker": ("broker down during 20 submissions", scenario_broker),
    "postgres": ("PostgreSQL down 2 s mid-job", scenario_postgres),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=",".join(SCENARIOS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    why = missing_servers()
    if why:
        print(f"chaos: cannot run: {why}", file=sys.stderr)
        return 2
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from store.migrate import upgrade

    admin = create_engine(SHARED_PG, isolation_level="AUTOCOMMIT")
    name = f"trainyard_chaos_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    db = make_url(SHARED_PG).set(database=name).render_as_string(hide_password=False)
    rows: list[dict[str, Any]] = []
    try:
        upgrade(db)
        for key in [k.strip() for k in args.only.split(",") if k.strip()]:
            label, fn = SCENARIOS[key]
            results = []
            for i in range(args.runs):
                tmp = Path(__import__("tempfile").mkdtemp(prefix=f"chaos-{key}-"))
                started = time.monotonic()
                try:
                    res = fn(db, tmp)
                except Exception as exc:  # noqa: BLE001 - a scenario that breaks is a lost run
                    res = Outcome(jobs=1, lost=1, notes=[f"{type(exc).__name__}: {exc}"[:300]])
                results.append(res)
                print(f"  {key} run {i + 1}: {res.succeeded}/{res.jobs} succeeded, duplicated {res.duplicated}, "
                      f"lost {res.lost}, recover {res.recover_s if res.recover_s is None else round(res.recover_s, 1)} s "
                      f"({time.monotonic() - started:.0f} s){' ' + '; '.join(res.notes) if res.notes else ''}",
                      flush=True)
            recov = [r.recover_s for r in results if r.recover_s is not None]
            rows.append({
                "scenario": label, "runs": args.runs, "jobs": sum(r.jobs for r in results),
                "succeeded": sum(r.succeeded for r in results), "duplicated": sum(r.duplicated for r in results),
                "lost": sum(r.lost for r in results),
                "recover_s_median": round(statistics.median(recov), 1) if recov else None,
                "recover_s_max": round(max(recov), 1) if recov else None,
            })
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print()
    print("| scenario | runs | succeeded | duplicated | lost | seconds to recover (median / max) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scenario']} | {r['runs']} | {r['succeeded']}/{r['jobs']} | {r['duplicated']} | {r['lost']} | "
              f"{r['recover_s_median']} / {r['recover_s_max']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["lost"] == 0 and r["duplicated"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
