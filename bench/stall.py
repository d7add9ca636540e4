"""Benchmark: latency of ``GET /v1/jobs`` under the two stall attacks of issue 18, against idle.

Usage (repo root, in the venv; PostgreSQL must be up, as for the service tests)::

    python bench/stall.py                  # ~1-2 min
    python bench/stall.py --window 5       # seconds of load per scenario

It starts (on loopback; stopped and dropped at the end) a fresh PostgreSQL database
``trainyard_stall_<run>`` (schema by ``trainyard migrate``) and ``trainyard api`` (keys off, one
process; the broker URL points at Redis but no worker is needed: 20 jobs are submitted and stay
queued, so the list has rows). One client then measures ``GET /v1/jobs`` back to back for
``--window`` seconds in each scenario:

* ``idle``: nothing else;
* ``headers``: a connection sending ``GET /healthz`` with a 50 MB header, again and again (as
  the issue did; ``--header-clients N`` for N at once), plus 50 connections that sent half a
  header and stall (slowloris);
* ``previews``: 40 clients each posting, again and again, a ``multistep`` preview of 1,000
  milestones (the most allowed) and 200,000 steps (the most allowed).

``--stock`` also runs the ``headers`` scenario against plain ``python -m uvicorn api.app:create_app``
(what ``trainyard api`` ran before issue 18) for comparison. Printed: median and p95 latency per
scenario and their ratio to idle (the issue's target: <= 2x).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("TRAINYARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SPEC = {"name": "stall", "data": {"dataset": "digits"}, "loss": "sparse_categorical_crossentropy",
        "model": {"layers": [{"type": "dense", "units": 10}]}, "epochs": 1}
#: connections sending 50 MB headers at once, each again and again (--header-clients)
HEADER_CLIENTS = 1
PREVIEW = {"learning_rate": {"schedule": "multistep", "initial_learning_rate": 1.0, "unit": "step",
                             "milestones": list(range(0, 200_000, 200))}, "steps": 200_000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the API did not start")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (and its waited-for children) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def measure(url: str, window: float) -> list[float]:
    out: list[float] = []
    with httpx.Client(base_url=url, timeout=120) as c:
        c.get("/v1/jobs")
        end = time.monotonic() + window
        while time.monotonic() < end:
            t0 = time.perf_counter()
            r = c.get("/v1/jobs")
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return out


class Attack:
    """Threads hammering the server until ``stop``."""

    def __init__(self) -> None:
        self.stop_flag = threading.Event()
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self.answers: dict[str, int] = {}
        self.lock = threading.Lock()

    def count(self, what: str) -> None:
        with self.lock:
            self.answers[what] = self.answers.get(what, 0) + 1

    def spawn(self, n: int, fn: Any) -> None:
        for _ in range(n):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(30)
        for s in self.socks:
            s.close()


def header_attack(port: int) -> Attack:
    a = Attack()
    big = b"x" * (50 * 2**20)

    def hammer() -> None:
        while not a.stop_flag.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
                    try:
                        s.sendall(big)
                        s.sendall(b"\r\n\r\n")
                    except OSError:
                        pass
                    a.count(s.recv(64).split(b"\r\n", 1)[0].decode(errors="replace") or "(closed)")
            except OSError as exc:
                a.count(type(exc).__name__)

    for _ in range(50):  # slowloris: half a header each, then silence
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        a.socks.append(s)
    a.spawn(HEADER_CLIENTS, hammer)
    return a


def preview_attack(url: str) -> Attack:
    a = Attack()

    def hammer() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not a.stop_flag.is_set():
                try:
                    a.count(str(c.post("/v1/schedules/preview", json=PREVIEW).status_code))
                except httpx.HTTPError as exc:
                    a.count(type(exc).__name__)

    a.spawn(40, hammer)
    return a


def _attack_process(make: Any, go: Any, stop: Any, answers: Any) -> None:
    attack = make()
    go.set()
    stop.wait()
    attack.stop()
    answers.put(dict(sorted(attack.answers.items())))


def summary(name: str, lat: list[float], idle: list[float] | None) -> dict[str, Any]:
    med, p95 = statistics.median(lat), sorted(lat)[int(0.95 * (len(lat) - 1))]
    row = {"scenario": name, "n": len(lat), "median_ms": med * 1000, "p95_ms": p95 * 1000}
    if idle:
        row["median_x"] = med / statistics.median(idle)
        row["p95_x"] = p95 / sorted(idle)[int(0.95 * (len(idle) - 1))]
    return row


def start_api(env: dict[str, str], port: int, stock: bool) -> subprocess.Popen[Any]:
    argv = ([sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--no-access-log"] if stock
            else [sys.executable, "-m", "client.cli", "api", "--workers", "1"])
    argv += ["--host", "127.0.0.1", "--port", str(port)] if stock else ["--port", str(port)]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(env: dict[str, str], window: float, stock: bool) -> list[dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_api(env, port, stock)
    rows = []
    try:
        wait_up(url, proc)
        with httpx.Client(base_url=url, timeout=60) as c:
            if not c.get("/v1/jobs").json()["jobs"]:
                for _ in range(20):
                    assert c.post("/v1/jobs", json=SPEC).status_code == 201
        tag = "stock uvicorn: " if stock else ""
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        idle = measure(url, window)
        rows.append(summary(tag + "idle", idle, None))
        rows[-1]["api cpu %"] = 100 * (cpu_s(proc.pid) - c0) / (time.monotonic() - t0)
        scenarios = [("headers", lambda: header_attack(port))]
        if not stock:
            scenarios.append(("previews", lambda: preview_attack(url)))
        for name, make in scenarios:
            # the attack runs in its own process: its threads must not hold the measuring client's GIL
            ctx = multiprocessing.get_context("fork")
            answers = ctx.Queue()
            go, stop = ctx.Event(), ctx.Event()
            child = ctx.Process(target=_attack_process, args=(make, go, stop, answers), daemon=True)
            child.start()
            go.wait(30)
            time.sleep(0.5)
            c0, t0 = cpu_s(proc.pid), time.monotonic()
            lat = measure(url, window)
            api_cpu = 100 * (cpu_s(proc.pid) - c0) / (time.monotonic() - t0)
            stop.set()
            row = summary(tag + name, lat, idle)
            row["api cpu %"] = api_cpu
            row["attack answers"] = answers.get(timeout=60)
            child.join(30)
            rows.append(row)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--stock", action="store_true", help="also the headers attack on plain uvicorn")
    parser.add_argument("--header-clients", type=int, default=1)
    args = parser.parse_args()
    global HEADER_CLIENTS
    HEADER_CLIENTS = args.header_clients
    run_id = uuid.uuid4().hex[:8]
    db = f"trainyard_stall_{run_id}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    url = admin.url.set(database=db).render_as_string(hide_password=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRAINYARD_DATABASE_URL": url, "TRAINYARD_BROKER_URL": REDIS_URL,
           "TRAINYARD_QUEUE_PREFIX": f"tys-{run_id}-", "TRAINYARD_AUTH": "off",
           "TRAINYARD_DATA_DIR": f"/tmp/trainyard-stall-{run_id}"}
    try:
        subprocess.run([sys.executable, "-m", "client.cli", "migrate"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        rows = run(env, args.window, stock=False)
        if args.stock:
            rows += run(env, args.window, stock=True)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()
    print(f"GET /v1/jobs latency, {args.window:g} s per scenario, {os.cpu_count()} CPUs")
    print(f"{'scenario':<26}{'n':>6}{'median ms':>11}{'p95 ms':>9}{'median x':>10}{'p95 x':>8}{'API CPU %':>11}"
          "  attack answers")
    for r in rows:
        print(f"{r['scenario']:<26}{r['n']:>6}{r['median_ms']:>11.1f}{r['p95_ms']:>9.1f}"
              f"{r.get('median_x', 1.0):>10.2f}{r.get('p95_x', 1.0):>8.2f}{r['api cpu %']:>11.0f}"
              f"  {r.get('attack answers', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
