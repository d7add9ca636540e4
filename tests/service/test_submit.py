"""The pipelined submit (store.submit) against the real PostgreSQL database: one round trip per
submission, a duplicate Idempotency-Key is an IntegrityError that leaves the connection clean, and
the project's concurrent-jobs limit writes nothing when it is exceeded."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from .helpers import note_spec


def _project(limit: int | None = None) -> str:
    from store import auth
    from store.db import session_scope

    with session_scope() as s:
        project = auth.ensure_project(s, f"submit-{uuid.uuid4().hex[:8]}")
        if limit is not None:
            auth.set_project_limits(s, project.id, max_concurrent_jobs=limit)
        return project.id


def _count(project_id: str) -> int:
    from store.db import session_scope
    from store.models import Job

    with session_scope(write=False) as s:
        return s.scalar(select(func.count()).select_from(Job).where(Job.project_id == project_id)) or 0


def test_a_submission_is_one_round_trip(inproc_env, tmp_path):
    import psycopg

    from store import submit
    from store.db import make_engine

    # an engine of exactly one connection, so the traced one is the one every submission uses
    engine, project = make_engine(inproc_env["TRAINYARD_DATABASE_URL"], pool_size=1, max_overflow=0), _project()
    raw = engine.raw_connection()
    trace_path = tmp_path / "trace.txt"
    with trace_path.open("w") as trace:
        raw.driver_connection.pgconn.trace(trace.fileno())
        raw.driver_connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        raw.close()
        try:
            submit.insert_queued_jobs(engine, [(note_spec(1), "cpu", None)], project_id=project, max_active=0)
            trace.flush()
            before = trace_path.read_text().count("ReadyForQuery")
            for _ in range(5):
                submit.insert_queued_jobs(engine, [(note_spec(1), "cpu", None)], project_id=project, max_active=0)
            trace.flush()
            assert trace_path.read_text().count("ReadyForQuery") - before == 5
        finally:
            engine.dispose()
    assert _count(project) == 6


def test_a_duplicate_idempotency_key_raises_and_leaves_the_connection_clean(inproc_env):
    from store import submit
    from store.db import get_engine

    engine, project = get_engine(), _project()
    key = f"k-{uuid.uuid4().hex}"
    submit.insert_queued_jobs(engine, [(note_spec(1), "cpu", key)], project_id=project, max_active=0,
                              idempotency_hash="h")
    with pytest.raises(IntegrityError):
        submit.insert_queued_jobs(engine, [(note_spec(1), "cpu", key)], project_id=project, max_active=0,
                                  idempotency_hash="h")
    # nothing of the failed submission was written, and the pooled connections still work
    assert _count(project) == 1
    for _ in range(3):
        submit.insert_queued_jobs(engine, [(note_spec(1), "cpu", None)], project_id=project, max_active=0)
    assert _count(project) == 4


def test_over_the_limit_nothing_is_written(inproc_env):
    from store import submit
    from store.db import get_engine

    engine, project = get_engine(), _project(limit=2)
    submit.insert_queued_jobs(engine, [(note_spec(1), "cpu", None)], project_id=project, max_active=0)
    with pytest.raises(submit.SlotsFull):
        submit.insert_queued_jobs(engine, [(note_spec(1), "cpu", None)] * 2, project_id=project, max_active=0)
    assert _count(project) == 1
    submit.insert_queued_jobs(engine, [(note_spec(1), "cpu", None)], project_id=project, max_active=0)
    assert _count(project) == 2


def test_post_sends_the_message_then_publishes_the_change_notice(app_client, inproc_env, redis_client):
    """POST /v1/jobs commits, sends the job's message, and only then publishes the change notice
    (the pipeline leaves it to the route, so that its Redis round trip is not inside
    submit->running); the notice is still published, once the message is in the broker's queue."""
    from config.settings import get_settings
    from store import notices
    from store.db import get_engine

    settings = get_settings()

    def waiting() -> int:  # messages in the broker's queues (nothing consumes this prefix)
        return sum(int(redis_client.llen(settings.queue_prefix + q)) for q in settings.queue_names())

    publisher = notices._publishers[get_engine()]
    seen: list[int] = []
    publish = publisher.publish

    def spy() -> None:  # records the broker queue's length at the moment of the notice, then publishes
        seen.append(waiting())
        publish()

    pubsub = redis_client.pubsub()
    pubsub.subscribe(notices.channel(settings))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    before = waiting()
    publisher.publish = spy  # type: ignore[method-assign]
    try:
        r = app_client.post("/v1/jobs", json=note_spec(1))
    finally:
        del publisher.publish
    assert r.status_code == 201, r.text
    assert seen == [before + 1]  # one notice, after the message was in the queue
    assert pubsub.get_message(timeout=5)["type"] == "message"
    pubsub.close()
