"""API keys and projects, against the real PostgreSQL database: keys are stored hashed and shown
once, a revoke takes effect on the next request, a key sees only its project, and another
project's id answers 404 on every route and method of the app (enumerated from the app itself,
so routes added later are covered)."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, text

from client import Client
from client.api import TrainyardError

from .conftest import cli
from .helpers import ROOT, free_port, long_spec, note_spec, stop, wait_http


@pytest.fixture(scope="module")
def keyed_app(inproc_env: dict[str, str]) -> Iterator[Any]:
    """The ASGI app with API keys required (the session's database; nothing consumes its queue)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from config.settings import get_settings

    app = create_app(get_settings().replace(auth="required"))
    with TestClient(app) as c:
        yield c


def new_key(project: str, name: str | None = None) -> tuple[str, str]:
    """(token, key id) of a fresh key of ``project``."""
    from store import auth
    from store.db import session_scope

    with session_scope() as s:
        k = auth.create_key(s, project, name)
    return k.token, k.id


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _unique(tag: str) -> str:
    import uuid

    return f"{tag}-{uuid.uuid4().hex[:8]}"


def _npz(n: int = 40, features: int = 3, classes: int = 2) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.normal(size=(n, features)).astype(np.float32), y=rng.integers(0, classes, n))
    return buf.getvalue()


def _small_spec(dataset: str = "digits", **over: Any) -> dict[str, Any]:
    spec = note_spec(2, name="auth-test")
    spec["data"] = {"dataset": dataset, "validation_split": 0.2, "batch_size": 16}
    if dataset != "digits":
        spec["model"] = {"layers": [{"type": "dense", "units": 2}]}
        spec["callbacks"] = {}
        spec["metrics"] = ["accuracy"]
    spec.update(over)
    return spec


def test_requests_without_a_valid_key_are_401_with_www_authenticate(keyed_app):
    token, _ = new_key(_unique("p401"))
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"},
                    bearer("ty_" + "x" * 43), bearer("not-a-key"), {"Authorization": f"Bearer {token[:-1]}"}):
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/catalog"),
                             ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef")):
            r = keyed_app.request(method, path, headers=headers, json={} if method == "POST" else None)
            assert r.status_code == 401, (headers, method, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert isinstance(r.json()["detail"], str)
    assert keyed_app.get("/v1/jobs", headers=bearer(token)).status_code == 200
    # health, readiness, metrics and the docs stay open (load balancers and scrapers have no key)
    for path in ("/healthz", "/openapi.json", "/metrics"):
        assert keyed_app.get(path).status_code == 200, path
    scheme = keyed_app.get("/openapi.json").json()["components"]["securitySchemes"]
    assert scheme == {"HTTPBearer": {"type": "http", "scheme": "bearer",
                                     "description": "an API key: trainyard keys create --project NAME"}}


def test_keys_are_stored_as_sha256_only_and_shown_once(keyed_app):
    from store.db import get_engine

    project = _unique("hash")
    token, key_id = new_key(project, "ci")
    assert re.fullmatch(r"ty_[A-Za-z0-9_-]{43}", token)
    with get_engine().connect() as conn:
        row = conn.execute(text("SELECT * FROM api_keys WHERE id = :i"), {"i": key_id}).mappings().one()
    assert row["key_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert row["prefix"] == token[:12]
    assert all(token not in str(v) for v in row.values())
    assert keyed_app.get("/v1/jobs", headers=bearer(token)).status_code == 200
    # last use is recorded (at most once a minute, so a request usually writes nothing)
    with get_engine().connect() as conn:
        assert conn.execute(text("SELECT last_used_at FROM api_keys WHERE id = :i"), {"i": key_id}).scalar()


def test_a_revoked_key_is_refused_on_its_very_next_request(keyed_app):
    from store import auth
    from store.db import session_scope

    token, key_id = new_key(_unique("revoke"))
    other, _ = new_key(_unique("revoke-other"))
    for _ in range(3):
        assert keyed_app.get("/v1/jobs", headers=bearer(token)).status_code == 200
    with session_scope() as s:
        assert auth.revoke_key(s, key_id)
    r = keyed_app.get("/v1/jobs", headers=bearer(token))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["detail"] == "invalid or revoked API key"
    assert keyed_app.get("/v1/jobs", headers=bearer(other)).status_code == 200
    with session_scope() as s:
        assert not auth.revoke_key(s, key_id)  # already revoked


@pytest.fixture(scope="module")
def two_projects(keyed_app: Any) -> dict[str, Any]:
    """Project A with a finished job (metrics, events, a best checkpoint) and a stored dataset;
    project B with its own key and nothing else."""
    from store import repo
    from store.db import session_scope

    a_token, _ = new_key(_unique("proj-a"))
    a2_token, _ = new_key(_unique("proj-a2"))
    b_token, _ = new_key(_unique("proj-b"))
    r = keyed_app.post("/v1/jobs", json=_small_spec(), headers=bearer(a_token))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with session_scope() as s:
        assert repo.claim_job(s, job_id, "test-worker", 300) is not None
        repo.record_progress(s, job_id, [{"epoch": 1, "loss": 1.0, "val_loss": float("nan")}])
        repo.add_checkpoint(s, job_id, epoch=1, step=5, monitor="val_loss", value=1.0, data=b"weights",
                            sha256=repo.sha256_hex(b"weights"), is_best=True)
        assert repo.finish_job(s, job_id, status="succeeded", stop_reason="completed")
    up = keyed_app.post("/v1/datasets", files={"file": ("a.npz", _npz())}, data={"name": "secret-a"},
                        headers=bearer(a_token))
    assert up.status_code == 201, up.text
    hook = keyed_app.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["job.failed"]},
                          headers=bearer(a_token))
    assert hook.status_code == 201, hook.text
    return {"a": a_token, "a2": a2_token, "b": b_token, "job_id": job_id, "dataset_id": up.json()["id"],
            "sweep_id": _make_sweep(keyed_app, a_token), "webhook_id": hook.json()["id"]}


