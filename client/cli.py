"""The ``trainyard`` command line.

Client commands (submit, jobs, show, watch, cancel, download, sweep, sweeps, sweep-cancel, datasets)
talk HTTP through :class:`client.api.Client` (``--url`` / ``$TRAINYARD_URL``); wherever they take
a job or sweep id, any unique prefix of it works (the API resolves it). The server's commands
(serve, api, worker, migrate, keys, projects) live in :mod:`server.cli`; :func:`main` adds them
when the command line runs, so importing the client never loads them. What the commands print is
shaped in :mod:`client.views`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import click
import httpx
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


def _load_specs(paths: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    """(where, spec) of every spec in ``paths``: files, and directories (their ``*.json`` files, sorted)."""
    specs = []
    files = [f for p in paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
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
    files: Annotated[list[Path], typer.Argument(help="JSON spec files (a spec, a list of specs, or {'jobs': [...]}) "
                                                     "or directories of them")],
    wait: Annotated[bool, typer.Option("--wait", help="follow the jobs until they end: a progress bar and a summary "
                                       "table on a terminal, a line per ended job otherwise")] = False,
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
            else:  # batches of 1,000, each with an Idempotency-Key: a retried batch makes nothing twice
                for item in c.submit_many([s for _, s in specs], batch_size=1000, priority=priority):
                    where = specs[item["index"]][0]
                    if item["id"]:
                        ids.append((where, item["id"]))
                    else:
                        bad += 1
                        typer.echo(f"{where}: invalid: {format_detail(item['errors'])}", err=True)
        except TrainyardError as exc:
            raise _fail(f"{specs[0][0] if len(specs) == 1 else 'batch'}: {exc}", 2) from None
        except httpx.HTTPError as exc:
            raise _fail(f"trainyard: the server at {c.url} cannot be reached: {exc}", 2) from None
        for where, job_id in ids:
            typer.echo(f"{job_id}  {where}")
        if not wait:
            raise typer.Exit(2 if bad else 0)
        kinds = {where: spec.get("kind") if isinstance(spec, dict) else None for where, spec in specs}
        lr_find = {job_id for where, job_id in ids if kinds.get(where) == "lr_find"}
        ended = _wait_with_progress(c, ids, lr_find)
    failed = [j for j, job in ended.items() if job["status"] != "succeeded"]
    raise typer.Exit(1 if failed else (2 if bad else 0))


#: running jobs shown on the live line of ``submit --wait`` (the rest are counted)
LIVE_RUNNING = 4


def _ended_line(c: Client, job: dict[str, Any], lr_find: set[str]) -> None:
    """How one job ended, as a line (and an lr_find job's curve: its full record is fetched)."""
    if job["id"] in lr_find:
        try:
            job = c.job(job["id"])
        except (TrainyardError, httpx.HTTPError):
            pass
    typer.echo(views.outcome(job))
    found = (job.get("info") or {}).get("lr_find")
    if views.is_lr_find(job) and found:
        typer.echo(views.lr_curve(found))


def _wait_with_progress(c: Client, jobs: list[tuple[str, str]], lr_find: set[str]) -> dict[str, dict[str, Any]]:
    """Follow the jobs until every one ends (:meth:`Client.wait`: one ``POST /v1/jobs/query`` per cycle for
    up to 10,000 unfinished jobs; a 429 or a dropped connection is waited out). On a terminal: one
    overall progress bar with the counts by status and a live line for a few running jobs, then a
    summary table. Otherwise: a line per job as it ends, then the counts. The ended jobs by id,
    in submission order."""
    from rich.console import Group
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    console = _console()
    ids = [j for _, j in jobs]
    printed: set[str] = set()
    if not console.is_terminal:
        def on_update(latest: dict[str, dict[str, Any]]) -> None:
            for j in ids:
                job = latest.get(j)
                if job is not None and job["status"] in TERMINAL and j not in printed:
                    printed.add(j)
                    _ended_line(c, job, lr_find)

        ended: dict[str, dict[str, Any]] = c.wait(ids, on_update=on_update)
        typer.echo(views.counts_line(ended.values()))
        return ended

    progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                        TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=console)
    task = progress.add_task("ended", total=len(ids), counts="")
    running = Text("")
    with _live(Group(progress, running), refresh_per_second=4) as live:
        def on_update(latest: dict[str, dict[str, Any]]) -> None:
            rows = [latest[j] for j in ids if j in latest]
            progress.update(task, completed=sum(r["status"] in TERMINAL for r in rows),
                            counts=views.counts_line(rows))
            running.plain = views.running_line([r for r in rows if r["status"] == "running"], LIVE_RUNNING)
            live.refresh()

        ended = c.wait(ids, on_update=on_update)
    console.print(views.summary_table(list(ended.values())))
    for j in lr_find:
        _ended_line(c, ended[j], lr_find)
    return ended


