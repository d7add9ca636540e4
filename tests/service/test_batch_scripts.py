"""Batch scripts against the live stack (API, PostgreSQL, Redis, a worker): ``Client.wait(ids)``
follows many jobs with one request per cycle (``POST /v1/jobs/query``, 1,200 jobs too), ``metrics(ids)`` goes through the bulk
endpoint (and into a DataFrame), the CLI's ``submit DIR --wait`` / ``jobs --output`` / ``metrics
--csv``, and examples/grid_batch.py (200 jobs) runs as written."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from client import Client

from .conftest import cli
from .helpers import ROOT, note_spec


def test_wait_follows_many_jobs_with_one_request_per_cycle_and_metrics_in_bulk(client: Client):
    name = f"wait-{uuid.uuid4().hex[:8]}"
    made = client.submit_many([note_spec(2, name=name, seed=s) for s in range(4)])
    ids = [r["id"] for r in made]
    sent: list[str] = []
    cycles: list[int] = []
    client._http.event_hooks["request"].append(lambda req: sent.append(f"{req.method} {req.url.path}"))
    ended = client.wait(ids, poll=0.3, timeout=300, on_update=lambda latest: cycles.append(len(latest)))
    assert list(ended) == ids and {j["status"] for j in ended.values()} == {"succeeded"}
    assert len(cycles) >= 1 and sent == ["POST /v1/jobs/query"] * len(cycles)  # never GET /v1/jobs/{id}
    assert client.wait(ids[0])["id"] == ids[0]  # one id: the job itself

    sent.clear()
    curves = client.metrics(ids)
    assert sent == ["POST /v1/metrics/bulk"]
    assert list(curves) == ids and all([e["epoch"] for e in curves[j]] == [1, 2] for j in ids)
    assert curves[ids[0]] == client.metrics(ids[0])  # the same numbers as the one-job route
    frame = client.metrics(ids, frame=True)
    assert len(frame) == 8 and set(frame["job_id"]) == set(ids) and {"epoch", "loss", "val_loss"} <= set(frame.columns)
    assert frame["loss"].dtype.kind == "f"


def _ended_jobs(n: int) -> list[str]:
    """``n`` jobs of the default project, made and cancelled straight in the session's database
    (in one transaction, their dispatch messages dropped): cheap jobs that have ended."""
    from sqlalchemy import delete

    from store import repo
    from store.db import session_scope
    from store.models import Outbox

    with session_scope() as s:
        ids = [j.id for j in repo.create_jobs(s, [(note_spec(1, name="ended"), "cpu", None)] * n)]
        s.execute(delete(Outbox).where(Outbox.job_id.in_(ids)))
        assert all(repo.request_cancel(s, j) == "cancelled" for j in ids)
    return ids


def test_wait_follows_1200_jobs_with_one_request_per_cycle(client: Client, inproc_env: dict[str, str]):
    """More jobs than ``GET /v1/jobs?id=`` takes (500): each cycle is still one request, carrying
    only the unfinished ids (all 1,202 first, then the two that run)."""
    ended = _ended_jobs(1200)
    running = [r["id"] for r in client.submit_many([note_spec(2, name=f"wait-many-{s}", seed=s) for s in range(2)])]
    ids = ended[:600] + running + ended[600:]
    asked: list[int] = []
    client._http.event_hooks["request"].append(
        lambda req: asked.append(len(json.loads(req.content)["ids"]) if req.url.path == "/v1/jobs/query" else -1))
    got = client.wait(ids, poll=0.3, timeout=300)
    assert list(got) == ids
    assert [got[j]["status"] for j in running] == ["succeeded"] * 2
    assert {got[j]["status"] for j in ended} == {"cancelled"}
    assert asked[0] == 1202 and len(asked) >= 2 and set(asked[1:]) <= {1, 2}  # one request a cycle, never GET


def test_the_job_query_answers_many_ids_in_order_and_lists_the_missing(app_client, inproc_env: dict[str, str]):
    ids = _ended_jobs(700)
    unknown = [uuid.uuid4().hex for _ in range(3)]
    asked = [unknown[0], *ids[::-1], unknown[1], ids[0], unknown[2]]  # a repeat is answered once
    r = app_client.post("/v1/jobs/query", json={"ids": asked})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [j["id"] for j in body["jobs"]] == ids[::-1] and body["missing"] == unknown
    assert body["jobs"][0] == app_client.get("/v1/jobs", params={"id": ids[-1]}).json()["jobs"][0]  # the list's view
    # bad bodies: 422 naming the JSON path
    too_many = app_client.post("/v1/jobs/query", json={"ids": [uuid.uuid4().hex for _ in range(10_001)]})
    assert too_many.status_code == 422 and too_many.json()["errors"][0]["path"] == "ids", too_many.text
    for bad, path in (({"ids": [ids[0], 5]}, "ids[1]"), ({"ids": [ids[0], "X" * 32]}, "ids[1]"), ({"ids": []}, "ids"),
                      ({}, "ids"), ({"ids": ids[:1], "other": 1}, "other")):
        r = app_client.post("/v1/jobs/query", json=bad)
        assert r.status_code == 422 and [e["path"] for e in r.json()["errors"]] == [path], (bad, r.text)


def _run(service_env: dict[str, str], api_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**service_env, "TRAINYARD_URL": api_url, "COLUMNS": "100"}
    return subprocess.run(cli(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_submit_a_directory_wait_list_and_metrics_csv(client: Client, service_env: dict[str, str],
                                                           api_url: str, tmp_path: Path):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    specs = tmp_path / "specs"
    specs.mkdir()
    for i in range(3):
        (specs / f"{i}.json").write_text(json.dumps(note_spec(2, name=name, seed=i)))
    (specs / "3-gpu.json").write_text(json.dumps(note_spec(1, name=name, device="cuda")))  # fails on a CPU worker
    out = _run(service_env, api_url, "submit", str(specs), "--wait")
    assert out.returncode == 1, out.stdout + out.stderr  # one failed
    assert "Traceback" not in out.stderr
    ids = [line.split()[0] for line in out.stdout.splitlines()[:4]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), out.stdout
    # without a terminal: a line per ended job (each once), then the counts
    ended = [line for line in out.stdout.splitlines() if re.match(r"^[0-9a-f]{32} (succeeded|failed)", line)]
    assert sorted(line.split()[0] for line in ended) == sorted(ids), out.stdout
    assert out.stdout.rstrip().splitlines()[-1] == "3 succeeded, 1 failed"

    listed = _run(service_env, api_url, "jobs", "--name", name, "--status", "succeeded", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["jobs"]
    assert sorted(j["id"] for j in rows) == sorted(ids[:3])
    table = _run(service_env, api_url, "jobs", "--name", name, "--stop-reason", "error")
    assert table.returncode == 0 and ids[3] in table.stdout and ids[0] not in table.stdout
    bad = _run(service_env, api_url, "jobs", "--output", "yaml")
    assert bad.returncode == 2 and "table or json" in bad.stderr

    got = _run(service_env, api_url, "metrics", *ids[:3], "--csv")
    assert got.returncode == 0, got.stderr
    parsed = list(csv.DictReader(io.StringIO(got.stdout)))
    assert len(parsed) == 6 and {r["job_id"] for r in parsed} == set(ids[:3])
    first = [r for r in parsed if r["job_id"] == ids[0]]
    assert [float(r["val_loss"]) for r in first] == [e["val_loss"] for e in client.metrics(ids[0])]
    unknown = _run(service_env, api_url, "metrics", "0" * 32)
    assert unknown.returncode == 1 and "no job" in unknown.stderr and "Traceback" not in unknown.stderr


def test_the_grid_example_submits_200_jobs_waits_and_prints_a_table(client: Client, service_env: dict[str, str],
                                                                      api_url: str):
    script = ROOT / "examples" / "grid_batch.py"
    assert len(script.read_text().splitlines()) < 30
    env = {**service_env, "TRAINYARD_URL": api_url, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script), "1"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "submitted 200 of 200 jobs" and lines[1].split()[:3] == ["job", "status", "val_loss"]
    rows = lines[2:12]
    assert all(re.match(r"^[0-9a-f]{32}  succeeded ", r) for r in rows), out.stdout
    values = [float(r.split()[2]) for r in rows]
    assert values == sorted(values)
    assert lines[-1] == "200 succeeded"
    best: Any = client.job(rows[0].split()[0])
    assert abs(float(best["best"]["value"]) - values[0]) < 1e-4
    assert os.path.basename(script) in (ROOT / "README.md").read_text()


def _run_on_a_terminal(service_env: dict[str, str], api_url: str, *args: str) -> tuple[int, str]:
    """The CLI with its stdout on a pseudo-terminal (rich draws its live display there)."""
    import pty
    import select

    master, slave = pty.openpty()
    env = {**service_env, "TRAINYARD_URL": api_url, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen(cli(*args), env=env, cwd=ROOT, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_cli_submit_wait_on_a_terminal_draws_one_bar_then_a_summary_table(client: Client, service_env: dict[str, str],
                                                                          api_url: str, tmp_path: Path):
    name = f"tty-{uuid.uuid4().hex[:8]}"
    specs = [note_spec(2, name=name, seed=i) for i in range(5)] + [note_spec(1, name=name, device="cuda")]
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    code, text = _run_on_a_terminal(service_env, api_url, "submit", str(path), "--wait")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert code == 1, plain
    assert "Traceback" not in plain
    ids = re.findall(r"^([0-9a-f]{32})  \S*specs\.json\[\d\]", plain, flags=re.M)  # "ID  FILE[i]" as submitted
    assert len(set(ids)) == 6, plain
    assert "6/6" in plain and "5 succeeded, 1 failed" in plain  # the bar, its counts (and the caption)
    assert plain.count("ended") >= 1 and plain.count("━") > 0
    summary = plain[plain.rindex("stop reason"):]
    assert all(i in summary for i in ids) and "1 failed:" in summary and "CUDA is not available" in summary


def test_project_event_stream_through_httpx_sse_resumes_after_an_id(client: Client):
    job = client.submit(note_spec(2, name=f"sse-{uuid.uuid4().hex[:8]}"))
    assert client.wait(job["id"], timeout=300)["status"] == "succeeded"
    own = list(client.events(job["id"]))  # a job's stream ends after its terminal state
    assert [e["event"] for e in own][-1] == "state" and own[-1]["data"]["status"] == "succeeded"
    seen: list[dict[str, Any]] = []
    for ev in client.project_events(last_event_id=own[0]["id"] - 1):  # endless: left once the job's end is seen
        if ev["event"] == "job" and ev["data"]["job_id"] == job["id"]:
            seen.append(ev)
            if ev["data"]["kind"] == "state" and ev["data"]["data"].get("status") == "succeeded":
                break
    assert [e["id"] for e in seen] == [e["id"] for e in own]
    assert [e["data"]["kind"] for e in seen] == [e["event"] for e in own]


def test_a_typed_client_returns_the_apis_models(client: Client):
    from client import models

    with Client(client.url, typed=True) as c:
        job = c.submit(note_spec(1, name=f"typed-{uuid.uuid4().hex[:8]}"))
        assert isinstance(job, models.JobRead) and job.status in ("queued", "running", "succeeded")
        ended = c.wait([job.id], timeout=300)
        assert isinstance(ended[job.id], models.JobSummary) and ended[job.id].status == "succeeded"
        again = c.job(job.id)
        assert isinstance(again, models.JobRead) and again.best is not None and again.spec["epochs"] == 1
        listed = list(c.iter_jobs(name=job.name, page_size=1))
        assert [j.id for j in listed] == [job.id] and isinstance(listed[0], models.JobSummary)
        made = c.submit_many([note_spec(1, name=job.name), {"epochs": "x"}])
        assert isinstance(made[0], models.BatchItem) and made[0].status == "created" and made[1].status == "invalid"
        c.cancel(made[0].id)
