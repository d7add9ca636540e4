"""The API in this process (httpx against the ASGI app) on the session's PostgreSQL database and
Redis. Jobs go to a queue no worker consumes, so what was enqueued can be inspected."""

from __future__ import annotations

import hashlib
import io
import json
import math
import uuid
from typing import Any

import numpy as np
import pytest

from store import repo
from store.db import session_scope
from training import preview_schedule
from worker.runner import run_job

from .helpers import note_spec


def queue_len(redis_client: Any, env: dict[str, str], base: str = "any") -> int:
    prefix = env["TRAINYARD_QUEUE_PREFIX"]
    return int(redis_client.llen(prefix + prefix + base))  # global key prefix + queue name


def paths(resp: Any) -> list[str]:
    assert resp.status_code == 422, resp.text
    return [e["path"] for e in resp.json()["errors"]]


# --------------------------------------------------------------------------- create, 422 paths


def test_create_stores_effective_spec_and_enqueues_job_id(app_client, redis_client, inproc_env):
    before = queue_len(redis_client, inproc_env)
    r = app_client.post("/v1/jobs", json=note_spec(3))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["progress"] == {"epoch": 0, "epochs": 3}
    # effective defaults are stored with the job
    assert job["spec"]["optimizer"]["beta_2"] == 0.999 and job["spec"]["optimizer"]["epsilon"] == 1e-7
    assert job["spec"]["optimizer"]["formulas"] == "keras"  # whose update rule runs (issue 15)
    assert job["spec"]["optimizer"]["learning_rate"]["t_mul"] == 2.0
    assert job["queue"].endswith("any")  # device auto -> the queue every worker takes
    assert queue_len(redis_client, inproc_env) == before + 1
    # the message carries only the job id, by task name, and the row it names exists
    prefix = inproc_env["TRAINYARD_QUEUE_PREFIX"]
    raw = redis_client.lindex(prefix + prefix + "any", 0)
    msg = json.loads(raw)
    assert msg["headers"]["task"] == "trainyard.run_job"
    assert json.loads(__import__("base64").b64decode(msg["body"]))[0] == [job["id"]]
    assert app_client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


def test_cpu_device_goes_to_cpu_queue(app_client, redis_client, inproc_env):
    before = queue_len(redis_client, inproc_env, "cpu")
    r = app_client.post("/v1/jobs", json=note_spec(1, device="cpu"))
    assert r.status_code == 201 and r.json()["queue"].endswith("cpu")
    assert queue_len(redis_client, inproc_env, "cpu") == before + 1


@pytest.mark.parametrize(
    ("mutate", "expected_path"),
    [
        (lambda s: s["model"]["layers"][2].update(units=7), "model.layers[2]"),
        (lambda s: s["model"]["layers"][0].update(activation="rleu"), "model.layers[0].activation"),
        (lambda s: s["callbacks"]["early_stopping"].update(monitor="val_acc"), "callbacks.early_stopping.monitor"),
        (lambda s: s["optimizer"].update(beta_1=1.5), "optimizer.beta_1"),
        (lambda s: s["data"].update(dataset="nope"), "data.dataset"),
        (lambda s: s.update(epoch=3), "epoch"),
        (lambda s: s["data"].update(path="/etc/passwd"), "data.path"),
    ],
)
def test_invalid_specs_are_422_naming_json_paths(app_client, mutate, expected_path):
    spec = note_spec(2)
    mutate(spec)
    r = app_client.post("/v1/jobs", json=spec)
    assert expected_path in paths(r)
    for e in r.json()["errors"]:
        assert set(e) == {"loc", "path", "msg", "type"} and e["msg"]


def test_schedule_parameter_errors_name_the_parameter(app_client):
    spec = note_spec(2)
    del spec["optimizer"]["learning_rate"]["first_decay_steps"]
    assert paths(app_client.post("/v1/jobs", json=spec)) == ["optimizer.learning_rate.first_decay_steps"]


def test_data_path_is_refused_even_when_the_rest_is_valid(app_client):
    spec = note_spec(2)
    spec["data"]["path"] = "/srv/other-users-data.npz"
    r = app_client.post("/v1/jobs", json=spec)
    assert paths(r) == ["data.path"]
    assert "server" in r.json()["errors"][0]["msg"]


def test_non_object_body_is_422(app_client):
    r = app_client.post("/v1/jobs", json=[1, 2])
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"][0] == "body"


# --------------------------------------------------------------------------- idempotency, batch


