"""The polled routes' fast path (api.fastpath) and their query threads (store.pollread), against
the real PostgreSQL database.

The fast path must be invisible: for every request, the app with it answers exactly what the app
without it answers (status, headers, body), whether the fast path served the request or handed
it to the FastAPI route. Each case also says which of the two it expects to have served it, so a
fast path that silently handed everything to the route would fail here too."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from .helpers import note_spec

JOB = "/v1/jobs/{id}"
METRICS = "/v1/jobs/{id}/metrics"


def _unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def _key(project: str, rpm: int | None = None) -> tuple[str, str]:
    from store import auth
    from store.db import session_scope

    with session_scope() as s:
        k = auth.create_key(s, project)
        if rpm is not None:
            auth.set_project_limits(s, k.project_id, requests_per_minute=rpm)
    return k.token, k.project_id


def _finished_job(project_id: str) -> str:
    """A finished job of ``project_id`` with 5 epochs of metrics, some not finite."""
    from store import repo
    from store.db import session_scope
    from training import validate_spec

    spec = validate_spec(note_spec(5)).model_dump(mode="json")
    epochs = [{"epoch": e, "loss": 1.0 / e, "val_loss": float("nan") if e == 2 else 0.5 / e, "accuracy": 0.1 * e,
               "lr": 1e-3, "seconds": 0.01} for e in range(1, 6)]
    with session_scope() as s:
        job = repo.create_job(s, spec=spec, queue="cpu", project_id=project_id)
        s.flush()
        repo.claim_job(s, job.id, "host:1", 300)
        repo.record_progress(s, job.id, epochs, info={"device": "cpu"})
        repo.finish_job(s, job.id, status="succeeded", stop_reason="completed", best=("val_loss", 0.1, 5),
                        steps=50, epochs_run=5, run_seconds=0.5, info={"device": "cpu"})
    return job.id


@pytest.fixture(scope="module")
def pair(inproc_env: dict[str, str]) -> Iterator[tuple[Any, Any, Any]]:
    """(with the fast path, without it, the fast-path layer), keys required."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.fastpath import PollFastPath
    from config.settings import get_settings

    settings = get_settings().replace(auth="required")
    fast_app = create_app(settings)
    slow_app = create_app(settings, poll_fast_path=False)
    # one request id for both: the echoed X-Request-ID header is then equal too
    with TestClient(fast_app, headers=SAME_ID) as fast, TestClient(slow_app, headers=SAME_ID) as slow:
        layer = fast_app.middleware_stack
        while not isinstance(layer, PollFastPath):
            layer = layer.app
        yield fast, slow, layer


SAME_ID = {"X-Request-ID": "fastpath-equivalence"}


def _same(pair: tuple[Any, Any, Any], method: str, url: str, headers: dict[str, str], served: bool) -> Any:
    fast, slow, layer = pair
    before = layer.stats.served
    a = fast.request(method, url, headers=headers, follow_redirects=False)
    assert layer.stats.served - before == (1 if served else 0), (url, headers, a.status_code, a.text[:200])
    b = slow.request(method, url, headers=headers, follow_redirects=False)
    assert (a.status_code, dict(a.headers), a.content) == (b.status_code, dict(b.headers), b.content), (url, headers)
    return a


