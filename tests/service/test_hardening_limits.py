"""Issue 18, medium 4: a project's concurrent-jobs limit holds for sweeps too, at creation and as
they advance (the in-process app with keys required, on the session's PostgreSQL; nothing
consumes its queue, so queued trials stay queued)."""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .helpers import note_spec


@pytest.fixture(scope="module")
def keyed_app(inproc_env: dict[str, str]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.settings import get_settings

    with TestClient(create_app(dataclasses.replace(get_settings(), auth="required"))) as c:
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
    from store import sweeps as store_sweeps
    from store.db import session_scope
    from store.settings import get_settings

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
        made = store_sweeps.advance_sweep(s, first["id"], get_settings())
    assert len(made) == 2 and _active(project_id) == 5
    with session_scope() as s:
        assert store_sweeps.advance_sweep(s, first["id"], get_settings()) == []
    assert _active(project_id) == 5
    keyed_app.post(f"/v1/sweeps/{first['id']}/cancel", headers=key)