def test_idempotency_key_returns_the_same_job(app_client, redis_client, inproc_env):
    key = f"key-{uuid.uuid4()}"
    name = f"idem-{uuid.uuid4().hex[:8]}"
    before = queue_len(redis_client, inproc_env)
    r1 = app_client.post("/v1/jobs", json=note_spec(2, name=name), headers={"Idempotency-Key": key})
    r2 = app_client.post("/v1/jobs", json=note_spec(2, name=name), headers={"Idempotency-Key": key})
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r1.json()["id"] == r2.json()["id"]
    listed = app_client.get("/v1/jobs", params={"name": name}).json()["jobs"]
    assert [j["id"] for j in listed] == [r1.json()["id"]]
    assert queue_len(redis_client, inproc_env) == before + 1  # enqueued once
    r3 = app_client.post("/v1/jobs", json=note_spec(2, name=name), headers={"Idempotency-Key": key + "-other"})
    assert r3.status_code == 201 and r3.json()["id"] != r1.json()["id"]


def test_batch_with_one_bad_item(app_client, redis_client, inproc_env):
    name = f"batch-{uuid.uuid4().hex[:8]}"
    bad = note_spec(2, name=name)
    bad["model"]["layers"][1]["rate"] = 1.5
    before = queue_len(redis_client, inproc_env)
    r = app_client.post("/v1/jobs/batch", json={"jobs": [note_spec(2, name=name), bad, note_spec(3, name=name)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["created"], body["invalid"]) == (2, 1)
    res = body["results"]
    assert [x["index"] for x in res] == [0, 1, 2]
    assert [x["status"] for x in res] == ["created", "invalid", "created"]
    assert res[1]["id"] is None and [e["path"] for e in res[1]["errors"]] == ["model.layers[1].rate"]
    for item in (res[0], res[2]):
        assert app_client.get(f"/v1/jobs/{item['id']}").json()["status"] == "queued"
    assert queue_len(redis_client, inproc_env) == before + 2
    listed = app_client.get("/v1/jobs", params={"name": name}).json()["jobs"]
    assert {j["id"] for j in listed} == {res[0]["id"], res[2]["id"]}


def test_batch_limit_is_1000(app_client):
    r = app_client.post("/v1/jobs/batch", json={"jobs": [{}] * 1001})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "jobs"


# --------------------------------------------------------------------------- list


def test_list_newest_first_with_cursor_and_filters(app_client):
    name = f"list-{uuid.uuid4().hex[:8]}"
    ids = [app_client.post("/v1/jobs", json=note_spec(1, name=name)).json()["id"] for _ in range(3)]
    page1 = app_client.get("/v1/jobs", params={"name": name, "limit": 2}).json()
    assert [j["id"] for j in page1["jobs"]] == ids[::-1][:2]
    assert page1["next_cursor"]
    page2 = app_client.get("/v1/jobs", params={"name": name, "limit": 2, "cursor": page1["next_cursor"]}).json()
    assert [j["id"] for j in page2["jobs"]] == [ids[0]] and page2["next_cursor"] is None
    assert app_client.get("/v1/jobs", params={"name": name, "status": "running"}).json()["jobs"] == []
    created = page1["jobs"][0]["created_at"]
    after = app_client.get("/v1/jobs", params={"name": name, "created_after": created}).json()["jobs"]
    assert ids[2] in [j["id"] for j in after]
    r = app_client.get("/v1/jobs", params={"status": "exploded"})
    assert r.status_code == 422 and r.json()["errors"][0]["path"].startswith("query")


# --------------------------------------------------------------------------- cancel


def test_cancelled_queued_job_never_starts(app_client):
    job = app_client.post("/v1/jobs", json=note_spec(2)).json()
    r = app_client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled" and r.json()["stop_reason"] == "cancelled"
    # a worker receiving the message afterwards (the real task body) does not start it
    assert run_job(job["id"]) == "skipped"
    after = app_client.get(f"/v1/jobs/{job['id']}").json()
    assert after["status"] == "cancelled" and after["attempts"] == 0 and after["started_at"] is None
    assert app_client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"] == []


def test_task_delivered_twice_runs_once(app_client):
    job = app_client.post("/v1/jobs", json=note_spec(2, device="cpu")).json()
    assert run_job(job["id"]) == "succeeded"
    assert run_job(job["id"]) == "skipped"
    after = app_client.get(f"/v1/jobs/{job['id']}").json()
    assert after["attempts"] == 1 and after["status"] == "succeeded"
    assert len(app_client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]) == 2
    assert app_client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_diverging_job_fails_and_its_nan_metrics_come_back(app_client):
    spec = note_spec(5, device="cpu", optimizer={"name": "sgd", "learning_rate": 1e6}, callbacks={})
    job = app_client.post("/v1/jobs", json=spec).json()
    assert run_job(job["id"]) == "failed"
    done = app_client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "failed" and done["stop_reason"] == "non_finite_loss" and "NaN" in done["error"]
    r = app_client.get(f"/v1/jobs/{job['id']}/metrics")
    assert r.status_code == 200
    last = r.json()["epochs"][-1]
    assert last["loss"] in ("NaN", "Infinity", "-Infinity")
    events = app_client.get(f"/v1/jobs/{job['id']}/events").text
    assert '"status": "failed"' in events and ("NaN" in events or "Infinity" in events)


def test_lr_find_job_records_its_curve(app_client):
    spec = note_spec(1, kind="lr_find", device="cpu", lr_find={"min_lr": 1e-5, "max_lr": 1.0, "steps": 30})
    job = app_client.post("/v1/jobs", json=spec).json()
    assert run_job(job["id"]) == "succeeded"
    done = app_client.get(f"/v1/jobs/{job['id']}").json()
    result = done["info"]["lr_find"]
    assert len(result["lrs"]) == len(result["losses"]) <= 30
    assert result["lrs"][0] == pytest.approx(1e-5)


def test_checkpoint_every_epoch_keeps_bytes_of_best_and_newest(app_client):
    # SGD whose rate grows 4x every 23 steps: accuracy rises, then collapses, so the best epoch
    # is not the last one (the test cannot pass just because the newest save is the best).
    lr = {"schedule": "exponential", "initial_learning_rate": 0.02, "decay_steps": 23, "decay_rate": 4.0}
    spec = note_spec(4, device="cpu", optimizer={"name": "sgd", "learning_rate": lr})
    spec["callbacks"] = {"model_checkpoint": {"monitor": "val_accuracy", "save_best_only": False}}
    job = app_client.post("/v1/jobs", json=spec).json()
    assert run_job(job["id"]) == "succeeded"
    cks = app_client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["checkpoints"]
    assert [c["epoch"] for c in cks] == [1, 2, 3, 4]
    accs = [m["val_accuracy"] for m in app_client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]]
    best = [c for c in cks if c["is_best"]]
    assert len(best) == 1 and best[0]["value"] == pytest.approx(max(accs))  # mode auto: max for accuracy
    assert accs.index(best[0]["value"]) + 1 == best[0]["epoch"] != 4
    assert r_epoch(app_client, job["id"]) == best[0]["epoch"]
    assert {c["epoch"] for c in cks if c["stored"]} == {best[0]["epoch"], 4}
    r = app_client.get(f"/v1/jobs/{job['id']}/checkpoints/best")
    assert r.headers["x-checkpoint-sha256"] == best[0]["sha256"] == hashlib.sha256(r.content).hexdigest()