def test_fast_path_answers_exactly_what_the_route_answers(pair):
    token, project = _key(_unique("fast"))
    other, _ = _key(_unique("fast-other"))
    job = _finished_job(project)
    auth = {"Authorization": f"Bearer {token}"}
    # a new key's first use is recorded by the route (a write), after which the fast path serves
    r = _same(pair, "GET", JOB.format(id=job), auth, served=False)
    assert r.status_code == 200 and r.json()["id"] == job
    served = [
        (JOB.format(id=job), auth),
        (METRICS.format(id=job), auth),
        (METRICS.format(id=job) + "?since_epoch=2", auth),
        (METRICS.format(id=job) + "?max_points=2", auth),
        (METRICS.format(id=job) + "?since_epoch=1&max_points=3", auth),
        (METRICS.format(id=job) + "?max_points=100000&since_epoch=0", auth),
        (JOB.format(id=job), {"Authorization": f"bearer  {token}"}),
    ]
    for url, headers in served:
        r = _same(pair, "GET", url, headers, served=True)
        assert r.status_code == 200, (url, r.text)
    _same(pair, "GET", JOB.format(id=job), {"Authorization": f"Bearer {other}"}, served=False)  # first use
    handed_over = [
        (JOB.format(id=job), {}),                                             # no key: 401
        (JOB.format(id=job), {"Authorization": "Bearer ty_" + "x" * 43}),     # unknown key: 401
        (JOB.format(id=job), {"Authorization": f"Basic {token}"}),            # not Bearer: 401
        (JOB.format(id=job), {"Authorization": f"Bearer {other}"}),           # another project's job: 404
        (JOB.format(id="0" * 32), auth),                                      # no such job: 404
        (JOB.format(id=job) + "?since_epoch=0", auth),                        # not a parameter of this route: 422
        (JOB.format(id=job) + "/", auth),                                     # the route redirects (307)
        (JOB.format(id="batch"), auth),                                       # a POST-only path: 404 by the route
        (METRICS.format(id=job) + "?since_epoch=-1", auth),                   # out of range: 422
        (METRICS.format(id=job) + "?max_points=0", auth),
        (METRICS.format(id=job) + "?max_points=100001", auth),
        (METRICS.format(id=job) + "?since_epoch=1&since_epoch=2", auth),      # twice: 422
        (METRICS.format(id=job) + "?since_epoch=+1", auth),                   # not plain digits: the route decides
        (METRICS.format(id=job) + "?sinceepoch=1", auth),                     # unknown: 422
        (METRICS.format(id=job) + "?since_epoch=1&", auth),
    ]
    for url, headers in handed_over:
        _same(pair, "GET", url, headers, served=False)
    # other methods on the polled paths are the route's (405 with Allow; DELETE is a route of its
    # own since the artifact store, and would delete the job before the second request)
    _same(pair, "PUT", JOB.format(id=job), auth, served=False)
    _same(pair, "POST", METRICS.format(id=job), auth, served=False)


def test_revoked_keys_and_rate_limits_hold_on_the_fast_path(pair):
    from store import auth
    from store.db import session_scope

    token, project = _key(_unique("fast-rate"), rpm=3)
    job = _finished_job(project)
    headers = {"Authorization": f"Bearer {token}"}
    fast, slow, layer = pair
    # the project may make 3 requests a minute, in each app (each process has its own bucket)
    statuses = []
    for _ in range(4):
        before = layer.stats.served
        r = fast.get(JOB.format(id=job), headers=headers)
        s = slow.get(JOB.format(id=job), headers=headers)
        assert (r.status_code, dict(r.headers), r.content) == (s.status_code, dict(s.headers), s.content)
        statuses.append((r.status_code, layer.stats.served - before))
    # first use recorded by the route, then served fast, then the bucket is empty: the route's 429
    assert statuses == [(200, 0), (200, 1), (200, 1), (429, 0)], statuses
    assert int(r.headers["retry-after"]) >= 1
    token2, project2 = _key(_unique("fast-revoke"))
    job2 = _finished_job(project2)
    headers2 = {"Authorization": f"Bearer {token2}"}
    assert fast.get(JOB.format(id=job2), headers=headers2).status_code == 200
    assert fast.get(JOB.format(id=job2), headers=headers2).status_code == 200
    with session_scope() as s:
        key_id = s.execute(text("SELECT id FROM api_keys WHERE project_id = :p"), {"p": project2}).scalar_one()
        auth.revoke_key(s, key_id)
    r = fast.get(JOB.format(id=job2), headers=headers2)  # the very next request
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API key"


