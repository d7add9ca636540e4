"""Fixtures of the service tests: a fresh PostgreSQL database per session (created and dropped
here), Redis with a per-session queue/key prefix, the schema built by ``trainyard migrate``, and a
real API process and Celery worker process. Nothing is mocked."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from client import Client

from .helpers import ROOT, free_port, stop, wait_for_log, wait_http

PG_URL = os.environ.get("TRAINYARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:10]


def pytest_configure(config: pytest.Config) -> None:
    # starlette's TestClient asks for httpx2, which is not a dependency here
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")


class PgDatabases:
    """Creates uniquely named databases on the test server and drops them at the end."""

    def __init__(self) -> None:
        self.admin = make_url(PG_URL)
        self.engine = create_engine(self.admin, isolation_level="AUTOCOMMIT")
        self.names: list[str] = []

    def create(self, tag: str) -> str:
        name = f"trainyard_test_{RUN_ID}_{tag}"
        with self.engine.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        return self.admin.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.engine.connect() as c:
            for name in self.names:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()


@pytest.fixture(scope="session")
def pg() -> Iterator[PgDatabases]:
    dbs = PgDatabases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def pg_url(pg: PgDatabases) -> str:
    """The session's PostgreSQL database (empty until ``migrated``)."""
    return pg.create("main")


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    for key in client.scan_iter(match=f"ty-{RUN_ID}-*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's artifact store (a directory): the API and worker processes and the tests'
    in-process code share it, as an API and its workers share one store in production."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def service_env(pg_url: str, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory,
                artifacts_dir: Path) -> dict[str, str]:
    """Environment of the session's API and worker processes."""
    data_dir = tmp_path_factory.mktemp("trainyard-data")
    return {
        **os.environ,
        "TRAINYARD_ARTIFACTS_URL": str(artifacts_dir),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "TRAINYARD_DATABASE_URL": pg_url,
        "TRAINYARD_BROKER_URL": REDIS_URL,
        "TRAINYARD_DATA_DIR": str(data_dir),
        "TRAINYARD_QUEUE_PREFIX": f"ty-{RUN_ID}-",
        # the shared API process runs keyless (every caller in the default project); the key and
        # project tests build their own apps with auth required (tests/service/test_auth.py)
        "TRAINYARD_AUTH": "off",
        # the session's worker runs every job alone: the scheduling, recovery and fault tests
        # are about solo runs (packed jobs have their own service in tests/service/test_packing.py)
        "TRAINYARD_PACK": "0",
        **WEBHOOK_KNOBS,
    }


#: webhook deliveries retried within seconds, not minutes, by every API the tests start
WEBHOOK_KNOBS = {"TRAINYARD_WEBHOOK_POLL_S": "0.2", "TRAINYARD_WEBHOOK_RETRY_BASE_S": "0.2",
                 "TRAINYARD_WEBHOOK_RETRY_MAX_S": "2", "TRAINYARD_WEBHOOK_TIMEOUT_S": "5",
                 "TRAINYARD_WEBHOOK_LEASE_S": "5"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "client.cli", *args]


@pytest.fixture(scope="session")
def migrated(service_env: dict[str, str]) -> None:
    """The schema, built by ``trainyard migrate`` (Alembic), never by create_all."""
    out = subprocess.run(cli("migrate"), env=service_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "database at head" in out.stdout


@pytest.fixture(scope="session")
def api_url(service_env: dict[str, str], migrated: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real API process (``trainyard api``)."""
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "api.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(cli("api", "--port", str(port)), env=service_env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def worker_proc(service_env: dict[str, str], migrated: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[Any]]:
    """A real Celery worker process (``trainyard worker``) consuming the session's gpu and cpu queues."""
    log: Path = tmp_path_factory.mktemp("logs") / "worker.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(cli("worker", "--queues", "gpu,cpu", "--name", f"ty-{RUN_ID}"), env=service_env,
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_log(log, " ready.", proc)
        yield proc
    finally:
        stop(proc)


@pytest.fixture()
def client(api_url: str, worker_proc: subprocess.Popen[Any]) -> Iterator[Client]:
    """A client of the live service (API + worker)."""
    with Client(api_url) as c:
        yield c


@pytest.fixture(scope="session")
def inproc_env(pg_url: str, migrated: None, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory,
               artifacts_dir: Path) -> Iterator[dict[str, str]]:
    """Point this process's settings at the session database and artifact store, with a queue
    prefix no worker consumes (so tests can inspect what was enqueued)."""
    from store.db import reset_caches

    env = {
        "TRAINYARD_ARTIFACTS_URL": str(artifacts_dir),
        "TRAINYARD_DATABASE_URL": pg_url,
        "TRAINYARD_BROKER_URL": REDIS_URL,
        "TRAINYARD_DATA_DIR": str(tmp_path_factory.mktemp("inproc-data")),
        "TRAINYARD_QUEUE_PREFIX": f"ty-{RUN_ID}-inproc-",
        "TRAINYARD_AUTH": "off",
        "TRAINYARD_GC_FREEZE": "0",  # apps built in the test process leave its garbage collector alone
        **WEBHOOK_KNOBS,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_caches()
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_caches()


@pytest.fixture(scope="session")
def app_client(inproc_env: dict[str, str]) -> Iterator[Any]:
    """httpx against the ASGI app in this process (real database and broker)."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app()) as c:
        yield c