def _make_sweep(keyed_app: Any, token: str) -> str | None:
    """A sweep of the token's project: through the API when the sweeps routes exist."""
    paths = keyed_app.get("/openapi.json").json()["paths"]
    if "/v1/sweeps" not in paths or "post" not in paths["/v1/sweeps"]:
        return None
    from store import auth, repo
    from store.db import session_scope
    from store.models import Sweep

    with session_scope() as s:
        owner = auth.resolve_key(s, token)
        assert owner is not None
        sweep = Sweep(
            id=repo.new_id(), project_id=owner.project_id, name="sweep-a", status="succeeded", method="random",
            config={}, objective_metric="val_loss", objective_mode="min", max_trials=1, max_concurrent=1,
            trials_created=0, created_at=repo.utcnow(), updated_at=repo.utcnow(),
        )
        s.add(sweep)
    return sweep.id


def _fill(path: str, ids: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        assert name in ids, f"no foreign object for path parameter {name!r} ({path}): add one to this test"
        return ids[name]

    return re.sub(r"\{([^}/:]+)(?::[^}]*)?\}", sub, path)


def test_another_projects_ids_are_404_on_every_route_and_method(keyed_app, two_projects):
    """Every route of the app with a path parameter, every method: project B gets 404 for
    project A's object, and A itself does not (so the id is real)."""
    ids = {"job_id": two_projects["job_id"], "dataset_id": two_projects["dataset_id"],
           "epoch": "1",  # the epoch of the job's one checkpoint
           "webhook_id": two_projects["webhook_id"]}
    if two_projects["sweep_id"]:
        ids["sweep_id"] = two_projects["sweep_id"]
    # the OpenAPI document lists every route of the app, each with its methods
    paths = keyed_app.get("/openapi.json").json()["paths"]
    routes = [(p, m.upper()) for p, ops in paths.items() if "{" in p for m in ops]
    assert len(routes) >= 6
    checked = []
    for path, method in routes:
        if method == "DELETE":  # A's own call really deletes: give it a throwaway object of A's
            a = bearer(two_projects["a"])
            spares = {}
            if "{dataset_id}" in path:
                spares["dataset_id"] = keyed_app.post("/v1/datasets", files={"file": ("spare.npz", _npz())},
                                                      headers=a).json()["id"]
            if "{webhook_id}" in path:
                spares["webhook_id"] = keyed_app.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/spare",
                                                                            "events": ["job.failed"]}, headers=a).json()["id"]
            if "{job_id}" in path:
                spares["job_id"] = keyed_app.post("/v1/jobs", json=_small_spec(), headers=a).json()["id"]
            if "{sweep_id}" in path:
                spares["sweep_id"] = _make_sweep(keyed_app, two_projects["a"])
            url = _fill(path, {**ids, **spares})
        else:
            url = _fill(path, ids)
        kw: dict[str, Any] = {"params": {"after": 0}} if url.endswith("/events") else {}
        if url.endswith("/export"):  # a required query parameter: a 422 would come before the 404
            kw = {"params": {"format": "onnx", "wait": 0}}
        elif url.endswith("/predict"):
            kw = {"json": {"inputs": [[0.0] * 64]}}
        elif url.endswith("/predict/file"):
            kw = {"files": {"file": ("x.npz", _npz())}}
        foreign = keyed_app.request(method, url, headers=bearer(two_projects["b"]), **kw)
        assert foreign.status_code == 404, (method, path, foreign.status_code, foreign.text)
        assert two_projects["dataset_id"] not in foreign.text or path.count("{") == 1
        own = keyed_app.request(method, url, headers=bearer(two_projects["a"]), **kw)
        assert own.status_code != 404, (method, path, own.text)
        checked.append(f"{method} {path}")
    assert "GET /v1/jobs/{job_id}" in checked and "POST /v1/jobs/{job_id}/cancel" in checked