def test_fast_path_with_keys_off_serves_the_default_project(inproc_env):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.fastpath import PollFastPath
    from store.models import DEFAULT_PROJECT

    job = _finished_job(DEFAULT_PROJECT)
    fast_app = create_app()  # the test environment runs with TRAINYARD_AUTH=off
    with TestClient(fast_app, headers=SAME_ID) as fast, TestClient(create_app(poll_fast_path=False), headers=SAME_ID) as slow:
        layer = fast_app.middleware_stack
        while not isinstance(layer, PollFastPath):
            layer = layer.app
        for url in (JOB.format(id=job), METRICS.format(id=job) + "?since_epoch=3", JOB.format(id="f" * 32)):
            before = layer.stats.served
            a, b = fast.get(url), slow.get(url)
            assert (a.status_code, dict(a.headers), a.content) == (b.status_code, dict(b.headers), b.content)
            assert layer.stats.served - before == (1 if a.status_code == 200 else 0)
        assert a.status_code == 404


def test_a_poll_survives_its_connection_being_killed(pair):
    """PostgreSQL ends the reader's connections (a restart, an idle timeout): the next poll is
    still answered (the fast path meets the broken connection, the route retries on a new one)."""
    from store.db import get_engine
    from store.pollread import get_reader

    token, project = _key(_unique("fast-kill"))
    job = _finished_job(project)
    fast, _, _ = pair
    headers = {"Authorization": f"Bearer {token}"}
    assert fast.get(JOB.format(id=job), headers=headers).status_code == 200
    reader = get_reader(get_engine())
    pids = [c.info.backend_pid for c in list(reader._conns)]
    assert pids
    with get_engine().connect() as conn:
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        conn.commit()
    for _ in range(2 * len(pids) + 2):  # every thread meets its dead connection once
        r = fast.get(JOB.format(id=job), headers=headers)
        assert r.status_code == 200, r.text
    assert not set(pids) & {c.info.backend_pid for c in list(reader._conns)}


# --------------------------------------------------------------------------- store.pollread


def test_identical_polls_share_a_query_that_has_not_started_and_only_that(inproc_env):
    from store.db import get_engine
    from store.pollread import PollReader

    reader = PollReader(get_engine(), threads=1)
    gate, started = threading.Event(), threading.Event()
    calls: list[str] = []

    def blocking(conn: Any) -> str:
        calls.append("first")
        started.set()
        gate.wait(10)
        return "first"

    def read(tag: str) -> Any:
        def fn(conn: Any) -> str:
            calls.append(tag)
            return conn.execute("SELECT %s::text", (tag,)).fetchone()[0] if hasattr(conn, "execute") else tag
        return fn

    try:
        first = reader.submit("k", blocking)
        assert started.wait(10)
        # the query under "k" is running: a new poll with the same key must not join it
        second = reader.submit("k", read("second"))
        assert second is not first
        # ... but later ones join the waiting one, and different keys never share
        joined = [reader.submit("k", read("never")) for _ in range(5)]
        other = reader.submit("other", read("other"))
        assert all(f is second for f in joined) and other is not second
        gate.set()
        assert first.result(10) == "first"
        assert second.result(10) == "second" and all(f.result(10) == "second" for f in joined)
        assert other.result(10) == "other"
        assert calls == ["first", "second", "other"] and reader.queries == 3
    finally:
        gate.set()
        reader.close()


def test_a_failed_shared_query_fails_every_waiter_and_the_next_one_runs_afresh(inproc_env):
    from store.db import get_engine
    from store.pollread import PollReader

    reader = PollReader(get_engine(), threads=1)
    gate = threading.Event()
    try:
        reader.submit("block", lambda conn: gate.wait(10))
        waiting = [reader.submit("k", lambda conn: 1 / 0) for _ in range(3)]
        gate.set()
        for f in waiting:
            with pytest.raises(ZeroDivisionError):
                f.result(10)
        assert reader.submit("k", lambda conn: conn.execute("SELECT 7").fetchone()[0]).result(10) == 7
    finally:
        gate.set()
        reader.close()