def r_epoch(app_client, job_id: str) -> int:
    return int(app_client.get(f"/v1/jobs/{job_id}/checkpoints/best").headers["x-checkpoint-epoch"])


def test_unknown_job_is_404(app_client):
    for path in ("", "/metrics", "/checkpoints", "/checkpoints/best", "/events"):
        assert app_client.get(f"/v1/jobs/{'0' * 32}{path}").status_code == 404, path
    assert app_client.post(f"/v1/jobs/{'0' * 32}/cancel").status_code == 404


# --------------------------------------------------------------------------- metrics, NaN


def test_non_finite_metrics_are_stored_and_served_safely(app_client):
    job = app_client.post("/v1/jobs", json=note_spec(5)).json()
    epochs = [
        {"epoch": 1, "loss": 1.5, "val_loss": math.nan, "accuracy": 0.5, "lr": 0.001, "seconds": 0.1},
        {"epoch": 2, "loss": math.inf, "val_loss": -math.inf, "accuracy": 0.25, "lr": 0.002, "seconds": 0.1},
        {"epoch": 3, "loss": 0.5, "val_loss": 0.75, "accuracy": 0.75, "lr": 0.003, "seconds": 0.1},
    ]
    with session_scope() as s:
        repo.record_progress(s, job["id"], epochs)
    r = app_client.get(f"/v1/jobs/{job['id']}/metrics")
    assert r.status_code == 200
    got = r.json()["epochs"]
    assert got[0]["val_loss"] == "NaN" and got[1]["loss"] == "Infinity" and got[1]["val_loss"] == "-Infinity"
    assert got[0]["loss"] == 1.5 and got[2]["val_loss"] == 0.75 and got[0]["epoch"] == 1
    assert math.isnan(float(got[0]["val_loss"])) and float(got[1]["val_loss"]) == -math.inf
    # incremental polling and downsampling
    since = app_client.get(f"/v1/jobs/{job['id']}/metrics", params={"since_epoch": 1}).json()
    assert [e["epoch"] for e in since["epochs"]] == [2, 3]
    down = app_client.get(f"/v1/jobs/{job['id']}/metrics", params={"max_points": 2}).json()
    assert [e["epoch"] for e in down["epochs"]] == [1, 3] and down["total"] == 3
    assert app_client.get(f"/v1/jobs/{job['id']}").json()["progress"]["epoch"] == 3


