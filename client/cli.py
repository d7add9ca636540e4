"""The ``trainyard`` command line.

Client commands (submit, jobs, show, watch, cancel, download, sweep, sweeps, sweep-cancel) talk HTTP through
:class:`client.api.Client` (``--url`` / ``$TRAINYARD_URL``). Server commands (serve, migrate,
api, worker) start processes; they import the server packages lazily, so the client stays light.
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

from client.api import TERMINAL, Client, TrainyardError, format_detail

app = typer.Typer(help="Trainyard: submit, follow and fetch training jobs; run the service.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

UrlOpt = Annotated[str | None, typer.Option("--url", envvar="TRAINYARD_URL", help="API base URL [default: http://127.0.0.1:8000]")]


@app.callback()
def _options(
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="TRAINYARD_API_KEY", show_envvar=True,
        help="API key sent as 'Authorization: Bearer <key>' by the client commands")] = None,
) -> None:
    if api_key:
        os.environ["TRAINYARD_API_KEY"] = api_key  # what Client reads (this process only)


def _client(url: str | None) -> Client:
    return Client(url)


def _console() -> Any:
    from rich.console import Console

    return Console()


def _fail(msg: str, code: int = 1) -> typer.Exit:
    typer.echo(msg, err=True)
    return typer.Exit(code)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


# --------------------------------------------------------------------------- client commands


def _load_specs(files: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise _fail(f"{f}: cannot read a JSON spec: {exc}", 2) from None
        items = doc.get("jobs") if isinstance(doc, dict) and "jobs" in doc and "model" not in doc else doc
        if isinstance(items, list):
            specs += [(f"{f}[{i}]", s) for i, s in enumerate(items)]
        else:
            specs.append((str(f), items))
    return specs


@app.command()
def submit(
    files: Annotated[list[Path], typer.Argument(help="JSON spec files (a spec, a list of specs, or {'jobs': [...]})")],
    wait: Annotated[bool, typer.Option("--wait", help="follow the jobs with progress bars until they end")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="single spec only: submit at most once per key")] = None,
    url: UrlOpt = None,
) -> None:
    """Submit job specs. Exit status: 0 when all were accepted (and, with --wait, succeeded)."""
    specs = _load_specs(files)
    if idempotency_key and len(specs) != 1:
        raise _fail("--idempotency-key needs exactly one spec", 2)
    ids: list[tuple[str, str]] = []
    bad = 0
    with _client(url) as c:
        try:
            if len(specs) == 1:
                job = c.submit(specs[0][1], idempotency_key=idempotency_key)
                ids.append((specs[0][0], job["id"]))
            else:
                for start in range(0, len(specs), 1000):
                    chunk = specs[start : start + 1000]
                    res = c.submit_batch([s for _, s in chunk])
                    for item in res["results"]:
                        where = chunk[item["index"]][0]
                        if item["id"]:
                            ids.append((where, item["id"]))
                        else:
                            bad += 1
                            typer.echo(f"{where}: invalid: {format_detail(item['errors'])}", err=True)
        except TrainyardError as exc:
            raise _fail(f"{specs[0][0] if len(specs) == 1 else 'batch'}: {exc}", 2) from None
        for where, job_id in ids:
            typer.echo(f"{job_id}  {where}")
        if not wait:
            raise typer.Exit(2 if bad else 0)
        statuses = _wait_with_progress(c, [j for _, j in ids])
    failed = [j for j, st in statuses.items() if st != "succeeded"]
    raise typer.Exit(1 if failed else (2 if bad else 0))


def _wait_with_progress(c: Client, job_ids: list[str]) -> dict[str, str]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done: dict[str, str] = {}
    with Progress(
        TextColumn("{task.fields[job]}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=_console(),
    ) as progress:
        tasks = {j: progress.add_task("", total=None, job=f"{j[:12]}…", status="queued") for j in job_ids}
        while len(done) < len(job_ids):
            for j in job_ids:
                if j in done:
                    continue
                job = c.job(j)
                best = job.get("best") or {}
                extra = f" best {best.get('monitor')}={_fmt(best.get('value'))}" if best.get("monitor") else ""
                status = job["status"] + (f" ({job['stop_reason']})" if job.get("stop_reason") else "") + extra
                progress.update(tasks[j], completed=job["progress"]["epoch"], total=job["progress"]["epochs"],
                                status=status if not job.get("error") else f"{status}: {job['error'][:80]}")
                if job["status"] in TERMINAL:
                    done[j] = job["status"]
            if len(done) < len(job_ids):
                time.sleep(0.5)
    return done


@app.command()
def jobs(
    status: Annotated[list[str] | None, typer.Option("--status", help="filter; repeat for several")] = None,
    name: Annotated[str | None, typer.Option(help="filter by exact name")] = None,
    limit: Annotated[int, typer.Option(help="how many (newest first)")] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    url: UrlOpt = None,
) -> None:
    """List jobs, newest first."""
    try:
        with _client(url) as c:
            page = c.jobs(status=status, name=name, limit=limit)
    except TrainyardError as exc:
        raise _fail(f"trainyard: {exc}") from None
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    from rich.table import Table

    t = Table("id", "name", "status", "epoch", "best", "created")
    for j in page["jobs"]:
        best = j.get("best") or {}
        t.add_row(j["id"], j["name"], j["status"] + (f" ({j['stop_reason']})" if j.get("stop_reason") else ""),
                  f"{j['progress']['epoch']}/{j['progress']['epochs']}",
                  f"{best.get('monitor')}={_fmt(best.get('value'))}" if best.get("monitor") else "-", j["created_at"][:19])
    _console().print(t)


@app.command()
def show(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False, url: UrlOpt = None) -> None:
    """Show a job (status, progress, best, error, spec)."""
    try:
        with _client(url) as c:
            job = c.job(job_id)
    except TrainyardError as exc:
        raise _fail(f"trainyard: {exc}") from None
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    best = job.get("best") or {}
    lines = [
        f"id          {job['id']}", f"name        {job['name']}",
        f"status      {job['status']}" + (f" ({job['stop_reason']})" if job.get("stop_reason") else ""),
        f"progress    {job['progress']['epoch']}/{job['progress']['epochs']} epochs",
        f"best        {best.get('monitor')} = {_fmt(best.get('value'), 6)} at epoch {best.get('epoch')}" if best else "best        -",
        f"attempts    {job['attempts']}", f"created     {job['created_at']}",
        f"started     {job.get('started_at') or '-'}", f"finished    {job.get('finished_at') or '-'}",
    ]
    if job.get("error"):
        lines.append(f"error       {job['error']}")
    typer.echo("\n".join(lines))


@app.command()
def watch(job_id: str, url: UrlOpt = None) -> None:
    """Follow a job's epochs live until it ends (exit 0 only if it succeeded)."""
    from rich.live import Live
    from rich.table import Table

    cols: list[str] = []
    rows: list[dict[str, Any]] = []
    final = "?"

    def render() -> Table:
        t = Table(*(cols or ["epoch"]), title=f"job {job_id}: {final}")
        for r in rows[-30:]:
            t.add_row(*(_fmt(r.get(k)) for k in cols))
        return t

    try:
        with _client(url) as c, Live(render(), console=_console(), refresh_per_second=4) as live:
            for ev in c.events(job_id):
                if ev.get("event") == "epoch":
                    data = ev["data"]
                    for k in data:
                        if k not in cols:
                            cols.append(k)
                    rows.append(data)
                elif ev.get("event") == "state":
                    final = ev["data"].get("status", final)
                    if ev["data"].get("error"):
                        final += f": {ev['data']['error']}"
                live.update(render())
    except TrainyardError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(0 if final == "succeeded" else 1)


