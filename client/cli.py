"""The ``trainyard`` command line.

Client commands (submit, jobs, show, watch, cancel, download, sweep, sweeps, sweep-cancel, datasets)
talk HTTP through :class:`client.api.Client` (``--url`` / ``$TRAINYARD_URL``); wherever they take
a job or sweep id, any unique prefix of it works (the API resolves it). Server commands (serve,
migrate, api, worker) start processes; they import the server packages lazily, so the client
stays light. What they print is shaped in :mod:`client.views`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from client import views
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


@contextlib.contextmanager
def _live(renderable: Any, refresh_per_second: float) -> Iterator[Any]:
    """A rich live display that leaves its last frame and a newline behind (rich ends one on a
    terminal with a newline, but not one written to a pipe or a file)."""
    from rich.live import Live

    console = _console()
    with Live(renderable, console=console, refresh_per_second=refresh_per_second) as live:
        yield live
    if not console.is_terminal:
        console.line()


def _fail(msg: str, code: int = 1) -> typer.Exit:
    typer.echo(msg, err=True)
    return typer.Exit(code)


_fmt = views.fmt


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
    priority: Annotated[int | None, typer.Option(help="higher starts first among queued jobs of a queue [default: 0]")] = None,
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
                job = c.submit(specs[0][1], idempotency_key=idempotency_key, priority=priority)
                ids.append((specs[0][0], job["id"]))
            else:
                for start in range(0, len(specs), 1000):
                    chunk = specs[start : start + 1000]
                    res = c.submit_batch([s for _, s in chunk], priority=priority)
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
        ended = _wait_with_progress(c, ids)
    for job in ended.values():
        typer.echo(views.outcome(job))
        found = (job.get("info") or {}).get("lr_find")
        if views.is_lr_find(job) and found:
            typer.echo(views.lr_curve(found))
    failed = [j for j, job in ended.items() if job["status"] != "succeeded"]
    raise typer.Exit(1 if failed else (2 if bad else 0))


def _wait_with_progress(c: Client, jobs: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Progress bars (one per job, labelled by its spec file: the ids were printed whole above)
    until every job ends; the ended jobs by id, in submission order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done: dict[str, dict[str, Any]] = {}
    console = _console()
    with Progress(
        TextColumn("{task.fields[job]}"), BarColumn(bar_width=20), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
    ) as progress:
        tasks = {j: progress.add_task("", total=None, job=where, status="queued") for where, j in jobs}
        while len(done) < len(jobs):
            for _, j in jobs:
                if j in done:
                    continue
                job = c.job(j)
                if views.is_lr_find(job):  # no epochs: a spinner-less bar until it ends
                    total, completed, status = 1, int(job["status"] in TERMINAL), f"{job['status']} (lr_find)"
                else:
                    best = views.best_text(job.get("best"))
                    total, completed = job["progress"]["epochs"], job["progress"]["epoch"]
                    status = views.status_text(job) + (f" best {best}" if best != "-" else "")
                progress.update(tasks[j], completed=completed, total=total, status=status)
                if job["status"] in TERMINAL:
                    done[j] = job
            if len(done) < len(jobs):
                time.sleep(0.5)
    if not console.is_terminal:
        console.line()  # as _live: rich leaves a piped display without its newline
    return {j: done[j] for _, j in jobs}


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
    # 80 columns: the id whole; the best value without its monitor and no creation time (ids
    # sort by it; 'trainyard show ID' has both); the name last, wrapped when long
    t = views.table("id", "status", "epoch", "best", "name")
    for j in page["jobs"]:
        t.add_row(j["id"], views.short_status(j), f"{j['progress']['epoch']}/{j['progress']['epochs']}",
                  _fmt((j.get("best") or {}).get("value")), j["name"])
    _console().print(t)


@app.command()
def show(
    job_id: Annotated[str, typer.Argument(help="a job id, or any unique prefix of one")],
    spec: Annotated[bool, typer.Option("--spec", help="also print the job's spec (with its defaults filled in)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the whole job as the API returns it")] = False,
    url: UrlOpt = None,
) -> None:
    """Show a job (status, progress, best, error; lr_find: suggested rate and curve); --spec adds its spec.

    Any unique prefix of a job id works."""
    try:
        with _client(url) as c:
            job = c.job(job_id)
    except TrainyardError as exc:
        raise _fail(f"trainyard: {exc}") from None
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    lines = views.job_lines(job)
    if spec:
        lines += ["", "spec", json.dumps(job["spec"], indent=2)]
    typer.echo("\n".join(lines))


#: how many of the latest epochs ``watch`` keeps on screen
WATCH_ROWS = 20


@app.command()
def watch(
    job_id: Annotated[str, typer.Argument(help="a job id, or any unique prefix of one")],
    rows_shown: Annotated[int, typer.Option("--rows", min=1, help="how many of the latest epochs to show")] = WATCH_ROWS,
    url: UrlOpt = None,
) -> None:
    """Follow a job's epochs live; at the end one line: how it ended, its best value.

    Shows the last --rows epochs (and says so when there are more); an lr_find job ends with the
    suggested rate and the curve. Exit status 0 only if the job succeeded."""
    from rich.console import Group
    from rich.text import Text

    cols: list[str] = []
    rows: list[dict[str, Any]] = []
    state = {"status": "?"}

    def render() -> Any:
        head = Text(f"job {job_id}: {state['status']}")
        if not rows:
            return head
        hidden = len(rows) - rows_shown
        t = views.table(*cols, ids=(), caption=f"the last {rows_shown} of {len(rows)} epochs" if hidden > 0 else None)
        for r in rows[-rows_shown:]:
            t.add_row(*(_fmt(r.get(k)) for k in cols))
        return Group(head, t)

    try:
        with _client(url) as c:
            with _live(render(), 4) as live:
                for ev in c.events(job_id):
                    if ev.get("event") == "epoch":
                        data = ev["data"]
                        for k in data:
                            if k not in cols:
                                cols.append(k)
                        rows.append(data)
                    elif ev.get("event") == "state":
                        state["status"] = ev["data"].get("status", state["status"])
                    live.update(render())
            job = c.job(job_id)
    except TrainyardError as exc:
        raise _fail(f"trainyard: {exc}") from None
    typer.echo(views.outcome(job))
    found = (job.get("info") or {}).get("lr_find")
    if views.is_lr_find(job) and found:
        typer.echo(views.lr_curve(found))
    raise typer.Exit(0 if job["status"] == "succeeded" else 1)


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


class _SweepGroup(TyperGroup):
    """``trainyard sweep FILE`` starts a sweep (as it always did); ``sweep show ID``,
    ``sweep cancel ID`` and ``sweep list`` are subcommands: an argument that names none of them
    is the FILE of ``sweep start``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


