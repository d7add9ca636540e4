"""Issue 18, medium 4: a project's concurrent-jobs limit holds for sweeps too, at creation and as
they advance (the in-process app with keys required, on the session's PostgreSQL; nothing
consumes its queue, so queued trials stay queued)."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .helpers import note_spec


@pytest.fixture(scope="module")
def keyed_app(inproc_env: dict[str, str]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from config.settings import get_settings

    with TestClient(create_app(get_settings().replace(auth="required"))) as c:
        yield c


def _project_with_limit(limit: int) -> tuple[str, dict[str, str]]:
    from store import auth
    from store.db import session_scope

    name = f"slots-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:
        key = auth.create_key(s, name)
        auth.set_project_limits(s, key.project_id, max_concurrent_jobs=limit)
    return key.project_id, {"Authorization": f"Bearer {key.token}"}


def _sweep_body() -> dict[str, Any]:
    from api.schemas.sweeps import SWEEP_EXAMPLE

    body = copy.deepcopy(SWEEP_EXAMPLE)
    body.update(method="random", max_trials=100, max_concurrent=100, early_termination=None)
    return body


def _active(project_id: str) -> int:
    from sqlalchemy import func, select

    from store.db import session_scope
    from store.models import Job

    with session_scope(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(
            Job.project_id == project_id, Job.status.in_(("queued", "running")))) or 0)


def test_sweeps_never_put_more_jobs_in_flight_than_the_project_allows(keyed_app: Any) -> None:
    from config.settings import get_settings
    from orchestration.sweeps import advance_sweep
    from store.db import session_scope

    project_id, key = _project_with_limit(5)
    r = keyed_app.post("/v1/sweeps", json=_sweep_body(), headers=key)
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["trials_created"] == 5 and _active(project_id) == 5
    for _ in range(2):  # before: each further sweep added max_concurrent more trials
        r = keyed_app.post("/v1/sweeps", json=_sweep_body(), headers=key)
        assert r.status_code == 429 and "Retry-After" in r.headers, r.text
    assert keyed_app.post("/v1/jobs", json=note_spec(1), headers=key).status_code == 429
    assert _active(project_id) == 5

    # two trials end: advancing the sweep fills exactly the two free slots
    trials = keyed_app.get(f"/v1/sweeps/{first['id']}", headers=key).json()["trials"]
    for t in trials[:2]:
        assert keyed_app.post(f"/v1/jobs/{t['job_id']}/cancel", headers=key).status_code == 200
    assert _active(project_id) == 3
    with session_scope() as s:
        made = advance_sweep(s, first["id"], get_settings())
    assert len(made) == 2 and _active(project_id) == 5
    with session_scope() as s:
        assert advance_sweep(s, first["id"], get_settings()) == []
    assert _active(project_id) == 5
    keyed_app.post(f"/v1/sweeps/{first['id']}/cancel", headers=key)


def _npz(n: int = 40) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((n, 3), np.float32), y=np.arange(n) % 2)
    return buf.getvalue()


def _spec_on(dataset: str) -> dict[str, Any]:
    spec = note_spec(1, name="uses-upload", callbacks={})
    spec["data"] = {"dataset": dataset, "validation_split": 0.2, "batch_size": 8}
    spec["model"] = {"layers": [{"type": "dense", "units": 2}]}
    return spec


def test_a_dataset_is_deleted_unless_an_unfinished_job_uses_it(keyed_app: Any) -> None:
    _, key = _project_with_limit(100)
    ds = keyed_app.post("/v1/datasets", files={"file": ("d.npz", _npz())}, headers=key).json()
    job = keyed_app.post("/v1/jobs", json=_spec_on(ds["id"]), headers=key)
    assert job.status_code == 201, job.text
    r = keyed_app.delete(f"/v1/datasets/{ds['id']}", headers=key)
    assert r.status_code == 409 and job.json()["id"] in r.json()["detail"]
    keyed_app.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=key)
    gone = keyed_app.delete(f"/v1/datasets/{ds['id']}", headers=key)
    assert gone.status_code == 200 and gone.json()["id"] == ds["id"]
    assert ds["id"] not in {d["id"] for d in keyed_app.get("/v1/datasets", headers=key).json()["datasets"]}
    assert keyed_app.delete(f"/v1/datasets/{ds['id']}", headers=key).status_code == 404
    r = keyed_app.post("/v1/jobs", json=_spec_on(ds["id"]), headers=key)
    assert r.status_code == 422 and "unknown dataset" in r.text
    _, other = _project_with_limit(100)  # another project's dataset is a 404, not deleted
    theirs = keyed_app.post("/v1/datasets", files={"file": ("d.npz", _npz())}, headers=other).json()
    assert keyed_app.delete(f"/v1/datasets/{theirs['id']}", headers=key).status_code == 404


def test_a_project_s_datasets_have_a_quota(inproc_env: dict[str, str]) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from config.settings import get_settings

    one = len(_npz())
    settings = get_settings().replace(auth="required", max_project_dataset_bytes=2 * one + 10)
    with TestClient(create_app(settings)) as app:
        _, key = _project_with_limit(100)
        ids = [app.post("/v1/datasets", files={"file": ("d.npz", _npz())}, headers=key).json()["id"] for _ in range(2)]
        r = app.post("/v1/datasets", files={"file": ("d.npz", _npz())}, headers=key)
        assert r.status_code == 422 and r.json()["errors"][0]["path"] == "file", r.text
        assert "at most" in r.json()["errors"][0]["msg"]
        assert app.delete(f"/v1/datasets/{ids[0]}", headers=key).status_code == 200
        assert app.post("/v1/datasets", files={"file": ("d.npz", _npz())}, headers=key).status_code == 201
