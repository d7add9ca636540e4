"""API conventions on the real database and broker: Idempotency-Key on batches and sweeps (a
retry creates nothing and answers the same ids; another body is a 409, also under concurrency),
RFC 9457 problem details on every error status, Location on 201, and an OpenAPI document whose
request bodies are the job spec's JSON Schema, with readable operationIds and enums."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from sqlalchemy import func, select

from .helpers import note_spec
from .test_auth import _unique, bearer, new_key
from .test_limits import make_app  # noqa: F401 - fixture
from .test_sweeps import base


def _count_jobs(name: str) -> int:
    from store.db import session_scope
    from store.models import Job

    with session_scope(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(Job.name == name)) or 0)


def _count_sweeps(name: str) -> int:
    from store.db import session_scope
    from store.models import Sweep

    with session_scope(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(Sweep).where(Sweep.name == name)) or 0)


def _is_problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body = r.json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    assert isinstance(body["detail"], str) and body["detail"] and isinstance(body["errors"], list)
    return body


def test_a_retried_batch_creates_nothing_and_returns_the_same_ids(app_client):
    name = f"batch-{uuid.uuid4().hex[:8]}"
    body = {"jobs": [note_spec(2, name=name), {"epochs": "x"}, note_spec(3, name=name)]}
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    first = app_client.post("/v1/jobs/batch", json=body, headers=key)
    assert first.status_code == 200 and first.json()["created"] == 2, first.text
    again = app_client.post("/v1/jobs/batch", json=body, headers=key)
    assert again.status_code == 200 and again.json() == first.json()
    assert _count_jobs(name) == 2
    other = app_client.post("/v1/jobs/batch", json={"jobs": [note_spec(4, name=name)]}, headers=key)
    body409 = _is_problem(other, 409)
    assert "Idempotency-Key" in body409["detail"] and "different" in body409["detail"]
    assert _count_jobs(name) == 2
    # without a key, every request is new
    assert app_client.post("/v1/jobs/batch", json=body).json()["created"] == 2 and _count_jobs(name) == 4


def test_concurrent_batches_with_one_key_create_one_set(app_client):
    name = f"batch-race-{uuid.uuid4().hex[:8]}"
    body = {"jobs": [note_spec(2, name=name)] * 5}
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    answers: list[Any] = []
    barrier = threading.Barrier(4)

    def post() -> None:
        barrier.wait()
        answers.append(app_client.post("/v1/jobs/batch", json=body, headers=key))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert len({tuple(x["id"] for x in r.json()["results"]) for r in answers}) == 1
    assert _count_jobs(name) == 5


def test_a_retried_sweep_creates_nothing_and_returns_the_same_sweep(app_client):
    name = f"sweep-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "base": base(), "method": "random", "max_trials": 2, "max_concurrent": 1,
            "parameters": {"optimizer.learning_rate": {"values": [0.01, 0.02]}},
            "objective": {"metric": "val_loss"}}
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    first = app_client.post("/v1/sweeps", json=body, headers=key)
    assert first.status_code == 201, first.text
    assert first.headers["location"] == f"/v1/sweeps/{first.json()['id']}"
    again = app_client.post("/v1/sweeps", json=body, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert [t["job_id"] for t in again.json()["trials"]] == [t["job_id"] for t in first.json()["trials"]]
    assert _count_sweeps(name) == 1
    _is_problem(app_client.post("/v1/sweeps", json={**body, "max_trials": 1}, headers=key), 409)
    assert _count_sweeps(name) == 1
    app_client.post(f"/v1/sweeps/{first.json()['id']}/cancel")


def test_location_on_a_created_job(app_client):
    r = app_client.post("/v1/jobs", json=note_spec(2, name="located"))
    assert r.status_code == 201 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert app_client.get(r.headers["location"]).json()["id"] == r.json()["id"]


def test_every_error_status_is_a_problem_document(make_app):  # noqa: F811
    c = make_app(max_body_bytes=50_000, requests_per_minute=0)
    token, _ = new_key(_unique("problems"))
    auth = bearer(token)
    # 401
    body = _is_problem(c.get("/v1/jobs"), 401)
    assert "API key" in body["detail"] and c.get("/v1/jobs").headers["www-authenticate"].startswith("Bearer")
    # 404
    assert "no job" in _is_problem(c.get("/v1/jobs/" + "0" * 32, headers=auth), 404)["detail"]
    # 405 keeps its Allow header
    r = c.put("/v1/jobs", headers=auth)
    _is_problem(r, 405)
    assert "GET" in r.headers["allow"] and "POST" in r.headers["allow"]
    # 409
    job = c.post("/v1/jobs", json=note_spec(2), headers=auth).json()
    c.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert "already ended" in _is_problem(c.post(f"/v1/jobs/{job['id']}/cancel", headers=auth), 409)["detail"]
    # 413 (the middleware answers before the app)
    big = note_spec(2, name="x" * 60_000)
    assert "limit of 50000 bytes" in _is_problem(c.post("/v1/jobs", json=big, headers=auth), 413)["detail"]
    # 422: detail summarizes; errors keep loc, path, msg, type
    body = _is_problem(c.post("/v1/jobs", json=note_spec(0), headers=auth), 422)
    assert [e["path"] for e in body["errors"]] == ["epochs"] and body["detail"].startswith("1 error in the request: epochs:")
    assert set(body["errors"][0]) == {"loc", "path", "msg", "type"}
    body = _is_problem(c.post("/v1/jobs", content=b"{nope", headers={**auth, "content-type": "application/json"}), 422)
    assert body["errors"][0]["type"] == "json_invalid" and body["errors"][0]["path"] == ""
    # 429 with Retry-After
    limited = make_app(requests_per_minute=1)
    token2, _ = new_key(_unique("problems-rate"))
    limited.get("/v1/jobs", headers=bearer(token2))
    r = limited.get("/v1/jobs", headers=bearer(token2))
    _is_problem(r, 429)
    assert int(r.headers["retry-after"]) >= 1


def test_openapi_types_spec_bodies_and_names_operations(app_client):
    doc = app_client.get("/openapi.json").json()
    ops = {op["operationId"]: (path, method, op) for path, m in doc["paths"].items() for method, op in m.items()}
    for name in ("create_job", "create_batch", "list_jobs", "get_job", "cancel_job", "create_sweep", "get_sweep",
                 "create_webhook", "list_deliveries", "preview_schedule"):
        assert name in ops, sorted(ops)
    assert len(ops) == sum(len(m) for m in doc["paths"].values())  # unique
    schemas = doc["components"]["schemas"]

    def body_schema(op_id: str) -> dict[str, Any]:
        return ops[op_id][2]["requestBody"]["content"]["application/json"]["schema"]

    assert body_schema("create_job") == {"$ref": "#/components/schemas/JobCreate"}  # a JobSpec, labels, notes
    assert set(schemas["JobCreate"]["properties"]) == set(schemas["JobSpec"]["properties"]) | {"labels", "notes"}
    assert body_schema("create_sweep") == {"$ref": "#/components/schemas/SweepCreate"}
    assert schemas["SweepCreate"]["properties"]["base"]["$ref"] == "#/components/schemas/JobSpec"
    assert schemas["BatchCreate"]["properties"]["jobs"]["items"] == {"$ref": "#/components/schemas/JobSpec"}
    # the spec schema is the engine's own (training.spec.json_schema), refs rewritten into the document
    from training.spec import json_schema

    engine = json_schema()
    assert set(schemas["JobSpec"]["properties"]) == set(engine["properties"])
    assert set(engine["$defs"]) <= set(schemas)
    assert "#/$defs/" not in str(schemas["JobSpec"])
    # enums
    summary = schemas["JobSummary"]["properties"]
    assert set(summary["status"]["enum"]) == {"queued", "running", "paused", "succeeded", "failed", "cancelled"}
    reasons = next(x for x in summary["stop_reason"]["anyOf"] if "enum" in x)["enum"]
    assert {"completed", "early_stopping", "cancelled", "pruned", "worker_lost", "stalled"} <= set(reasons)
    # every error answer is documented as a problem document; 201s carry Location
    for op_id, (_path, _method, op) in ops.items():
        for code, resp in op["responses"].items():
            if code.startswith(("4", "5")) and op_id != "readyz":
                assert list(resp["content"]) == ["application/problem+json"], (op_id, code)
            if code == "201" and op_id != "upload_dataset":
                assert "Location" in resp.get("headers", {}), op_id