def test_a_key_sees_only_its_projects_jobs_datasets_and_catalog(keyed_app, two_projects):
    a, a2, b = two_projects["a"], two_projects["a2"], two_projects["b"]
    job_id, dataset_id = two_projects["job_id"], two_projects["dataset_id"]
    assert job_id in [j["id"] for j in keyed_app.get("/v1/jobs", headers=bearer(a)).json()["jobs"]]
    assert keyed_app.get("/v1/jobs", headers=bearer(b)).json()["jobs"] == []
    assert keyed_app.get("/v1/jobs", headers=bearer(a2)).json()["jobs"] == []  # another project, too
    assert [d["id"] for d in keyed_app.get("/v1/datasets", headers=bearer(a)).json()["datasets"]] == [dataset_id]
    assert keyed_app.get("/v1/datasets", headers=bearer(b)).json()["datasets"] == []
    names = [d["name"] for d in keyed_app.get("/v1/catalog", headers=bearer(b)).json()["datasets"]]
    assert dataset_id not in names and "digits" in names
    assert dataset_id in [d["name"] for d in keyed_app.get("/v1/catalog", headers=bearer(a)).json()["datasets"]]
    # B cannot train on A's dataset: to B it does not exist
    r = keyed_app.post("/v1/jobs", json=_small_spec(dataset_id), headers=bearer(b))
    assert r.status_code == 422 and "unknown dataset" in r.text, r.text
    r = keyed_app.post("/v1/jobs/batch", json={"jobs": [_small_spec(dataset_id)]}, headers=bearer(b))
    assert r.json()["invalid"] == 1
    ok = keyed_app.post("/v1/jobs", json=_small_spec(dataset_id), headers=bearer(a))
    assert ok.status_code == 201, ok.text
    # jobs made by a key land in its project (batch too)
    batch = keyed_app.post("/v1/jobs/batch", json={"jobs": [_small_spec()]}, headers=bearer(b)).json()
    assert batch["created"] == 1
    assert [j["id"] for j in keyed_app.get("/v1/jobs", headers=bearer(b)).json()["jobs"]] == [batch["results"][0]["id"]]