def test_many_concurrent_polls_of_one_job_use_few_queries(pair):
    """64 concurrent polls of the same job: every one answered 200 with the job, and the
    database answered fewer queries than there were polls (they shared)."""
    import asyncio

    import httpx

    from store.db import get_engine
    from store.pollread import get_reader

    token, project = _key(_unique("fast-share"))
    job = _finished_job(project)
    fast, _, layer = pair
    headers = {"Authorization": f"Bearer {token}"}
    assert fast.get(JOB.format(id=job), headers=headers).status_code == 200  # records the first use
    app = fast.app
    reader = get_reader(get_engine())

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.get(JOB.format(id=job), headers=headers) for _ in range(64)))

    def scraped(name: str) -> float:
        text_ = fast.get("/metrics").text
        return float(next(line.split()[-1] for line in text_.splitlines() if line.startswith(name + " ")))

    q0, s0 = reader.queries, layer.stats.served
    prom_served, prom_queries = scraped("trainyard_polls_fast_total"), scraped("trainyard_poll_queries_total")
    t0 = time.monotonic()
    responses = asyncio.run(main())
    assert time.monotonic() - t0 < 30
    assert all(r.status_code == 200 and r.json()["id"] == job for r in responses)
    assert layer.stats.served - s0 == 64
    assert reader.queries - q0 < 64
    # what Prometheus sees: the same counts
    assert scraped("trainyard_polls_fast_total") - prom_served == 64
    assert scraped("trainyard_poll_queries_total") - prom_queries == reader.queries - q0


def test_a_poll_is_one_database_round_trip(pair, tmp_path, monkeypatch):
    """Counted exactly from a libpq trace of the poll threads' connections: ReadyForQuery
    messages per poll, on the fast path, for both routes. (One poll thread, so that the warm-up
    surely covers psycopg's one-time statement preparation on its connection.)"""
    import psycopg

    from store import pollread

    token, project = _key(_unique("fast-trips"))
    job = _finished_job(project)
    fast, _, layer = pair
    headers = {"Authorization": f"Bearer {token}"}
    assert fast.get(JOB.format(id=job), headers=headers).status_code == 200  # first use: recorded by the route
    trace_path = tmp_path / "trace.txt"
    with trace_path.open("w") as trace:

        def traced(conn: Any) -> None:
            conn.pgconn.trace(trace.fileno())
            conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

        pollread.CONNECT_HOOKS.append(traced)
        monkeypatch.setattr(pollread, "DEFAULT_THREADS", 1)
        try:
            pollread.close_readers()  # new connections, traced
            for url in (JOB.format(id=job), METRICS.format(id=job)):
                for _ in range(12):  # warm-up: each thread's connection prepares the statement once
                    assert fast.get(url, headers=headers).status_code == 200
                trace.flush()
                before, served = trace_path.read_text().count("ReadyForQuery"), layer.stats.served
                for _ in range(40):
                    assert fast.get(url, headers=headers).status_code == 200
                trace.flush()
                assert layer.stats.served - served == 40
                assert trace_path.read_text().count("ReadyForQuery") - before == 40, url
        finally:
            pollread.CONNECT_HOOKS.remove(traced)
            pollread.close_readers()