# --------------------------------------------------------------------------- schedules, catalog


def test_schedule_preview_matches_the_engine(app_client):
    lr = note_spec()["optimizer"]["learning_rate"]
    r = app_client.post("/v1/schedules/preview", json={"learning_rate": lr, "steps": 1200})
    assert r.status_code == 200
    got = r.json()["lr"]
    assert got == pytest.approx(preview_schedule(lr, 1200))
    assert got[0] == 0.0 and got[50] == pytest.approx(0.01)  # warm-up from 0 to the initial rate
    assert got[49] < got[50] and got[1049] < 1e-6 and got[1050] == pytest.approx(0.01)  # restart after 1000
    r = app_client.post("/v1/schedules/preview", json={"learning_rate": {"schedule": "cosine"}, "steps": 5})
    assert r.status_code == 422 and all(p.startswith("learning_rate") for p in paths(r))
    r = app_client.post("/v1/schedules/preview", json={"learning_rate": 0.1, "steps": 0})
    assert r.status_code == 422 and paths(r) == ["steps"]


def test_catalog_has_what_a_form_needs(app_client):
    cat = app_client.get("/v1/catalog").json()
    adam = next(o for o in cat["optimizers"] if o["name"] == "adam")
    params = {p["name"]: p for p in adam["parameters"]}
    assert params["beta_1"]["default"] == 0.9 and params["epsilon"]["default"] == 1e-7
    # the formulas switch and what each choice computes (Keras' epsilon on the uncorrected sqrt(v))
    assert params["formulas"]["default"] == "keras" and params["formulas"]["schema"]["enum"] == ["keras", "torch"]
    assert "uncorrected sqrt(v)" in adam["formulas"]["keras"] and adam["formulas"]["torch"].startswith("torch.optim.Adam")
    radam = next(o for o in cat["optimizers"] if o["name"] == "radam")
    assert list(radam["formulas"]) == ["torch"]
    cr = next(s for s in cat["schedules"] if s["name"] == "cosine_restarts")
    assert {"initial_learning_rate", "first_decay_steps", "t_mul", "m_mul", "alpha", "warmup_steps"} <= {
        p["name"] for p in cr["parameters"]}
    assert cr["source"] == "Keras CosineDecayRestarts"
    assert "he_normal" in {i["name"] for i in cat["initializers"]}
    dense = next(layer for layer in cat["layers"] if layer["type"] == "dense")
    assert next(p for p in dense["parameters"] if p["name"] == "units")["required"] is True
    assert "relu" in cat["activations"]
    assert "sparse_categorical_crossentropy" in {x["name"] for x in cat["losses"]}
    assert "accuracy" in {x["name"] for x in cat["metrics"]}
    assert {"early_stopping", "model_checkpoint"} <= {c["name"] for c in cat["callbacks"]}
    digits = next(d for d in cat["datasets"] if d["name"] == "digits")
    assert digits["n_classes"] == 10 and digits["builtin"] is True
    assert "properties" in cat["spec_schema"]


# --------------------------------------------------------------------------- datasets


