"""Priorities (issue 14): the database decides which queued job a free worker starts next
(store.scheduling). Against the real stack: PostgreSQL, Redis, a real API process and one real
Celery worker, on queues of their own so no other test's jobs stand in the queue."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from client import Client

from .conftest import RUN_ID, cli
from .helpers import ROOT, free_port, long_spec, note_spec, stop, wait_for_log, wait_http, wait_status


@pytest.fixture(scope="module")
def prio_stack(service_env: dict[str, str], migrated: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API and ONE worker (solo pool: one job at a time) on queues no other test uses."""
    env = {**service_env, "TRAINYARD_QUEUE_PREFIX": f"ty-{RUN_ID}-prio-"}
    logs = tmp_path_factory.mktemp("prio-logs")
    port = free_port()
    with (logs / "api.log").open("wb") as f:
        api = subprocess.Popen(cli("api", "--port", str(port)), env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    with (logs / "worker.log").open("wb") as f:
        worker = subprocess.Popen(cli("worker", "--queues", "cpu", "--name", f"ty-{RUN_ID}-prio"), env=env, cwd=ROOT,
                                  stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", api)
        wait_for_log(logs / "worker.log", " ready.", worker)
        yield url
    finally:
        stop(worker)
        stop(api)


def _started(job: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))


def test_a_high_priority_job_starts_before_earlier_low_priority_ones(prio_stack: str) -> None:
    with Client(prio_stack) as c:
        blocker = c.submit(long_spec(name="prio-blocker", device="cpu"))
        wait_status(c, blocker["id"], ("running",))
        lows = [c.submit(note_spec(2, name=f"prio-low-{i}", device="cpu", callbacks={})) for i in range(3)]
        high = c.submit(note_spec(2, name="prio-high", device="cpu", callbacks={}), priority=5)
        assert high["priority"] == 5 and all(j["priority"] == 0 for j in lows)
        # positions while queued: the high one first, then the low ones oldest first
        assert c.job(high["id"])["queue_position"] == 1
        assert [c.job(j["id"])["queue_position"] for j in lows] == [2, 3, 4]
        # PATCH while queued: the last low job jumps ahead of everything
        bumped = c.set_priority(lows[2]["id"], 9)
        assert bumped["priority"] == 9 and bumped["queue_position"] == 1
        assert c.job(high["id"])["queue_position"] == 2
        # the running job's priority can no longer change: 409
        r = httpx.patch(f"{prio_stack}/v1/jobs/{blocker['id']}", json={"priority": 3})
        assert r.status_code == 409 and "not queued" in r.json()["detail"]
        # /metrics counts the queue per project
        metrics = httpx.get(f"{prio_stack}/metrics").text
        assert f'trainyard_queued_jobs{{project="default",queue="ty-{RUN_ID}-prio-cpu"}} 4.0' in metrics

        c.cancel(blocker["id"])
        done = {j["id"]: c.wait(j["id"], timeout=300) for j in [*lows, high]}
        assert all(j["status"] == "succeeded" for j in done.values()), done
        order = sorted(done, key=lambda i: _started(done[i]))
        assert order == [lows[2]["id"], high["id"], lows[0]["id"], lows[1]["id"]], [done[i]["name"] for i in order]
        assert all(c.job(i)["queue_position"] is None for i in done)  # (wait answers the list's summary)


def test_priority_is_validated(prio_stack: str) -> None:
    with Client(prio_stack) as c:
        r = httpx.post(f"{prio_stack}/v1/jobs", params={"priority": 5000}, json=note_spec(1, device="cpu"))
        assert r.status_code == 422
        assert "priority" in r.text and "1000" in r.text
        job = c.submit(long_spec(name="prio-validate", device="cpu"), priority=-3)
        try:
            r = httpx.patch(f"{prio_stack}/v1/jobs/{job['id']}", json={"priority": "high"})
            assert r.status_code == 422 and "priority" in r.text
            r = httpx.patch(f"{prio_stack}/v1/jobs/{job['id']}", json={"priority": 1, "colour": "red"})
            assert r.status_code == 422 and "colour" in r.text
            r = httpx.post(f"{prio_stack}/v1/jobs/batch", json={"jobs": [note_spec(1, device="cpu")], "priority": True})
            assert r.status_code == 422 and "priority" in r.text
            batch = c.submit_batch([long_spec(name="prio-batch", device="cpu")], priority=4)
            batch_job = batch["results"][0]["id"]
            assert c.job(batch_job)["priority"] == 4
            c.cancel(batch_job)
        finally:
            c.cancel(job["id"])


def test_a_sweep_gives_its_priority_to_its_trials_and_patch_changes_the_queued_ones(prio_stack: str) -> None:
    with Client(prio_stack) as c:
        blocker = c.submit(long_spec(name="prio-sweep-blocker", device="cpu"))
        wait_status(c, blocker["id"], ("running",))
        try:
            sweep = c.create_sweep({
                "name": "prio-sweep", "base": note_spec(2, device="cpu", callbacks={}), "method": "grid",
                "parameters": {"model.layers[0].units": {"values": [8, 16, 32]}},
                "objective": {"metric": "val_loss"}, "max_concurrent": 2, "priority": 7,
            })
            assert sweep["priority"] == 7
            trials = [t["job_id"] for t in sweep["trials"]]
            assert len(trials) == 2 and all(c.job(t)["priority"] == 7 for t in trials)
            low = c.submit(note_spec(2, name="prio-vs-sweep", device="cpu", callbacks={}), priority=3)
            assert c.job(low["id"])["queue_position"] == 3  # behind both trials
            r = httpx.patch(f"{prio_stack}/v1/sweeps/{sweep['id']}", json={"priority": 1})
            assert r.status_code == 200 and r.json()["priority"] == 1
            assert all(c.job(t)["priority"] == 1 for t in trials)
            assert c.job(low["id"])["queue_position"] == 1  # now ahead of them
            r = httpx.patch(f"{prio_stack}/v1/sweeps/{sweep['id']}", json={"priority": 1001})
            assert r.status_code == 422 and "priority" in r.text
            c.cancel(low["id"])
        finally:
            c.cancel_sweep(sweep["id"])
            c.cancel(blocker["id"])
        r = httpx.patch(f"{prio_stack}/v1/sweeps/{sweep['id']}", json={"priority": 2})
        assert r.status_code == 409 and "already ended" in r.text