sweep_app = typer.Typer(cls=_SweepGroup, no_args_is_help=True,
                        help="Sweeps: 'sweep FILE [--wait]' starts one; 'sweep show ID', 'sweep cancel ID', 'sweep list'.")
app.add_typer(sweep_app, name="sweep")


@sweep_app.command("start")
def sweep_start(
    file: Annotated[Path, typer.Argument(help="a JSON sweep: {name, base, method, parameters, objective, ...}")],
    wait: Annotated[bool, typer.Option("--wait", help="follow the sweep with a live leaderboard until it ends")] = False,
    url: UrlOpt = None,
) -> None:
    """Start a hyperparameter sweep (also: trainyard sweep FILE).

    Exit status: 0 when accepted (with --wait: when it succeeded)."""
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
        with _live(views.leaderboard(sw), 2) as live:
            while sw["status"] == "running":
                time.sleep(1.0)
                try:
                    sw = c.sweep(sw["id"])
                except TrainyardError as exc:
                    raise _fail(f"trainyard: {exc}") from None
                live.update(views.leaderboard(sw))
    _best_line(sw)
    raise typer.Exit(0 if sw["status"] == "succeeded" else 1)


def _best_line(sw: dict[str, Any]) -> None:
    best = sw.get("best_trial")
    if best:
        typer.echo(f"best: trial {best['number']} (job {best['job_id']}) {sw['objective']['metric']}={_fmt(best['value'], 6)} "
                   f"params {json.dumps(best['params'])}")


