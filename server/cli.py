"""The server's commands of the ``trainyard`` command line: ``serve`` (the API and workers under
one supervisor, ``_supervise_restarting``), ``api``, ``worker``, ``migrate``, and the admin commands
``keys`` and ``projects``, which work on the database directly.

They live with the server, apart from :mod:`client` (what a batch script imports): the
``trainyard`` entry point (``client.cli:main``) adds them to its command line when it runs
(:func:`register`); ``import client`` does not load them. They import the server packages lazily,
so ``trainyard --help`` and the client commands stay light.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from client import views
from client.cli import _console, _fail

#: the server's commands; :func:`register` adds them to the ``trainyard`` command line
app = typer.Typer()


def register(cli: typer.Typer) -> None:
    """Add the server's commands (and command groups) to ``cli``."""
    cli.registered_commands.extend(app.registered_commands)
    cli.registered_groups.extend(app.registered_groups)


# --------------------------------------------------------------------------- server commands


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _celery_worker_argv(queues: list[str], concurrency: int, pool: str | None, loglevel: str, hostname: str) -> list[str]:
    pool = pool or ("solo" if concurrency == 1 else "prefork")
    return _python(
        "-m", "celery", "-A", "worker.main", "worker", "-Q", ",".join(queues), "--concurrency", str(concurrency),
        "--pool", pool, "--loglevel", loglevel, "-n", hostname, "--without-gossip", "--without-mingle",
        "--without-heartbeat",
    )


def _settings(env: dict[str, str] | None = None) -> Any:
    """The server's settings (from ``env``, default the environment and ``.env``); a bad
    ``TRAINYARD_*`` value stops the command here, with a message naming the variable."""
    from config.settings import SettingsError, settings_from_env

    try:
        return settings_from_env(env)
    except SettingsError as exc:
        raise _fail(f"trainyard: {exc}", 2) from None


@app.command()
def migrate() -> None:
    """Bring the database ($TRAINYARD_DATABASE_URL) to the newest schema (Alembic head)."""
    from store.migrate import upgrade

    url = _settings().database_url
    upgrade(url)
    typer.echo(f"database at head: {_redact(url)}")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url


