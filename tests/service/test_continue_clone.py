"""Continue and clone, on the real API, database and worker: a job continued with more epochs
gives the numbers of an uninterrupted run of the total (CPU, deterministic); a clone is the old
spec with a JSON merge patch."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from client import Client

from .helpers import note_spec

#: numeric fields of an epoch's metrics that must agree (seconds is wall time)
COMPARED = ("loss", "val_loss", "accuracy", "val_accuracy", "lr")


def _spec(epochs: int, name: str) -> dict[str, Any]:
    return note_spec(epochs, name=name, device="cpu", deterministic=True)


def _epoch_events(job_id: str) -> int:
    from sqlalchemy import func, select

    from store.db import session_scope
    from store.models import JobEvent

    with session_scope(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(JobEvent)
                            .where(JobEvent.job_id == job_id, JobEvent.kind == "epoch")) or 0)


def test_continue_equals_an_uninterrupted_run(client: Client, inproc_env: dict[str, str]) -> None:
    http = httpx.Client(base_url=client.url, timeout=30)
    part = client.submit(_spec(3, "continued"))
    whole = client.submit(_spec(5, "uninterrupted"))
    assert client.wait(part["id"], timeout=300)["status"] == "succeeded"
    r = http.post(f"/v1/jobs/{part['id']}/continue", json={"epochs": 2})
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("queued", "running") and r.json()["progress"]["epochs"] == 5
    assert r.json()["spec"]["epochs"] == 5
    done = client.wait(part["id"], timeout=300)
    ref = client.wait(whole["id"], timeout=300)
    assert done["status"] == ref["status"] == "succeeded" and done["stop_reason"] == "completed"
    assert done["progress"] == {"epoch": 5, "epochs": 5}
    got, want = client.metrics(part["id"]), client.metrics(whole["id"])
    assert [m["epoch"] for m in got] == [1, 2, 3, 4, 5] == [m["epoch"] for m in want]
    for g, w in zip(got, want, strict=True):
        for k in COMPARED:
            assert abs(float(g[k]) - float(w[k])) <= 1e-6, (g["epoch"], k, g[k], w[k])
    assert done["best"]["epoch"] == ref["best"]["epoch"]
    assert abs(float(done["best"]["value"]) - float(ref["best"]["value"])) <= 1e-6
    # the run after continuing resumed after epoch 3 (it did not start over: 5 epochs trained in all)
    assert _epoch_events(part["id"]) == 5 and done["attempts"] == 2

    # refusals: 0 more epochs (422 at "epochs"), an unknown job (404), a cancelled job (409)
    r = http.post(f"/v1/jobs/{part['id']}/continue", json={"epochs": 0})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "epochs"
    assert http.post(f"/v1/jobs/{'0' * 32}/continue", json={"epochs": 1}).status_code == 404
    queued = client.submit(_spec(2, "to-cancel"))
    client.cancel(queued["id"])
    r = http.post(f"/v1/jobs/{queued['id']}/continue", json={"epochs": 1})
    assert r.status_code in (409,) and "cannot continue" in r.json()["detail"], r.text
    http.close()


def test_clone_applies_a_json_merge_patch(app_client: Any) -> None:
    src = app_client.post("/v1/jobs", json=note_spec(4, name="original")).json()
    patch = {"name": "clone", "epochs": 7, "optimizer": {"beta_1": None, "learning_rate": 0.002},
             "callbacks": {"early_stopping": None}}
    r = app_client.post(f"/v1/jobs/{src['id']}/clone", json=patch)
    assert r.status_code == 201, r.text
    clone = r.json()
    assert r.headers["location"] == f"/v1/jobs/{clone['id']}" and clone["id"] != src["id"]
    spec = clone["spec"]
    assert spec["name"] == "clone" and spec["epochs"] == 7 and spec["optimizer"]["learning_rate"] == 0.002
    assert spec["optimizer"]["beta_1"] == 0.9  # removed by the patch: back to its default
    assert spec["callbacks"].get("early_stopping") is None
    assert spec["model"] == src["spec"]["model"] and spec["data"] == src["spec"]["data"]  # the rest is the source's
    # an invalid result names the path; an Idempotency-Key makes a retry return the same clone
    bad = app_client.post(f"/v1/jobs/{src['id']}/clone", json={"epochs": -1})
    assert bad.status_code == 422 and bad.json()["errors"][0]["path"] == "epochs"
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = app_client.post(f"/v1/jobs/{src['id']}/clone", json={"epochs": 2}, headers=key)
    again = app_client.post(f"/v1/jobs/{src['id']}/clone", json={"epochs": 2}, headers=key)
    assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert app_client.post(f"/v1/jobs/{src['id']}/clone", json={"epochs": 3}, headers=key).status_code == 409
    assert app_client.post(f"/v1/jobs/{'0' * 32}/clone", json={}).status_code == 404


def test_init_from_starts_from_another_jobs_best_checkpoint(client: Client) -> None:
    source = client.submit(note_spec(3, name="warm-source"))
    http = httpx.Client(base_url=client.url, timeout=30)
    r = http.post("/v1/jobs", json=note_spec(1, init_from="f" * 32))
    assert r.status_code == 422 and [e["path"] for e in r.json()["errors"]] == ["init_from"], r.text
    done = client.wait(source["id"], timeout=300)
    assert done["status"] == "succeeded" and done["best"]["monitor"] == "val_loss"
    warm = note_spec(1, name="warm", init_from=source["id"])
    warm["optimizer"] = {"name": "sgd", "learning_rate": 1e-12}  # (as good as) no step: the loaded weights
    job = client.submit(warm)
    assert client.wait(job["id"], timeout=300)["status"] == "succeeded"
    (first,) = client.metrics(job["id"])
    assert abs(float(first["val_loss"]) - float(done["best"]["value"])) <= 1e-5, (first, done["best"])
    http.close()