@sweep_app.command("show")
def sweep_show(
    sweep_id: Annotated[str, typer.Argument(help="a sweep id, or any unique prefix of one")],
    as_json: Annotated[bool, typer.Option("--json", help="the whole sweep as the API returns it")] = False,
    url: UrlOpt = None,
) -> None:
    """Show a sweep: status, objective, best trial (its job id whole) and the leaderboard."""
    try:
        with _client(url) as c:
            sw = c.sweep(sweep_id)
    except TrainyardError as exc:
        raise _fail(f"trainyard: {exc}") from None
    if as_json:
        typer.echo(json.dumps(sw, indent=2))
        return
    typer.echo("\n".join(views.sweep_lines(sw)))
    _console().print(views.leaderboard(sw))


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
    t = views.table("id", "name", "method", "status", "trials", "best", "created")
    for s in page["sweeps"]:
        t.add_row(s["id"], s["name"], s["method"], s["status"], f"{s['trials_created']}/{s['max_trials']}",
                  f"{s['objective']['metric']}={_fmt(s.get('best_value'))}", views.when(s["created_at"]))
    _console().print(t)


sweep_app.command("list", help="List sweeps, newest first (as 'trainyard sweeps').")(sweeps)


@app.command("sweep-cancel")
@sweep_app.command("cancel")
def sweep_cancel(
    sweep_id: Annotated[str, typer.Argument(help="a sweep id, or any unique prefix of one")], url: UrlOpt = None
) -> None:
    """Cancel a sweep: no new trials; its queued and running trials are cancelled."""
    try:
        with _client(url) as c:
            sw = c.cancel_sweep(sweep_id)
    except TrainyardError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{sw['id']}  {sw['status']}")


datasets_app = typer.Typer(no_args_is_help=True, help="Upload datasets (.npz with arrays x and y, or .csv) and list them.")
app.add_typer(datasets_app, name="datasets")


@datasets_app.command("upload")
def datasets_upload(
    file: Annotated[Path, typer.Argument(help=".npz with arrays x and y, or .csv with a header row", exists=True,
                                         dir_okay=False)],
    name: Annotated[str | None, typer.Option("--name", help="what specs call it in data.dataset [default: the file name]")] = None,
    target: Annotated[str | None, typer.Option("--target", help="csv: target column name or 0-based index [default: last]")] = None,
    url: UrlOpt = None,
) -> None:
    """Upload a dataset; a spec names it in data.dataset by its id or its (unique) name."""
    try:
        with _client(url) as c:
            ds = c.upload_dataset(file, name=name, target=target)
    except TrainyardError as exc:
        raise _fail(f"{file}: {exc}", 2) from None
    shape = "x".join(str(d) for d in ds["input_shape"])
    what = f"{ds['n_classes']} classes" if ds["task"] == "classification" else f"{ds['n_targets']} target(s)"
    typer.echo(f"{ds['id']}  {ds['name']}  ({ds['task']}, {ds['n_samples']} samples of {shape}, {what})")


@datasets_app.command("list")
def datasets_list(as_json: Annotated[bool, typer.Option("--json")] = False, url: UrlOpt = None) -> None:
    """List the stored datasets, newest first."""
    try:
        with _client(url) as c:
            rows = c.datasets()
    except TrainyardError as exc:
        raise _fail(f"trainyard: {exc}") from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    # 80 columns: the id whole; the task as its classes or targets; no creation time (ids sort by it)
    t = views.table("id", "name", "samples", "shape", "task")
    for d in rows:
        task = f"{d['n_classes']} classes" if d["task"] == "classification" else f"{d['n_targets']} targets"
        t.add_row(d["id"], d["name"], str(d["n_samples"]), "x".join(str(v) for v in d["input_shape"]), task)
    _console().print(t)


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
