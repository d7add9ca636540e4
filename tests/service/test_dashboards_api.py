"""The dashboards' API through the real app on PostgreSQL: labels and notes, the list's filters
and sort orders with cursors, bulk metrics, the dry run, browser sessions (cookie + CSRF), CORS
and /docs without a CDN. (The event streams fed by change notices: test_dashboards_stream.py.)"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .helpers import note_spec


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _submit(app_client: Any, **over: Any) -> dict[str, Any]:
    r = app_client.post("/v1/jobs", json=note_spec(3, **over))
    assert r.status_code == 201, r.text
    return r.json()


def _finish(job_id: str, best: float | None) -> None:
    """Run the job's recorded life through the store's own transitions (no worker consumes the
    in-process app's queue): claimed, then finished with ``best``."""
    from store import repo
    from store.db import session_scope

    with session_scope() as s:
        assert repo.claim_job(s, job_id, "test-worker", 300.0) is not None
    with session_scope() as s:
        assert repo.finish_job(s, job_id, status="succeeded", stop_reason="completed",
                               best=("val_loss", best, 1) if best is not None else None)


def _all_pages(app_client: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(50):
        r = app_client.get("/v1/jobs", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        out += r.json()["jobs"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("the cursor never ended")


# --------------------------------------------------------------------------- labels and notes


def test_labels_and_notes_at_create_in_every_view_and_by_patch(app_client):
    tag = _tag()
    job = _submit(app_client, name=f"lab-{tag}", labels={"team": "vision", "run": tag}, notes="first try")
    assert job["labels"] == {"team": "vision", "run": tag} and job["notes"] == "first try"
    assert "labels" not in job["spec"] and "notes" not in job["spec"]  # not part of the training spec
    got = app_client.get(f"/v1/jobs/{job['id']}").json()  # the one-query read path (store.fastread)
    assert got["labels"] == job["labels"] and got["notes"] == "first try"
    listed = app_client.get("/v1/jobs", params={"label": f"run={tag}"}).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]] and listed[0]["labels"]["team"] == "vision"

    r = app_client.patch(f"/v1/jobs/{job['id']}", json={"labels": {"team": "nlp"}})
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == {"team": "nlp"} and r.json()["notes"] == "first try"  # notes untouched
    r = app_client.patch(f"/v1/jobs/{job['id']}", json={"notes": ""})
    assert r.json()["notes"] is None and r.json()["labels"] == {"team": "nlp"}
    assert app_client.get("/v1/jobs", params={"label": f"run={tag}"}).json()["jobs"] == []


@pytest.mark.parametrize("body, path", [
    ({"labels": {"bad key": "x"}}, "labels.bad key"),
    ({"labels": {"ok": 3}}, "labels.ok"),
    ({"labels": "team=x"}, "labels"),
    ({"notes": 5}, "notes"),
    ({"status": "succeeded"}, "status"),
])
def test_patch_rejects_what_it_cannot_set_naming_the_path(app_client, body, path):
    job = _submit(app_client, name=f"bad-{_tag()}")
    r = app_client.patch(f"/v1/jobs/{job['id']}", json=body)
    assert r.status_code == 422, r.text
    assert any(d["path"] == path or d["path"].startswith(path + ".") for d in r.json()["errors"]), r.json()


def test_labels_at_create_are_checked_like_the_spec(app_client):
    r = app_client.post("/v1/jobs", json={**note_spec(2), "labels": {"-x": "y"}})
    assert r.status_code == 422 and r.json()["errors"][0]["path"].startswith("labels")
    assert app_client.patch(f"/v1/jobs/{'0' * 32}", json={"notes": "x"}).status_code == 404


def test_sweeps_take_labels_and_notes(app_client):
    from .test_sweeps import base

    body = {"name": f"sw-{_tag()}", "base": base(), "method": "grid",
            "parameters": {"model.layers[0].units": {"values": [8, 16]}}, "objective": {"metric": "val_accuracy"},
            "labels": {"team": "vision"}, "notes": "grid over lr"}
    r = app_client.post("/v1/sweeps", json=body)
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert sweep["labels"] == {"team": "vision"} and sweep["notes"] == "grid over lr"
    r = app_client.patch(f"/v1/sweeps/{sweep['id']}", json={"labels": {"team": "nlp"}, "notes": None})
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == {"team": "nlp"} and r.json()["notes"] is None
    listed = app_client.get("/v1/sweeps").json()["sweeps"]
    assert next(s for s in listed if s["id"] == sweep["id"])["labels"] == {"team": "nlp"}
    app_client.post(f"/v1/sweeps/{sweep['id']}/cancel")


# --------------------------------------------------------------------------- list filters and orders


def test_list_filters_name_prefix_stop_reason_ids_and_updated_after(app_client):
    tag = _tag()
    a = _submit(app_client, name=f"pre-{tag}-a")
    b = _submit(app_client, name=f"pre-{tag}-b")
    c = _submit(app_client, name=f"other-{tag}")
    _finish(a["id"], 0.5)
    ids = lambda **p: [j["id"] for j in _all_pages(app_client, p)]  # noqa: E731
    assert set(ids(name_prefix=f"pre-{tag}")) == {a["id"], b["id"]}
    assert ids(name_prefix=f"pre-{tag}", stop_reason="completed") == [a["id"]]
    assert ids(id=[c["id"], b["id"]]) == [c["id"], b["id"]]  # newest first
    assert ids(name_prefix="pre-%") == []  # LIKE wildcards are literal
    after = app_client.get(f"/v1/jobs/{a['id']}").json()["updated_at"]
    assert a["id"] not in ids(name_prefix=f"pre-{tag}", updated_after=after)
    app_client.patch(f"/v1/jobs/{b['id']}", json={"notes": "touched"})
    assert ids(name_prefix=f"pre-{tag}", updated_after=after) == [b["id"]]


def test_order_by_best_pages_through_every_job_once_in_value_order(app_client):
    tag = _tag()
    values = [0.3, None, 0.1, 0.3, 0.7, 0.2, None, 0.05, 0.3]
    made = []
    for v in values:
        job = _submit(app_client, name=f"best-{tag}")
        _finish(job["id"], v)
        made.append((v, job["id"]))
    seen = _all_pages(app_client, {"name_prefix": f"best-{tag}", "order_by": "best", "limit": 2})
    expected = sorted(made, key=lambda p: (p[0] is None, p[0] or 0.0, p[1]))
    assert [j["id"] for j in seen] == [i for _, i in expected]
    desc = _all_pages(app_client, {"name_prefix": f"best-{tag}", "order_by": "best", "order": "desc", "limit": 3})
    expected_desc = sorted([m for m in made if m[0] is not None], key=lambda p: (-p[0], p[1]), reverse=False)
    expected_desc = sorted(expected_desc, key=lambda p: (-p[0], [-ord(ch) for ch in p[1]]))
    assert [j["id"] for j in desc][: len(expected_desc)] == [i for _, i in expected_desc]
    assert {j["id"] for j in desc} == {i for _, i in made}


def test_order_by_updated_follows_the_latest_change(app_client):
    tag = _tag()
    jobs = [_submit(app_client, name=f"upd-{tag}") for _ in range(4)]
    app_client.patch(f"/v1/jobs/{jobs[1]['id']}", json={"notes": "latest"})
    seen = _all_pages(app_client, {"name_prefix": f"upd-{tag}", "order_by": "updated", "limit": 1})
    assert seen[0]["id"] == jobs[1]["id"] and len(seen) == 4 and len({j["id"] for j in seen}) == 4


@pytest.mark.parametrize("params, path", [
    ({"label": "no-equals-sign"}, "query.label[0]"),
    ({"id": "xyz"}, "query.id[0]"),
    ({"order_by": "loss"}, "query.order_by"),
    ({"order_by": "best", "cursor": "0123456789abcdef0123456789abcdef"}, "query.cursor"),
])
def test_list_rejects_bad_filters_naming_the_parameter(app_client, params, path):
    r = app_client.get("/v1/jobs", params=params)
    assert r.status_code == 422, r.text
    assert path in [d["path"] for d in r.json()["errors"]], r.json()


# --------------------------------------------------------------------------- bulk metrics


def _record_epochs(job_id: str, n: int) -> None:
    from store import repo
    from store.db import session_scope

    with session_scope() as s:
        repo.record_progress(s, job_id, [
            {"epoch": e, "loss": 1.0 / e, "val_loss": 2.0 / e, "accuracy": e / 100, "lr": 0.001,
             **({"val_accuracy": float("nan")} if e == 2 else {})}
            for e in range(1, n + 1)])


def test_bulk_metrics_many_jobs_since_keys_and_downsampling(app_client):
    tag = _tag()
    jobs = [_submit(app_client, name=f"bulk-{tag}")["id"] for _ in range(3)]
    for i, j in enumerate(jobs):
        _record_epochs(j, 5 + i)
    missing = "f" * 32
    body = {"jobs": [{"id": jobs[0]}, {"id": jobs[1], "since_epoch": 4}, {"id": jobs[2]}, {"id": missing}]}
    r = app_client.post("/v1/metrics/bulk", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["missing"] == [missing]
    for j in jobs:  # the same epochs as each job's own metrics route
        own = app_client.get(f"/v1/jobs/{j}/metrics").json()
        since = 4 if j == jobs[1] else 0
        assert got["jobs"][j]["epochs"] == [e for e in own["epochs"] if e["epoch"] > since]
        assert got["jobs"][j]["total"] == len(got["jobs"][j]["epochs"])
    assert got["jobs"][jobs[0]]["epochs"][1]["val_accuracy"] == "NaN"

    r = app_client.post("/v1/metrics/bulk", json={"jobs": [{"id": jobs[2]}], "keys": ["val_loss", "nope"],
                                                 "max_points": 3})
    curve = r.json()["jobs"][jobs[2]]
    assert curve["total"] == 7
    assert [e["epoch"] for e in curve["epochs"]] == [1, 4, 7]
    assert all(set(e) == {"epoch", "val_loss"} for e in curve["epochs"])
    own = {e["epoch"]: e for e in app_client.get(f"/v1/jobs/{jobs[2]}/metrics").json()["epochs"]}
    assert [e["val_loss"] for e in curve["epochs"]] == [own[k]["val_loss"] for k in (1, 4, 7)]


def test_bulk_downsampling_keeps_the_rows_the_single_route_keeps(app_client):
    job = _submit(app_client, name=f"ds-{_tag()}")["id"]
    _record_epochs(job, 37)
    for max_points in (1, 2, 3, 4, 5, 7, 10, 13, 19, 36, 37, 50):
        for since in (0, 5):
            single = app_client.get(f"/v1/jobs/{job}/metrics", params={"max_points": max_points,
                                                                       "since_epoch": since}).json()
            bulk = app_client.post("/v1/metrics/bulk", json={"jobs": [{"id": job, "since_epoch": since}],
                                                             "max_points": max_points}).json()["jobs"][job]
            assert [e["epoch"] for e in bulk["epochs"]] == [e["epoch"] for e in single["epochs"]], (max_points, since)
            assert bulk["epochs"] == single["epochs"] and bulk["total"] == single["total"]


def test_bulk_metrics_limits(app_client):
    r = app_client.post("/v1/metrics/bulk", json={"jobs": [{"id": f"{i:032x}"} for i in range(1001)]})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "jobs"
    r = app_client.post("/v1/metrics/bulk", json={"jobs": [{"id": "a" * 32, "since_epoch": -1}]})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "jobs[0].since_epoch"


# --------------------------------------------------------------------------- dry run


def test_dry_run_answers_the_normalized_spec_and_what_it_implies(app_client):
    from training import validate_spec
    from training.data import describe
    from training.model import build_model

    spec = note_spec(4)
    before = app_client.get("/v1/jobs", params={"limit": 1}).json()["jobs"]
    r = app_client.post("/v1/jobs/validate", json={**spec, "labels": {"a": "b"}})
    assert r.status_code == 200, r.text
    dry = r.json()
    assert app_client.get("/v1/jobs", params={"limit": 1}).json()["jobs"] == before  # nothing stored
    created = app_client.post("/v1/jobs", json=spec).json()
    assert dry["spec"] == created["spec"]
    assert dry["labels"] == {"a": "b"}
    # the parameter count of the model the engine builds (torch), not a formula of ours
    valid = validate_spec(dry["spec"])
    info = describe(valid.data, valid.seed)
    built = build_model(valid, tuple(info.input_shape), True)
    assert dry["parameters"] == sum(p.numel() for p in built.module.parameters())
    n_val = round(info.n_samples * valid.data.validation_split)
    assert dry["steps_per_epoch"] == -(-(info.n_samples - n_val) // valid.data.batch_size)


def test_dry_run_422_names_the_path(app_client):
    spec = note_spec(4)
    spec["model"]["layers"][1]["units"] = -3
    r = app_client.post("/v1/jobs/validate", json=spec)
    assert r.status_code == 422
    assert "model.layers[1].units" in [d["path"] for d in r.json()["errors"]]


# --------------------------------------------------------------------------- browser access


@pytest.fixture(scope="module")
def keyed(inproc_env: dict[str, str]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from config.settings import get_settings

    app = create_app(get_settings().replace(auth="required", cors_origins="http://dash.example"))
    with TestClient(app, base_url="http://testserver") as c:
        yield c


def _key(project: str) -> tuple[str, str]:
    from store import auth
    from store.db import session_scope

    with session_scope() as s:
        k = auth.create_key(s, project)
    return k.token, k.id


def test_sign_in_sets_a_signed_httponly_cookie_that_authenticates_pages_and_api(keyed):
    keyed.cookies.clear()
    token, key_id = _key(f"ui-{_tag()}")
    r = keyed.get("/ui", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/signin")
    assert keyed.get("/v1/jobs").status_code == 401

    bad = keyed.post("/ui/signin", data={"key": "ty_" + "x" * 40, "next": "/ui"}, follow_redirects=False)
    assert bad.status_code == 401 and "not valid" in bad.text
    r = keyed.post("/ui/signin", data={"key": token, "next": "https://evil.example/"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui"  # never an open redirect
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert token not in cookie  # the key itself never reaches the browser's storage

    page = keyed.get("/ui")
    assert page.status_code == 200
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text).group(1)
    assert keyed.get("/v1/jobs").status_code == 200
    job = keyed.post("/v1/jobs", json=note_spec(2), headers={"X-CSRF-Token": csrf})
    assert job.status_code == 201, job.text
    # a state change with the cookie but without the page's token: refused (CSRF)
    r = keyed.post(f"/v1/jobs/{job.json()['id']}/cancel")
    assert r.status_code == 403 and "X-CSRF-Token" in r.text
    assert keyed.post(f"/v1/jobs/{job.json()['id']}/cancel", headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert keyed.post(f"/v1/jobs/{job.json()['id']}/cancel", headers={"X-CSRF-Token": csrf}).status_code == 200

    # a tampered cookie is no session; a revoked key ends the session
    value = keyed.cookies.get("trainyard_session")
    keyed.cookies.set("trainyard_session", value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1])
    assert keyed.get("/v1/jobs").status_code == 401
    keyed.cookies.set("trainyard_session", value)
    from store import auth
    from store.db import session_scope

    with session_scope() as s:
        auth.revoke_key(s, key_id)
    assert keyed.get("/v1/jobs").status_code == 401
    keyed.cookies.clear()


def test_sign_in_from_another_site_is_refused(keyed):
    token, _ = _key(f"ui-{_tag()}")
    r = keyed.post("/ui/signin", data={"key": token}, headers={"Origin": "http://evil.example"},
                   follow_redirects=False)
    assert r.status_code == 403 and "set-cookie" not in r.headers
    keyed.cookies.clear()


def test_cors_allows_only_the_configured_origins(keyed):
    pre = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    ok = keyed.options("/v1/jobs", headers={"Origin": "http://dash.example", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://dash.example"
    other = keyed.options("/v1/jobs", headers={"Origin": "http://other.example", **pre})
    assert "access-control-allow-origin" not in other.headers


def test_embedded_mode_opens_pages_directly(app_client):
    r = app_client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui"
    for path in ("/ui", "/ui/sweeps", "/ui/new", "/ui/compare?ids=a", f"/ui/jobs/{'a' * 32}", f"/ui/sweeps/{'a' * 32}"):
        r = app_client.get(path, follow_redirects=False)
        assert r.status_code == 200 and "<html" in r.text, path
    assert app_client.get("/ui/signin", follow_redirects=False).status_code == 303


def test_docs_and_static_assets_are_served_from_installed_packages(app_client):
    html = app_client.get("/docs").text
    urls = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert urls and all(u.startswith("/") for u in urls), urls
    for u in urls:
        assert app_client.get(u).status_code == 200, u
    js = app_client.get("/ui/vendor/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000 and b"plotly" in js.content[:2000].lower()