@app.command()
def api(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Run the HTTP API (uvicorn) against $TRAINYARD_DATABASE_URL and $TRAINYARD_BROKER_URL.
    Every /v1 request needs an API key ('trainyard keys create') unless TRAINYARD_AUTH=off."""
    import logging

    from config.logs import configure_logging

    settings = _settings()
    configure_logging(settings, "api")  # the banner in the API's own format (text or JSON lines)
    logging.getLogger("trainyard.api").warning(
        "TRAINYARD_AUTH=off: no API keys; every caller is in the default project" if settings.auth == "off" else
        "API keys required (create one with 'trainyard keys create --project NAME')")
    argv = _python("-m", "api.server", "--host", host, "--port", str(port),  # uvicorn, bounded heads
                   "--workers", str(workers), "--no-access-log")
    os.execv(argv[0], argv)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated: gpu, cpu (every worker also takes the 'any' queue of "
                                              "device 'auto' jobs)")] = "gpu,cpu",
    concurrency: Annotated[int, typer.Option(help="jobs at a time per process (keep 1 per GPU)")] = 1,
    gpus: Annotated[str | None, typer.Option(help="e.g. 0,1: one worker process per GPU (CUDA_VISIBLE_DEVICES)")] = None,
    pool: Annotated[str | None, typer.Option(help="celery pool [default: solo for 1, else prefork]")] = None,
    loglevel: Annotated[str | None, typer.Option(help="[default: $TRAINYARD_LOG_LEVEL, INFO]")] = None,
    name: Annotated[str, typer.Option(help="worker name prefix")] = "trainyard",
) -> None:
    """Run a Celery worker for the given queues and the 'any' queue (names get $TRAINYARD_QUEUE_PREFIX)."""
    settings = _settings()
    prefix, loglevel = settings.queue_prefix, loglevel or settings.log_level
    names = list(dict.fromkeys([q.strip() for q in queues.split(",") if q.strip()] + ["any"]))
    qs = [prefix + q for q in names]
    bad = [q for q in queues.split(",") if q.strip() not in ("gpu", "cpu", "any")]
    if bad:
        raise _fail(f"unknown queue(s) {', '.join(bad)}; use gpu and/or cpu", 2)
    devices = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else []
    if gpus:
        problem = _missing_gpus(devices)
        if problem:
            raise _fail(f"trainyard: --gpus {gpus}: {problem}", 2)
    if not gpus:
        argv = _celery_worker_argv(qs, concurrency, pool, loglevel, f"{name}@%h")
        os.execv(argv[0], argv)
    children = {
        f"gpu{g}": (_celery_worker_argv(qs, concurrency, pool, loglevel, f"{name}-gpu{g}@%h"),
                    {**os.environ, "CUDA_VISIBLE_DEVICES": g})
        for g in devices
    }
    raise typer.Exit(_supervise_restarting(children))


#: Test-only: a number of GPUs that ``--gpus`` validation believes this machine has, instead of
#: asking PyTorch (CPU-only CI tests the one-process-per-GPU supervisor with fake device lists).
#: Honoured only together with TRAINYARD_TEST_FAULTS=1, which only the test suite sets.
FAKE_GPUS_ENV = "TRAINYARD_TEST_FAKE_GPUS"


def _missing_gpus(wanted: list[str]) -> str | None:
    """Why the CUDA devices ``wanted`` (indices, or GPU-... UUIDs) cannot be used here, or None."""
    if not wanted:
        return "give GPU indices, e.g. --gpus 0,1"
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake is not None and os.environ.get("TRAINYARD_TEST_FAULTS") == "1":
        count = int(fake)
        cuda_build = True
    else:
        import torch  # only for --gpus: the worker imports it anyway

        count = torch.cuda.device_count()
        cuda_build = bool(torch.version.cuda)
    if count == 0:
        return ("this machine has no CUDA GPU that PyTorch can use"
                + ("" if cuda_build else " (this PyTorch is a CPU-only build)")
                + "; run a CPU worker instead: trainyard worker --queues cpu")
    missing = [g for g in wanted if g.isdigit() and int(g) >= count]
    if missing:
        return f"no GPU {', '.join(missing)} here: this machine has {count} (0-{count - 1})"
    return None


#: a child given a restart recipe is restarted at most this many times a minute, then all stop
RESTARTS_PER_MINUTE = 5


def _supervise(procs: dict[str, subprocess.Popen[Any]], grace: float = 30.0,
               restart: dict[str, Any] | None = None) -> int:
    """Wait for children; on SIGINT/SIGTERM (or one child dying) stop them all, SIGTERM first.
    A child named in ``restart`` (name -> a function starting a new one) is started again when it
    dies (a worker killed by the OOM killer, say), up to RESTARTS_PER_MINUTE times a minute."""
    restart = restart or {}
    restarts: list[float] = []
    stop = {"flag": False}

    def handler(_signum: int, _frame: Any) -> None:
        stop["flag"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while not stop["flag"]:
            dead = [n for n, p in procs.items() if p.poll() is not None]
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60]
            if dead and all(n in restart for n in dead) and len(restarts) + len(dead) <= RESTARTS_PER_MINUTE:
                for n in dead:
                    typer.echo(f"trainyard: {n} exited with status {procs[n].returncode}; starting a new one", err=True)
                    procs[n] = restart[n]()
                    restarts.append(now)
                continue
            if dead:
                typer.echo(f"trainyard: {', '.join(dead)} exited; stopping", err=True)
                code = 1
                break
            time.sleep(0.2)
    finally:
        _stop_all(procs, grace)
        for s, h in old.items():
            signal.signal(s, h)
    return code


def _supervise_restarting(children: dict[str, tuple[list[str], dict[str, str]]], grace: float = 30.0) -> int:
    """Run one process per entry of ``children`` (name -> (argv, env)) and restart any that dies,
    after a back-off (1 s, doubling to 60 s; back to 1 s once a child has run for 5 minutes), so a
    GPU whose process crashed (native error, OOM-kill) gets a worker again while the others keep
    training; a job the dead child was running is requeued by the lease (RELIABILITY.md). SIGINT or
    SIGTERM stops them all (SIGTERM first: each requeues its running job); exit status 0."""
    stop = {"flag": False}

    def handler(_signum: int, _frame: Any) -> None:
        stop["flag"] = True

    def start(name: str) -> subprocess.Popen[Any]:
        argv, env = children[name]
        proc = subprocess.Popen(argv, env=env)
        typer.echo(f"trainyard: started {name} (pid {proc.pid}, CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')})",
                   err=True)
        return proc

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: dict[str, subprocess.Popen[Any]] = {}
    started: dict[str, float] = {}
    backoff = {name: 1.0 for name in children}
    due: dict[str, float] = {}  # name -> when to restart it
    try:
        for name in children:
            procs[name] = start(name)
            started[name] = time.monotonic()
        while not stop["flag"]:
            now = time.monotonic()
            for name, p in list(procs.items()):
                if name in due or p.poll() is None:
                    continue
                if now - started[name] > 300:
                    backoff[name] = 1.0
                due[name] = now + backoff[name]
                typer.echo(f"trainyard: {name} (pid {p.pid}) exited with status {p.returncode}; restarting it in "
                           f"{backoff[name]:.0f} s", err=True)
                backoff[name] = min(60.0, backoff[name] * 2)
            for name, when in list(due.items()):
                if now >= when:
                    del due[name]
                    procs[name] = start(name)
                    started[name] = time.monotonic()
            time.sleep(0.2)
    finally:
        _stop_all(procs, grace)
        for s, h in old.items():
            signal.signal(s, h)
    return 0


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    data_dir: Annotated[Path, typer.Option(help="database, broker and datasets live here")] = Path("./trainyard-data"),
    auth: Annotated[bool, typer.Option("--auth", help="require API keys (trainyard keys create), as 'trainyard api' does")] = False,
) -> None:
    """Run everything in one process tree: the API, one worker, SQLite (WAL) and an embedded
    broker (kombu's SQLAlchemy transport over SQLite). Ctrl-C stops it all. Without --auth there
    are no API keys (every caller is in the default project), so it serves only on a loopback host."""
    if not auth and host not in ("127.0.0.1", "localhost", "::1"):
        raise _fail(f"trainyard: serving on {host} without API keys would let anyone on the network in; "
                    "add --auth (and create a key with 'trainyard keys create') or use --host 127.0.0.1", 2)
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "TRAINYARD_DATA_DIR": str(data_dir),
        "TRAINYARD_DATABASE_URL": f"sqlite:///{data_dir / 'trainyard.db'}",
        "TRAINYARD_BROKER_URL": f"sqla+sqlite:///{data_dir / 'broker.sqlite'}",
        "TRAINYARD_AUTH": "required" if auth else "off",
    }
    prefix = _settings(env).queue_prefix
    if not _port_free(host, port):
        raise _fail(f"trainyard: port {port} is in use on {host}; use --port to pick another", 1)
    from config.settings import BASE_QUEUES
    from store.migrate import upgrade

    upgrade(env["TRAINYARD_DATABASE_URL"])
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    worker_log = (log_dir / "worker.log").open("ab")
    token = secrets.token_hex(16)

    def start_worker() -> subprocess.Popen[Any]:
        return subprocess.Popen(
            _celery_worker_argv([prefix + q for q in BASE_QUEUES], 1, "solo", "INFO", "trainyard-serve@%h"),
            env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    procs = {
        "worker": start_worker(),
        "api": subprocess.Popen(
            _python("-m", "api.server", "--host", host, "--port", str(port), "--log-level", "warning"),
            env={**env, "TRAINYARD_INSTANCE_TOKEN": token}, start_new_session=True,
        ),
    }
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    problem = _wait_healthy(base, procs, 60, token)
    if problem is not None:
        if procs["api"].poll() is not None and not _port_free(host, port):
            problem = f"port {port} is in use on {host}; use --port to pick another"
        _stop_all(procs)
        raise _fail(f"trainyard: the service did not start: {problem}", 1)
    typer.echo(f"Trainyard is running at {base}  (dashboard: {base}/ui, API docs: {base}/docs)")
    typer.echo(f"data: {data_dir}  worker log: {log_dir / 'worker.log'}  - press Ctrl-C to stop")
    if auth:
        typer.echo(f"API keys required: TRAINYARD_DATABASE_URL={env['TRAINYARD_DATABASE_URL']} "
                   "trainyard keys create --project NAME")
    else:
        typer.echo(f"no API keys (embedded mode on {host}): every caller is in the default project; "
                   "--auth requires keys")
    raise typer.Exit(_supervise(procs, restart={"worker": start_worker}))


def _port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (nothing else listens there)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _stop_all(procs: dict[str, subprocess.Popen[Any]], grace: float = 30.0) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_healthy(base: str, procs: dict[str, subprocess.Popen[Any]], timeout: float, token: str) -> str | None:
    """None once OUR API child answers /healthz (it echoes ``token``), else what went wrong."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [f"{n} exited with status {p.returncode}" for n, p in procs.items() if p.poll() is not None]
        if dead:
            return "; ".join(dead)
        try:
            r = httpx.get(f"{base}/healthz", timeout=1)
            if r.status_code == 200 and r.headers.get("x-trainyard-instance") == token:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return f"{base}/healthz did not answer within {timeout:.0f} s"


# --------------------------------------------------------------------------- API keys (admin)

keys_app = typer.Typer(help="Create, list and revoke API keys (talks to $TRAINYARD_DATABASE_URL directly).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _require_database() -> None:
    """The admin commands work on the API's own database: name it clearly when it is missing or
    empty, rather than create an empty SQLite file and fail with "no such table"."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    from config.settings import get_settings
    from store.db import get_engine

    if "--help" in sys.argv[1:]:
        return
    url = get_settings().database_url
    parsed = make_url(url)
    unset = "" if os.environ.get("TRAINYARD_DATABASE_URL") else " (TRAINYARD_DATABASE_URL is not set)"
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        raise _fail(f"trainyard: no database at {parsed.database}{unset}; set TRAINYARD_DATABASE_URL to the API's "
                    "database (or create this one with 'trainyard migrate')", 2)
    try:
        has_schema = inspect(get_engine()).has_table("api_keys")
    except Exception as exc:  # noqa: BLE001 - any connection failure is reported as such
        raise _fail(f"trainyard: cannot open the database {_redact(url)}{unset}: {exc}", 2) from None
    if not has_schema:
        raise _fail(f"trainyard: the database {_redact(url)} has no Trainyard tables{unset}; "
                    "run 'trainyard migrate' or point TRAINYARD_DATABASE_URL at the API's database", 2)


keys_app.callback()(_require_database)


def _when(dt: Any) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt is not None else "-"


@keys_app.command("create")
def keys_create(
    project: Annotated[str, typer.Option("--project", help="the key's project (created if missing)")],
    name: Annotated[str | None, typer.Option("--name", help="a label for the key")] = None,
) -> None:
    """Make an API key for a project and print it. It is shown only this once: only its sha256 is stored."""
    from store import auth
    from store.db import session_scope

    try:
        with session_scope(write=True) as session:
            key = auth.create_key(session, project, name)
    except ValueError as exc:
        raise _fail(f"trainyard: {exc}", 2) from None
    typer.echo(key.token)
    typer.echo(f"key {key.id} (prefix {key.prefix}) for project {key.project_name!r}: store it now, it is not "
               "shown again; send it as 'Authorization: Bearer <key>' or set TRAINYARD_API_KEY", err=True)


@keys_app.command("list")
def keys_list(
    project: Annotated[str | None, typer.Option("--project", help="only this project's keys")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List keys: id, prefix, project, name, created, last used, revoked (never the key itself)."""
    from store import auth
    from store.db import session_scope

    with session_scope(write=False) as session:
        rows = [
            {"id": k.id, "prefix": k.prefix, "project": pname, "name": k.name,
             "created_at": auth.as_utc(k.created_at), "last_used_at": auth.as_utc(k.last_used_at),
             "revoked_at": auth.as_utc(k.revoked_at)}
            for k, pname in auth.list_keys(session, project)
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=lambda d: d.isoformat()))
        return
    # 80 columns: the id and the prefix whole (revoke takes either), the three times stacked
    t = views.table("id", "prefix", "project / name", "created / used / revoked", ids=("id", "prefix"))
    for r in rows:
        t.add_row(r["id"], r["prefix"], f"{r['project']}\n{r['name'] or '-'}",
                  "\n".join(_when(r[k])[:16] for k in ("created_at", "last_used_at", "revoked_at")))
    _console().print(t)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="the key's id, or its prefix as 'keys list' shows it")],
) -> None:
    """Revoke a key; requests with it are refused (401) from the next one on."""
    from store import auth
    from store.db import session_scope

    with session_scope(write=True) as session:
        found = auth.find_keys(session, key)
        if not found:
            raise _fail(f"trainyard: no API key with id or prefix {key!r}", 1)
        if len(found) > 1:
            raise _fail(f"trainyard: {key!r} matches {len(found)} keys ({', '.join(k.prefix for k in found)}); "
                        "give the key id", 2)
        revoked = auth.revoke_key(session, found[0].id)
    typer.echo(f"{found[0].id}  {found[0].prefix}…  " + ("revoked" if revoked else "was already revoked"))