@app.command()
def cancel(job_id: str, url: UrlOpt = None) -> None:
    """Cancel a job (a queued one never starts; a running one stops within about a second)."""
    try:
        with _client(url) as c:
            job = c.cancel(job_id)
    except TrainyardError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{job['id']}  {job['status']}" + ("  (cancel requested)" if job["status"] == "running" else ""))


@app.command()
def download(
    job_id: str,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="file to write [default: CHECKPOINT.safetensors]")] = None,
    checkpoint: Annotated[str, typer.Option(help="best, last (the last epoch's weights) or an epoch number")] = "best",
    url: UrlOpt = None,
) -> None:
    """Download a job's checkpoint (.safetensors; the best by default), verifying its sha256."""
    output = output or Path(f"{checkpoint}.safetensors")
    try:
        with _client(url) as c:
            data, digest = c.checkpoint(job_id, checkpoint)
            output.write_bytes(data)
    except TrainyardError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{output}  sha256 {digest}")


@app.command("export")
def export_model(
    job_id: str,
    format: Annotated[str, typer.Option("--format", "-f", help="torchscript, onnx or keras")] = "onnx",
    checkpoint: Annotated[str, typer.Option(help="best, last or an epoch number")] = "best",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="file to write [default: JOB-CHECKPOINT.EXT]")] = None,
    url: UrlOpt = None,
) -> None:
    """Export a job's model (raw inputs in, probabilities or values out), verifying its sha256."""
    ext = {"torchscript": "pt", "onnx": "onnx", "keras": "keras"}.get(format)
    if ext is None:
        raise _fail(f"--format must be torchscript, onnx or keras, not {format!r}")
    path = output or Path(f"{job_id}-{checkpoint}.{ext}")
    try:
        with _client(url) as c:
            digest = c.download_export(job_id, format, path, checkpoint=checkpoint)
    except TrainyardError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{path}  sha256 {digest}")