def _npz(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


def test_upload_dataset_and_train_on_it(app_client):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    r = app_client.post("/v1/datasets", files={"file": ("toy.npz", _npz(x, y))}, data={"name": "toy"})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert (ds["task"], ds["input_shape"], ds["n_classes"], ds["n_samples"]) == ("classification", [5], 2, 120)
    assert ds["id"] in [d["id"] for d in app_client.get("/v1/datasets").json()["datasets"]]
    assert ds["id"] in [d["name"] for d in app_client.get("/v1/catalog").json()["datasets"]]

    spec = {"name": "toy", "device": "cpu", "data": {"dataset": ds["id"], "validation_split": 0.25},
            "model": {"layers": [{"type": "dense", "units": 2}]}, "loss": "sparse_categorical_crossentropy",
            "metrics": ["accuracy"], "epochs": 2}
    wrong = json.loads(json.dumps(spec))
    wrong["model"]["layers"][0]["units"] = 3
    assert "model.layers[0]" in paths(app_client.post("/v1/jobs", json=wrong))
    with_option = json.loads(json.dumps(spec))
    with_option["data"]["noise"] = 0.1
    assert "data.noise" in paths(app_client.post("/v1/jobs", json=with_option))

    job = app_client.post("/v1/jobs", json=spec).json()
    assert job["spec"]["data"]["path"] is None  # server paths never reach clients
    assert run_job(job["id"]) == "succeeded"  # the worker resolves the stored file
    assert len(app_client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]) == 2


def test_upload_csv_with_target_column(app_client):
    csv = "a,b,label\n" + "\n".join(f"{i},{i * 2},{i % 3}" for i in range(30))
    r = app_client.post("/v1/datasets", files={"file": ("t.csv", csv.encode())}, data={"target": "label"})
    assert r.status_code == 201, r.text
    assert (r.json()["task"], r.json()["n_classes"], r.json()["input_shape"]) == ("classification", 3, [2])


def test_bad_uploads_are_refused(app_client, inproc_env):
    r = app_client.post("/v1/datasets", files={"file": ("x.npz", _npz(np.zeros((3, 2)), np.zeros(4)))})
    assert paths(r) == ["file"] and "rows" in r.json()["errors"][0]["msg"]
    r = app_client.post("/v1/datasets", files={"file": ("x.txt", b"1,2")})
    assert paths(r) == ["file"]
    r = app_client.post("/v1/datasets", files={"file": ("t.csv", b"a,b\n1,2\n")}, data={"target": "nope"})
    assert paths(r) == ["target"]


def test_upload_size_limit(inproc_env):

    from fastapi.testclient import TestClient

    from api.app import create_app
    from config.settings import get_settings

    small = create_app(get_settings().replace(max_upload_bytes=1000))
    with TestClient(small) as c:
        x = np.zeros((100, 5), dtype=np.float32)
        r = c.post("/v1/datasets", files={"file": ("big.npz", _npz(x, np.arange(100) % 2))})
        assert r.status_code == 413 and "1000" in r.json()["detail"]
        r = c.post("/v1/datasets", files={"file": ("ok.csv", b"a,y\n1,0\n2,1\n3,0\n")})
        assert r.status_code == 201


# --------------------------------------------------------------------------- health


def test_health_ready_and_prometheus(app_client):
    assert app_client.get("/healthz").json() == {"status": "ok"}
    ready = app_client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "database": "ok", "broker": "ok"}
    text = app_client.get("/metrics").text
    assert 'trainyard_jobs{status="queued"}' in text
    assert "trainyard_queue_depth" in text and "trainyard_job_run_seconds_bucket" in text
    queued = [ln for ln in text.splitlines() if ln.startswith('trainyard_jobs{status="queued"}')][0]
    assert float(queued.split()[-1]) >= 1


def test_broker_down_still_accepts_the_job_and_keeps_it_in_the_outbox(inproc_env):

    from fastapi.testclient import TestClient

    from api.app import create_app
    from config.settings import get_settings
    from store.db import session_scope
    from store.models import Outbox

    down = create_app(get_settings().replace(broker_url="redis://127.0.0.1:1/0"))
    with TestClient(down) as c:
        name = f"nobroker-{uuid.uuid4().hex[:8]}"
        r = c.post("/v1/jobs", json=note_spec(2, name=name))
        assert r.status_code == 201 and r.json()["status"] == "queued"
        jobs = c.get("/v1/jobs", params={"name": name}).json()["jobs"]
        assert len(jobs) == 1 and jobs[0]["status"] == "queued"
        with session_scope(write=False) as s:
            assert s.query(Outbox).filter(Outbox.job_id == r.json()["id"]).count() == 1  # sent when the broker is back
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"] == "ok" and ready.json()["broker"] != "ok"


def test_openapi_has_a_response_model_on_json_routes(app_client):
    schema = app_client.get("/openapi.json").json()
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            if set(op["responses"]) & {"200", "201"} == set() and "204" in op["responses"]:
                continue  # answers no content (DELETE /v1/webhooks/{id})
            content = op["responses"].get("200", op["responses"].get("201", {})).get("content", {})
            assert content, f"{method} {path} documents no response"
            if "application/json" in content:
                assert content["application/json"]["schema"], f"{method} {path}"
