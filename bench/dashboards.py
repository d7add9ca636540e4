"""Benchmark: the dashboards' API (issue 11). PostgreSQL and Redis must be up.

Usage (repo root, in the venv)::

    python bench/dashboards.py            # ~1-2 min on a 2-core box
    python bench/dashboards.py --quick    # fewer clients and rows

It makes a fresh PostgreSQL database (``trainyard_bench_dash_<run>``, schema by Alembic) and a
unique Redis key prefix, builds the app in this process, and drops both at the end.

1. Live streams. A writer (its own engine, like a worker process: its commits publish Redis change
   notices) commits an epoch of one running job every 0.2 s. 1 client, then N clients, follow the
   job (``GET /v1/jobs/{id}/events`` over real HTTP, uvicorn on loopback). Counted: the API's
   database queries during the window (every statement its engine runs), and each epoch's delay
   from the writer's commit to its arrival at each client. Baseline: the same window with one
   client (target: N clients <= 2x one client's queries; each epoch within 1 s).
2. The jobs list page with 10,000 jobs: the server time of ``GET /ui`` and of the first page it
   loads (``GET /v1/jobs``, 25 rows) in each sort order and with a label filter, in-process (ASGI,
   no network). Baseline: ``GET /healthz`` through the same app. Target: <= 300 ms.
3. Bulk metrics: 1,000 jobs x 100 epochs in one ``POST /v1/metrics/bulk``, p50/p95 server time
   and the API process's CPU time per request (all keys of 1,000 finished jobs, whose curves
   their terminal move compacted, and of 1,000 running jobs). First cold: the API process's
   cache cleared (and checked empty) before each request, so each reads every job whole (its
   first request for a choice of keys), for every key, one key, max_points 50, of both, while
   the running jobs have 100 epochs; then with the cache: as asked again, with one new epoch per
   running job committed before each request (as on a live page), a since_epoch tail, one key,
   max_points 50. Baseline: the same curves through 1,000 single ``GET /v1/jobs/{id}/metrics``
   requests, in the same run. Target: p95 <= 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN = os.environ.get("TRAINYARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN = uuid.uuid4().hex[:8]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def setup() -> tuple[str, Any]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(make_url(PG_ADMIN), isolation_level="AUTOCOMMIT")
    name = f"trainyard_bench_dash_{RUN}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    os.environ.update({
        "TRAINYARD_DATABASE_URL": url, "TRAINYARD_BROKER_URL": REDIS, "TRAINYARD_QUEUE_PREFIX": f"tyd-{RUN}-",
        "TRAINYARD_AUTH": "off", "TRAINYARD_GC_FREEZE": "0", "TRAINYARD_DATA_DIR": f"/tmp/tyd-{RUN}",
        "TRAINYARD_REQUESTS_PER_MINUTE": "0", "TRAINYARD_MAX_EVENT_STREAMS": "0",  # 100 streams of one project
    })
    from store.migrate import upgrade

    upgrade(url)
    return name, admin


def teardown(name: str, admin: Any) -> None:
    import redis
    from sqlalchemy import text

    from store.db import reset_caches

    reset_caches()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    r = redis.Redis.from_url(REDIS)
    for key in r.scan_iter(match=f"tyd-{RUN}-*"):
        r.delete(key)


def add_epoch(running: list[str], e: int) -> None:
    """Epoch ``e`` for each running job, committed (one transaction, as 1,000 workers' would be),
    and their rows as repo.record_progress updates them (progress, heartbeat, revision)."""
    from sqlalchemy import insert, update

    from store import repo
    from store.db import session_scope
    from store.models import Job, JobMetric

    with session_scope() as s:
        s.execute(insert(JobMetric), [{"job_id": j, "epoch": e, "created_at": repo.utcnow(),
                                       "values": {"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, "accuracy": 0.9,
                                                  "val_accuracy": 0.9, "lr": 0.001, "seconds": 0.01}}
                                      for j in running])
        s.execute(update(Job).where(Job.id.in_(running)).values(
            epoch=e, heartbeat_at=repo.utcnow(), updated_at=repo.utcnow(), metrics_top=e))


def make_jobs(n: int, epochs: int = 0, labelled_every: int = 10, status: str = "succeeded") -> list[str]:
    """``n`` finished jobs with best values (and ``epochs`` metric rows each), inserted in bulk;
    finished ones get what their terminal move writes (the compacted curve, store.curves);
    ``status="running"``: jobs still training (their epochs are read row by row)."""
    import random

    from sqlalchemy import insert, update

    from store import curves, repo
    from store.db import session_scope
    from store.models import Job, JobMetric

    spec = {"name": "bench", "epochs": max(1, epochs), "data": {"dataset": "digits"}}
    ids: list[str] = []
    rng = random.Random(0)
    for start in range(0, n, 1000):
        k = min(1000, n - start)
        with session_scope() as s:
            jobs = repo.create_jobs(s, [(spec, "cpu", None)] * k,
                                    labels={"team": "vision"} if (start // 1000) % labelled_every == 0 else None)
            ids += [j.id for j in jobs]
            for j in jobs:
                v = rng.random()
                s.execute(update(Job).where(Job.id == j.id).values(
                    status=status, stop_reason="completed" if status == "succeeded" else None,
                    best_monitor="val_loss", best_value=repr(v),
                    best_number=v, best_epoch=1, epoch=max(1, epochs), metrics_top=epochs))
            if epochs:
                now = repo.utcnow()
                rows = [{"job_id": j.id, "epoch": e, "created_at": now,
                         "values": {"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, "accuracy": 0.5 + e / 250,
                                    "val_accuracy": 0.5 + e / 260, "lr": 0.001, "seconds": 0.01}}
                        for j in jobs for e in range(1, epochs + 1)]
                s.execute(insert(JobMetric), rows)
                if status == "succeeded":
                    for j in jobs:
                        curves.compact(s, j.id)
    from sqlalchemy import text

    from store.db import get_engine

    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("ANALYZE"))  # as autovacuum does after a bulk load
    return ids


# --------------------------------------------------------------------------- 1. live streams


class Counter:
    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.n = 0
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, *_: Any) -> None:
        self.n += 1


def serve(app: Any, port: int) -> Any:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


async def follow(url: str, arrivals: dict[int, float], ready: asyncio.Event, stop: asyncio.Event) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=120)) as c, c.stream("GET", url) as r:
        ready.set()
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "epoch":
                arrivals[json.loads(line[5:])["epoch"]] = time.monotonic()
            if stop.is_set():
                return


def stream_window(port: int, job_id: str, clients: int, seconds: float, counter: Counter, start_epoch: int,
                  writer_engine: Any) -> dict[str, Any]:
    from sqlalchemy.orm import Session

    from store import repo

    async def run() -> dict[str, Any]:
        stop = asyncio.Event()
        arrivals: list[dict[int, float]] = [{} for _ in range(clients)]
        readies = [asyncio.Event() for _ in range(clients)]
        tasks = [asyncio.create_task(follow(f"http://127.0.0.1:{port}/v1/jobs/{job_id}/events",
                                            arrivals[i], readies[i], stop)) for i in range(clients)]
        await asyncio.gather(*(r.wait() for r in readies))
        await asyncio.sleep(1.0)  # connected and idle
        committed: dict[int, float] = {}
        before = counter.n
        t0 = time.monotonic()
        epoch = start_epoch
        while time.monotonic() - t0 < seconds:
            epoch += 1

            def write(e: int = epoch) -> None:
                with Session(writer_engine) as s, s.begin():
                    repo.record_progress(s, job_id, [{"epoch": e, "loss": 1 / e}])

            await asyncio.to_thread(write)
            committed[epoch] = time.monotonic()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # the last epochs arrive
        queries = counter.n - before
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        delays = [a[e] - committed[e] for a in arrivals for e in committed if e in a]
        missing = sum(1 for a in arrivals for e in committed if e not in a)
        return {"clients": clients, "epochs": len(committed), "queries": queries,
                "delay_p50_ms": 1000 * pct(delays, 0.5), "delay_p99_ms": 1000 * pct(delays, 0.99),
                "delay_max_ms": 1000 * max(delays), "missed": missing, "last_epoch": epoch}

    return asyncio.run(run())


def bench_streams(clients: int, seconds: float) -> dict[str, Any]:
    from sqlalchemy import update

    from api.app import create_app
    from config.settings import get_settings
    from store import notices
    from store.db import get_engine, make_engine, session_scope
    from store.models import Job

    job_id = make_jobs(1)[0]
    with session_scope() as s:  # a running job (its stream stays open)
        s.execute(update(Job).where(Job.id == job_id).values(status="running", stop_reason=None))
    writer = make_engine(os.environ["TRAINYARD_DATABASE_URL"])
    notices.install(writer, get_settings())  # like a worker process's engine
    app = create_app()
    counter = Counter(get_engine())
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(app, port)
    try:
        one = stream_window(port, job_id, 1, seconds, counter, 0, writer)
        many = stream_window(port, job_id, clients, seconds, counter, one["last_epoch"], writer)
    finally:
        server.should_exit = True
        time.sleep(0.5)
    polled = clients * seconds / 0.25  # the replaced design: every client queried 4 times a second
    return {"one": one, "many": many, "ratio": many["queries"] / max(1, one["queries"]),
            "per_client_polling_queries": polled}


# --------------------------------------------------------------------------- 2-3. in-process timings


#: the API's CPU time (this process's, ms) of each request :func:`timed` made, by its result's id
CPU: dict[int, list[float]] = {}


async def timed(client: Any, method: str, path: str, n: int, before: Any = None, **kw: Any) -> list[float]:
    """``n`` requests' server times (ms) after 3 warm-ups; ``before()`` runs before each, untimed.
    Their CPU times go to ``CPU[id(result)]`` (the app runs in this process: the database's CPU
    is not in them)."""
    out, cpu = [], []
    for i in range(n + 3):
        if before is not None:
            before()
        t, c = time.perf_counter(), time.process_time()
        r = await client.request(method, path, **kw)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        if i >= 3:  # warm-up
            out.append(dt * 1000)
            cpu.append(dc * 1000)
    CPU[id(out)] = cpu
    return out


def bench_list(n_jobs: int, rounds: int) -> dict[str, Any]:
    import httpx

    from api.app import create_app

    make_jobs(n_jobs)
    app = create_app()

    async def run() -> dict[str, Any]:
        res: dict[str, Any] = {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as c:
            res["healthz (baseline)"] = await timed(c, "GET", "/healthz", rounds)
            res["GET /ui (page)"] = await timed(c, "GET", "/ui", rounds)
            for order in ("created", "updated", "best"):
                res[f"first page, order_by={order}"] = await timed(c, "GET", "/v1/jobs", rounds,
                                                                   params={"limit": 25, "order_by": order})
            res["first page, label=team=vision, order_by=best"] = await timed(
                c, "GET", "/v1/jobs", rounds, params={"limit": 25, "label": "team=vision", "order_by": "best"})
            page = (await c.get("/v1/jobs", params={"limit": 25, "order_by": "best"})).json()
            res["second page, order_by=best (cursor)"] = await timed(
                c, "GET", "/v1/jobs", rounds, params={"limit": 25, "order_by": "best", "cursor": page["next_cursor"]})
        return res

    return {k: {"p50_ms": pct(v, 0.5), "p95_ms": pct(v, 0.95)} for k, v in asyncio.run(run()).items()}


def bench_bulk(n_jobs: int, epochs: int, rounds: int) -> dict[str, Any]:
    import httpx

    from api.app import create_app
    from store.bulkread import CURVES, _projection

    done = make_jobs(n_jobs, epochs)
    running = make_jobs(n_jobs, epochs, status="running")
    app = create_app()
    last = [epochs]

    def one_more_epoch() -> None:
        last[0] += 1
        add_epoch(running, last[0])

    def body(ids: list[str], **kw: Any) -> dict[str, Any]:
        return {"jobs": [{"id": i} for i in ids], **kw}

    def cold() -> None:
        """Nothing kept: the process's cache emptied (and checked empty), so the request reads
        every job whole (the database's own buffers stay warm, as on a running server)."""
        CURVES.clear()
        assert not CURVES.snapshot(done) and not CURVES.lists(done + running, ()) and not CURVES.lists(
            done + running, _projection(["val_loss"]))

    async def run() -> dict[str, Any]:
        res: dict[str, Any] = {}
        bulk = "/v1/metrics/bulk"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=60) as c:
            for ids in (done, running):
                got = (await c.post(bulk, json=body(ids))).json()
                assert len(got["jobs"]) == n_jobs and all(len(v["epochs"]) == epochs for v in got["jobs"].values())
            res["healthz (baseline)"] = await timed(c, "GET", "/healthz", rounds)
            # cold: nothing kept in the API process before each request (its first request for a
            # choice of keys, or after eviction), while the running jobs still have 100 epochs
            for label, ids, kw in (("all keys, finished jobs", done, {}), ("all keys, running jobs", running, {}),
                                   ("keys=[val_loss], finished jobs", done, {"keys": ["val_loss"]}),
                                   ("keys=[val_loss], running jobs", running, {"keys": ["val_loss"]}),
                                   ("max_points=50, finished jobs", done, {"max_points": 50}),
                                   ("max_points=50, running jobs", running, {"max_points": 50}),
                                   ("keys=[val_loss], max_points=50, running jobs", running,
                                    {"keys": ["val_loss"], "max_points": 50})):
                res[f"bulk, {label} (cold: cache cleared before each request)"] = await timed(
                    c, "POST", bulk, rounds, before=cold, json=body(ids, **kw))
                if ids is done and not kw:  # the compacted curves, read whole
                    assert len(CURVES.snapshot(done)) == n_jobs
                else:
                    got = CURVES.lists(ids, _projection(kw.get("keys")))
                    assert len(got) == n_jobs and all(e.n == epochs for e in got.values()), label  # read whole
            res["bulk, all keys, finished jobs (curves cached in the API process)"] = await timed(
                c, "POST", bulk, rounds, json=body(done))
            res["bulk, all keys, running jobs"] = await timed(c, "POST", bulk, rounds, json=body(running))
            res["bulk, all keys, running jobs, one new epoch each before each request"] = await timed(
                c, "POST", bulk, rounds, before=one_more_epoch, json=body(running))
            res["bulk, all keys, finished jobs, since_epoch=90"] = await timed(
                c, "POST", bulk, rounds, json={"jobs": [{"id": i, "since_epoch": 90} for i in done]})
            res["bulk, keys=[val_loss]"] = await timed(c, "POST", bulk, rounds, json=body(done, keys=["val_loss"]))
            res["bulk, max_points=50"] = await timed(c, "POST", bulk, rounds, json=body(done, max_points=50))
            res["bulk, keys=[val_loss], running jobs, one new epoch each before each request"] = await timed(
                c, "POST", bulk, rounds, before=one_more_epoch, json=body(running, keys=["val_loss"]))
            res["bulk, max_points=50, running jobs, one new epoch each before each request"] = await timed(
                c, "POST", bulk, rounds, before=one_more_epoch, json=body(running, max_points=50))
            t = time.perf_counter()
            for i in done:
                assert (await c.get(f"/v1/jobs/{i}/metrics")).status_code == 200
            res["baseline: 1,000 single /metrics requests (one round)"] = [(time.perf_counter() - t) * 1000]
        return res

    return {k: {"p50_ms": pct(v, 0.5), "p95_ms": pct(v, 0.95),
                **({"cpu_p50_ms": pct(CPU[id(v)], 0.5)} if id(v) in CPU else {})}
            for k, v in asyncio.run(run()).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--parts", default="streams,list,bulk", help="comma-separated: streams, list, bulk")
    args = ap.parse_args()
    clients, seconds = (30, 4.0) if args.quick else (100, 8.0)
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request (the app logs at INFO)
    name, admin = setup()
    try:
        out: dict[str, Any] = {}
        parts = set(args.parts.split(","))
        if "streams" in parts:
            out["streams"] = bench_streams(clients, seconds)
            s = out["streams"]
            print(f"1. streams: 1 client {s['one']['queries']} queries, {clients} clients {s['many']['queries']} queries "
              f"(x{s['ratio']:.2f}; per-client 0.25 s polling would be ~{s['per_client_polling_queries']:.0f}); "
              f"epoch delay p50 {s['many']['delay_p50_ms']:.0f} ms, p99 {s['many']['delay_p99_ms']:.0f} ms, "
                  f"max {s['many']['delay_max_ms']:.0f} ms, missed {s['many']['missed']}", flush=True)
        if "list" in parts:
            out["list"] = bench_list(2000 if args.quick else 10_000, 20 if args.quick else 50)
            base = out["list"]["healthz (baseline)"]["p50_ms"]
            for k, v in out["list"].items():
                print(f"2. {k}: p50 {v['p50_ms']:.1f} ms, p95 {v['p95_ms']:.1f} ms (x{v['p50_ms'] / base:.1f} healthz; "
                      f"load average {os.getloadavg()[0]:.1f})", flush=True)
        if "bulk" in parts:
            out["bulk"] = bench_bulk(1000, 100, 10 if args.quick else 30)
            singles = out["bulk"]["baseline: 1,000 single /metrics requests (one round)"]["p50_ms"]
            for k, v in out["bulk"].items():
                cpu = f", API CPU p50 {v['cpu_p50_ms']:.1f} ms" if "cpu_p50_ms" in v else ""
                print(f"3. {k}: p50 {v['p50_ms']:.1f} ms, p95 {v['p95_ms']:.1f} ms{cpu} "
                      f"(p95 = {v['p95_ms'] / singles:.3f}x the 1,000 single requests; load average "
                      f"{os.getloadavg()[0]:.1f})", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        teardown(name, admin)


if __name__ == "__main__":
    main()
