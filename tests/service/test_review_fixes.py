"""Regression tests of the review's findings (in-process API on the session's PostgreSQL/Redis,
the real task body ``run_job``; nothing mocked)."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import text

from store.db import session_scope
from worker.runner import run_job

from .helpers import note_spec

# SGD whose rate grows 4x every 23 steps: val_loss improves for a few epochs, then blows up.
WORSENING_LR = {"schedule": "exponential", "initial_learning_rate": 0.02, "decay_steps": 23, "decay_rate": 4.0}


def worsening_spec(epochs: int = 8, **checkpoint: object) -> dict:
    spec = note_spec(epochs, device="cpu", optimizer={"name": "sgd", "learning_rate": WORSENING_LR})
    spec["callbacks"] = {"model_checkpoint": {"monitor": "val_loss", "save_best_only": False, **checkpoint}}
    return spec


# --------------------------------------------------------------------------- 1: errors after fit()


def test_error_while_recording_the_result_fails_the_job_with_a_reason(app_client):
    job = app_client.post("/v1/jobs", json=note_spec(2, device="cpu")).json()
    fn = f"ty_refuse_{job['id']}"
    # a real database error on the final write: this job may not become 'succeeded'
    with session_scope() as s:
        s.execute(text(f"""
            CREATE FUNCTION {fn}() RETURNS trigger AS $$
            BEGIN
              IF NEW.id = '{job['id']}' AND NEW.status = 'succeeded' THEN
                RAISE EXCEPTION 'refusing to finish this job';
              END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql"""))
        s.execute(text(f"CREATE TRIGGER {fn} BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION {fn}()"))
    try:
        with pytest.raises(Exception, match="refusing to finish"):
            run_job(job["id"])
    finally:
        with session_scope() as s:
            s.execute(text(f"DROP TRIGGER {fn} ON jobs"))
            s.execute(text(f"DROP FUNCTION {fn}()"))
    done = app_client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "failed" and done["stop_reason"] == "error"
    assert "refusing to finish" in done["error"] and done["finished_at"]


# --------------------------------------------------------------------------- 2: best checkpoint


def _check_best(app_client, job_id: str) -> tuple[list[dict], dict]:
    cks = app_client.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]
    assert len({c["epoch"] for c in cks}) == len(cks), cks  # one row per save, no duplicate
    best = [c for c in cks if c["is_best"]]
    assert len(best) == 1 and best[0]["stored"]
    assert {c["epoch"] for c in cks if c["stored"]} == {best[0]["epoch"], cks[-1]["epoch"]}
    r = app_client.get(f"/v1/jobs/{job_id}/checkpoints/best")
    assert r.status_code == 200
    assert r.headers["x-checkpoint-sha256"] == best[0]["sha256"] == hashlib.sha256(r.content).hexdigest()
    assert r.headers["x-checkpoint-epoch"] == str(best[0]["epoch"])
    return cks, best[0]


def test_best_checkpoint_is_the_best_epoch_when_the_value_gets_worse_at_the_end(app_client):
    job = app_client.post("/v1/jobs", json=worsening_spec()).json()
    run_job(job["id"])
    done = app_client.get(f"/v1/jobs/{job['id']}").json()
    vals = [float(m["val_loss"]) for m in app_client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]]
    best_epoch = vals.index(min(vals)) + 1
    assert best_epoch < len(vals)  # the premise: the last epoch is not the best
    cks, best = _check_best(app_client, job["id"])
    assert [c["epoch"] for c in cks] == list(range(1, len(vals) + 1))
    assert best["epoch"] == best_epoch == done["best"]["epoch"]
    assert best["value"] == pytest.approx(min(vals))


def test_best_checkpoint_follows_the_engine_with_an_initial_value_threshold(app_client):
    # Nothing beats the threshold: the engine's best is its first save; its bytes must survive.
    job = app_client.post("/v1/jobs", json=worsening_spec(initial_value_threshold=0.01)).json()
    run_job(job["id"])
    cks, best = _check_best(app_client, job["id"])
    assert best["epoch"] == 1 and len(cks) >= 3


# --------------------------------------------------------------------------- 5: commit before the response


def test_upload_is_committed_before_the_response(api_url, inproc_env):
    """A commit that fails must not follow a 201 (the live API: FastAPI runs a yield dependency's
    cleanup after the response is sent)."""
    import io
    import uuid

    import httpx
    import numpy as np

    name = f"commit-fails-{uuid.uuid4().hex[:8]}"
    fn = f"ty_refuse_{name.replace('-', '_')}"
    with session_scope() as s:
        s.execute(text(f"""
            CREATE FUNCTION {fn}() RETURNS trigger AS $$
            BEGIN
              IF NEW.name = '{name}' THEN RAISE EXCEPTION 'refusing this dataset at commit'; END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql"""))
        s.execute(text(f"CREATE CONSTRAINT TRIGGER {fn} AFTER INSERT ON datasets DEFERRABLE INITIALLY DEFERRED "
                       f"FOR EACH ROW EXECUTE FUNCTION {fn}()"))
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((10, 2), dtype=np.float32), y=np.arange(10) % 2)
    try:
        r = httpx.post(f"{api_url}/v1/datasets", files={"file": ("d.npz", buf.getvalue())}, data={"name": name},
                       timeout=30)
    finally:
        with session_scope() as s:
            s.execute(text(f"DROP TRIGGER {fn} ON datasets"))
            s.execute(text(f"DROP FUNCTION {fn}()"))
    assert r.status_code >= 500, r.text
    listed = httpx.get(f"{api_url}/v1/datasets", timeout=30).json()["datasets"]
    assert name not in [d["name"] for d in listed]


# --------------------------------------------------------------------------- 6: no 500s on odd input


def test_huge_integers_are_client_errors_not_500(app_client):
    job = app_client.post("/v1/jobs", json=note_spec(2)).json()
    base = f"/v1/jobs/{job['id']}"
    huge = str(10**30)
    for path, params in [("/metrics", {"since_epoch": huge}), ("/metrics", {"max_points": huge}),
                         ("/metrics", {"since_epoch": str(2**31)}), ("/events", {"after": huge}),
                         ("/events", {"after": str(2**63)})]:
        r = app_client.get(base + path, params=params)
        assert r.status_code == 422, (path, params, r.text)
    for value in (huge, str(2**63), "-1"):
        r = app_client.get(base + "/events", headers={"Last-Event-ID": value})
        assert r.status_code == 400 and "Last-Event-ID" in r.json()["detail"], (value, r.text)
    assert app_client.get(base + "/metrics", params={"since_epoch": str(2**31 - 1)}).json()["epochs"] == []


def test_corrupt_npz_is_422_and_leaves_no_temp_file(app_client, inproc_env):
    import io
    import zipfile
    from pathlib import Path

    import numpy as np

    datasets_dir = Path(inproc_env["TRAINYARD_DATA_DIR"]) / "datasets"
    before = set(datasets_dir.glob("*")) if datasets_dir.exists() else set()
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((50, 3)), y=np.zeros(50))
    flipped = bytearray(buf.getvalue())
    for i in range(60, 120):
        flipped[i] ^= 0xFF  # broken compressed data inside a readable zip
    members = io.BytesIO()
    with zipfile.ZipFile(members, "w") as zf:
        zf.writestr("x.npy", b"garbage")
        zf.writestr("y.npy", b"garbage")
    for content in (bytes(flipped), buf.getvalue()[:100], b"not a zip at all", members.getvalue()):
        r = app_client.post("/v1/datasets", files={"file": ("broken.npz", content)})
        assert r.status_code == 422, r.text
        err = r.json()["errors"][0]
        assert err["path"] == "file" and "not" in err["msg"] and ".npz" in err["msg"]
    assert set(datasets_dir.glob("*")) == before  # no temp or stored file left behind
    r = app_client.post("/v1/datasets", files={"file": ("broken.npz", bytes(flipped))})
    assert "not a valid .npz" in r.json()["errors"][0]["msg"]


def test_batch_items_that_are_not_objects_get_their_own_errors(app_client):
    import uuid

    name = f"batch-odd-{uuid.uuid4().hex[:8]}"
    r = app_client.post("/v1/jobs/batch", json={"jobs": [note_spec(2, name=name), 5, None, "x"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["created"], body["invalid"]) == (1, 3)
    res = body["results"]
    assert [x["status"] for x in res] == ["created", "invalid", "invalid", "invalid"]
    for item in res[1:]:
        assert item["id"] is None and "object" in item["errors"][0]["msg"]
    assert app_client.get(f"/v1/jobs/{res[0]['id']}").json()["status"] == "queued"


# --------------------------------------------------------------------------- 7: Idempotency-Key reuse


def test_idempotency_key_with_a_different_body_is_409(app_client):
    import uuid

    key = f"key-{uuid.uuid4()}"
    spec = note_spec(2, name=f"idem-{uuid.uuid4().hex[:8]}")
    r1 = app_client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
    assert r1.status_code == 201
    reordered = dict(reversed(list(spec.items())))  # the same body, keys in another order
    r2 = app_client.post("/v1/jobs", json=reordered, headers={"Idempotency-Key": key})
    assert r2.status_code == 200 and r2.json()["id"] == r1.json()["id"]
    r3 = app_client.post("/v1/jobs", json={**spec, "epochs": 3}, headers={"Idempotency-Key": key})
    assert r3.status_code == 409, r3.text
    assert "Idempotency-Key" in r3.json()["detail"] and "different" in r3.json()["detail"]
    listed = app_client.get("/v1/jobs", params={"name": spec["name"]}).json()["jobs"]
    assert [j["id"] for j in listed] == [r1.json()["id"]]


# --------------------------------------------------------------------------- 8: time zones in list filters


def _created_filters_match(list_fn) -> None:
    """``list_fn(params) -> ids``; the newest job must be found with bounds in any time zone."""
    from datetime import UTC, timedelta, timezone

    created, job_id = list_fn(None)
    for tz in (UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))):
        local = created.astimezone(tz)
        assert job_id in list_fn({"created_after": local - timedelta(minutes=1),
                                  "created_before": local + timedelta(minutes=1)})[1], tz
        assert job_id not in list_fn({"created_after": local + timedelta(minutes=1)})[1], tz
    naive = created.astimezone(UTC).replace(tzinfo=None)  # naive = UTC
    assert job_id in list_fn({"created_after": naive - timedelta(minutes=1),
                              "created_before": naive + timedelta(minutes=1)})[1]
    assert job_id not in list_fn({"created_before": naive - timedelta(minutes=1)})[1]


def test_created_filters_normalize_time_zones_on_sqlite(tmp_path):
    from sqlalchemy.orm import Session

    from store import repo
    from store.db import make_engine
    from store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'tz.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with Session(engine) as s:
            job = repo.create_job(s, spec={"name": "tz", "epochs": 1}, queue="cpu")
            s.commit()
            created, job_id = repo.as_utc(job.created_at), job.id

            def list_fn(params):
                if params is None:
                    return created, job_id
                flt = repo.JobFilter(name="tz", **params)
                return created, [j.id for j in repo.list_jobs(s, flt, limit=10, cursor=None)]

            _created_filters_match(list_fn)
    finally:
        engine.dispose()


def test_created_filters_normalize_time_zones_over_http(app_client):
    import uuid
    from datetime import datetime

    name = f"tz-{uuid.uuid4().hex[:8]}"
    job = app_client.post("/v1/jobs", json=note_spec(1, name=name)).json()

    def list_fn(params):
        if params is None:
            return datetime.fromisoformat(job["created_at"]), job["id"]
        q = {"name": name, **{k: v.isoformat() for k, v in params.items()}}
        r = app_client.get("/v1/jobs", params=q)
        assert r.status_code == 200, r.text
        return None, [j["id"] for j in r.json()["jobs"]]

    _created_filters_match(list_fn)


# --------------------------------------------------------------------------- 9: schedule preview validation


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1, 0, True, False, "0.1", [0.1], None])
def test_schedule_preview_refuses_invalid_rates(app_client, lr):
    import json

    body = json.dumps({"learning_rate": lr, "steps": 5})  # NaN/Infinity as Python's json writes them
    r = app_client.post("/v1/schedules/preview", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, (lr, r.text)
    for e in r.json()["errors"]:
        assert set(e) == {"loc", "path", "msg", "type"} and e["path"].startswith("learning_rate"), e


def test_schedule_preview_nested_errors_are_under_learning_rate(app_client):
    lr = {"schedule": "exponential", "initial_learning_rate": -1, "decay_steps": 10, "decay_rate": 0.5}
    r = app_client.post("/v1/schedules/preview", json={"learning_rate": lr, "steps": 5})
    assert r.status_code == 422 and [e["path"] for e in r.json()["errors"]] == ["learning_rate.initial_learning_rate"]
    ok = app_client.post("/v1/schedules/preview", json={"learning_rate": 0.5, "steps": 3})
    assert ok.status_code == 200 and ok.json()["lr"] == [0.5, 0.5, 0.5]


# --------------------------------------------------------------------------- 10: malformed JSON


@pytest.mark.parametrize("url", ["/v1/jobs", "/v1/schedules/preview", "/v1/jobs/batch"])
def test_malformed_json_names_the_body_and_the_position(app_client, url):
    r = app_client.post(url, content=b'{"steps": x}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    (err,) = r.json()["errors"]
    assert err["path"] == "" and err["type"] == "json_invalid" and err["loc"] == ["body"]
    assert "not valid JSON" in err["msg"] and "character 10" in err["msg"]


# --------------------------------------------------------------------------- 11: small ones


def test_cancel_of_an_ended_job_is_409_and_its_download_says_it_has_no_checkpoint(app_client):
    job = app_client.post("/v1/jobs", json=note_spec(2)).json()
    assert app_client.get(f"/v1/jobs/{job['id']}/checkpoints/best").json()["detail"].endswith("no checkpoint yet")
    first = app_client.post(f"/v1/jobs/{job['id']}/cancel")
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    again = app_client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]  # like succeeded/failed jobs
    r = app_client.get(f"/v1/jobs/{job['id']}/checkpoints/best")
    assert r.status_code == 404 and "ended without a checkpoint" in r.json()["detail"]


def test_cli_jobs_and_show_print_one_line_on_a_client_error(api_url):
    import subprocess
    import sys

    from .helpers import ROOT

    cli = [sys.executable, "-m", "client.cli"]
    for args in (["jobs", "--status", "exploded"], ["show", "0" * 32], ["show", "0" * 32, "--json"]):
        out = subprocess.run([*cli, *args, "--url", api_url], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
        assert "HTTP 4" in out.stderr, out.stderr


def _refuse_at_commit(table: str, condition: str, tag: str) -> tuple[str, str]:
    """A deferred constraint trigger that fails the COMMIT of rows matching ``condition``."""
    fn = f"ty_refuse_{tag}"
    with session_scope() as s:
        s.execute(text(f"""
            CREATE FUNCTION {fn}() RETURNS trigger AS $$
            BEGIN
              IF {condition} THEN RAISE EXCEPTION 'refused at commit'; END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql"""))
        s.execute(text(f"CREATE CONSTRAINT TRIGGER {fn} AFTER INSERT OR UPDATE ON {table} DEFERRABLE INITIALLY "
                       f"DEFERRED FOR EACH ROW EXECUTE FUNCTION {fn}()"))
    return fn, table


def _drop(fn: str, table: str) -> None:
    with session_scope() as s:
        s.execute(text(f"DROP TRIGGER {fn} ON {table}"))
        s.execute(text(f"DROP FUNCTION {fn}()"))


@pytest.mark.parametrize("route", ["create", "batch", "cancel"])
def test_job_writes_are_committed_before_the_response(api_url, inproc_env, route):
    import uuid

    import httpx

    name = f"commit-{route}-{uuid.uuid4().hex[:8]}"
    # a fresh connection per request: uvicorn closes the one a 500 went out on
    h = httpx.Client(base_url=api_url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
    with h:
        job_id = None
        if route == "cancel":
            from store import repo

            with session_scope() as s:  # stored, never enqueued: it stays queued
                job_id = repo.create_job(s, spec=note_spec(2, name=name), queue="nowhere").id
            trigger = _refuse_at_commit("jobs", f"NEW.id = '{job_id}' AND NEW.status = 'cancelled'", name.replace("-", "_"))
        else:
            trigger = _refuse_at_commit("jobs", f"NEW.name = '{name}'", name.replace("-", "_"))
        try:
            if route == "create":
                r = h.post("/v1/jobs", json=note_spec(2, name=name))
            elif route == "batch":
                r = h.post("/v1/jobs/batch", json={"jobs": [note_spec(2, name=name)]})
            else:
                r = h.post(f"/v1/jobs/{job_id}/cancel")
        finally:
            _drop(*trigger)
        assert r.status_code >= 500, r.text  # the failed commit is the answer, not a 2xx before it
        listed = h.get("/v1/jobs", params={"name": name}).json()["jobs"]
        if route == "cancel":
            assert [j["status"] for j in listed] == ["queued"]
        else:
            assert listed == []
