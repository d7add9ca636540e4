"""End to end over HTTP: a real API process, a real Celery worker process, PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
import torch
from safetensors.numpy import load as load_safetensors

from training import preview_schedule
from worker.record import HEARTBEAT_EVERY_S

from .helpers import ROOT, long_spec, note_spec, wait_status


def test_source_note_spec_trains_and_its_results_come_back(client):
    epochs = 8
    job = client.submit(note_spec(epochs))
    assert job["status"] == "queued"
    done = wait_status(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
    assert done["status"] == "succeeded", done
    assert done["stop_reason"] in ("completed", "early_stopping")
    assert done["attempts"] == 1 and done["started_at"] and done["finished_at"]

    # metrics: one row per epoch run, with the spec's metrics and the learning rate
    metrics = client.metrics(job["id"])
    assert [m["epoch"] for m in metrics] == list(range(1, done["progress"]["epoch"] + 1))
    assert done["progress"] == {"epoch": len(metrics), "epochs": epochs}
    for m in metrics:
        assert {"loss", "val_loss", "accuracy", "val_accuracy", "lr"} <= set(m)
        assert all(isinstance(m[k], float) and math.isfinite(m[k]) for k in ("loss", "val_loss", "lr"))
    # every lr the engine reports is one the schedule (warm-up then cosine restarts) produces
    steps = done["steps"]
    curve = preview_schedule(note_spec()["optimizer"]["learning_rate"], steps + 1)
    for m in metrics:
        assert min(abs(m["lr"] - v) for v in curve) < 1e-9
    assert metrics[-1]["val_accuracy"] > 0.5  # it learned something

    # best = the epoch with the lowest val_loss (early stopping restores it; save_best_only keeps it)
    vals = [m["val_loss"] for m in metrics]
    best_epoch = vals.index(min(vals)) + 1
    assert done["best"]["monitor"] == "val_loss"
    assert done["best"]["epoch"] == best_epoch
    assert done["best"]["value"] == pytest.approx(min(vals))

    # checkpoints: save_best_only stores only improvements, the last of which is the best; then
    # the last epoch's weights, when they are not the best's (kept so they can be downloaded)
    cks = client.checkpoints(job["id"])
    assert cks and all(c["monitor"] == "val_loss" for c in cks)
    last = cks[-1]
    assert last["epoch"] == len(metrics) and last["stored"]
    assert last["value"] == pytest.approx(vals[-1])
    saves = cks if last["is_best"] else cks[:-1]
    values = [c["value"] for c in saves]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
    best_rows = [c for c in cks if c["is_best"]]
    assert len(best_rows) == 1 and best_rows[0]["epoch"] == best_epoch
    assert [c["stored"] for c in saves] == [c["is_best"] for c in saves]  # of the saves, only the best keeps its bytes

    # best weights: a safetensors file whose sha256 matches the header and the listing
    data, digest = client.best_checkpoint(job["id"])
    assert digest == hashlib.sha256(data).hexdigest() == best_rows[0]["sha256"]
    assert len(data) == best_rows[0]["size"]
    tensors = load_safetensors(data)
    shapes = sorted(t.shape for t in tensors.values())
    assert shapes == sorted([(64, 64), (64,), (10, 64), (10,)])


def test_events_stream_state_and_epochs_and_resume(client):
    job = client.submit(note_spec(3, device="cpu"))
    events = list(client.events(job["id"]))  # ends after the terminal state
    kinds = [(e["event"], e["data"].get("status")) for e in events]
    assert kinds[0] == ("state", "queued") and ("state", "running") in kinds
    assert kinds[-1] == ("state", "succeeded")
    epochs = [e["data"]["epoch"] for e in events if e["event"] == "epoch"]
    assert epochs == [1, 2, 3]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # resume after the second event: exactly the rest comes again
    rest = list(client.events(job["id"], last_event_id=ids[1]))
    assert [e["id"] for e in rest] == ids[2:]
    assert [e["data"] for e in rest] == [e["data"] for e in events[2:]]


def test_cancel_a_running_job(client):
    job = client.submit(long_spec())
    deadline = time.monotonic() + 60
    while True:
        cur = client.job(job["id"])
        if cur["status"] == "running" and cur["progress"]["epoch"] >= 2:
            break
        assert time.monotonic() < deadline, cur
        time.sleep(0.1)
    beat = datetime.fromisoformat(cur["heartbeat_at"])
    assert abs((datetime.now(UTC) - beat).total_seconds()) < 15  # the worker keeps a heartbeat
    # ... and it advances: two polls more than the heartbeat interval apart see two beats
    time.sleep(HEARTBEAT_EVERY_S + 1.5)
    later = client.job(job["id"])
    assert later["status"] == "running"
    assert datetime.fromisoformat(later["heartbeat_at"]) > beat, (cur["heartbeat_at"], later["heartbeat_at"])
    assert client.cancel(job["id"])["cancel_requested"] is True
    # how fast is measured by bench/cancel.py; here: that it stops, and how (30 s is only a hang guard)
    done = wait_status(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=30)
    assert done["status"] == "cancelled" and done["stop_reason"] == "cancelled", done
    n = done["progress"]["epoch"]
    assert 2 <= n < done["progress"]["epochs"]  # it stopped mid-run, not at the end
    assert [m["epoch"] for m in client.metrics(job["id"])] == list(range(1, n + 1))
    steps = done["steps"]
    time.sleep(2.0)  # many epochs of this spec: a worker still training would have reported more
    after = client.job(job["id"])
    assert (after["status"], after["progress"]["epoch"], after["steps"]) == ("cancelled", n, steps)  # it really stopped
    assert len(client.metrics(job["id"])) == n


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (tests the CPU-only error)")
def test_runtime_failure_is_recorded_with_a_reason(client):
    # valid spec, but this worker (same machine as this test) has no GPU: the engine raises an
    # actionable TrainingError, and the job must not quietly train on the CPU instead
    job = client.submit(note_spec(2, device="cuda"))
    done = wait_status(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=60)
    assert done["status"] == "failed" and done["stop_reason"] == "error", done
    assert "device 'cuda' was requested but CUDA is not available" in done["error"]
    assert "'cpu'" in done["error"] and "'auto'" in done["error"]  # what to use instead
    assert client.metrics(job["id"]) == [] and done["progress"]["epoch"] == 0  # no epoch ran anywhere


def test_cli_submit_wait_show_and_download(client, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(note_spec(3, name="cli-job", device="cpu")))
    env_url = ["--url", client.url]
    cli = [sys.executable, "-m", "client.cli"]
    out = subprocess.run([*cli, "submit", str(spec_file), "--wait", *env_url], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split()[0]
    assert client.job(job_id)["status"] == "succeeded"
    shown = subprocess.run([*cli, "show", job_id, "--json", *env_url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert json.loads(shown.stdout)["id"] == job_id
    target = tmp_path / "best.safetensors"
    dl = subprocess.run([*cli, "download", job_id, "-o", str(target), *env_url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dl.returncode == 0, dl.stderr
    best = next(c for c in client.checkpoints(job_id) if c["is_best"])
    assert hashlib.sha256(target.read_bytes()).hexdigest() == best["sha256"]

    listed = subprocess.run([*cli, "jobs", "--json", "--limit", "5", *env_url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert job_id in [j["id"] for j in json.loads(listed.stdout)["jobs"]]
    watched = subprocess.run([*cli, "watch", job_id, *env_url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert watched.returncode == 0, watched.stderr  # the stream replays the whole job, then ends
    assert "succeeded" in watched.stdout and "val_loss" in watched.stdout

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(note_spec(3, optimizer={"name": "adamm"})))
    out = subprocess.run([*cli, "submit", str(bad), *env_url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "optimizer" in out.stderr

    failing = tmp_path / "failing.json"
    failing.write_text(json.dumps(note_spec(2, device="cuda")))
    out = subprocess.run([*cli, "submit", str(failing), str(spec_file), "--wait", *env_url], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 1, out.stdout + out.stderr  # one of the two failed
