"""Logs of the real processes (``trainyard api`` and ``trainyard worker``) with
TRAINYARD_LOG_FORMAT=json and the access log on: every line is a JSON object; the API's lines of a
request carry its request id, which the response echoes as X-Request-ID; the worker's lines about
a job carry its id and attempt."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import httpx

from client import Client

from .conftest import RUN_ID, cli
from .helpers import ROOT, free_port, note_spec, stop, wait_for_log, wait_http, wait_status

#: Celery writes these from its signal handler, straight to stdout (no logging is safe there)
CELERY_SIGNAL_NOTICES = ("worker: Warm shutdown (MainProcess)",)


def _records(path: Any) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and line not in CELERY_SIGNAL_NOTICES]
    return [json.loads(line) for line in lines]  # every other line is one JSON object


def test_json_logs_of_the_api_and_worker_carry_request_and_job_ids(service_env, migrated, tmp_path):
    env = {**service_env, "TRAINYARD_LOG_FORMAT": "json", "TRAINYARD_ACCESS_LOG": "1",
           "TRAINYARD_QUEUE_PREFIX": f"ty-{RUN_ID}-logs-"}
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    port = free_port()
    with api_log.open("wb") as a, worker_log.open("wb") as w:
        api = subprocess.Popen(cli("api", "--port", str(port)), env=env, cwd=ROOT, stdout=a, stderr=subprocess.STDOUT)
        worker = subprocess.Popen(cli("worker", "--queues", "cpu", "--name", f"logs-{RUN_ID}"), env=env, cwd=ROOT,
                                  stdout=w, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", api)
        wait_for_log(worker_log, " ready.", worker)
        given = httpx.get(f"{url}/v1/jobs", headers={"X-Request-ID": "my-request-1"})
        assert given.headers["x-request-id"] == "my-request-1"
        made = httpx.get(f"{url}/v1/jobs", headers={"X-Request-ID": "not a token; ok?"})
        assert made.headers["x-request-id"] not in ("", "not a token; ok?") and len(made.headers["x-request-id"]) == 32
        with Client(url) as c:
            job_id = c.submit(note_spec(2, device="cpu"))["id"]
            wait_status(c, job_id, ("succeeded",), timeout=120)
    finally:
        stop(api)
        stop(worker)

    api_records = _records(api_log)
    access = [r for r in api_records if r["logger"] == "trainyard.access"]
    mine = [r for r in access if r.get("request_id") == "my-request-1"]
    assert len(mine) == 1 and (mine[0]["level"], mine[0]["process"]) == ("INFO", "api")
    assert mine[0]["msg"].startswith("GET /v1/jobs 200 ") and mine[0]["msg"].endswith(" ms")
    assert all(r.get("request_id") for r in access) and len({r["request_id"] for r in access}) == len(access)
    assert any(r["request_id"] == made.headers["x-request-id"] for r in access)

    worker_records = _records(worker_log)
    about_job = [r for r in worker_records if job_id in r["msg"]]
    assert [r["msg"] for r in about_job] == [f"job {job_id}: claimed, attempt 1", f"job {job_id}: succeeded"]
    assert all((r["job_id"], r["attempt"], r["process"]) == (job_id, 1, "worker") for r in about_job)
    assert any(r["msg"].endswith(" ready.") and "job_id" not in r for r in worker_records)