projects_app = typer.Typer(help="Per-project limits and fair-share weights (talks to $TRAINYARD_DATABASE_URL directly).",
                           no_args_is_help=True)
app.add_typer(projects_app, name="projects")
projects_app.callback()(_require_database)


@projects_app.command("set-limits")
def projects_set_limits(
    project: Annotated[str, typer.Argument(help="project name (created if missing)")],
    max_concurrent_jobs: Annotated[int | None, typer.Option(min=0, help="queued + running jobs; 0: unlimited")] = None,
    requests_per_minute: Annotated[int | None, typer.Option(min=0, help="0: unlimited")] = None,
) -> None:
    """Set a project's own limits; an option left out keeps its value, and with no option at all
    both go back to the service's defaults (TRAINYARD_MAX_CONCURRENT_JOBS, TRAINYARD_REQUESTS_PER_MINUTE)."""
    from store import auth
    from store.db import session_scope

    given = {k: v for k, v in (("max_concurrent_jobs", max_concurrent_jobs),
                               ("requests_per_minute", requests_per_minute)) if v is not None}
    try:
        with session_scope(write=True) as session:
            row = auth.ensure_project(session, project)
            # no option at all: both back to the defaults; otherwise only the options given change
            auth.set_project_limits(session, row.id, **(given or {"max_concurrent_jobs": None, "requests_per_minute": None}))
            session.refresh(row)
            shown = {"max_concurrent_jobs": row.max_concurrent_jobs, "requests_per_minute": row.requests_per_minute}
    except ValueError as exc:
        raise _fail(f"trainyard: {exc}", 2) from None
    typer.echo(f"{project}: " + ", ".join(f"{k}={'default' if v is None else v}" for k, v in shown.items()))


@projects_app.command("set-weight")
def projects_set_weight(
    project: Annotated[str, typer.Argument(help="project name (created if missing)")],
    weight: Annotated[float, typer.Argument(help="fair-share weight, > 0 (default 1)")],
) -> None:
    """Set a project's fair-share weight: when projects compete for a queue's workers, each receives
    worker time in proportion to its weight (README "Scheduler")."""
    from store import auth
    from store.db import session_scope

    try:
        with session_scope(write=True) as session:
            row = auth.ensure_project(session, project)
            auth.set_project_weight(session, row.id, weight)
    except ValueError as exc:
        raise _fail(f"trainyard: {exc}", 2) from None
    typer.echo(f"{project}: weight={weight:g}")
