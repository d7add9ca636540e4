"""Benchmark: how long a cancel takes to land (issue 19; the tests assert only that it lands and
how the run stops). Ratios are against a baseline measured in the same run.

Usage (repo root, in the venv)::

    python bench/cancel.py                      # engine + service (PostgreSQL and Redis must be up)
    python bench/cancel.py --rounds 5 --only engine
    python bench/cancel.py --json bench/out/cancel.json

1. engine: ``training.fit`` of a long-running digits job (the service tests' ``long_spec``) in this
   process; after ``--warm`` seconds a timer thread sets the flag that ``should_stop`` reads; the
   latency is flag set -> ``fit`` returned. Baseline: a plain PyTorch loop with the same data,
   model size, batch and Adam, that checks the same kind of flag after every step, so its latency
   is one step. The engine polls ``should_stop`` every ``training.engine.POLL_SECONDS`` (0.2 s), so
   its design bound is that plus a step.
2. service: the same spec submitted over HTTP to a real ``trainyard api`` process and run by a real
   ``trainyard worker`` (PostgreSQL + Redis, a fresh database and queue prefix, removed at the end);
   once the job has finished an epoch, ``POST /v1/jobs/{id}/cancel``; the latency is the request sent
   -> the job's row ``cancelled`` (read directly from the database every 10 ms). Baseline: the engine's
   latency of part 1. The worker reads the cancel flag at most every ``flush_interval_s`` (0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.service.helpers import long_spec  # noqa: E402


def log(msg: str) -> None:
    print(f"[cancel] {msg}", file=sys.stderr, flush=True)


def summary(xs: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs)}


# --------------------------------------------------------------------------- 1. engine


def engine_round(warm: float) -> float:
    from training import fit

    flag = threading.Event()
    set_at: list[float] = []

    def fire() -> None:
        set_at.append(time.monotonic())
        flag.set()

    timer = threading.Timer(warm, fire)
    timer.start()
    r = fit(long_spec(device="cpu"), should_stop=flag.is_set)
    returned = time.monotonic()
    timer.cancel()
    assert r.stop_reason == "cancelled" and set_at, r.stop_reason
    return returned - set_at[0]


def plain_round(warm: float) -> tuple[float, float]:
    """(latency, median step time) of a bare loop that checks the flag after every step."""
    import torch
    from torch import nn

    from training import validate_spec
    from training.data import load

    spec = long_spec(device="cpu")
    d = load(validate_spec(spec).data, seed=0)  # split and standardized as the engine does
    x = torch.as_tensor(d.x_train).reshape(len(d.x_train), -1)
    y = torch.as_tensor(d.y_train)
    model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    bs = spec["data"]["batch_size"]
    flag = threading.Event()
    set_at: list[float] = []

    def fire() -> None:
        set_at.append(time.monotonic())
        flag.set()

    timer = threading.Timer(warm, fire)
    timer.start()
    steps: list[float] = []
    while not flag.is_set():
        perm = torch.randperm(len(x))
        for b in range(0, len(x), bs):
            t = time.perf_counter()
            idx = perm[b : b + bs]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps.append(time.perf_counter() - t)
            if flag.is_set():
                break
    returned = time.monotonic()
    return returned - set_at[0], statistics.median(steps)


def bench_engine(rounds: int, warm: float) -> dict[str, Any]:
    from training import engine

    eng, plain, step = [], [], []
    engine_round(0.3)  # warm-up (data cache, torch kernels)
    for i in range(rounds):
        eng.append(engine_round(warm))
        lat, st = plain_round(warm)
        plain.append(lat)
        step.append(st)
        log(f"engine round {i + 1}/{rounds}: engine {eng[-1] * 1000:.0f} ms, plain loop {plain[-1] * 1000:.1f} ms")
    bound = engine.POLL_SECONDS + statistics.median(step)
    return {
        "engine": summary(eng), "plain_loop": summary(plain), "step_s": statistics.median(step),
        "poll_seconds": engine.POLL_SECONDS, "design_bound_s": bound,
        "ratio_median": statistics.median(eng) / statistics.median(plain),
        "within_bound": sum(v <= bound for v in eng), "load_avg": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------- 2. service


def bench_service(rounds: int, engine_median: float) -> dict[str, Any]:
    import httpx
    import redis
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from client import Client
    from config.settings import settings_from_env
    from store.migrate import upgrade
    from tests.service.helpers import stop, wait_http
    from tests.service.test_faults_kit import Probe, free_port, service_env, start_worker, wait_until

    pg_admin = make_url(os.environ.get("TRAINYARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    redis_url = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    name = f"trainyard_bench_cancel_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    db = pg_admin.set(database=name).render_as_string(hide_password=False)
    tmp = Path(tempfile.mkdtemp(prefix="trainyard-bench-cancel-"))
    procs: list[subprocess.Popen[Any]] = []
    env = service_env(db, redis_url, tmp / "data")
    env.pop("OMP_NUM_THREADS")  # the worker trains as it does in production
    probe = None
    try:
        upgrade(db)
        worker = start_worker(env, tmp / "worker.log", "tyb-cancel")
        procs.append(worker)
        port = free_port()
        with (tmp / "api.log").open("wb") as f:
            api = subprocess.Popen([sys.executable, "-m", "client.cli", "api", "--port", str(port)], env=env, cwd=ROOT,
                                   stdout=f, stderr=subprocess.STDOUT)
        procs.append(api)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", api)
        probe = Probe(db)
        lat: list[float] = []
        with Client(url) as client:
            for i in range(rounds + 1):  # the first is a warm-up
                job = client.submit(long_spec(device="cpu"))
                wait_until(lambda j=job: (row := probe.try_job(j["id"])) is not None and row.status == "running"
                           and (row.epoch or 0) >= 1, 120, "job running")
                t0 = time.monotonic()
                httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", timeout=30).raise_for_status()
                row = wait_until(lambda j=job: (r := probe.try_job(j["id"])) is not None and r.status != "running" and r,
                                 60, "job stopped", every=0.01)
                took = time.monotonic() - t0
                assert row.status == "cancelled", row.status
                if i:
                    lat.append(took)
                    log(f"service round {i}/{rounds}: {took * 1000:.0f} ms")
        flush = settings_from_env(env).flush_interval_s
        return {"service": summary(lat), "flush_interval_s": flush,
                "ratio_to_engine_median": statistics.median(lat) / engine_median, "load_avg": os.getloadavg()[0]}
    finally:
        if probe is not None:
            probe.close()
        for p in reversed(procs):
            stop(p)
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(match=f"{env['TRAINYARD_QUEUE_PREFIX']}*"))
        if keys:
            r.delete(*keys)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warm", type=float, default=0.7, help="seconds of training before the flag is set")
    ap.add_argument("--only", default="engine,service")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    only = set(args.only.split(","))
    import torch

    torch.set_num_threads(2)
    out: dict[str, Any] = {"torch": torch.__version__, "rounds": args.rounds, "load_avg_start": os.getloadavg()[0]}
    out["engine"] = bench_engine(args.rounds, args.warm)
    e = out["engine"]
    print(f"engine : cancel -> fit returned  median {e['engine']['median_s'] * 1000:7.1f} ms  "
          f"(min {e['engine']['min_s'] * 1000:.1f}, max {e['engine']['max_s'] * 1000:.1f}); "
          f"plain loop (flag checked every step) {e['plain_loop']['median_s'] * 1000:.2f} ms -> x{e['ratio_median']:.1f}; "
          f"design bound POLL_SECONDS {e['poll_seconds']} + one step {e['step_s'] * 1000:.2f} ms: "
          f"{e['within_bound']}/{args.rounds} rounds within")
    if "service" in only:
        out["service"] = bench_service(args.rounds, e["engine"]["median_s"])
        s = out["service"]
        print(f"service: POST cancel -> row cancelled  median {s['service']['median_s'] * 1000:7.1f} ms  "
              f"(min {s['service']['min_s'] * 1000:.1f}, max {s['service']['max_s'] * 1000:.1f}); "
              f"x{s['ratio_to_engine_median']:.1f} the engine's median (worker reads the flag every "
              f"{s['flush_interval_s']} s)")
    out["load_avg_end"] = os.getloadavg()[0]
    print(f"load average: {out['load_avg_start']:.1f} at start, {out['load_avg_end']:.1f} at the end")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
