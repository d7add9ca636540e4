"""Limits, against the real database: body size (413, before the body is read), JSON nesting and
huge bodies (4xx with bounded memory), NaN/Infinity in a spec, epochs, layers, batch size,
dataset size and parameter count (422 with the JSON path), per-project concurrent jobs and request
rate (429 with Retry-After)."""

from __future__ import annotations

import io
import json
import threading
import tracemalloc
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from .helpers import note_spec
from .test_auth import _unique, bearer, new_key


@pytest.fixture(scope="module")
def make_app(inproc_env: dict[str, str]) -> Iterator[Any]:
    """Build a TestClient of the app with some settings changed (keys required by default)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from config.settings import get_settings

    clients: list[Any] = []

    def make(**changes: Any) -> Any:
        settings = get_settings().replace(**{"auth": "required", **changes})
        c = TestClient(create_app(settings))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def _spec(**over: Any) -> dict[str, Any]:
    spec = note_spec(2, name="limits")
    spec.update(over)
    return spec


def _paths(r: Any) -> list[str]:
    return [e["path"] for e in r.json()["errors"]]


def test_a_body_over_the_limit_is_413_before_it_is_read(make_app):
    c = make_app(max_body_bytes=10_000)
    token, _ = new_key(_unique("body"))
    big = json.dumps(_spec(name="x" * 20_000))
    r = c.post("/v1/jobs", content=big, headers={**bearer(token), "content-type": "application/json"})
    assert r.status_code == 413 and "limit of 10000 bytes" in r.json()["detail"]
    # without Content-Length (chunked): counted as it arrives, and reading stops at the limit
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000].encode()

    r = c.post("/v1/jobs", content=chunks(), headers={**bearer(token), "content-type": "application/json"})
    assert r.status_code == 413, r.text
    # a request without a key is still refused for its size first: nothing big is ever buffered
    assert c.post("/v1/jobs", content=big, headers={"content-type": "application/json"}).status_code == 413
    # a body under the limit goes through
    assert c.post("/v1/jobs", json=_spec(), headers=bearer(token)).status_code == 201


def _nested(depth: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(depth - 1):
        out = [out]
    return out


def test_deeply_nested_or_huge_json_is_4xx_never_500_with_bounded_memory(make_app):
    c = make_app()
    token, _ = new_key(_unique("nest"))
    h = {**bearer(token), "content-type": "application/json"}
    tracemalloc.start()
    try:
        for body in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000,
                     json.dumps(_spec(extra=_nested(70)))):
            r = c.post("/v1/jobs", content=body, headers=h)
            assert r.status_code == 422 and r.json()["errors"][0]["type"] == "json_too_deep", r.text[:300]
        # brackets inside strings do not count
        r = c.post("/v1/jobs", json=_spec(name="[" * 1000), headers=bearer(token))
        assert r.status_code == 422 and "name" in _paths(r)  # too long a name, not too deep
        # nested just under the limit is an ordinary spec error
        r = c.post("/v1/jobs", content="[" * 60 + "]" * 60, headers=h)
        assert r.status_code == 422 and r.json()["errors"][0]["type"] == "dict_type"
        # a body above the limit (17 MiB of one big array) is refused before it is buffered
        tracemalloc.reset_peak()
        huge = b"[" + b"1," * (17 * 2**19) + b"1]"
        r = c.post("/v1/jobs/batch", content=huge, headers=h)
        assert r.status_code == 413
        del huge
        # a large but allowed batch body is parsed, validated and answered item by item
        batch = json.dumps({"jobs": [{"bogus": list(range(2000))}] * 500})
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        r = c.post("/v1/jobs/batch", content=batch, headers=h)
        assert r.status_code == 200 and r.json()["invalid"] == 500
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 400 * 2**20, peak


@pytest.mark.parametrize("where", ["optimizer.learning_rate", "model.layers.0.kernel_regularizer.l2",
                                   "data.validation_split", "epochs", "callbacks.early_stopping.min_delta",
                                   "optimizer.beta_1", "model.layers.1.rate"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_or_infinity_anywhere_in_a_spec_is_422(app_client, where, value):
    spec = _spec()
    keys = where.split(".")
    d: Any = spec
    for k in keys[:-1]:
        d = d[int(k)] if k.isdigit() else d[k]
    d[keys[-1]] = "__X__"
    body = json.dumps(spec).replace('"__X__"', value)
    r = app_client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    path = where.replace(".0.", "[0].").replace(".1.", "[1].")
    assert path in _paths(r), r.text


def test_spec_limits_are_422_with_the_json_path(make_app):
    c = make_app(max_epochs=50, max_layers=3, max_batch_size=128, max_parameters=10_000,
                 max_dataset_bytes=1_000_000)
    token, _ = new_key(_unique("spec"))
    r = c.post("/v1/jobs", json=_spec(epochs=51), headers=bearer(token))
    assert r.status_code == 422 and _paths(r) == ["epochs"] and "at most 50" in r.text
    r = c.post("/v1/jobs", json=_spec(data={"dataset": "digits", "batch_size": 129}), headers=bearer(token))
    assert r.status_code == 422 and _paths(r) == ["data.batch_size"]
    layers = [{"type": "dense", "units": 8}] * 3 + [{"type": "dense", "units": 10}]
    r = c.post("/v1/jobs", json=_spec(model={"layers": layers}), headers=bearer(token))
    assert r.status_code == 422 and _paths(r) == ["model.layers"] and "4 layers" in r.text
    # parameters: 64*4096+4096 + 4096*10+10 > 10_000, counted from shapes before anything is built
    wide = {"layers": [{"type": "dense", "units": 4096}, {"type": "dense", "units": 10}]}
    r = c.post("/v1/jobs", json=_spec(model=wide), headers=bearer(token))
    assert r.status_code == 422 and _paths(r) == ["model"] and "307210 parameters" in r.text
    # a synthetic dataset bigger than the limit: 100_000 x 20 float32 = 8 MB
    big = {"dataset": "classification", "n_samples": 100_000, "n_features": 20, "n_classes": 2}
    r = c.post("/v1/jobs", json=_spec(data=big, model={"layers": [{"type": "dense", "units": 2}]}, callbacks={},
                                      metrics=[]), headers=bearer(token))
    assert r.status_code == 422 and "data" in _paths(r), r.text
    # each batch item is checked the same way
    r = c.post("/v1/jobs/batch", json={"jobs": [_spec(epochs=51), _spec()]}, headers=bearer(token))
    assert r.json()["created"] == 1 and r.json()["results"][0]["errors"][0]["path"] == "epochs"


def test_dataset_uploads_are_limited_in_size_and_in_what_they_expand_to(make_app):
    c = make_app(max_upload_bytes=50_000, max_dataset_bytes=200_000)
    token, _ = new_key(_unique("upload"))
    r = c.post("/v1/datasets", files={"file": ("big.npz", b"\0" * 200_000)}, headers=bearer(token))
    assert r.status_code == 413
    # a zip bomb: 1 MB of zeros compresses to about 1 kB
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((25_000, 10), np.float32), y=np.zeros(25_000, np.int64))
    assert len(buf.getvalue()) < 50_000
    r = c.post("/v1/datasets", files={"file": ("bomb.npz", buf.getvalue())}, headers=bearer(token))
    assert r.status_code == 422 and r.json()["errors"][0]["type"] == "limit_exceeded", r.text
    assert zipfile.is_zipfile(io.BytesIO(buf.getvalue()))
    small = io.BytesIO()
    np.savez(small, x=np.zeros((40, 3), np.float32), y=np.arange(40) % 2)
    assert c.post("/v1/datasets", files={"file": ("ok.npz", small.getvalue())}, headers=bearer(token)).status_code == 201


def test_concurrent_jobs_per_project_are_limited_with_429_and_retry_after(make_app):
    from store import auth
    from store.db import session_scope

    c = make_app(max_concurrent_jobs=1000)
    project = _unique("slots")
    token, _ = new_key(project)
    other, _ = new_key(_unique("slots-other"))
    with session_scope() as s:
        auth.set_project_limits(s, auth.ensure_project(s, project).id, max_concurrent_jobs=3)
    ids = [c.post("/v1/jobs", json=_spec(), headers=bearer(token)).json()["id"] for _ in range(2)]
    r = c.post("/v1/jobs/batch", json={"jobs": [_spec(), _spec()]}, headers=bearer(token))
    assert r.status_code == 429 and r.headers["retry-after"] == "30" and "at most 3" in r.json()["detail"]
    assert c.post("/v1/jobs", json=_spec(), headers=bearer(token)).status_code == 201
    r = c.post("/v1/jobs", json=_spec(), headers=bearer(token))
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert c.post("/v1/jobs", json=_spec(), headers=bearer(other)).status_code == 201  # other projects unaffected
    # a finished (here: cancelled) job frees its slot
    assert c.post(f"/v1/jobs/{ids[0]}/cancel", headers=bearer(token)).status_code == 200
    assert c.post("/v1/jobs", json=_spec(), headers=bearer(token)).status_code == 201


def test_concurrent_submissions_cannot_squeeze_past_the_limit(make_app):
    from store import auth
    from store.db import session_scope

    c = make_app()
    project = _unique("race")
    token, _ = new_key(project)
    with session_scope() as s:
        auth.set_project_limits(s, auth.ensure_project(s, project).id, max_concurrent_jobs=4)
    codes: list[int] = []

    def submit() -> None:
        codes.append(c.post("/v1/jobs", json=_spec(), headers=bearer(token)).status_code)

    threads = [threading.Thread(target=submit) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] * 4 + [429] * 6


def test_request_rate_per_project_is_limited_with_429_and_retry_after(make_app):
    from store import auth
    from store.db import session_scope

    c = make_app(requests_per_minute=0)
    project = _unique("rate")
    token, _ = new_key(project)
    token2, _ = new_key(project)
    other, _ = new_key(_unique("rate-other"))
    with session_scope() as s:
        auth.set_project_limits(s, auth.ensure_project(s, project).id, requests_per_minute=4)
    assert [c.get("/v1/jobs", headers=bearer(t)).status_code for t in (token, token, token2, token2)] == [200] * 4
    r = c.get("/v1/jobs", headers=bearer(token2))  # the bucket is the project's, shared by its keys
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 15 and "4 requests per minute" in r.text
    assert c.get("/v1/jobs", headers=bearer(other)).status_code == 200
    # the service-wide default applies to projects without their own
    d = make_app(requests_per_minute=2)
    assert [d.get("/v1/catalog", headers=bearer(other)).status_code for _ in range(3)] == [200, 200, 429]


def test_rate_limiter_refills_at_its_rate():
    from api.limits import RateLimiter

    now = [0.0]
    rl = RateLimiter(clock=lambda: now[0])
    assert [rl.acquire("p", 60) for _ in range(60)] == [0.0] * 60
    assert rl.acquire("p", 60) == pytest.approx(1.0)
    now[0] += 0.5
    assert rl.acquire("p", 60) == pytest.approx(0.5)
    now[0] += 0.5
    assert rl.acquire("p", 60) == 0.0
    assert rl.acquire("q", 60) == 0.0  # buckets are per key
    assert rl.acquire("p", 0) == 0.0  # 0: unlimited


def test_nul_characters_are_refused_or_not_found_never_500(make_app):
    """PostgreSQL text cannot hold NUL: wherever one could reach a text column the answer is a
    4xx (found by Schemathesis: ?sweep_id=%00 was a 500)."""
    c = make_app()
    token, _ = new_key(_unique("nul"))
    h = bearer(token)
    r = c.get("/v1/jobs", params={"name": "a\x00b"}, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query.name", r.text
    assert c.get("/v1/jobs", params={"sweep_id": "\x00"}, headers=h).status_code == 422
    assert c.get("/v1/jobs/ab%00cd", headers=h).status_code == 404
    assert c.get("/v1/jobs/ab%00cd/metrics", headers=h).status_code == 404
    r = c.post("/v1/jobs", json=_spec(name="a\x00b"), headers=h)
    assert r.status_code == 422 and "name" in _paths(r), r.text
    r = c.post("/v1/jobs/batch", json={"jobs": [_spec(name="\x00")]}, headers=h)
    assert r.status_code == 200 and r.json()["invalid"] == 1
    small = io.BytesIO()
    np.savez(small, x=np.zeros((40, 3), np.float32), y=np.arange(40) % 2)
    r = c.post("/v1/datasets", files={"file": ("ok.npz", small.getvalue())}, data={"name": "a\x00"}, headers=h)
    assert r.status_code == 422, r.text
    r = c.post("/v1/datasets", files={"file": ("o\x00k.npz", small.getvalue())}, headers=h)
    assert r.status_code in (201, 422), r.text


def test_unknown_or_repeated_query_parameters_are_422_and_405_lists_every_method(app_client):
    r = app_client.get("/v1/jobs", params={"statsu": "failed"})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query.statsu"
    allowed = r.json()["errors"][0]["msg"].split("allowed: ", 1)[1].split(", ")
    assert allowed == sorted(allowed) and {"created_after", "cursor", "limit", "name", "status"} <= set(allowed)
    r = app_client.get("/v1/jobs?name=a&name=b")
    assert r.status_code == 422 and r.json()["errors"][0]["type"] == "too_many_values"
    assert app_client.get("/v1/jobs?status=queued&status=running").status_code == 200  # an array parameter
    r = app_client.request("DELETE", "/v1/jobs")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"}


def test_a_chunked_upload_over_the_limit_is_413_while_it_arrives(make_app):
    """No Content-Length: the middleware counts the multipart body's bytes as they arrive and
    stops at the limit (the upload limit plus 64 KiB of form overhead)."""
    import asyncio

    import httpx

    app = make_app(max_upload_bytes=10_000).app
    token, _ = new_key(_unique("chunked"))
    sent = 0

    async def body() -> Any:
        nonlocal sent
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\n'
        for _ in range(1000):  # 1 MB, far over the limit
            sent += 1000
            yield b"\0" * 1000
        yield b"\r\n--xyz--\r\n"

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/datasets", content=body(),
                                headers={**bearer(token), "content-type": "multipart/form-data; boundary=xyz"})

    r = asyncio.run(post())
    assert r.status_code == 413 and "limit of 75536 bytes" in r.json()["detail"]
    assert r.request.headers.get("content-length") is None
    assert sent < 100_000  # reading stopped at the limit
