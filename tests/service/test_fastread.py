"""The polled routes read through :mod:`store.fastread` (raw DBAPI, stored JSON passed through as
text). Their bytes must say exactly what the response models say, on PostgreSQL and on SQLite,
for jobs in every state: each case builds the ORM view (api.views + the pydantic model) of the
same row and compares the two documents."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from api.schemas.jobs import JobRead, MetricsRead
from api.views import job_read
from store import auth as store_auth
from store import fastread, repo
from store.db import make_engine
from store.migrate import upgrade
from store.models import DEFAULT_PROJECT
from training import validate_spec

from .helpers import note_spec

EPOCHS = [
    {"epoch": 1, "loss": 0.9, "val_loss": 0.8, "accuracy": 0.5, "lr": 1e-3, "seconds": 0.25},
    {"epoch": 2, "loss": math.nan, "val_loss": math.inf, "accuracy": 0.25, "lr": 1e-3, "seconds": 0.5},
    {"epoch": 3, "loss": 0.5, "val_loss": -math.inf, "accuracy": 0.75, "lr": 5e-4, "seconds": 0.125},
]


def _orm_view(session: Any, job_id: str) -> dict[str, Any]:
    job = repo.get_job(session, job_id)
    return JobRead.model_validate(job_read(job)).model_dump(mode="json")


def _make_jobs(session: Any) -> list[str]:
    spec = validate_spec(note_spec(3)).model_dump(mode="json")
    queued = repo.create_job(session, spec=spec, queue="cpu")
    running = repo.create_job(session, spec=spec, queue="gpu")
    done = repo.create_job(session, spec=spec, queue="cpu")
    session.flush()
    repo.claim_job(session, running.id, "host:1", 300)
    repo.claim_job(session, done.id, "host:2", 300)
    repo.record_progress(session, done.id, EPOCHS, info={"device": "cpu", "nested": {"a": [1, 2.5, None]}})
    repo.finish_job(
        session, done.id, status="succeeded", stop_reason="early_stopping", best=("val_loss", math.nan, 2),
        steps=42, epochs_run=3, run_seconds=1.5, info={"device": "cpu", "text": "ünïcode \"quoted\""},
    )
    return [queued.id, running.id, done.id]


def _check(url: str) -> None:
    from sqlalchemy.orm import Session

    engine = make_engine(url)
    try:
        with Session(engine) as s:
            ids = _make_jobs(s)
            mine = store_auth.create_key(s, DEFAULT_PROJECT, "reader")  # the default project's key
            other = store_auth.create_key(s, "fastread-other")
            revoked = store_auth.create_key(s, DEFAULT_PROJECT, "old")
            store_auth.revoke_key(s, revoked.id)
            s.commit()
        callers = {
            "project": fastread.Caller(project_id=DEFAULT_PROJECT),
            "key": fastread.Caller(key_hash=store_auth.hash_key(mine.token)),
        }
        foreign = [fastread.Caller(project_id="another-project"), fastread.Caller(key_hash=store_auth.hash_key(other.token))]
        done = ids[2]

        def job(caller: fastread.Caller, job_id: str) -> bytes | None:
            key, body = fastread.job_json(engine, job_id, caller)
            if caller.key_hash is not None:
                assert key is not None and key[0] in (mine.id, other.id)  # the key resolved
            return body

        def metrics(caller: fastread.Caller, job_id: str, **kw: Any) -> Any:
            key, body = fastread.metrics_json(engine, job_id, caller, **kw)
            if caller.key_hash is not None:
                assert key is not None and key[1] == (DEFAULT_PROJECT if caller.key_hash == callers["key"].key_hash else other.project_id)
            return None if body is None else json.loads(body)

        with Session(engine) as s:
            for caller in callers.values():
                for job_id in ids:
                    body = job(caller, job_id)
                    assert body is not None
                    fast = json.loads(body)
                    assert fast == _orm_view(s, job_id)
                    assert JobRead.model_validate(fast).id == job_id
                assert json.loads(job(caller, done))["best"]["value"] == "NaN"
                assert job(caller, "0" * 32) is None

                m = metrics(caller, done)
                assert m == MetricsRead(job_id=done, epochs=repo.metrics(s, done), total=3).model_dump(mode="json")
                assert [e["loss"] for e in m["epochs"]] == [0.9, "NaN", 0.5]
                assert [e["val_loss"] for e in m["epochs"]] == [0.8, "Infinity", "-Infinity"]
                since = metrics(caller, done, since_epoch=1)
                assert [e["epoch"] for e in since["epochs"]] == [2, 3] and since["total"] == 2
                few = metrics(caller, done, max_points=2)
                assert [e["epoch"] for e in few["epochs"]] == [1, 3] and few["total"] == 3
                assert metrics(caller, ids[0]) == {"job_id": ids[0], "epochs": [], "total": 0}
                assert metrics(caller, "0" * 32) is None
            for caller in foreign:  # another project's job: not found, whoever asks
                assert job(caller, done) is None
                assert metrics(caller, done) is None
            # an unknown or revoked key resolves to nothing (the route answers 401)
            for token in ("ty_" + "x" * 43, revoked.token):
                gone = fastread.Caller(key_hash=store_auth.hash_key(token))
                assert fastread.job_json(engine, done, gone) == (None, None)
                assert fastread.metrics_json(engine, done, gone) == (None, None)
    finally:
        engine.dispose()


def test_fast_views_equal_the_response_models_on_postgresql(pg):
    url = pg.create("fastread")
    upgrade(url)
    _check(url)


def test_fast_views_equal_the_response_models_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'fast.db'}"
    upgrade(url)
    _check(url)


@pytest.mark.parametrize("n,k,expected", [(5, 3, [0, 2, 4]), (3, 5, [0, 1, 2]), (4, 1, [3]), (10, 2, [0, 9])])
def test_downsample_keeps_first_and_last(n, k, expected):
    assert fastread.downsample(list(range(n)), k) == expected


def test_a_poll_is_one_database_round_trip_with_or_without_a_key(pg, tmp_path):
    """libpq's own trace of the connection: one ReadyForQuery (one round trip) per poll, for both
    routes, whether the caller is a project or an API key resolved by the same query."""
    import psycopg
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    url = pg.create("fastread_rt")
    upgrade(url)
    engine = make_engine(url)
    trace_path = tmp_path / "libpq.trace"
    trace = trace_path.open("w")
    try:
        with Session(engine) as s:
            done = _make_jobs(s)[2]
            key = store_auth.create_key(s, DEFAULT_PROJECT, "rt")
            s.commit()
        engine.dispose()  # new connections, traced from their first message

        @event.listens_for(engine, "connect")
        def _trace(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.pgconn.trace(trace.fileno())
            dbapi_conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

        def ready_for_query() -> int:
            """ReadyForQuery messages so far (untrace flushes libpq's buffer; then trace again)."""
            raw = engine.raw_connection()  # the pool's one connection
            try:
                raw.driver_connection.pgconn.untrace()
                n = trace_path.read_text().count("ReadyForQuery")
                raw.driver_connection.pgconn.trace(trace.fileno())
                raw.driver_connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            finally:
                raw.close()
            return n

        for caller in (fastread.Caller(project_id=DEFAULT_PROJECT), fastread.Caller(key_hash=store_auth.hash_key(key.token))):
            for fn in (fastread.job_json, fastread.metrics_json):
                for _ in range(10):  # warm: connected, and psycopg has prepared the statement (after 5 uses)
                    fn(engine, done, caller)
                before = ready_for_query()
                for _ in range(20):
                    assert fn(engine, done, caller)[1] is not None
                assert ready_for_query() - before == 20, (fn.__name__, caller)
    finally:
        trace.close()
        engine.dispose()