def _callers_and_jobs() -> tuple[list[Any], list[str]]:
    """Callers (keys of two projects, a revoked and an unknown key, two projects without keys) and
    jobs (each project's, and one that does not exist)."""
    from store import auth
    from store import fastread as fr
    from store.db import session_scope

    token_a, project_a = _key(_unique("batch-a"))
    token_b, project_b = _key(_unique("batch-b"))
    revoked, _ = _key(_unique("batch-revoked"))
    with session_scope() as s:
        key_id = s.execute(text("SELECT id FROM api_keys WHERE key_hash = :h"), {"h": auth.hash_key(revoked)}).scalar_one()
        auth.revoke_key(s, key_id)
    callers = [fr.Caller(key_hash=auth.hash_key(t)) for t in (token_a, token_b, revoked, "ty_" + "z" * 43)]
    callers += [fr.Caller(project_id=project_a), fr.Caller(project_id=project_b)]
    jobs = [_finished_job(project_a), _finished_job(project_a), _finished_job(project_b), "0" * 32]
    return callers, jobs


def test_batched_polls_answer_what_single_polls_answer(inproc_env):
    """One query for many (job, caller) items gives, item by item, the single-poll answer: the
    key's row (or none: 401), the job's document (or none: 404), metrics after since_epoch,
    downsampled to max_points, for keyed and keyless callers mixed in one batch."""
    from store import fastread as fr
    from store.db import get_engine

    engine = get_engine()
    callers, jobs = _callers_and_jobs()
    job_items = [(j, c) for c in callers for j in jobs]
    metric_items = [(j, c, since, mp) for c in callers for j in jobs for since, mp in ((0, None), (2, None), (0, 2), (5, 1))]
    conn = engine.raw_connection()
    try:
        conn.driver_connection.autocommit = True
        batched_jobs = fr.job_polls(engine).run_many(conn.driver_connection, job_items)
        batched_metrics = fr.metrics_polls(engine).run_many(conn.driver_connection, metric_items)
    finally:
        conn.driver_connection.autocommit = False
        conn.close()
    singles_jobs = [fr.job_json(engine, j, c) for j, c in job_items]
    singles_metrics = [fr.metrics_json(engine, j, c, s, mp) for j, c, s, mp in metric_items]
    assert batched_jobs == singles_jobs
    assert batched_metrics == singles_metrics
    # the cases are all there: served, 404 (key fine, job elsewhere), 401 (no key row)
    outcomes = {(key is not None, body is not None) for key, body in singles_jobs[: 4 * len(jobs)]}
    assert outcomes == {(True, True), (True, False), (False, False)}
    assert any(b is not None and b'"epochs":[]' in b for _, b in singles_metrics)  # since_epoch=5: none after


def test_waiting_polls_of_different_jobs_share_one_query(inproc_env):
    from store import fastread as fr
    from store.db import get_engine
    from store.pollread import PollReader

    engine = get_engine()
    callers, jobs = _callers_and_jobs()
    reader = PollReader(engine, threads=1)
    gate, started = threading.Event(), threading.Event()
    try:
        reader.submit("block", lambda conn: (started.set(), gate.wait(10)))
        assert started.wait(10)
        items = [(j, c) for c in callers[:2] for j in jobs]
        futures = [reader.submit_item(it, fr.job_polls(engine), it) for it in items]
        metric = reader.submit_item(("m",), fr.metrics_polls(engine), (jobs[0], callers[0], 0, None))
        gate.set()
        assert [f.result(10) for f in futures] == [fr.job_json(engine, j, c) for j, c in items]
        assert metric.result(10) == fr.metrics_json(engine, jobs[0], callers[0])
        assert reader.queries == 3  # the blocker, all the job polls in one, the metrics poll
    finally:
        gate.set()
        reader.close()