def _leaderboard_table(sweep: dict[str, Any], top: int = 15) -> Any:
    from rich.table import Table

    counts = sweep["counts"]
    obj = sweep["objective"]
    title = (
        f"sweep {sweep['name']} ({sweep['id'][:12]}…): {sweep['status']}"
        + (f" - {sweep['error']}" if sweep.get("error") else "")
        + f"  |  {counts['total']}/{sweep['max_trials']} trials: {counts['running']} running, {counts['queued']} queued, "
        f"{counts['succeeded']} done ({counts['pruned']} pruned), {counts['failed']} failed, {counts['cancelled']} cancelled"
    )
    names = list(sweep["config"].get("parameters", {}))
    t = Table("#", "trial", f"{obj['metric']} ({obj['mode']})", "epochs", "status", *names, title=title)
    shown = sweep["leaderboard"][:top]
    shown_ids = {r["job_id"] for r in shown}
    live = [r for r in sweep["trials"] if r["status"] in ("running", "queued") and r["job_id"] not in shown_ids]
    for rank, r in enumerate(shown + live, 1):
        status = r["status"] + (f" ({r['stop_reason']})" if r.get("stop_reason") and r["stop_reason"] != "completed" else "")
        t.add_row(
            str(rank) if r in shown else "", str(r["number"]), _fmt(r.get("value")), f"{r['epochs_run']}/{r['epochs']}",
            status, *(_fmt(r["params"].get(n)) for n in names),
        )
    return t


