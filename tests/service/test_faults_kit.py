"""Process-level tools of the fault-tolerance tests and of ``bench/chaos.py`` (no tests here):
private PostgreSQL and Redis servers that a test may stop and restart (the shared ones on the
usual ports are never touched), worker processes, and probes of a job's rows."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from store import repo
from store.db import make_engine
from store.models import Job, JobEvent, JobMetric

from .servers import missing_servers, pg_bin, redis_server

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout} s")
        time.sleep(every)


class PrivateRedis:
    """A throw-away redis-server on its own port (no persistence: a restart loses every key,
    as a crashed Redis without AOF does)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        binary = redis_server()
        assert binary is not None, missing_servers()
        self.proc = subprocess.Popen(
            [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        def up() -> bool:
            try:
                return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
            except redis.RedisError:
                return False

        wait_until(up, 20, f"redis on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (initdb in a temporary directory, run as the ``postgres``
    user) on its own port, with its socket in its data directory."""

    def __init__(self) -> None:
        binary = pg_bin()
        assert binary is not None, missing_servers()
        self.bin = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ty-pg-"))
        self.data = self.dir / "data"
        shutil.chown(self.dir, "postgres", "postgres")

    def _as_postgres(self, *argv: str, timeout: float = 120) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/trainyard"

    def start(self) -> PrivatePostgres:
        if not self.data.exists():
            self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                              "--no-sync", "-E", "UTF8")
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.dir / "server.log"), "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} -c fsync=off",
            "start",
        )
        return self

    def create_database(self) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres", isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(text("CREATE DATABASE trainyard"))
        engine.dispose()
        return self.url

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is dropped, the server comes back."""
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "-l", str(self.dir / "server.log"),
            "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} -c fsync=off",
            "restart",
        )

    def bounce(self, down_s: float) -> None:
        """Stop the server (fast: every connection dropped), stay down ``down_s``, start it again."""
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        try:
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def service_env(database_url: str, broker_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a worker or API process of a fault test."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "TRAINYARD_DATABASE_URL": database_url,
        "TRAINYARD_BROKER_URL": broker_url,
        "TRAINYARD_DATA_DIR": str(data_dir),
        "TRAINYARD_QUEUE_PREFIX": f"tyf-{uuid.uuid4().hex[:8]}-",
        "TRAINYARD_AUTH": "off",
        "OMP_NUM_THREADS": "1",
    }
    env.update(extra)
    return env


def start_worker(env: dict[str, str], log: Path, name: str, *, concurrency: int = 1, pool: str | None = None,
                 wait: bool = True) -> subprocess.Popen[Any]:
    """``trainyard worker`` on the cpu queue (solo pool unless ``concurrency`` > 1 or ``pool``)."""
    argv = [sys.executable, "-m", "client.cli", "worker", "--queues", "cpu", "--concurrency", str(concurrency),
            "--name", name]
    if pool:
        argv += ["--pool", pool]
    with log.open("ab") as f:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if wait:
        wait_for_ready(log, proc)
    return proc


def wait_for_ready(log: Path, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        return log.exists() and " ready." in log.read_text(errors="replace")

    wait_until(ready, timeout, f"worker ready ({log})", every=0.2)


def kill(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGKILL) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tiny_spec(name: str = "tiny", epochs: int = 1, **over: Any) -> dict[str, Any]:
    """A job of well under a second on one CPU core (digits, one small hidden layer)."""
    spec: dict[str, Any] = {
        "name": name, "seed": 7, "device": "cpu",
        "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 128, "standardize": True},
        "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}, {"type": "dense", "units": 10}]},
        "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
        "optimizer": {"name": "adam", "learning_rate": 0.01}, "epochs": epochs,
    }
    spec.update(over)
    return spec


class Probe:
    """Reads a job's rows from a database (any URL), with its own small engine."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = make_engine(url, pool_size=2, max_overflow=2) if not url.startswith("sqlite") else make_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def create(self, spec: dict[str, Any], queue: str) -> str:
        """Insert a queued job (and its outbox row) as the API does."""
        from training import validate_spec

        valid = validate_spec(spec).model_dump(mode="json")
        with Session(self.engine) as s:
            job = repo.create_job(s, spec=valid, queue=queue)
            s.commit()
            return job.id

    def job(self, job_id: str) -> Job:
        with Session(self.engine, expire_on_commit=False) as s:
            job = s.get(Job, job_id)
            assert job is not None
            s.expunge(job)
            return job

    def try_job(self, job_id: str) -> Job | None:
        try:
            return self.job(job_id)
        except Exception:  # noqa: BLE001 - the database may be restarting
            return None

    def events(self, job_id: str) -> list[JobEvent]:
        with Session(self.engine) as s:
            rows = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
            for r in rows:
                s.expunge(r)
            return rows

    def metric_epochs(self, job_id: str) -> list[int]:
        with Session(self.engine) as s:
            return list(s.scalars(select(JobMetric.epoch).where(JobMetric.job_id == job_id).order_by(JobMetric.epoch)))

    def runs(self, job_id: str) -> list[list[int]]:
        """The epochs each attempt reported (epoch events between 'running' state events)."""
        out: list[list[int]] = []
        for e in self.events(job_id):
            if e.kind == "state" and e.data.get("status") == "running":
                out.append([])
            elif e.kind == "epoch" and out:
                out[-1].append(int(e.data["epoch"]))
        return out

    def starts(self, job_id: str) -> int:
        return sum(1 for e in self.events(job_id) if e.kind == "state" and e.data.get("status") == "running")

    def wait_status(self, job_id: str, statuses: tuple[str, ...], timeout: float) -> Job:
        return wait_until(
            lambda: (j := self.try_job(job_id)) is not None and j.status in statuses and j,
            timeout, f"job {job_id} in {statuses}",
        )


def send(settings: Any, jobs: list[tuple[str, str]]) -> None:
    """Send jobs' messages as the API does (after their rows are committed)."""
    from api.dispatch import Dispatcher

    Dispatcher(settings).send(jobs)


def slow_spec(name: str = "slow", epochs: int = 30, **over: Any) -> dict[str, Any]:
    """Epochs of 180 small steps (batch 8, 256 units; ~0.07 s per epoch on one core of this VM in
    2026-12, 0.2-0.3 s before): a job of many epochs is long enough to kill a worker or restart a
    server in the middle of it."""
    spec = tiny_spec(name, epochs,
                     data={"dataset": "digits", "validation_split": 0.2, "batch_size": 8, "standardize": True},
                     model={"layers": [{"type": "dense", "units": 256, "activation": "relu"}, {"type": "dense", "units": 10}]})
    spec.update(over)
    return spec
