"""What a new user trips over (issue 17), through a real API and worker, the CLI at 80 columns:
id prefixes everywhere, tables that fit without cutting ids, lr_find and failed jobs in show /
submit --wait / watch, datasets by name, sweep show, device "auto" on a CPU-only worker, worker
--gpus on a machine without them, Keras habits, the job view's single spec, HEAD on a checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api.dispatch import Dispatcher
from config.settings import settings_from_env
from store import repo
from store.db import session_scope
from training import validate_spec

from .conftest import RUN_ID, cli
from .helpers import ROOT, note_spec, stop, wait_for_log, wait_status

WIDTH = 80
END = ("succeeded", "failed", "cancelled")


def run_cli(service_env: dict[str, str], api_url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**service_env, "TRAINYARD_URL": api_url, "COLUMNS": str(WIDTH)}
    env.pop("LINES", None)
    return subprocess.run(cli(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


OUTCOME = re.compile(r"^[0-9a-f]{32} (succeeded|failed|cancelled|queued|running)")


def assert_fits(text: str) -> None:
    """Tables, plots and fields fit 80 columns; the one-line outcome of a job (a sentence that a
    terminal wraps between words) may be longer."""
    wide = [line for line in text.splitlines() if len(line) > WIDTH and not OUTCOME.match(line)]
    assert not wide, "lines wider than 80 columns:\n" + "\n".join(wide)
    assert "…" not in text, text  # nothing cut


def whole_on_a_line(text: str, ident: str) -> bool:
    return any(ident in line for line in text.splitlines())


@pytest.fixture(scope="module")
def two_jobs(api_url: str, worker_proc: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from client import Client

    with Client(api_url) as c:
        a = c.submit(note_spec(3, name="prefix-a"))
        b = c.submit(note_spec(3, name="prefix-b-with-a-long-name-that-must-wrap-in-the-table"))
        return (wait_status(c, a["id"], END, timeout=240), wait_status(c, b["id"], END, timeout=240))


def test_any_unique_id_prefix_works_in_the_api_and_an_ambiguous_one_lists_the_candidates(client, api_url, two_jobs):
    a, b = two_jobs
    assert a["status"] == b["status"] == "succeeded", (a, b)
    common = os.path.commonprefix([a["id"], b["id"]])
    assert len(common) >= 4  # ids start with their creation time (store.ids)
    short = a["id"][: len(common) + 1]  # the first digit where they differ makes it unique
    assert client.job(short)["id"] == a["id"]
    assert len(client.metrics(short)) == 3
    assert any(ck["is_best"] for ck in client.checkpoints(short))
    data, digest = client.best_checkpoint(short)
    with httpx.Client(base_url=api_url) as h:
        head = h.head(f"/v1/jobs/{short}/checkpoints/best")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["x-checkpoint-sha256"] == digest and int(head.headers["content-length"]) == len(data)
        assert h.head(f"/v1/jobs/{'0' * 32}/checkpoints/best").status_code == 404
        amb = h.get(f"/v1/jobs/{common}")
        assert amb.status_code == 409, amb.text
        detail = amb.json()["detail"]
        assert "ambiguous" in detail and a["id"] in detail and b["id"] in detail and "more characters" in detail
        for path in (f"/v1/jobs/{common}/metrics", f"/v1/jobs/{common}/checkpoints", f"/v1/jobs/{common}/events"):
            assert h.get(path).status_code == 409, path
        assert h.post(f"/v1/jobs/{common}/cancel").status_code == 409
        missing = h.get("/v1/jobs/0000ffff")
        assert missing.status_code == 404 and "0000ffff" in missing.json()["detail"]


def test_jobs_and_show_fit_80_columns_with_whole_ids_and_show_takes_a_prefix(service_env, api_url, two_jobs):
    a, b = two_jobs
    out = run_cli(service_env, api_url, "jobs", "--limit", "50")
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout)
    assert whole_on_a_line(out.stdout, a["id"]) and whole_on_a_line(out.stdout, b["id"])
    # the long name wraps instead of being cut: all its characters are there
    assert "".join(out.stdout.split()).count("prefix-b-with-a-long-name-that-must-wrap-in-the-table") == 1

    shown = run_cli(service_env, api_url, "show", a["id"][:20], "--spec")
    assert shown.returncode == 0, shown.stderr
    assert_fits(shown.stdout.split("\nspec\n")[0])
    assert f"id          {a['id']}" in shown.stdout
    assert "best        val_loss = " in shown.stdout
    spec = json.loads(shown.stdout.split("\nspec\n", 1)[1])
    assert spec["name"] == "prefix-a" and spec["epochs"] == 3
    assert "--spec" in run_cli(service_env, api_url, "show", "--help").stdout

    amb = run_cli(service_env, api_url, "show", os.path.commonprefix([a["id"], b["id"]]))
    assert amb.returncode == 1 and "ambiguous" in amb.stderr and a["id"] in amb.stderr


def test_the_job_view_has_the_spec_once(client, two_jobs):
    job = client.job(two_jobs[0]["id"])
    assert job["spec"]["name"] == "prefix-a"
    assert "spec" not in job["info"], sorted(job["info"])


def test_keys_list_fits_80_columns_with_whole_ids(service_env, api_url):
    env = {**service_env, "COLUMNS": str(WIDTH)}
    made = subprocess.run(cli("keys", "create", "--project", f"p17-{RUN_ID}", "--name", "alaptopkeywithalongname"),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    key_id = made.stderr.split("key ", 1)[1].split()[0]
    out = subprocess.run(cli("keys", "list", "--project", f"p17-{RUN_ID}"), env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout)
    assert whole_on_a_line(out.stdout, key_id) and whole_on_a_line(out.stdout, made.stdout.strip()[:12])
    # the name wraps in its column (other columns' dashes interleave): every character is there
    assert "".join(out.stdout.replace("-", "").split()).count("alaptopkeywithalongname") == 1


def test_lr_find_in_submit_wait_show_and_watch(service_env, api_url, tmp_path):
    spec = note_spec(1, name="lr-find-17", kind="lr_find", lr_find={"steps": 60, "min_lr": 1e-5, "max_lr": 10.0})
    path = tmp_path / "lr_find.json"
    path.write_text(json.dumps(spec))
    out = run_cli(service_env, api_url, "submit", str(path), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split()[0]
    assert len(job_id) == 32
    assert f"{job_id} succeeded: suggested learning rate " in out.stdout
    assert "learning rate (log scale); * smoothed loss; | suggested" in out.stdout
    assert "0/1 epochs" not in out.stdout and "best -" not in out.stdout

    shown = run_cli(service_env, api_url, "show", job_id)
    assert shown.returncode == 0, shown.stderr
    assert_fits(shown.stdout)
    assert "suggested   learning_rate = " in shown.stdout and "rule        " in shown.stdout
    assert "kind        lr_find" in shown.stdout and "*" in shown.stdout and "|" in shown.stdout
    assert "progress" not in shown.stdout

    watched = run_cli(service_env, api_url, "watch", job_id[:20])
    assert watched.returncode == 0, watched.stderr
    assert_fits(watched.stdout)
    assert "epoch" not in watched.stdout.split("\n")[0]  # no empty epoch table
    assert f"{job_id} succeeded: suggested learning rate " in watched.stdout
    assert watched.stdout.endswith("\n")


def test_watch_ends_with_a_summary_and_says_when_epochs_are_hidden(service_env, api_url, client, two_jobs):
    a = two_jobs[0]
    out = run_cli(service_env, api_url, "watch", a["id"], "--rows", "2")
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout)
    assert "the last 2 of 3 epochs" in out.stdout
    last = out.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"{a['id']} succeeded") and "3/3 epochs" in last and "best val_loss " in last
    assert out.stdout.endswith("\n")

    bad = client.submit(note_spec(3, name="diverges-17", callbacks={},
                                  optimizer={"name": "sgd", "learning_rate": 1e10}))  # the spec's bound
    done = wait_status(client, bad["id"], END, timeout=240)
    assert done["status"] == "failed", done
    out = run_cli(service_env, api_url, "watch", bad["id"])
    assert out.returncode == 1
    assert_fits(out.stdout)
    last = out.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"{bad['id']} failed") and done["error"] in last


def _npz(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    np.savez(path, x=x, y=(x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0).astype(np.int64))
    return path


def test_datasets_upload_list_and_use_by_name(service_env, api_url, client, tmp_path):
    name = f"toy-{uuid.uuid4().hex[:8]}"
    up = run_cli(service_env, api_url, "datasets", "upload", str(_npz(tmp_path / "toy.npz", 0)), "--name", name)
    assert up.returncode == 0, up.stderr
    ds_id = up.stdout.split()[0]
    assert len(ds_id) == 32 and name in up.stdout and "3 classes" in up.stdout
    listed = run_cli(service_env, api_url, "datasets", "list")
    assert listed.returncode == 0, listed.stderr
    assert_fits(listed.stdout)
    assert whole_on_a_line(listed.stdout, ds_id) and name in "".join(listed.stdout.split())

    spec = {"name": "by-name", "data": {"dataset": name, "validation_split": 0.25, "batch_size": 16},
            "model": {"layers": [{"type": "dense", "units": 3}]}, "loss": "sparse_categorical_crossentropy",
            "metrics": ["accuracy"], "epochs": 2, "device": "cpu"}
    job = client.submit(spec)
    assert job["spec"]["data"]["dataset"] == ds_id  # the job keeps the id: a later upload cannot change it
    assert wait_status(client, job["id"], END, timeout=240)["status"] == "succeeded"

    again = run_cli(service_env, api_url, "datasets", "upload", str(_npz(tmp_path / "toy2.npz", 1)), "--name", name)
    assert again.returncode == 0, again.stderr
    second = again.stdout.split()[0]
    with httpx.Client(base_url=api_url) as h:
        r = h.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    err = r.json()["errors"][0]
    assert err["path"] == "data.dataset" and ds_id in err["msg"] and second in err["msg"] and "give the id" in err["msg"]
    with httpx.Client(base_url=api_url) as h:
        r = h.post("/v1/jobs", json={**spec, "data": {**spec["data"], "dataset": "no-such-toy"}})
    assert r.status_code == 422 and "or the id or name of a stored dataset" in r.json()["errors"][0]["msg"]


def test_sweep_show_and_its_leaderboard_fit_80_columns(service_env, api_url, tmp_path):
    body = {
        "name": "sweep-show-17", "base": note_spec(2, callbacks={}), "method": "grid",
        "parameters": {"optimizer.learning_rate": {"values": [0.01, 0.003]},
                       "model.layers[0].kernel_initializer": {"values": ["glorot_normal"]},
                       "optimizer.beta_1": {"values": [0.89]}},
        "objective": {"metric": "val_accuracy", "mode": "max"}, "max_concurrent": 2,
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(body))
    started = run_cli(service_env, api_url, "sweep", str(path), "--wait")  # 'sweep FILE' still starts one
    assert started.returncode == 0, started.stdout + started.stderr
    sweep_id = started.stdout.split()[0]
    out = run_cli(service_env, api_url, "sweep", "show", sweep_id[:20])
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout)
    assert f"id          {sweep_id}" in out.stdout and "status      succeeded" in out.stdout
    best_job = out.stdout.split("best job    ")[1].split()[0]
    assert len(best_job) == 32
    for header in ("learning_rate", "kernel_initializer", "beta_1", "succeeded"):
        assert header in "".join(out.stdout.split()), header
    assert "model.layers[0].kernel_initializer" in "".join(out.stdout.split())  # the legend names the path


def test_device_auto_runs_on_a_cpu_only_worker(service_env, inproc_env, tmp_path):
    env = {**service_env, "TRAINYARD_QUEUE_PREFIX": f"ty-{RUN_ID}-cpuonly-"}
    settings = settings_from_env(env)
    queue = settings.queue_for_device("auto")
    assert queue == settings.queue_name("any")
    with session_scope() as s:
        job_id = repo.create_job(s, spec=validate_spec(note_spec(2)).model_dump(mode="json"), queue=queue).id
    Dispatcher(settings).send([(job_id, queue)])
    log = tmp_path / "cpu-worker.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(cli("worker", "--queues", "cpu", "--name", f"cpuonly-{RUN_ID}"), env=env, cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_log(log, " ready.", proc)
        import time

        deadline = time.monotonic() + 240
        while True:
            with session_scope(write=False) as s:
                job = repo.get_job(s, job_id)
                assert job is not None
                if job.status in END:
                    break
            assert time.monotonic() < deadline, f"auto job still {job.status}:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        assert job.status == "succeeded", job.error
        assert job.worker is not None and job.worker.endswith(f":{proc.pid}")
    finally:
        stop(proc)


def test_worker_gpus_that_this_machine_lacks_are_refused(service_env):
    out = subprocess.run(cli("worker", "--queues", "gpu", "--gpus", "0,99"), env=service_env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "trainyard: --gpus 0,99:" in out.stderr and "GPU" in out.stderr


def test_keras_habits(client, api_url):
    keras = {
        "name": "keras-names", "device": "cpu",
        "data": {"dataset": "digits", "validation_split": 0.2},
        "model": {"layers": [
            {"type": "Reshape", "target_shape": [1, 8, 8]},
            {"type": "Conv2D", "filters": 4, "kernel_size": 3, "activation": "relu"},
            {"type": "MaxPooling2D", "pool_size": 2},
            {"type": "BatchNormalization"},
            {"type": "Flatten"},
            {"type": "Dropout", "rate": 0.1},
            {"type": "Dense", "units": 10},
        ]},
        "loss": "sparse_categorical_crossentropy", "epochs": 1,
    }
    job = client.submit(keras)
    assert [layer["type"] for layer in job["spec"]["model"]["layers"]] == [
        "reshape", "conv2d", "max_pool2d", "batch_norm", "flatten", "dropout", "dense"]
    channels_last = json.loads(json.dumps(keras))
    channels_last["model"]["layers"][0]["target_shape"] = [8, 8, 1]
    with httpx.Client(base_url=api_url) as h:
        r = h.post("/v1/jobs", json=channels_last)
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert [e["path"] for e in errors] == ["model.layers[0].target_shape"], errors
    assert "channels-last" in errors[0]["msg"] and "use [1, 8, 8]" in errors[0]["msg"]
    assert wait_status(client, job["id"], END, timeout=240)["status"] == "succeeded"
