"""Benchmark: the API's CPU per poll in-process (issue 10), where polls run their queries.

Usage (repo root, in the venv; needs PostgreSQL at 127.0.0.1:5432, trust auth)::

    python bench/poll_cpu.py                 # 5 rounds of 6,400 polls per case
    python bench/poll_cpu.py --rounds 9

The whole ASGI app (request ids, the poll fast path, key check, rate limit, the read) is called
directly on one event loop, 64 polls at a time (``asyncio.gather``), without uvicorn or a load
generator, so the figures are the app's own CPU (``time.process_time``: the loop and any thread)
and wall time per poll, with no HTTP parsing and no client on the same cores. Cases, alternated
round by round:

- **bare**: a one-route FastAPI app (``async def``) returning the same bytes as the job's poll;
- **loop, one job / 64 jobs**: ``GET /v1/jobs/{id}`` as the API runs it (on PostgreSQL the query
  runs on the event loop's own connections, ``store.pollread._LoopReader``), every poll of the
  same finished job, or each of 64 in turn;
- **threads, one job / 64 jobs**: the same with the query handed to the reader's threads (the
  path polls took before, and the one synchronous callers and SQLite still take).

Prints the medians per case and the ratios loop / threads and loop / bare. "idle" is wall minus
CPU per poll: the time the loop waited for the database with nothing else to do.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SPEC: dict[str, Any] = {
    "name": "bench-poll", "device": "cpu",
    "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 64},
    "model": {"layers": [{"type": "dense", "units": 64, "activation": "relu"}, {"type": "dense", "units": 10}]},
    "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "learning_rate": 0.001}, "epochs": 5,
}


def _jobs(project: str, n: int) -> list[str]:
    from store import repo
    from store.db import session_scope
    from training import validate_spec

    spec = validate_spec(SPEC).model_dump(mode="json")
    ids = []
    for _ in range(n):
        with session_scope() as s:
            job = repo.create_job(s, spec=spec, queue="cpu", project_id=project)
            s.flush()
            repo.claim_job(s, job.id, "bench:1", 300)
            repo.record_progress(s, job.id, [{"epoch": e, "loss": 1.0 / e, "val_loss": 0.5 / e, "accuracy": 0.1 * e,
                                              "lr": 1e-3, "seconds": 0.01} for e in range(1, 6)], info={"device": "cpu"})
            repo.finish_job(s, job.id, status="succeeded", stop_reason="completed", best=("val_loss", 0.1, 5),
                            steps=50, epochs_run=5, run_seconds=0.5, info={"device": "cpu"})
            ids.append(job.id)
    return ids


def _scope(path: str, token: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"bench"), (b"authorization", f"Bearer {token}".encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}


async def _call(app: Any, scope: dict[str, Any]) -> bytes:
    out: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        out.append(message)

    await app(scope, receive, send)
    if out[0]["status"] != 200:
        raise RuntimeError(f"poll answered {out[0]['status']}: {out[1:]}")
    return bytes(out[1]["body"])


def _threaded(on: bool) -> None:
    """Route the reader's loop polls to its threads (``on``) or back to the loop."""
    from store.pollread import PollReader

    if on:
        async def run_item(self: PollReader, key: Any, kind: Any, item: Any) -> Any:
            return await asyncio.shield(asyncio.wrap_future(self.submit_item(key, kind, item)))
        PollReader.run_item = run_item  # type: ignore[method-assign]
    else:
        PollReader.run_item = _LOOP_RUN_ITEM  # type: ignore[method-assign]


async def _measure(app: Any, scopes: list[dict[str, Any]], n: int) -> tuple[float, float]:
    done = 0
    c0, w0 = time.process_time(), time.perf_counter()
    while done < n:
        await asyncio.gather(*(_call(app, scopes[i % len(scopes)]) for i in range(64)))
        done += 64
    return (time.process_time() - c0) / done * 1e6, (time.perf_counter() - w0) / done * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--polls", type=int, default=6400)
    args = ap.parse_args()
    db = "trainyard_pollcpu_" + uuid.uuid4().hex[:8]
    with psycopg.connect(ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    try:
        os.environ.update(TRAINYARD_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}",
                          TRAINYARD_AUTH="required", TRAINYARD_REQUESTS_PER_MINUTE="0")
        subprocess.run([sys.executable, "-m", "client.cli", "migrate"], check=True, capture_output=True, cwd=ROOT)
        _run(args)
    finally:
        from store.db import get_engine
        from store.pollread import close_readers

        close_readers()
        get_engine().dispose()
        with psycopg.connect(ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE "{db}" WITH (FORCE)')


def _run(args: argparse.Namespace) -> None:
    global _LOOP_RUN_ITEM
    from fastapi import FastAPI
    from fastapi.responses import Response

    from api.app import create_app
    from config.settings import get_settings
    from store import auth
    from store.db import session_scope
    from store.pollread import PollReader

    _LOOP_RUN_ITEM = PollReader.run_item
    with session_scope() as s:
        key = auth.create_key(s, "bench")
    ids = _jobs(key.project_id, 64)
    app = create_app(get_settings())
    one = [_scope(f"/v1/jobs/{ids[0]}", key.token)]
    many = [_scope(f"/v1/jobs/{i}", key.token) for i in ids]

    async def bench() -> dict[str, list[tuple[float, float]]]:
        body = await _call(app, one[0])  # also records the key's first use
        bare = FastAPI()

        @bare.get("/v1/jobs/{job_id}")
        async def get(job_id: str) -> Response:
            return Response(body, media_type="application/json")

        gc.collect()
        gc.freeze()  # as the API does after start-up (api.app)
        gc.set_threshold(10_000, 10, 10)
        cases = {"bare": (bare, one, False), "loop, one job": (app, one, False), "threads, one job": (app, one, True),
                 "loop, 64 jobs": (app, many, False), "threads, 64 jobs": (app, many, True)}
        out: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
        for _ in range(args.rounds):
            for name, (a, scopes, threaded) in cases.items():
                _threaded(threaded)
                out[name].append(await _measure(a, scopes, args.polls))
        _threaded(False)
        return out

    load0 = os.getloadavg()[0]
    res = asyncio.run(bench())
    med = {k: (sorted(c for c, _ in v)[len(v) // 2], sorted(w for _, w in v)[len(v) // 2]) for k, v in res.items()}
    print(f"{'case':18s} | CPU us/poll | wall us/poll | idle us/poll")
    for k, (c, w) in med.items():
        print(f"{k:18s} | {c:11.1f} | {w:12.1f} | {max(w - c, 0.0):12.1f}")
    for what in ("one job", "64 jobs"):
        lc, lw = med[f"loop, {what}"]
        tc, tw = med[f"threads, {what}"]
        print(f"{what}: CPU loop/threads {lc / tc:.2f}x, wall loop/threads {lw / tw:.2f}x, CPU loop/bare {lc / med['bare'][0]:.2f}x")
    print(f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}; {args.rounds} rounds of {args.polls} polls per case")


_LOOP_RUN_ITEM: Any = None

if __name__ == "__main__":
    main()