def test_polls_from_an_event_loop_share_a_query_not_yet_sent_and_only_that(inproc_env):
    """On PostgreSQL a poll awaited on an event loop runs on that loop's own connection
    (store.pollread._LoopReader) under the threads' rules: the polls that arrive before a query is
    sent share it (different jobs in one batched query), a poll that arrives once it is under way
    waits for a query of its own, and every answer is the single poll's."""
    import asyncio

    from store import fastread as fr
    from store.db import get_engine
    from store.pollread import PollReader

    engine = get_engine()
    callers, jobs = _callers_and_jobs()
    reader = PollReader(engine, threads=1)
    kind = fr.job_polls(engine)
    item = (jobs[0], callers[0])

    async def main() -> tuple[list[Any], list[Any], int]:
        loop = asyncio.get_running_loop()
        first = [asyncio.ensure_future(reader.run_item(item, kind, item)) for _ in range(10)]
        first += [asyncio.ensure_future(reader.run_item((j, c), kind, (j, c))) for c in callers for j in jobs]
        while not reader._loops.get(loop) or reader._loops[loop].waiting or not reader._loops[loop].opening:
            await asyncio.sleep(0)  # until the burst's query is taken (its connection is still opening)
        later = [asyncio.ensure_future(reader.run_item(item, kind, item)) for _ in range(5)]
        return await asyncio.gather(*first), await asyncio.gather(*later), len(reader._conns)

    try:
        first, later, conns = asyncio.run(main())
        assert first == [fr.job_json(engine, *item)] * 10 + [fr.job_json(engine, j, c) for c in callers for j in jobs]
        assert later == [fr.job_json(engine, *item)] * 5
        # one query for the whole first burst (25 different polls), one for the late ones
        assert reader.queries == 2
        assert conns == 1  # threads=1: one connection on the loop as well
    finally:
        reader.close()
    assert not reader._conns


@pytest.mark.parametrize("closer", ["loop", "thread"])
def test_closing_the_reader_finishes_the_polls_still_waiting_on_a_loop(inproc_env, closer):
    """``PollReader.close`` finishes the waiting polls (the threads' rule) on an event loop too,
    whether it is called on the loop itself (the app's lifespan: close_readers) or from another
    thread (get_reader replacing a reader) while a poll is under way and another waits for the
    connection: both are answered (before, the waiting one was never answered: its request hung),
    and no connection is left open."""
    import asyncio

    from store import fastread as fr
    from store.db import get_engine
    from store.pollread import PollReader

    engine = get_engine()
    callers, jobs = _callers_and_jobs()
    reader = PollReader(engine, threads=1)
    kind = fr.job_polls(engine)
    item = (jobs[0], callers[0])

    async def main() -> tuple[list[Any], Any]:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(reader.run_item(item, kind, item))
        while not reader._loops.get(loop) or reader._loops[loop].waiting or not reader._loops[loop].opening:
            await asyncio.sleep(0)  # the first poll's query is taken (its connection is opening)
        on_loop = reader._loops[loop]
        later = asyncio.ensure_future(reader.run_item(item, kind, item))  # waits for the one connection
        await asyncio.sleep(0)
        if closer == "loop":
            reader.close()
        else:
            await loop.run_in_executor(None, reader.close)
        answers = list(await asyncio.wait_for(asyncio.gather(first, later), 10))
        await asyncio.sleep(0.1)  # the last batch's task closes its connection after answering
        return answers, on_loop

    answers, on_loop = asyncio.run(main())
    assert answers == [fr.job_json(engine, *item)] * 2
    assert on_loop.closed and not on_loop.conns and not on_loop.idle
    assert not reader._conns


def test_a_loop_never_holds_more_connections_than_its_limit_while_one_is_replaced(inproc_env, monkeypatch):
    """A connection replaced on the loop (recycled after RECYCLE_S, or broken by a server restart)
    counts while its successor opens: a poll that arrives meanwhile waits for it rather than
    opening one more (before, each replacement let the loop open one connection over its limit)."""
    import asyncio

    from store import fastread as fr
    from store import pollread
    from store.db import get_engine
    from store.pollread import PollReader

    engine = get_engine()
    callers, jobs = _callers_and_jobs()
    reader = PollReader(engine, threads=1)
    kind = fr.job_polls(engine)
    items = [(j, callers[0]) for j in jobs]
    most = 0

    async def main() -> list[Any]:
        nonlocal most
        loop = asyncio.get_running_loop()
        answers = [await reader.run_item(items[0], kind, items[0])]  # one connection, idle now
        monkeypatch.setattr(pollread, "RECYCLE_S", -1.0)  # its next use replaces it
        lr = reader._loops[loop]
        first = asyncio.ensure_future(reader.run_item(items[1], kind, items[1]))
        while lr.waiting or lr.idle:
            await asyncio.sleep(0)  # taken with the idle connection, which is being replaced
        second = asyncio.ensure_future(reader.run_item(items[2], kind, items[2]))
        while not (first.done() and second.done()):
            most = max(most, len(lr.conns) + lr.opening)
            await asyncio.sleep(0)
        return answers + [first.result(), second.result()]

    try:
        assert asyncio.run(main()) == [fr.job_json(engine, *it) for it in items[:3]]
        assert most <= 1
    finally:
        reader.close()