@app.command()
def jobs(
    status: Annotated[list[str] | None, typer.Option("--status", help="filter; repeat for several")] = None,
    name: Annotated[str | None, typer.Option(help="filter by exact name")] = None,
    name_prefix: Annotated[str | None, typer.Option(help="names starting so")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="key=value; repeat to require several")] = None,
    stop_reason: Annotated[list[str] | None, typer.Option("--stop-reason", help="filter; repeat for several")] = None,
    sweep: Annotated[str | None, typer.Option("--sweep", help="only the trials of this sweep")] = None,
    order_by: Annotated[str, typer.Option(help="created (newest first), updated, best (smallest first)")] = "created",
    limit: Annotated[int, typer.Option(help="how many, at most (pages are fetched as needed)")] = 20,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
    as_json: Annotated[bool, typer.Option("--json", help="as --output json")] = False,
    url: UrlOpt = None,
) -> None:
    """List jobs with the API's filters (newest first unless --order-by says otherwise)."""
    if output not in ("table", "json"):
        raise _fail(f"--output must be table or json, not {output!r}", 2)
    filters = {"status": status, "name": name, "name_prefix": name_prefix, "label": label,
               "stop_reason": stop_reason, "sweep_id": sweep, "order_by": order_by}
    try:
        with _client(url) as c:
            found = list(itertools.islice(c.iter_jobs(page_size=min(max(limit, 1), 500), **filters), limit))
    except TrainyardError as exc:
        raise _fail(f"trainyard: {exc}") from None
    except httpx.HTTPError as exc:
        raise _fail(f"trainyard: the server cannot be reached: {exc}") from None
    if as_json or output == "json":
        typer.echo(json.dumps({"jobs": found}, indent=2))
        return
    # 80 columns: the id whole; the best value without its monitor and no creation time (ids
    # sort by it; 'trainyard show ID' has both); the name last, wrapped when long
    t = views.table("id", "status", "epoch", "best", "name")
    for j in found:
        t.add_row(j["id"], views.short_status(j), f"{j['progress']['epoch']}/{j['progress']['epochs']}",
                  _fmt((j.get("best") or {}).get("value")), j["name"])
    _console().print(t)


@app.command()
def metrics(
    job_ids: Annotated[list[str], typer.Argument(help="job ids (whole: the bulk endpoint takes no prefixes)")],
    csv_out: Annotated[bool, typer.Option("--csv", help="CSV on stdout: job_id, epoch, then one column per metric")] = False,
    keys: Annotated[list[str] | None, typer.Option("--key", help="only this metric; repeat for several")] = None,
    url: UrlOpt = None,
) -> None:
    """The metrics of one or many jobs (one bulk request per 1,000 jobs): a table per job, or CSV."""
    try:
        with _client(url) as c:
            curves = c.metrics_of(job_ids, keys=keys)
    except TrainyardError as exc:
        raise _fail(f"trainyard: {exc}") from None
    except httpx.HTTPError as exc:
        raise _fail(f"trainyard: the server cannot be reached: {exc}") from None
    columns = views.metric_columns(curves)
    if csv_out:
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["job_id", *columns])
        for job_id, epochs in curves.items():
            for e in epochs:
                w.writerow([job_id, *(e.get(k, "") for k in columns)])
        return
    console = _console()
    for job_id, epochs in curves.items():
        t = views.table(*columns, ids=(), title=job_id)
        for e in epochs:
            t.add_row(*(_fmt(e.get(k)) for k in columns))
        console.print(t)


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


def main() -> None:
    """Console-script entry point (``trainyard``): the client's commands and the server's
    (:mod:`server.cli`, added here so that importing the client never loads them)."""
    import httpx

    from server.cli import register

    register(app)
    try:
        app()
    except httpx.TransportError as exc:
        url = exc.request.url if getattr(exc, "_request", None) is not None else "the server"
        typer.echo(f"trainyard: cannot reach {url}: {exc} (is the server running? see --url / TRAINYARD_URL)", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
