"""Benchmark: the running service (API + Celery worker + PostgreSQL + Redis) against bare
baselines started by this script in the same run. Issue 3, section 7.

Usage (repo root, in the venv; PostgreSQL and Redis must be up)::

    python bench/service.py                 # ~2-3 min on a 2-core box
    python bench/service.py --quick         # smaller N, shorter load windows
    python bench/service.py --json bench/out/service.json

What it starts (all on loopback, all stopped and removed at the end, even on failure):
  * a fresh PostgreSQL database ``trainyard_bench_<run>``, schema by ``trainyard migrate``;
  * Redis with a unique ``TRAINYARD_QUEUE_PREFIX`` (``tyb-<run>-``; its keys are deleted at the end);
  * ``trainyard api`` (uvicorn, 1 process, --no-access-log) on a free port;
  * ``trainyard worker`` (Celery, concurrency 1, solo pool: what the CLI picks for concurrency 1);
  * baselines: a one-file Celery app (same ``celery_config``, same worker flags, its own queue prefix
    on the same Redis) whose task only records timestamps, and a one-file FastAPI app with one JSON
    endpoint, served by uvicorn with the same flags.

Measurements
  1. submit -> running: POST /v1/jobs of a 1-epoch spec, one job at a time (the next one is sent
     when the previous has finished), latency = started_at - created_at from the job row (both
     stamped by the service itself, so polling resolution does not matter). Baseline: send_task ->
     first line of the task (time.time() in the sender and in the task), one at a time.
  2. GET /v1/jobs/{id} and GET /v1/jobs/{id}/metrics with 64 concurrent httpx.AsyncClient clients
     for a fixed window each, while a long job trains, against the bare FastAPI endpoint (same
     payload as the job response) in the same conditions. req/s, p50/p99 (client side), server
     CPU ms per request (/proc/<pid>/stat of the uvicorn process). Database round trips per poll are
     counted exactly: the app is built in this process against the same database, libpq tracing
     (psycopg ``pgconn.trace``) is switched on for its connections, and ``ReadyForQuery`` messages
     (one per client/server round trip) are counted over 100 sequential requests after a warm-up.
  3. epoch time: a 30-epoch digits MLP job through the service vs ``training.fit`` of the same
     spec in this process with ``reporter=None``, interleaved rounds. Compared: the median of the
     per-epoch ``seconds`` (engine-internal, measured *before* the reporter's on_epoch and the
     snapshot), and the whole fit (the job's ``run_seconds``, i.e. ``fit()``'s wall time in the
     worker, which includes reporting) per epoch. Both with the same torch threads (and the same
     one thread for small steps, ``TRAINYARD_TORCH_ONE_THREAD_BELOW``).
  4. tiny-job throughput: K 1-epoch jobs in one POST /v1/jobs/batch, time until the last
     finished_at; vs K no-op tasks through the baseline Celery worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = str(Path(__file__).resolve().parent)
if sys.path and sys.path[0] == HERE:  # bench/engine.py must not shadow anything
    sys.path.pop(0)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402

PG_ADMIN = os.environ.get("TRAINYARD_BENCH_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_SQLA = os.environ.get("TRAINYARD_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/{db}")
REDIS_URL = os.environ.get("TRAINYARD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN = uuid.uuid4().hex[:8]
PREFIX = f"tyb-{RUN}-"
DB_NAME = f"trainyard_bench_{RUN}"
CLK = os.sysconf("SC_CLK_TCK")

DATA = {"dataset": "digits", "validation_split": 0.2, "batch_size": 64, "shuffle": True, "standardize": True}
MLP = {"layers": [{"type": "dense", "units": 64, "activation": "relu"}, {"type": "dense", "units": 10}]}


def spec(epochs: int, name: str, seed: int = 0, model: dict[str, Any] = MLP) -> dict[str, Any]:
    return {"name": name, "seed": seed, "device": "cpu", "data": dict(DATA), "model": model,
            "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
            "optimizer": {"name": "adam", "learning_rate": 0.001}, "epochs": epochs}


BIG_MLP = {"layers": [{"type": "dense", "units": 1024, "activation": "relu"},
                      {"type": "dense", "units": 1024, "activation": "relu"}, {"type": "dense", "units": 10}]}

BARE_CELERY = '''
"""Baseline Celery app: the service's celery_config, one task that records when it ran."""
import json, os, time
import redis
from celery import Celery
from store.broker import celery_config
from config.settings import settings_from_env

settings = settings_from_env()
app = Celery("bench-bare")
app.conf.update(celery_config(settings))
_r = redis.Redis.from_url(settings.broker_url)
RESULTS = os.environ["BENCH_RESULTS_KEY"]

@app.task(name="bench.noop", ignore_result=True, acks_late=True)
def noop(sent):
    start = time.time()
    _r.rpush(RESULTS, json.dumps([sent, start, time.time()]))
'''

BARE_API = '''
"""Baseline: one FastAPI JSON endpoint, returning a fixed copy of a job response."""
import json, os
from fastapi import FastAPI
PAYLOAD = json.loads(os.environ.get("BENCH_PAYLOAD", "{}"))
app = FastAPI()

@app.get("/bare")
async def bare() -> dict:
    return PAYLOAD

@app.get("/healthz")
async def healthz() -> dict:
    return {"ok": True}