@app.command()
def sweep(
    file: Annotated[Path, typer.Argument(help="a JSON sweep: {name, base, method, parameters, objective, ...}")],
    wait: Annotated[bool, typer.Option("--wait", help="follow the sweep with a live leaderboard until it ends")] = False,
    url: UrlOpt = None,
) -> None:
    """Start a hyperparameter sweep. Exit status: 0 when accepted (with --wait: when it succeeded)."""
    try:
        body = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise _fail(f"{file}: cannot read a JSON sweep: {exc}", 2) from None
    with _client(url) as c:
        try:
            sw = c.create_sweep(body)
        except TrainyardError as exc:
            raise _fail(f"{file}: {exc}", 2) from None
        typer.echo(f"{sw['id']}  {file}  ({sw['method']}, up to {sw['max_trials']} trials)")
        if not wait:
            raise typer.Exit(0)
        from rich.live import Live

        with Live(_leaderboard_table(sw), console=_console(), refresh_per_second=2) as live:
            while sw["status"] == "running":
                time.sleep(1.0)
                try:
                    sw = c.sweep(sw["id"])
                except TrainyardError as exc:
                    raise _fail(f"trainyard: {exc}") from None
                live.update(_leaderboard_table(sw))
    best = sw.get("best_trial")
    if best:
        typer.echo(f"best: trial {best['number']} (job {best['job_id']}) {sw['objective']['metric']}={_fmt(best['value'], 6)} "
                   f"params {json.dumps(best['params'])}")
    raise typer.Exit(0 if sw["status"] == "succeeded" else 1)


@app.command()
def sweeps(
    limit: Annotated[int, typer.Option(help="how many (newest first)")] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    url: UrlOpt = None,
) -> None:
    """List sweeps, newest first."""
    try:
        with _client(url) as c:
            page = c.sweeps(limit=limit)
    except TrainyardError as exc:
        raise _fail(f"trainyard: {exc}") from None
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    from rich.table import Table

    t = Table("id", "name", "method", "status", "trials", "best", "created")
    for s in page["sweeps"]:
        t.add_row(s["id"], s["name"], s["method"], s["status"], f"{s['trials_created']}/{s['max_trials']}",
                  f"{s['objective']['metric']}={_fmt(s.get('best_value'))}", s["created_at"][:19])
    _console().print(t)


@app.command("sweep-cancel")
def sweep_cancel(sweep_id: str, url: UrlOpt = None) -> None:
    """Cancel a sweep: no new trials; its queued and running trials are cancelled."""
    try:
        with _client(url) as c:
            sw = c.cancel_sweep(sweep_id)
    except TrainyardError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{sw['id']}  {sw['status']}")


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
    if _settings().auth == "off":
        typer.echo("trainyard: TRAINYARD_AUTH=off: no API keys; every caller is in the default project", err=True)
    else:
        typer.echo("trainyard: API keys required (create one with 'trainyard keys create --project NAME')", err=True)
    argv = _python("-m", "uvicorn", "api.app:create_app", "--factory", "--host", host, "--port", str(port),
                   "--workers", str(workers), "--no-access-log")
    os.execv(argv[0], argv)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated: gpu, cpu")] = "gpu,cpu",
    concurrency: Annotated[int, typer.Option(help="jobs at a time per process (keep 1 per GPU)")] = 1,
    gpus: Annotated[str | None, typer.Option(help="e.g. 0,1: one worker process per GPU (CUDA_VISIBLE_DEVICES)")] = None,
    pool: Annotated[str | None, typer.Option(help="celery pool [default: solo for 1, else prefork]")] = None,
    loglevel: Annotated[str, typer.Option()] = "INFO",
    name: Annotated[str, typer.Option(help="worker name prefix")] = "trainyard",
) -> None:
    """Run a Celery worker for the given queues (names get $TRAINYARD_QUEUE_PREFIX)."""
    prefix = _settings().queue_prefix
    qs = [prefix + q.strip() for q in queues.split(",") if q.strip()]
    bad = [q for q in queues.split(",") if q.strip() not in ("gpu", "cpu")]
    if bad:
        raise _fail(f"unknown queue(s) {', '.join(bad)}; use gpu and/or cpu", 2)
    if not gpus:
        argv = _celery_worker_argv(qs, concurrency, pool, loglevel, f"{name}@%h")
        os.execv(argv[0], argv)
    procs = []
    for g in [g.strip() for g in gpus.split(",") if g.strip()]:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": g}
        procs.append(subprocess.Popen(_celery_worker_argv(qs, concurrency, pool, loglevel, f"{name}-gpu{g}@%h"), env=env))
    raise typer.Exit(_supervise({f"gpu{i}": p for i, p in enumerate(procs)}))