def test_idempotency_keys_are_per_project(keyed_app):
    a, _ = new_key(_unique("idem-a"))
    b, _ = new_key(_unique("idem-b"))
    key = _unique("same-key")
    ra = keyed_app.post("/v1/jobs", json=_small_spec(), headers={**bearer(a), "Idempotency-Key": key})
    assert ra.status_code == 201
    # another project's use of the same key makes its own job and learns nothing of A's
    rb = keyed_app.post("/v1/jobs", json=_small_spec(name="other"), headers={**bearer(b), "Idempotency-Key": key})
    assert rb.status_code == 201, rb.text
    assert rb.json()["id"] != ra.json()["id"]
    again = keyed_app.post("/v1/jobs", json=_small_spec(), headers={**bearer(a), "Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["id"] == ra.json()["id"]


def test_without_auth_every_caller_is_in_the_default_project(app_client):
    from store.db import session_scope
    from store.models import DEFAULT_PROJECT, Job

    r = app_client.post("/v1/jobs", json=_small_spec(name="keyless"))
    assert r.status_code == 201, r.text
    with session_scope(write=False) as s:
        assert s.scalar(select(Job.project_id).where(Job.id == r.json()["id"])) == DEFAULT_PROJECT
    # a key sent anyway is ignored, not an error
    assert app_client.get(f"/v1/jobs/{r.json()['id']}", headers=bearer("ty_whatever-whatever-whatever")).status_code == 200


def test_settings_default_to_required_keys():
    from config.settings import settings_from_env

    assert settings_from_env({}).auth == "required"
    assert settings_from_env({"TRAINYARD_AUTH": "off"}).auth == "off"
    with pytest.raises(ValueError, match="TRAINYARD_AUTH"):
        settings_from_env({"TRAINYARD_AUTH": "maybe"})


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def keyed_api(service_env: dict[str, str], migrated: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``trainyard api`` process with the production default (no TRAINYARD_AUTH: keys required)."""
    env = {k: v for k, v in service_env.items() if k != "TRAINYARD_AUTH"}
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "keyed-api.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(cli("api", "--port", str(port)), env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc)
        assert "API keys required" in log.read_text()
        yield url
    finally:
        stop(proc)


def test_cli_keys_create_list_revoke_against_a_live_api(service_env, keyed_api):
    env = {k: v for k, v in service_env.items() if k not in ("TRAINYARD_AUTH", "TRAINYARD_API_KEY")}
    project = _unique("cli")
    out = _run_cli(env, "keys", "create", "--project", project, "--name", "laptop")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert re.fullmatch(r"ty_[A-Za-z0-9_-]{43}", token), out.stdout
    assert "not shown again" in out.stderr
    second = _run_cli(env, "keys", "create", "--project", project).stdout.strip()  # the project is reused

    # the client sends TRAINYARD_API_KEY / --api-key as the bearer token; the server wants one
    assert _run_cli(env, "--url", keyed_api, "jobs").returncode != 0
    listed = _run_cli({**env, "TRAINYARD_API_KEY": token}, "jobs", "--url", keyed_api, "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"jobs": []' in listed.stdout
    assert _run_cli(env, "--api-key", second, "jobs", "--url", keyed_api).returncode == 0
    with Client(keyed_api, api_key=token) as c:
        job = c.submit(_small_spec(name="cli-key"))
        assert c.job(job["id"])["id"] == job["id"]
    with Client(keyed_api, api_key=second) as c:
        assert [j["id"] for j in c.jobs()["jobs"]] == [job["id"]]  # same project, other key

    rows = _run_cli(env, "keys", "list", "--project", project, "--json")
    assert rows.returncode == 0, rows.stderr
    assert token not in rows.stdout and token[:12] in rows.stdout and '"name": "laptop"' in rows.stdout
    assert _run_cli(env, "keys", "list").returncode == 0

    assert _run_cli(env, "keys", "revoke", "ty_").returncode == 2  # ambiguous prefix: refused
    assert _run_cli(env, "keys", "revoke", "ty_nosuchkey").returncode == 1
    rev = _run_cli(env, "keys", "revoke", token[:12])
    assert rev.returncode == 0 and "revoked" in rev.stdout, rev.stderr
    denied = _run_cli({**env, "TRAINYARD_API_KEY": token}, "jobs", "--url", keyed_api)
    assert denied.returncode != 0 and "401" in denied.stderr and "revoked" in denied.stderr
    assert _run_cli({**env, "TRAINYARD_API_KEY": second}, "jobs", "--url", keyed_api).returncode == 0
    assert "was already revoked" in _run_cli(env, "keys", "revoke", token).stdout
    assert _run_cli(env, "keys", "create", "--project", "no spaces allowed").returncode == 2

    # per-project limits: the project's own rate applies at once
    out = _run_cli(env, "projects", "set-limits", project, "--requests-per-minute", "1", "--max-concurrent-jobs", "5")
    assert out.returncode == 0 and "requests_per_minute=1" in out.stdout, out.stderr
    with Client(keyed_api, api_key=second, retries=0) as c:  # (a client retries 429s by default)
        c.jobs()
        with pytest.raises(TrainyardError) as exc:
            c.jobs()
        assert exc.value.status_code == 429
    assert _run_cli(env, "projects", "set-limits", project).returncode == 0  # back to the defaults


def test_serve_without_keys_refuses_a_non_loopback_host(tmp_path):
    out = subprocess.run([sys.executable, "-m", "client.cli", "serve", "--host", "0.0.0.0", "--data-dir",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--auth" in out.stderr


def test_revoking_a_key_ends_its_open_event_stream(service_env, keyed_api):
    """An SSE stream outlives many requests' worth of time: it re-checks its key with the query
    it polls anyway, so a revoke ends it at the next poll."""
    import threading
    import time

    from store import auth, repo
    from store.db import session_scope

    token, key_id = new_key(_unique("sse"))
    with Client(keyed_api, api_key=token) as c:
        job = c.submit(long_spec(name="sse-revoke"))
        seen: list[dict[str, Any]] = []
        ended = threading.Event()

        def follow() -> None:
            for ev in c.events(job["id"]):
                seen.append(ev)
            ended.set()

        threading.Thread(target=follow, daemon=True).start()
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen and not ended.is_set()
        with session_scope() as s:
            assert auth.revoke_key(s, key_id)
        assert ended.wait(10), "the stream went on after its key was revoked"
    with session_scope() as s:
        assert repo.get_job(s, job["id"]).status not in ("succeeded", "failed", "cancelled")
        repo.request_cancel(s, job["id"])