'''


# --------------------------------------------------------------------------- small utilities


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its own threads; children not included)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK


def busy_seconds() -> float:
    """CPU time all cores spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK


def ours_seconds(st: Stack) -> float:
    total = time.process_time()
    for proc in st.procs.values():
        with suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(proc.pid)
    return total


class Phase:
    """Wall time, and how many cores processes other than this run's (PostgreSQL and Redis
    included) kept busy: the noise indicator for a shared machine."""

    def __init__(self, st: Stack) -> None:
        self.st = st

    def __enter__(self) -> Phase:
        self.w0, self.b0, self.o0 = time.perf_counter(), busy_seconds(), ours_seconds(self.st)
        self.c0 = clock_offset()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self.w0
        self.ours = (ours_seconds(self.st) - self.o0) / wall
        self.other = (busy_seconds() - self.b0) / wall - self.ours
        self.clock_step_ms = (clock_offset() - self.c0) * 1000


def clock_offset() -> float:
    """Wall clock minus monotonic clock: changes only when the wall clock is stepped (seen on
    this VM: a -308 ms step), which would corrupt cross-process wall-clock intervals."""
    return time.time() - time.monotonic()


def ts(v: datetime | None) -> float:
    assert v is not None
    return v.timestamp()


#: The API key of this run's project, sent with every request to the API (set by Stack.create_db).
HEADERS: dict[str, str] = {}


class Stack:
    """Everything this run starts, so that ``close`` can remove it whatever happened."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="trainyard-bench-"))
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.logs: dict[str, Path] = {}
        self.db_created = False
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.db_url = PG_SQLA.format(db=DB_NAME)
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(self.tmp), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "TRAINYARD_DATABASE_URL": self.db_url,
            "TRAINYARD_BROKER_URL": REDIS_URL,
            "TRAINYARD_DATA_DIR": str(self.tmp / "data"),
            "TRAINYARD_QUEUE_PREFIX": PREFIX,
            # production mode: every request carries an API key (the key check is part of the cost);
            # no per-project request rate, or the load windows would measure 429s
            "TRAINYARD_AUTH": "required",
            "TRAINYARD_REQUESTS_PER_MINUTE": "0",
        }
        self.bare_env = {**self.env, "TRAINYARD_QUEUE_PREFIX": PREFIX + "bare-", "BENCH_RESULTS_KEY": PREFIX + "bare-results"}
        self.pg: psycopg.Connection[Any] | None = None

    # ---- lifecycle
    def create_db(self) -> None:
        self.redis.ping()
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{DB_NAME}"')
        self.db_created = True
        out = subprocess.run([sys.executable, "-m", "client.cli", "migrate"], env=self.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"trainyard migrate failed:\n{out.stderr[-3000:]}")
        self.pg = psycopg.connect(PG_ADMIN.replace("dbname=postgres", f"dbname={DB_NAME}"), autocommit=True)
        out = subprocess.run([sys.executable, "-m", "client.cli", "keys", "create", "--project", "bench"], env=self.env,
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"trainyard keys create failed:\n{out.stderr[-3000:]}")
        HEADERS["Authorization"] = f"Bearer {out.stdout.split()[0]}"

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[Any]:
        path = self.tmp / f"{name}.log"
        with path.open("wb") as f:
            proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        self.procs[name], self.logs[name] = proc, path
        return proc

    def wait_log(self, name: str, needle: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        proc, path = self.procs[name], self.logs[name]
        while time.monotonic() < deadline:
            if needle in path.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{name}: {needle!r} not seen in {timeout} s:\n{path.read_text(errors='replace')[-3000:]}")

    def wait_http(self, name: str, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.logs[name].read_text(errors='replace')[-3000:]}")
            with suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{url} did not answer in {timeout} s")

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop on SIGTERM; killing pid {proc.pid}")
                proc.kill()
                proc.wait()
        if self.pg is not None:
            with suppress(Exception):
                self.pg.close()
        with suppress(Exception):
            from store.db import reset_caches

            reset_caches()
        if self.db_created:
            try:
                with psycopg.connect(PG_ADMIN, autocommit=True) as c:
                    c.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001
                log(f"could not drop database {DB_NAME}: {exc}")
        try:
            keys = list(self.redis.scan_iter(match=f"{PREFIX}*", count=1000))
            if keys:
                self.redis.delete(*keys)
            self.redis.close()
        except Exception as exc:  # noqa: BLE001
            log(f"could not delete Redis keys {PREFIX}*: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- database reads (direct, so that waiting does not load the API)
    def job_rows(self, ids: list[str]) -> dict[str, tuple[Any, ...]]:
        assert self.pg is not None
        rows = self.pg.execute(
            "select id, status, created_at, started_at, finished_at, run_seconds, epoch from jobs where id = any(%s)", (ids,)
        ).fetchall()
        return {r[0]: r for r in rows}

    def wait_jobs(self, ids: list[str], statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
                  timeout: float = 120, every: float = 0.02) -> dict[str, tuple[Any, ...]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.job_rows(ids)
            if len(rows) == len(ids) and all(r[1] in statuses for r in rows.values()):
                return rows
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not {statuses} after {timeout} s: {[(r[0], r[1]) for r in rows.values()]}")
            for name in ("worker", "api"):
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} died:\n{self.logs[name].read_text(errors='replace')[-3000:]}")
            time.sleep(every)


# --------------------------------------------------------------------------- 1. submit -> running


def bench_latency(st: Stack, api: str, bare: Any, n: int, n_bare: int) -> dict[str, Any]:
    """Jobs and bare Celery tasks alternate, one sample of each per round, so that both see the
    same machine (this VM's speed drifts by tens of percent within a minute)."""
    client = httpx.Client(base_url=api, timeout=30, headers=HEADERS)
    tiny = spec(1, "bench-tiny")
    lat, post_ms, done_ms, blat = [], [], [], []
    dropped = 0
    key = st.bare_env["BENCH_RESULTS_KEY"]
    q = PREFIX + "bare-cpu"

    def job_sample(keep: bool) -> None:
        nonlocal dropped
        time.sleep(0.05)  # let the worker get back to waiting on the broker
        off0 = clock_offset()
        t0 = time.perf_counter()
        r = client.post("/v1/jobs", json=tiny)
        r.raise_for_status()
        t_posted = time.perf_counter()
        jid = r.json()["id"]
        row = st.wait_jobs([jid])[jid]
        if row[1] != "succeeded":
            raise RuntimeError(f"tiny job {jid} ended {row[1]}")
        if abs(clock_offset() - off0) > 0.002:
            dropped += 1  # the wall clock was stepped meanwhile: the interval is meaningless
        elif keep:
            post_ms.append((t_posted - t0) * 1000)
            done_ms.append((time.perf_counter() - t0) * 1000)
            lat.append((ts(row[3]) - ts(row[2])) * 1000)

    def bare_sample(keep: bool) -> None:
        nonlocal dropped
        time.sleep(0.05)
        off0 = clock_offset()
        bare.send_task("bench.noop", args=[time.time()], queue=q)
        got = st.redis.blpop([key], timeout=30)
        if got is None:
            raise TimeoutError("bare Celery task did not run within 30 s")
        sent, start, _end = json.loads(got[1])
        if abs(clock_offset() - off0) > 0.002:
            dropped += 1
        elif keep:
            blat.append((start - sent) * 1000)

    warm = 3
    for i in range(max(n, n_bare) + warm):
        if i < n + warm:
            job_sample(i >= warm)
        if i < n_bare + warm:
            bare_sample(i >= warm)
    client.close()
    out = {
        "jobs": len(lat), "p50_ms": statistics.median(lat), "p95_ms": pct(lat, 0.95), "max_ms": max(lat),
        "post_p50_ms": statistics.median(post_ms), "post_to_succeeded_p50_ms": statistics.median(done_ms),
        "bare_tasks": len(blat), "bare_p50_ms": statistics.median(blat), "bare_p95_ms": pct(blat, 0.95),
        "bare_max_ms": max(blat), "all_ms": [round(x, 1) for x in lat], "bare_all_ms": [round(x, 1) for x in blat],
    }
    out["ratio_p50"] = out["p50_ms"] / out["bare_p50_ms"]
    out["ratio_p95"] = out["p95_ms"] / out["bare_p95_ms"]
    out["stalls_over_1s"] = sum(1 for x in lat if x >= 1000)
    out["samples_dropped_for_clock_steps"] = dropped
    return out


# --------------------------------------------------------------------------- 2. polling under load


async def _load(url: str, seconds: float, conc: int, warmup: float = 2.0) -> dict[str, Any]:
    """``conc`` clients, each its own httpx.AsyncClient with one keep-alive connection, looping
    GETs. (One AsyncClient shared by 64 tasks collapses on its own connection pool here: ~130 req/s
    against an endpoint that serves 1000+; so every client gets its own.) Only requests that start
    after the warm-up and end inside the window count."""
    lat: list[float] = []
    errors = 0
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds

    async def one() -> None:
        nonlocal errors
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1), timeout=30, headers=HEADERS) as c:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    r = await c.get(url)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                if t0 >= t_start and t1 <= t_end:
                    lat.append(t1 - t0)
                    if not ok:
                        errors += 1

    await asyncio.gather(*(one() for _ in range(conc)))
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / seconds,
            "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000, "max_ms": max(lat, default=0) * 1000,
            "littles_law_mean_ms": conc / max(len(lat) / seconds, 1e-9) * 1000}


def _wrk_ms(text: str) -> float:
    v = float(re.match(r"[\d.]+", text).group(0))  # type: ignore[union-attr]
    return v * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[re.sub(r"[\d.]+", "", text)]


def _wrk(url: str, seconds: float, conc: int, warmup: float = 2.0, script: Path | None = None) -> tuple[dict[str, Any], float]:
    """The same load from wrk (C, one thread, ``conc`` keep-alive connections): the generator then
    takes a few percent of a core instead of most of one, so the server, not the load generator,
    is what is measured. A short warm-up run first, then the measured window. ``script``: a wrk
    Lua script choosing each request's path (to spread the load over many jobs)."""
    hdr = [a for k, v in HEADERS.items() for a in ("-H", f"{k}: {v}")]  # the bare endpoint ignores it
    hdr += ["-s", str(script)] if script is not None else []
    subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{max(int(warmup), 1)}s", *hdr, url], capture_output=True, check=True)
    out = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{int(seconds)}s", "--latency", *hdr, url],
                         capture_output=True, text=True, check=True).stdout
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    reqs = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    pcts = dict(re.findall(r"^\s+(\d+)%\s+(\S+)", out, re.M))
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(errs.group(1)) if errs else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    res = {"requests": reqs, "errors": errors, "rps": reqs / seconds, "p50_ms": _wrk_ms(pcts["50"]),
           "p99_ms": _wrk_ms(pcts["99"]), "max_ms": _wrk_ms(re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
           "littles_law_mean_ms": conc / max(reqs / seconds, 1e-9) * 1000, "load_generator": "wrk"}
    return res, child.ru_utime + child.ru_stime


def load_window(url: str, seconds: float, conc: int, server_pid: int, gen: str = "httpx",
                script: Path | None = None) -> dict[str, Any]:
    c0_srv, c0_me, w0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    if gen == "wrk":
        ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res, ch1 = _wrk(url, seconds, conc, script=script)
        gen_cpu = ch1 - (ch0.ru_utime + ch0.ru_stime)
    else:
        if script is not None:
            raise ValueError("spreading the load over many jobs needs wrk (--load wrk)")
        res = asyncio.run(_load(url, seconds, conc))
        res["load_generator"] = "httpx"
        gen_cpu = 0.0
    wall = time.perf_counter() - w0
    srv, me = cpu_seconds(server_pid) - c0_srv, time.process_time() - c0_me + gen_cpu
    # CPU over the whole window incl. the 1 s warm-up; per request over the requests of that span
    total_reqs = max(res["requests"], 1) * (wall / seconds)
    res["server_cpu_ms_per_req"] = srv * 1000 / max(total_reqs, 1)
    res["server_cpu_util"] = srv / wall
    res["client_cpu_util"] = me / wall
    return res


def count_round_trips(st: Stack, job_id: str, n: int = 100) -> dict[str, Any]:
    """Round trips per request, exactly: libpq traces of the app's connections, ReadyForQuery
    messages counted over ``n`` sequential requests after a warm-up (psycopg prepares statements
    after 5 uses, which costs one extra round trip once per connection)."""
    os.environ.update({k: st.env[k] for k in ("TRAINYARD_DATABASE_URL", "TRAINYARD_BROKER_URL", "TRAINYARD_DATA_DIR",
                                              "TRAINYARD_AUTH", "TRAINYARD_REQUESTS_PER_MINUTE")})
    os.environ["TRAINYARD_QUEUE_PREFIX"] = PREFIX + "inproc-"
    from fastapi.testclient import TestClient
    from sqlalchemy import event

    from api.app import create_app
    from store.db import get_engine, reset_caches

    reset_caches()
    trace_path = st.tmp / "libpq-trace.txt"
    trace = trace_path.open("w")

    @event.listens_for(get_engine(), "connect")
    def _trace(dbapi_conn: Any, _rec: Any = None) -> None:
        dbapi_conn.pgconn.trace(trace.fileno())
        dbapi_conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

    from store import pollread

    pollread.CONNECT_HOOKS.append(_trace)  # the polled routes' own connections

    out: dict[str, Any] = {}
    app = create_app()
    dispatcher = app.state.dispatcher
    sent_at: list[float] = []
    real_send = dispatcher.send

    def timed_send(jobs: Any, **kw: Any) -> None:
        sent_at.append(time.time())
        real_send(jobs, **kw)

    dispatcher.send = timed_send  # nobody consumes the in-process prefix's queue
    with TestClient(app, headers=HEADERS) as c:
        for label, path in (("job", f"/v1/jobs/{job_id}"), ("metrics", f"/v1/jobs/{job_id}/metrics")):
            for _ in range(10):
                assert c.get(path).status_code == 200
            trace.flush()
            before = trace_path.read_text().count("ReadyForQuery")
            for _ in range(n):
                assert c.get(path).status_code == 200
            trace.flush()
            out[label] = (trace_path.read_text().count("ReadyForQuery") - before) / n
        # POST /v1/jobs: round trips, and the time from the job's created_at stamp to the broker send
        tiny = spec(1, "bench-inproc")
        stamp_to_send = []
        for i in range(25):
            trace.flush()
            before = trace_path.read_text().count("ReadyForQuery")
            r = c.post("/v1/jobs", json=tiny)
            assert r.status_code == 201, r.text
            trace.flush()
            if i >= 5:
                out.setdefault("post_samples", []).append(trace_path.read_text().count("ReadyForQuery") - before)
                stamp_to_send.append((sent_at[-1] - datetime.fromisoformat(r.json()["created_at"]).timestamp()) * 1000)
        out["post"] = statistics.mean(out.pop("post_samples"))
        out["post_created_at_to_send_ms_p50"] = statistics.median(stamp_to_send)
    trace.close()
    pollread.CONNECT_HOOKS.remove(_trace)
    reset_caches()
    return out


ROTATE_LUA = """
ids = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/v1/jobs/" .. ids[(n %% #ids) + 1] .. "%s")
end
"""


def _poll_counters(client: httpx.Client) -> tuple[float, float]:
    """(polls answered by the fast path, poll queries run) from the API's Prometheus /metrics."""
    found = dict(line.split()[:2] for line in client.get("/metrics").text.splitlines()
                 if line.startswith(("trainyard_polls_fast_total ", "trainyard_poll_queries_total ")))
    return float(found.get("trainyard_polls_fast_total", "nan")), float(found.get("trainyard_poll_queries_total", "nan"))


def bench_polling(st: Stack, api: str, bare_url: str, seconds: float, conc: int, gen: str = "httpx") -> dict[str, Any]:
    client = httpx.Client(base_url=api, timeout=30, headers=HEADERS)
    # 64 finished one-epoch jobs, for the windows that spread the polls over many jobs (no two
    # clients asking for the same job at once, so no poll shares another's query)
    many = [spec(1, f"bench-poll-{i}") for i in range(conc)]
    ids = [it["id"] for it in client.post("/v1/jobs/batch", json={"jobs": many}).raise_for_status().json()["results"]]
    st.wait_jobs(ids, timeout=120)
    scripts = {}
    for k, suffix in (("job", ""), ("metrics", "/metrics")):
        scripts[k] = st.tmp / f"rotate-{k}.lua"
        scripts[k].write_text(ROTATE_LUA % (",".join(f'"{i}"' for i in ids), suffix))
    # A job with heavier epochs (MLP 64-1024-1024-10, a few hundred ms each), so that it keeps the
    # worker busy and its metrics stay a realistic size (tens of epochs, not thousands) while polled.
    long = spec(100_000, "bench-long", model=BIG_MLP)
    jid = client.post("/v1/jobs", json=long).raise_for_status().json()["id"]
    deadline = time.monotonic() + 60
    while True:
        row = st.job_rows([jid])[jid]
        if row[1] == "running" and (row[6] or 0) >= 3:
            break
        if row[1] not in ("queued", "running") or time.monotonic() > deadline:
            raise RuntimeError(f"long job is {row[1]} at epoch {row[6]}")
        time.sleep(0.1)
    out: dict[str, Any] = {"job_id": jid, "many_jobs": len(ids)}
    api_pid, bare_pid = st.procs["api"].pid, st.procs["bare-api"].pid
    windows: list[tuple[str, str, int, Path | None]] = [
        ("bare", bare_url, bare_pid, None), ("job", f"{api}/v1/jobs/{jid}", api_pid, None),
        ("metrics", f"{api}/v1/jobs/{jid}/metrics", api_pid, None)]
    if gen == "wrk":
        windows += [("job_many", f"{api}/", api_pid, scripts["job"]), ("metrics_many", f"{api}/", api_pid, scripts["metrics"])]
    for label, url, pid, script in windows:
        e0 = st.job_rows([jid])[jid][6]
        fast0, q0 = _poll_counters(client)
        t0 = time.perf_counter()
        res = load_window(url, seconds, conc, pid, gen, script)
        e1 = st.job_rows([jid])[jid][6]
        res["job_epochs_per_s"] = (e1 - e0) / (time.perf_counter() - t0)
        if label != "bare":
            fast1, q1 = _poll_counters(client)
            # over the warm-up and the window: the polls the fast path answered, the queries run
            res["fast_path_polls"], res["poll_queries"] = fast1 - fast0, q1 - q0
            res["queries_per_fast_poll"] = (q1 - q0) / max(fast1 - fast0, 1)
        out[label] = res
        log(f"  {label}: {res['rps']:.0f} req/s p99 {res['p99_ms']:.1f} ms, errors {res['errors']}, "
            f"server cpu {res['server_cpu_ms_per_req']:.2f} ms/req, client cpu {res['client_cpu_util']:.2f}"
            + (f", queries/poll {res['queries_per_fast_poll']:.2f}" if label != "bare" else ""))
    out["metrics_epochs_at_end"] = st.job_rows([jid])[jid][6]
    out["response_bytes"] = {"job": len(client.get(f"/v1/jobs/{jid}").content),
                             "metrics": len(client.get(f"/v1/jobs/{jid}/metrics").content)}
    # Unloaded single-request latency, for reference
    for label, path in (("job", f"/v1/jobs/{jid}"), ("metrics", f"/v1/jobs/{jid}/metrics")):
        lat = []
        for _ in range(50):
            t0 = time.perf_counter()
            client.get(path).raise_for_status()
            lat.append((time.perf_counter() - t0) * 1000)
        out[label]["serial_p50_ms"] = statistics.median(lat)
    with httpx.Client(timeout=10) as bc:
        lat = []
        for _ in range(50):
            t0 = time.perf_counter()
            bc.get(bare_url).raise_for_status()
            lat.append((time.perf_counter() - t0) * 1000)
        out["bare"]["serial_p50_ms"] = statistics.median(lat)
    try:
        out["round_trips_per_request"] = count_round_trips(st, jid)
    except Exception as exc:  # noqa: BLE001 - a secondary figure; keep the run
        log(f"  round-trip count failed: {type(exc).__name__}: {exc}")
        out["round_trips_per_request"] = {"error": f"{type(exc).__name__}: {exc}"}
    client.post(f"/v1/jobs/{jid}/cancel").raise_for_status()
    st.wait_jobs([jid], timeout=30)
    client.close()
    for k in ("job", "metrics", "job_many", "metrics_many"):
        if k not in out:
            continue
        out[k]["ratio_rps"] = out[k]["rps"] / max(out["bare"]["rps"], 1e-9)
        # requests per server CPU-second relative to bare: the req/s ratio a saturated server would show
        out[k]["ratio_capacity"] = out["bare"]["server_cpu_ms_per_req"] / max(out[k]["server_cpu_ms_per_req"], 1e-9)
    return out


# --------------------------------------------------------------------------- 3. epoch time


def worker_threads(st: Stack) -> dict[str, Any]:
    """What torch uses in the worker: torch's default in a fresh process with the worker's
    environment, except for a job whose steps are small (``one_thread_below``: the worker's
    ``TRAINYARD_TORCH_ONE_THREAD_BELOW``), which trains on one (``training.threads``)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env=st.env, capture_output=True, text=True, timeout=60)
    sets = subprocess.run(["grep", "-rln", "set_num_threads", "worker", "training", "store"], cwd=ROOT,
                          capture_output=True, text=True).stdout.split()
    return {"threads": int(out.stdout.strip()), "set_num_threads_in": sets, "one_thread_below": one_thread_below(st),
            "OMP_NUM_THREADS": st.env.get("OMP_NUM_THREADS")}


def _timed_db_reporter(st: Stack) -> Any:
    """The worker's record of a run (its reporter: ``worker.record.RunRecord``), in this process against the bench database, with the time spent
    in each of its methods recorded (inclusive; ``flush`` is also counted inside its callers)."""
    try:
        from config.settings import get_settings
        from store import repo
        from store.db import session_scope
        from worker.record import RunRecord
    except Exception as exc:  # noqa: BLE001
        log(f"  in-process RunRecord unavailable: {exc}")
        return None
    settings = get_settings()  # count_round_trips pointed this process at the bench database
    if settings.database_url != st.db_url:
        return None

    def make(spec_: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        with session_scope() as s:
            job = repo.create_job(s, spec=spec_, queue=settings.queue_name("cpu"))
            job_id = job.id
        with session_scope() as s:
            claimed = repo.claim_job(s, job_id, "bench-inproc", settings.heartbeat_stale_s)
            token = claimed.lease_token if claimed is not None else None
        timings: dict[str, float] = {}

        def timed(name: str, fn: Any) -> Any:
            def wrapper(*a: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            return wrapper

        rep = RunRecord(job_id, settings, lease_token=token)
        for name in ("on_start", "on_epoch", "on_snapshot", "on_checkpoint", "should_stop", "flush", "write_snapshot"):
            setattr(rep, name, timed(name, getattr(rep, name)))
        return rep, timings

    return make


def one_thread_below(st: Stack) -> int:
    """The worker's ``torch_one_thread_below`` setting (its environment, else the default)."""
    from config.settings import settings_from_env

    return settings_from_env({k: v for k, v in st.env.items() if k.startswith("TRAINYARD_")}).torch_one_thread_below


def bench_epochs(st: Stack, api: str, epochs: int, rounds: int, threads: int) -> dict[str, Any]:
    """Interleaved rounds of: the engine alone (reporter=None), the engine with a reporter that
    does nothing plus a should_stop poll (what the engine itself spends on reporting: snapshots
    every epoch, callbacks), and the job through the service (RunRecord: database writes too).
    The in-process runs follow the worker's thread rule (:func:`one_thread_below`) as its job does."""
    import functools

    import torch

    from training import BaseReporter
    from training import fit as engine_fit

    torch.set_num_threads(threads)
    fit = functools.partial(engine_fit, one_thread_below=one_thread_below(st))
    s = spec(epochs, "bench-epochs")
    fit(spec(2, "warm"))  # warm this process (imports, first-call costs)
    client = httpx.Client(base_url=api, timeout=30, headers=HEADERS)
    r: dict[str, dict[str, list[float]]] = {k: {"epoch": [], "fit": [], "outside": []} for k in ("engine", "nop", "inproc_db", "job")}

    def add(k: str, epoch_s: list[float], fit_s: float) -> None:
        r[k]["epoch"] += epoch_s
        r[k]["fit"].append(fit_s / len(epoch_s))
        r[k]["outside"].append(fit_s - sum(epoch_s))

    db_rep = _timed_db_reporter(st)
    job_wall = []
    for _ in range(rounds):
        res = fit(s)
        add("engine", [h["seconds"] for h in res.history], res.seconds)
        res = fit(s, reporter=BaseReporter(), should_stop=lambda: False)
        add("nop", [h["seconds"] for h in res.history], res.seconds)
        if db_rep is not None:
            rep, timings = db_rep(s)
            res = fit(s, reporter=rep, should_stop=rep.should_stop)
            add("inproc_db", [h["seconds"] for h in res.history], res.seconds)
            for k, v in timings.items():
                r["inproc_db"].setdefault(f"in_{k}", []).append(v)
        jid = client.post("/v1/jobs", json=s).raise_for_status().json()["id"]
        row = st.wait_jobs([jid], timeout=180, every=0.25)[jid]
        if row[1] != "succeeded":
            raise RuntimeError(f"epoch job ended {row[1]}")
        m = client.get(f"/v1/jobs/{jid}/metrics").raise_for_status().json()["epochs"]
        add("job", [float(e["seconds"]) for e in m], row[5])
        job_wall.append((ts(row[4]) - ts(row[3])) / len(m))
    client.close()
    out: dict[str, Any] = {"epochs": epochs, "rounds": rounds, "threads": threads,
                           "job_started_to_finished_per_epoch_ms": statistics.median(job_wall) * 1000}
    for k, v in r.items():
        if not v["epoch"]:
            continue
        out[f"{k}_epoch_median_ms"] = statistics.median(v["epoch"]) * 1000
        out[f"{k}_fit_per_epoch_ms"] = statistics.median(v["fit"]) * 1000
        out[f"{k}_outside_epochs_ms_per_fit"] = statistics.median(v["outside"]) * 1000
        for name, xs in v.items():
            if name.startswith("in_"):
                out[f"{k}_{name}_ms_per_fit"] = statistics.median(xs) * 1000
    out["fit_per_epoch_ms_by_round"] = {k: [round(x * 1000, 2) for x in v["fit"]] for k, v in r.items()}
    out["ratio_epoch_seconds"] = out["job_epoch_median_ms"] / out["engine_epoch_median_ms"]
    out["ratio_fit"] = out["job_fit_per_epoch_ms"] / out["engine_fit_per_epoch_ms"]
    out["ratio_fit_nop_reporter"] = out["nop_fit_per_epoch_ms"] / out["engine_fit_per_epoch_ms"]
    return out


# --------------------------------------------------------------------------- 4. throughput


def bench_throughput(st: Stack, api: str, bare: Any, k_jobs: int, k_tasks: int) -> dict[str, Any]:
    client = httpx.Client(base_url=api, timeout=60, headers=HEADERS)
    specs = [spec(1, f"bench-tp-{i}") for i in range(k_jobs)]
    m0 = time.monotonic()
    res = client.post("/v1/jobs/batch", json={"jobs": specs}).raise_for_status().json()
    t_posted = time.time()
    batch_post_ms = (time.monotonic() - m0) * 1000
    client.close()
    ids = [r["id"] for r in res["results"]]
    rows = st.wait_jobs(ids, timeout=300, every=0.01)
    jobs_per_min = k_jobs / (time.monotonic() - m0) * 60  # monotonic: immune to wall-clock steps
    bad = [r[1] for r in rows.values() if r[1] != "succeeded"]
    if bad:
        raise RuntimeError(f"throughput jobs ended {bad}")
    ordered = sorted(rows.values(), key=lambda r: r[3])
    t_end = max(ts(r[4]) for r in ordered)
    run = [ts(r[4]) - ts(r[3]) for r in ordered]
    gaps = [ts(b[3]) - ts(a[4]) for a, b in zip(ordered, ordered[1:], strict=False)]

    # reference: the same 1-epoch spec through training.fit in this process (no service at all)
    from training import fit

    fit_ms = []
    for _ in range(5):
        t = time.perf_counter()
        fit(specs[0])
        fit_ms.append((time.perf_counter() - t) * 1000)

    key = st.bare_env["BENCH_RESULTS_KEY"]
    st.redis.delete(key)
    q = PREFIX + "bare-cpu"
    m0 = time.monotonic()
    with bare.producer_or_acquire() as producer:
        for _ in range(k_tasks):
            bare.send_task("bench.noop", args=[time.time()], queue=q, producer=producer)
    deadline = time.monotonic() + 120
    while st.redis.llen(key) < k_tasks:
        if time.monotonic() > deadline:
            raise TimeoutError(f"bare tasks: {st.redis.llen(key)}/{k_tasks} ran in 120 s")
        time.sleep(0.005)
    tasks_per_min = k_tasks / (time.monotonic() - m0) * 60
    return {
        "jobs": k_jobs, "jobs_per_min": jobs_per_min, "job_run_ms_median": statistics.median(run) * 1000,
        "batch_post_ms": batch_post_ms, "post_to_first_start_ms": (ts(ordered[0][3]) - t_posted) * 1000,
        "first_job_run_ms": run[0] * 1000, "last_finished_minus_first_started_ms": (t_end - ts(ordered[0][3])) * 1000,
        "gap_finished_to_next_started_ms_median": statistics.median(gaps) * 1000 if gaps else None,
        "gap_max_ms": max(gaps) * 1000 if gaps else None,
        "tasks": k_tasks, "noop_tasks_per_min": tasks_per_min, "ratio": jobs_per_min / tasks_per_min,
        "job_run_ms_max": max(run) * 1000, "engine_fit_1_epoch_ms_median": statistics.median(fit_ms), "runs_ms": [round(x * 1000, 1) for x in run],
        "gaps_ms": [round(x * 1000, 1) for x in gaps],
    }


# --------------------------------------------------------------------------- main


def start_stack(st: Stack) -> tuple[str, str, Any]:
    (st.tmp / "bench_bare_celery.py").write_text(textwrap.dedent(BARE_CELERY))
    (st.tmp / "bench_bare_api.py").write_text(textwrap.dedent(BARE_API))
    st.create_db()
    api_port, bare_port = free_port(), free_port()
    cli = [sys.executable, "-m", "client.cli"]
    st.start("worker", [*cli, "worker", "--queues", "gpu,cpu", "--concurrency", "1", "--name", f"tyb-{RUN}"], st.env)
    # The same flags as `trainyard worker` (server/cli.py::_celery_worker_argv), its own app and queue
    st.start("bare-worker", [sys.executable, "-m", "celery", "-A", "bench_bare_celery", "worker", "-Q", PREFIX + "bare-cpu",
                             "--concurrency", "1", "--pool", "solo", "--loglevel", "INFO", "-n", f"tyb-{RUN}-bare@%h",
                             "--without-gossip", "--without-mingle", "--without-heartbeat"], st.bare_env)
    st.start("api", [*cli, "api", "--port", str(api_port)], st.env)
    api = f"http://127.0.0.1:{api_port}"
    st.wait_http("api", f"{api}/healthz")
    st.wait_log("worker", " ready.")
    st.wait_log("bare-worker", " ready.")
    # the bare API returns what GET /v1/jobs/{id} returns for a queued-then-finished job
    sample = httpx.post(f"{api}/v1/jobs", json=spec(1, "bench-sample"), timeout=30, headers=HEADERS).raise_for_status().json()
    st.wait_jobs([sample["id"]])
    payload = httpx.get(f"{api}/v1/jobs/{sample['id']}", timeout=30, headers=HEADERS).text
    st.start("bare-api", [sys.executable, "-m", "uvicorn", "bench_bare_api:app", "--host", "127.0.0.1", "--port",
                          str(bare_port), "--workers", "1", "--no-access-log"], {**st.env, "BENCH_PAYLOAD": payload})
    bare_url = f"http://127.0.0.1:{bare_port}/bare"
    st.wait_http("bare-api", f"http://127.0.0.1:{bare_port}/healthz")

    os.environ["BENCH_RESULTS_KEY"] = st.bare_env["BENCH_RESULTS_KEY"]
    from celery import Celery

    from config.settings import settings_from_env
    from store.broker import celery_config

    bare = Celery("bench-bare-sender", set_as_current=False)
    bare.conf.update(celery_config(settings_from_env(st.bare_env)))
    return api, bare_url, bare


def table(r: dict[str, Any]) -> str:
    lat, pol, ep, tp = r["latency"], r["polling"], r["epochs"], r["throughput"]
    rt = pol.get("round_trips_per_request", {})

    def ok(b: bool) -> str:
        return "met" if b else "MISSED"

    rows = [
        ("1 submit->running p50 (job / bare Celery)", f"{lat['p50_ms']:.1f} / {lat['bare_p50_ms']:.1f} ms",
         f"{lat['ratio_p50']:.2f}x", "<= 2x", ok(lat["ratio_p50"] <= 2)),
        ("1 submit->running p95", f"{lat['p95_ms']:.1f} / {lat['bare_p95_ms']:.1f} ms", f"{lat['ratio_p95']:.2f}x",
         "<= 2x", ok(lat["ratio_p95"] <= 2)),
        ("1   of which created_at -> broker send (in-process POST)", f"{rt.get('post_created_at_to_send_ms_p50', float('nan')):.1f} ms",
         f"{rt.get('post', float('nan')):.0f} DB round trips", "", ""),
        ("1 submit->running max", f"{lat['max_ms']:.1f} / {lat['bare_max_ms']:.1f} ms", "",
         "no 1-2 s stalls", ok(lat["max_ms"] < 1000)),
        (f"2 bare FastAPI, 64 clients ({pol['bare'].get('load_generator', 'httpx')})", f"{pol['bare']['rps']:.0f} req/s, p99 {pol['bare']['p99_ms']:.1f} ms",
         f"{pol['bare']['server_cpu_ms_per_req']:.2f} ms cpu/req", "", ""),
    ]
    for k in ("job", "metrics", "job_many", "metrics_many"):
        if k not in pol:
            continue
        p = pol[k]
        route = "/v1/jobs/{id}" if k.startswith("job") else "/v1/jobs/{id}/metrics"
        rows.append((f"2 GET {route} req/s" + (f", {pol.get('many_jobs', 0)} jobs round-robin" if k.endswith("_many") else ", one job"),
                     f"{p['rps']:.0f} req/s ({p['server_cpu_ms_per_req']:.2f} ms cpu/req)", f"{p['ratio_rps']:.2f}x",
                     ">= 0.5x", ok(p["ratio_rps"] >= 0.5)))
        rows.append((f"2   {k} server capacity (bare cpu/req / this)", "", f"{p['ratio_capacity']:.2f}x", ">= 0.5x",
                     ok(p["ratio_capacity"] >= 0.5)))
        rows.append((f"2   {k} p99 (p50)", f"{p['p99_ms']:.1f} ms ({p['p50_ms']:.1f} ms)", "", "<= 50 ms", ok(p["p99_ms"] <= 50)))
        if "queries_per_fast_poll" in p:
            rows.append((f"2   {k} DB queries per poll under load (shared by identical polls)", f"{p['queries_per_fast_poll']:.2f}",
                         f"{p['fast_path_polls']:.0f} fast polls", "", ""))
        if isinstance(rt.get(k), float):
            # one per poll; psycopg prepares a statement once per connection (+1 round trip, amortized)
            rows.append((f"2   {k} DB round trips per request", f"{rt[k]:.2f}", "", "1", ok(rt[k] <= 1.05)))
    rows += [
        ("3 epoch seconds median (job / engine)", f"{ep['job_epoch_median_ms']:.1f} / {ep['engine_epoch_median_ms']:.1f} ms",
         f"{ep['ratio_epoch_seconds']:.3f}x", "<= 1.05x", ok(ep["ratio_epoch_seconds"] <= 1.05)),
        ("3 whole fit per epoch (run_seconds / fit)", f"{ep['job_fit_per_epoch_ms']:.1f} / {ep['engine_fit_per_epoch_ms']:.1f} ms",
         f"{ep['ratio_fit']:.3f}x", "<= 1.05x", ok(ep["ratio_fit"] <= 1.05)),
        ("3   engine + no-op reporter (fit / epoch)", f"{ep['nop_fit_per_epoch_ms']:.1f} / {ep['nop_epoch_median_ms']:.1f} ms",
         f"{ep['ratio_fit_nop_reporter']:.3f}x", "(attribution)", ""),
        ("3   engine + worker's RunRecord in-process (fit/epoch)", f"{ep.get('inproc_db_fit_per_epoch_ms', float('nan')):.1f} / {ep.get('inproc_db_epoch_median_ms', float('nan')):.1f} ms",
         f"{ep.get('inproc_db_fit_per_epoch_ms', float('nan')) / ep['engine_fit_per_epoch_ms']:.3f}x", "(attribution)", ""),
        ("3     RunRecord ms/fit: start/epoch/checkpoint/snapshot/should_stop (flush/snapshot write)",
         "/".join(f"{ep.get(f'inproc_db_in_{m}_ms_per_fit', 0):.0f}" for m in ("on_start", "on_epoch", "on_checkpoint", "on_snapshot", "should_stop"))
         + " (" + "/".join(f"{ep.get(f'inproc_db_in_{m}_ms_per_fit', 0):.0f}" for m in ("flush", "write_snapshot")) + ")", "", "", ""),
        ("3   time outside epochs per fit (job/nop/engine)",
         f"{ep['job_outside_epochs_ms_per_fit']:.0f} / {ep['nop_outside_epochs_ms_per_fit']:.0f} / {ep['engine_outside_epochs_ms_per_fit']:.0f} ms",
         "", "", ""),
        ("4 tiny jobs/min (job / raw Celery no-op)", f"{tp['jobs_per_min']:.0f} / {tp['noop_tasks_per_min']:.0f}",
         f"{tp['ratio']:.4f}x", "(report)", ""),
    ]
    w = [max(len(str(row[i])) for row in rows) for i in range(5)]
    head = ("measurement", "value", "ratio", "goal", "")
    lines = [" | ".join(h.ljust(w[i]) for i, h in enumerate(head)).rstrip(), "-+-".join("-" * x for x in w)]
    lines += [" | ".join(str(c).ljust(w[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    extra = (f"torch threads: {ep['threads']} in both (worker: torch default; one for steps under "
             f"{r['threads'].get('one_thread_below', 0):,} multiply-adds, in both; set_num_threads in "
             f"{r['threads']['set_num_threads_in'] or 'no worker/training/store module'})  |  "
             f"tiny job run (started->finished) {tp['job_run_ms_median']:.0f} ms median / {tp['job_run_ms_max']:.0f} ms max "
             f"vs training.fit alone {tp['engine_fit_1_epoch_ms_median']:.0f} ms, gap finished->next started "
             f"{tp['gap_finished_to_next_started_ms_median']:.0f} ms median / {tp['gap_max_ms']:.0f} ms max, batch POST "
             f"{tp['batch_post_ms']:.0f} ms, POST->first start {tp['post_to_first_start_ms']:.0f} ms, first job run "
             f"{tp['first_job_run_ms']:.0f} ms  |  "
             f"POST /v1/jobs p50 {lat['post_p50_ms']:.1f} ms, POST -> succeeded p50 {lat['post_to_succeeded_p50_ms']:.1f} ms (client)  |  "
             f"64-client Little's-law mean latency: bare {pol['bare']['littles_law_mean_ms']:.0f} ms  |  job epochs/s during load windows: "
             + ", ".join(f"{k} {pol[k]['job_epochs_per_s']:.1f}" for k in ("bare", "job", "metrics")))
    steps = {k: v["clock_step_ms"] for k, v in r["cpu_cores"].items() if abs(v["clock_step_ms"]) > 2}
    if steps or lat["samples_dropped_for_clock_steps"]:
        extra += (f"\nWALL CLOCK STEPPED during: {steps} ms; {lat['samples_dropped_for_clock_steps']} latency samples dropped"
                  " (DB-timestamp intervals in that phase are suspect)")
    extra += ("\nbusy cores per phase, this run's processes / everything else (PostgreSQL + Redis + other users): "
              + ", ".join(f"{k} {v['ours']:.2f}/{v['other_incl_postgres_redis']:.2f}" for k, v in r["cpu_cores"].items()))
    return "\n".join(lines) + "\n" + extra


def latency_only(st: Stack, api: str, bare: Any, n: int, results: dict[str, Any], json_path: Path | None) -> int:
    """``--latency-only N``: part 1 alone, printed as one line (and all samples in ``--json``)."""
    log(f"1. submit->running: {n} jobs, {n} bare tasks")
    lat = results["latency"] = bench_latency(st, api, bare, n, n)
    results["load_avg_end"] = os.getloadavg()
    print(f"submit->running p50 {lat['p50_ms']:.1f} / {lat['bare_p50_ms']:.1f} ms = {lat['ratio_p50']:.2f}x, "
          f"p95 {lat['p95_ms']:.1f} / {lat['bare_p95_ms']:.1f} ms = {lat['ratio_p95']:.2f}x, max {lat['max_ms']:.1f} ms, "
          f"POST p50 {lat['post_p50_ms']:.1f} ms, POST -> succeeded p50 {lat['post_to_succeeded_p50_ms']:.1f} ms (client); load average {results['load_avg_start'][0]:.2f} -> "
          f"{results['load_avg_end'][0]:.2f}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, default=str))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller N and shorter load windows")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--load", choices=("wrk", "httpx"), default="wrk" if shutil.which("wrk") else "httpx",
                    help="load generator for the polling windows (default: wrk when installed, apt-get install wrk)")
    ap.add_argument("--latency-only", type=int, metavar="N",
                    help="measure only submit->running, N jobs and N bare tasks interleaved (A/B runs of the latency)")
    args = ap.parse_args()
    n, n_bare, secs, ep_rounds, k_jobs, k_tasks = (8, 20, 4.0, 2, 10, 100) if args.quick else (50, 50, 8.0, 5, 20, 300)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    st = Stack()
    t_all = time.monotonic()
    results: dict[str, Any] = {"run": RUN, "quick": args.quick, "host": platform.node(), "cpus": os.cpu_count(),
                               "python": platform.python_version(), "load_avg_start": os.getloadavg()}
    try:
        log(f"starting stack (database {DB_NAME}, Redis prefix {PREFIX})")
        api, bare_url, bare = start_stack(st)
        if args.latency_only:
            return latency_only(st, api, bare, args.latency_only, results, args.json)
        results["threads"] = worker_threads(st)
        log(f"1. submit->running: {n} jobs, {n_bare} bare tasks")
        with Phase(st) as ph:
            results["latency"] = bench_latency(st, api, bare, n, n_bare)
        results.setdefault("cpu_cores", {})["latency"] = {"ours": ph.ours, "other_incl_postgres_redis": ph.other, "clock_step_ms": ph.clock_step_ms}
        log(f"2. polling: {args.clients} clients ({args.load}), {secs:.0f} s per window")
        with Phase(st) as ph:
            results["polling"] = bench_polling(st, api, bare_url, secs, args.clients, args.load)
        results.setdefault("cpu_cores", {})["polling"] = {"ours": ph.ours, "other_incl_postgres_redis": ph.other, "clock_step_ms": ph.clock_step_ms}
        log(f"3. epoch time: 30 epochs x {ep_rounds} rounds")
        with Phase(st) as ph:
            results["epochs"] = bench_epochs(st, api, 30, ep_rounds, results["threads"]["threads"])
        results.setdefault("cpu_cores", {})["epochs"] = {"ours": ph.ours, "other_incl_postgres_redis": ph.other, "clock_step_ms": ph.clock_step_ms}
        log(f"4. throughput: {k_jobs} jobs, {k_tasks} bare tasks")
        with Phase(st) as ph:
            results["throughput"] = bench_throughput(st, api, bare, k_jobs, k_tasks)
        results.setdefault("cpu_cores", {})["throughput"] = {"ours": ph.ours, "other_incl_postgres_redis": ph.other, "clock_step_ms": ph.clock_step_ms}
        results["load_avg_end"] = os.getloadavg()
        results["seconds"] = time.monotonic() - t_all
        print(table(results))
        print(f"load average start {results['load_avg_start'][0]:.2f}, end {results['load_avg_end'][0]:.2f}; "
              f"total {results['seconds']:.0f} s")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=str))
        return 0
    except BaseException:
        for name, path in st.logs.items():
            if path.exists():
                log(f"--- tail of {name} log ---\n{path.read_text(errors='replace')[-1500:]}")
        raise
    finally:
        st.close()
        log("cleaned up")


if __name__ == "__main__":
    sys.exit(main())
