"""docker-compose.yml, proven without Docker: each service's command and healthcheck runs here
with the compose environment (host names rewritten to 127.0.0.1, the database to a fresh test
database, the data volume to a temporary directory) against the local PostgreSQL and Redis, and
jobs run through them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from client import Client

from .conftest import REDIS_URL, RUN_ID
from .helpers import ROOT, free_port, note_spec, stop, wait_status

COMPOSE = ROOT / "docker-compose.yml"


def _trainyard() -> list[str]:
    script = Path(sys.executable).parent / "trainyard"
    return [str(script)] if script.exists() else [sys.executable, "-m", "client.cli"]


class Rewriter:
    """Maps the compose world onto this machine."""

    def __init__(self, pg_url: str, tmp: Path, api_port: int) -> None:
        self.pg = make_url(pg_url)
        self.redis = make_url(REDIS_URL)
        self.tmp = tmp
        self.api_port = api_port

    def env(self, service: dict[str, Any]) -> dict[str, str]:
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        db = make_url(env["TRAINYARD_DATABASE_URL"])
        assert db.host == "postgres" and db.drivername == "postgresql+psycopg"
        env["TRAINYARD_DATABASE_URL"] = db.set(
            host="127.0.0.1", port=self.pg.port, username=self.pg.username, password=self.pg.password,
            database=self.pg.database,
        ).render_as_string(hide_password=False)
        broker = env["TRAINYARD_BROKER_URL"]
        assert broker.startswith("redis://redis:6379/")
        env["TRAINYARD_BROKER_URL"] = broker.replace("redis://redis:6379", f"redis://{self.redis.host}:{self.redis.port or 6379}")
        assert env["TRAINYARD_DATA_DIR"] == "/data"  # the shared volume
        env["TRAINYARD_DATA_DIR"] = str(self.tmp / "data")
        if "TRAINYARD_WORKER_HEARTBEAT_FILE" in env:
            env["TRAINYARD_WORKER_HEARTBEAT_FILE"] = self.path(env["TRAINYARD_WORKER_HEARTBEAT_FILE"])
        env["TRAINYARD_QUEUE_PREFIX"] = f"ty-{RUN_ID}-compose-"  # isolation from concurrent runs only
        # the compose file's settings only: not a TRAINYARD_* this test process carries (inproc_env's AUTH=off)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
        return {**inherited, "PYTHONPATH": str(ROOT), **env}

    def path(self, p: str) -> str:
        return str(self.tmp / p.lstrip("/").replace("/", "_"))

    def arg(self, a: str) -> str:
        a = a.replace("0.0.0.0", "127.0.0.1").replace("127.0.0.1:8000", f"127.0.0.1:{self.api_port}")
        a = a.replace("/tmp/trainyard-worker-alive", self.path("/tmp/trainyard-worker-alive"))
        return str(self.api_port) if a == "8000" else a

    def command(self, argv: list[str]) -> list[str]:
        head = _trainyard() if argv[0] == "trainyard" else [sys.executable] if argv[0] == "python" else [argv[0]]
        return head + [self.arg(a) for a in argv[1:]]

    def healthcheck(self, service: dict[str, Any]) -> list[str]:
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        return self.command(test[1:])


def _healthy(cmd: list[str], env: dict[str, str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            return
        assert time.monotonic() < deadline, f"healthcheck {cmd} failing: {out.stderr[-2000:]}"
        time.sleep(0.5)


def test_compose_file_shape():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"postgres", "redis", "migrate", "api", "worker-gpu", "worker-cpu"} <= set(services)
    for name, svc in services.items():
        if name != "migrate":
            assert "healthcheck" in svc, name
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker-gpu", "worker-cpu"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "trainyard-data:/data" in services[name]["volumes"]
    assert set(spec["volumes"]) >= {"postgres-data", "redis-data", "trainyard-data"}


def test_compose_services_run_jobs(pg, redis_client, tmp_path):
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    port = free_port()
    rw = Rewriter(pg.create("compose"), tmp_path, port)

    for name, binary in (("postgres", "pg_isready"), ("redis", "redis-cli")):
        if shutil.which(binary):
            cmd = services[name]["healthcheck"]["test"][1:]
            cmd = cmd + (["-h", "127.0.0.1"] if name == "postgres" else [])
            assert subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0, name

    migrate = services["migrate"]
    out = subprocess.run(rw.command(migrate["command"]), env=rw.env(migrate), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    procs: dict[str, subprocess.Popen[Any]] = {}
    try:
        for name in ("api", "worker-gpu", "worker-cpu"):
            svc = services[name]
            log = (tmp_path / f"{name}.log").open("wb")
            procs[name] = subprocess.Popen(rw.command(svc["command"]), env=rw.env(svc), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        for name in ("api", "worker-gpu", "worker-cpu"):
            _healthy(rw.healthcheck(services[name]), rw.env(services[name]), timeout=90)
        # production mode: the API wants a key, made the way an operator would (in the api container)
        key = subprocess.run(rw.command(["trainyard", "keys", "create", "--project", "compose"]),
                             env=rw.env(services["api"]), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert key.returncode == 0, key.stderr
        with Client(f"http://127.0.0.1:{port}") as c:
            assert c._http.get("/v1/jobs").status_code == 401
        with Client(f"http://127.0.0.1:{port}", api_key=key.stdout.strip()) as c:
            cpu_job = c.submit(note_spec(2, name="compose-cpu", device="cpu"))
            auto_job = c.submit(note_spec(2, name="compose-auto"))
            assert cpu_job["queue"].endswith("cpu") and auto_job["queue"].endswith("gpu")
            for job, worker in ((cpu_job, "worker-cpu"), (auto_job, "worker-gpu")):
                done = wait_status(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
                assert done["status"] == "succeeded", (done, (tmp_path / f"{worker}.log").read_text()[-3000:])
                # it ran in that service's process (the CLI execs celery, so the pid is the same)
                assert done["worker"].endswith(f":{procs[worker].pid}"), (done["worker"], worker)
                assert c.best_checkpoint(job["id"])[1]
    finally:
        for p in procs.values():
            stop(p)
    for name, p in procs.items():
        assert p.returncode in (0, -15), f"{name} exited with {p.returncode}"


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="the docker compose plugin is not installed here")
def test_compose_config_is_valid():  # pragma: no cover - only where docker compose exists
    out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