def test_metrics_polls_from_an_event_loop_answer_what_single_polls_answer(inproc_env):
    import asyncio

    from store import fastread as fr
    from store.db import get_engine
    from store.pollread import PollReader

    engine = get_engine()
    callers, jobs = _callers_and_jobs()
    items = [(j, c, since, mp) for c in callers for j in jobs for since, mp in ((0, None), (2, None), (0, 2), (5, 1))]
    reader = PollReader(engine, threads=2)

    async def main() -> list[Any]:
        return await asyncio.gather(*(reader.run_item(it, fr.metrics_polls(engine), it) for it in items))

    try:
        assert asyncio.run(main()) == [fr.metrics_json(engine, *it) for it in items]
        assert reader.queries <= 2 * -(-len(items) // fr.metrics_polls(engine).limit)
    finally:
        reader.close()


def test_poll_connections_use_the_engines_connect_arguments(inproc_env):
    """A password with a space (``%20`` in the URL) reaches libpq intact: the poll threads connect
    with the engine's own arguments, not a URL rendered back to text. (The test server trusts
    local connections, so any password is accepted; a mangled one is a connection error.)"""
    from sqlalchemy.engine import make_url

    from store.db import make_engine
    from store.pollread import PollReader

    url = make_url(inproc_env["TRAINYARD_DATABASE_URL"]).set(password="a b")
    engine = make_engine(url.render_as_string(hide_password=False))
    reader = PollReader(engine, threads=1)
    try:
        assert reader.submit("k", lambda conn: conn.execute("SELECT 41 + 1").fetchone()[0]).result(10) == 42
        conn = reader._conns[0]
        assert conn.info.get_parameters().get("user") == "postgres" or conn.info.user == "postgres"
    finally:
        reader.close()
        engine.dispose()


def test_a_queued_jobs_poll_has_its_position_and_estimated_start_batched_or_not(inproc_env):
    """A queued job (a queue no worker takes) polled through the batched query and the single one:
    the same document, with queue_position 1 and an estimated start (issue 14); the estimate is
    compared apart (it is "now" for a queue where nothing runs, and the queue's state is re-read
    after a second)."""
    import json

    from store import fastread as fr
    from store import repo
    from store.db import get_engine, session_scope
    from training import validate_spec

    _, project = _key(_unique("queued"))
    with session_scope() as s:
        job = repo.create_job(s, spec=validate_spec(note_spec(1)).model_dump(mode="json"),
                              queue=_unique("no-worker"), project_id=project).id
    engine = get_engine()
    items = [(job, fr.Caller(project_id=project))]
    conn = engine.raw_connection()
    try:
        conn.driver_connection.autocommit = True
        [(_, batched)] = fr.job_polls(engine).run_many(conn.driver_connection, items)
    finally:
        conn.driver_connection.autocommit = False
        conn.close()
    _, single = fr.job_json(engine, job, items[0][1])
    assert batched is not None and single is not None
    a, b = json.loads(batched), json.loads(single)
    assert a["queue_position"] == b["queue_position"] == 1
    assert a.pop("estimated_start_at") and b.pop("estimated_start_at")
    assert a == b