def _supervise(procs: dict[str, subprocess.Popen[Any]], grace: float = 30.0) -> int:
    """Wait for children; on SIGINT/SIGTERM (or one child dying) stop them all, SIGTERM first."""
    stop = {"flag": False}

    def handler(_signum: int, _frame: Any) -> None:
        stop["flag"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while not stop["flag"]:
            dead = [n for n, p in procs.items() if p.poll() is not None]
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
    from store.migrate import upgrade

    upgrade(env["TRAINYARD_DATABASE_URL"])
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    worker_log = (log_dir / "worker.log").open("ab")
    token = secrets.token_hex(16)
    procs = {
        "worker": subprocess.Popen(
            _celery_worker_argv([prefix + "gpu", prefix + "cpu"], 1, "solo", "INFO", "trainyard-serve@%h"),
            env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
        ),
        "api": subprocess.Popen(
            _python("-m", "uvicorn", "api.app:create_app", "--factory", "--host", host, "--port", str(port),
                    "--log-level", "warning"),
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
    typer.echo(f"Trainyard is running at {base}  (API docs: {base}/docs)")
    typer.echo(f"data: {data_dir}  worker log: {log_dir / 'worker.log'}  - press Ctrl-C to stop")
    if auth:
        typer.echo(f"API keys required: TRAINYARD_DATABASE_URL={env['TRAINYARD_DATABASE_URL']} "
                   "trainyard keys create --project NAME")
    else:
        typer.echo(f"no API keys (embedded mode on {host}): every caller is in the default project; "
                   "--auth requires keys")
    raise typer.Exit(_supervise(procs))


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
    from rich.table import Column, Table

    t = Table(Column("id", overflow="fold"), Column("prefix", no_wrap=True), "project", "name", "created",
              "last used", "revoked")
    for r in rows:
        t.add_row(r["id"], r["prefix"] + "…", r["project"], r["name"] or "-", _when(r["created_at"]),
                  _when(r["last_used_at"]), _when(r["revoked_at"]))
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


projects_app = typer.Typer(help="Per-project limits (talks to $TRAINYARD_DATABASE_URL directly).",
                           no_args_is_help=True)
app.add_typer(projects_app, name="projects")


@projects_app.command("set-limits")
def projects_set_limits(
    project: Annotated[str, typer.Argument(help="project name (created if missing)")],
    max_concurrent_jobs: Annotated[int | None, typer.Option(min=0, help="queued + running jobs; 0: unlimited")] = None,
    requests_per_minute: Annotated[int | None, typer.Option(min=0, help="0: unlimited")] = None,
) -> None:
    """Set a project's own limits; an option left out means the service's default
    (TRAINYARD_MAX_CONCURRENT_JOBS, TRAINYARD_REQUESTS_PER_MINUTE)."""
    from store import auth
    from store.db import session_scope

    try:
        with session_scope(write=True) as session:
            pid = auth.ensure_project(session, project).id
            auth.set_project_limits(session, pid, max_concurrent_jobs=max_concurrent_jobs,
                                    requests_per_minute=requests_per_minute)
    except ValueError as exc:
        raise _fail(f"trainyard: {exc}", 2) from None
    shown = {"max_concurrent_jobs": max_concurrent_jobs, "requests_per_minute": requests_per_minute}
    typer.echo(f"{project}: " + ", ".join(f"{k}={'default' if v is None else v}" for k, v in shown.items()))


def main() -> None:
    """Console-script entry point (``trainyard``)."""
    import httpx

    try:
        app()
    except httpx.TransportError as exc:
        url = exc.request.url if getattr(exc, "_request", None) is not None else "the server"
        typer.echo(f"trainyard: cannot reach {url}: {exc} (is the server running? see --url / TRAINYARD_URL)", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
