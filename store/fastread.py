"""The two routes that dashboards and batch scripts poll (a job, its metrics) read through the
DBAPI connection directly: one prepared SQL string, one round trip, and the stored JSON (the spec,
each epoch's metrics) passed through as text instead of parsed and re-serialized.

Measured on this project's 2-core VM (``bench/service.py`` and the A/B in BENCHMARKS.md), the ORM
path spent most of a poll's server time in SQLAlchemy's session, row and result machinery and in
pydantic validating a response it had just built; this path keeps only the query.
``tests/service/test_fastread.py`` checks its output equals the response model's, field for field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine

from store.floats import from_text
from store.pollread import get_reader
from store.scheduling import position_sql, queued_view

#: the most points a metrics poll may ask for (``max_points``)
MAX_POINTS = 100_000

# The job columns a view needs, in select order; spec and info come as JSON text.
JOB_COLUMNS = (
    "id", "name", "status", "queue", "stop_reason", "error", "epoch", "epochs", "best_monitor", "best_value",
    "best_epoch", "attempts", "cancel_requested", "worker", "steps", "run_seconds", "created_at", "started_at",
    "finished_at", "heartbeat_at", "updated_at", "sweep_id", "trial_number", "trial_params", "priority",
    "labels", "notes",
)


def _sql(engine: Engine, sql: str) -> str:
    """``:name`` placeholders in the driver's own parameter style."""
    if engine.dialect.paramstyle in ("pyformat", "format"):
        return re.sub(r"(?<!:):([a-z_]+)", r"%(\1)s", sql)
    return sql  # sqlite3 takes :name


#: With an API key, the key's row leads the query (LEFT JOIN to the job), so one round trip
#: authenticates the caller and reads the job: no key row = 401, key row without job = 404.
KEY_COLUMNS = ("k.id", "k.project_id", "p.requests_per_minute", "k.last_used_at")
_KEY_FROM = (
    "FROM api_keys k JOIN projects p ON p.id = k.project_id "
    "LEFT JOIN jobs j ON j.id = :id AND j.project_id = k.project_id"
)
_KEY_WHERE = "WHERE k.key_hash = :key_hash AND k.revoked_at IS NULL"


@lru_cache(maxsize=8)
def _job_sql(engine: Engine, keyed: bool) -> str:
    cols = (", ".join(f"j.{c}" for c in JOB_COLUMNS) + f", {position_sql('j')}, j.project_id"
            + ", CAST(j.spec AS TEXT), CAST(j.info AS TEXT)")
    if keyed:
        return _sql(engine, f"SELECT {', '.join(KEY_COLUMNS)}, {cols} {_KEY_FROM} {_KEY_WHERE}")
    return _sql(engine, f"SELECT {cols} FROM jobs j WHERE j.id = :id AND j.project_id = :project")


@lru_cache(maxsize=8)
def _metrics_sql(engine: Engine, keyed: bool) -> str:
    # The job row joins in so one round trip tells "no such job" from "no epochs yet".
    metrics = "LEFT JOIN job_metrics m ON m.job_id = j.id AND m.epoch > :since"
    if keyed:
        return _sql(
            engine,
            f"SELECT {', '.join(KEY_COLUMNS)}, j.id, CAST(m.\"values\" AS TEXT) {_KEY_FROM} {metrics} "
            f"{_KEY_WHERE} ORDER BY m.epoch",
        )
    return _sql(
        engine,
        f"SELECT j.id, CAST(m.\"values\" AS TEXT) FROM jobs j {metrics} "
        "WHERE j.id = :id AND j.project_id = :project ORDER BY m.epoch",
    )


@dataclass(frozen=True)
class Caller:
    """Who asks: a project (auth off, or already resolved) or the sha256 of an API key, which the
    query itself resolves (see :data:`KEY_COLUMNS`)."""

    project_id: str | None = None
    key_hash: str | None = None

    def params(self) -> dict[str, Any]:
        return {"key_hash": self.key_hash} if self.key_hash is not None else {"project": self.project_id}


#: What a keyed query says of the key: (key id, project id, project's requests per minute,
#: last used at), or None when the key is unknown or revoked.
KeyRow = tuple[Any, Any, Any, Any] | None


def _rows(conn: Any, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        return cur.fetchall()
    finally:
        cur.close()


def _fetch(engine: Engine, sql: str, params: dict[str, Any], conn: Any = None) -> list[tuple[Any, ...]]:
    if conn is not None:  # a connection of store.pollread's (PostgreSQL ones are in autocommit)
        return _rows(conn, sql, params)
    conn = engine.raw_connection()
    pg = engine.dialect.name == "postgresql"
    try:
        if pg:
            # autocommit for this one SELECT: otherwise psycopg sends BEGIN and COMMIT as round
            # trips of their own (three per poll instead of one; bench/service.py counts them)
            conn.driver_connection.autocommit = True
        return _rows(conn, sql, params)
    finally:
        if pg:
            conn.driver_connection.autocommit = False
        conn.close()  # back to the pool


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite returns text
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json_value(value: Any) -> Any:
    if isinstance(value, str):
        return json.loads(value)
    return value


def job_view(r: Mapping[str, Any], when: Callable[[Any], Any] = _iso) -> dict[str, Any]:
    """The JSON view of a job (``JobSummary``'s fields) from its columns (:data:`JOB_COLUMNS`, as
    a row's values or an ORM object's attributes); ``when`` renders a timestamp (default: ISO 8601
    text in UTC). The one builder of a job's view: the polls' bytes and the API's response models
    (``api.views``) both come from it."""
    best = None
    if r["best_monitor"] is not None or r["best_epoch"] is not None:
        best = {"monitor": r["best_monitor"], "value": from_text(r["best_value"]), "epoch": r["best_epoch"]}
    return {
        "id": r["id"], "name": r["name"], "status": r["status"], "queue": r["queue"],
        "stop_reason": r["stop_reason"], "error": r["error"],
        "progress": {"epoch": r["epoch"], "epochs": r["epochs"]}, "best": best,
        "attempts": r["attempts"], "cancel_requested": bool(r["cancel_requested"]), "worker": r["worker"],
        "steps": r["steps"], "run_seconds": r["run_seconds"],
        "created_at": when(r["created_at"]), "started_at": when(r["started_at"]),
        "finished_at": when(r["finished_at"]), "heartbeat_at": when(r["heartbeat_at"]),
        "updated_at": when(r["updated_at"]),
        "sweep_id": r["sweep_id"], "trial_number": r["trial_number"], "trial_params": _json_value(r["trial_params"]),
        "priority": r["priority"],
        "labels": _json_value(r["labels"]) or {}, "notes": r["notes"],
    }


def job_json(engine: Engine, job_id: str, caller: Caller, conn: Any = None) -> tuple[KeyRow, bytes | None]:
    """``GET /v1/jobs/{id}`` as JSON bytes (the spec and info spliced in as stored), or None if
    there is no such job in the caller's project; with a key, also the key's row (None: 401).
    ``conn``: a DBAPI connection to use (default: one from the engine's pool)."""
    keyed = caller.key_hash is not None
    rows = _fetch(engine, _job_sql(engine, keyed), {"id": job_id, **caller.params()}, conn)
    key: KeyRow = None
    if keyed:
        if not rows:
            return None, None
        key, row = tuple(rows[0][:4]), rows[0][4:]  # type: ignore[assignment]
    elif rows:
        row = rows[0]
    else:
        return None, None
    if row[0] is None:  # the key is valid, the job is not in its project
        return key, None
    return key, _job_document(engine, row)


def _job_document(engine: Engine, row: Sequence[Any]) -> bytes:
    """The job's JSON from its columns (:data:`JOB_COLUMNS`, its rank in its project's queue, its
    project, then the spec and info as text)."""
    n = len(JOB_COLUMNS)
    view = job_view(dict(zip(JOB_COLUMNS, row[:n], strict=True)))
    position, start = queued_view(engine, view["queue"], row[n + 1], row[n])
    view["queue_position"], view["estimated_start_at"] = position, _iso(start)
    head = json.dumps(view, separators=(",", ":"), allow_nan=False)
    spec_text, info_text = row[n + 2], row[n + 3]
    body = f'{head[:-1]},"spec":{spec_text},"info":{info_text if info_text is not None else "null"}}}'
    return body.encode()


def downsample(rows: list[Any], max_points: int) -> list[Any]:
    """``max_points`` evenly spaced rows, always keeping the first and the last."""
    n = len(rows)
    if n <= max_points:
        return rows
    return [rows[i] for i in _kept(n, max_points)]


@lru_cache(maxsize=256)
def _kept(n: int, max_points: int) -> tuple[int, ...]:
    """Which of ``n`` rows :func:`downsample` keeps (the same for every job of a bulk request
    with as many epochs: computed once, not once per job)."""
    if max_points == 1:
        return (n - 1,)
    return tuple(sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)}))


def metrics_json(
    engine: Engine, job_id: str, caller: Caller, since_epoch: int = 0, max_points: int | None = None,
    conn: Any = None,
) -> tuple[KeyRow, bytes | None]:
    """``GET /v1/jobs/{id}/metrics`` as JSON bytes (each epoch's stored JSON spliced in), or None
    if the job does not exist in the caller's project; with a key, also the key's row."""
    keyed = caller.key_hash is not None
    rows = _fetch(engine, _metrics_sql(engine, keyed), {"id": job_id, "since": since_epoch, **caller.params()}, conn)
    if not rows:
        return None, None
    key: KeyRow = tuple(rows[0][:4]) if keyed else None  # type: ignore[assignment]
    if keyed:
        rows = [r[4:] for r in rows]
    if rows[0][0] is None:
        return key, None
    return key, _metrics_document(job_id, [r[1] for r in rows if r[1] is not None], max_points)


def _metrics_document(job_id: str, epochs: list[str], max_points: int | None) -> bytes:
    total = len(epochs)
    if max_points is not None:
        epochs = downsample(epochs, max_points)
    return f'{{"job_id":{json.dumps(job_id)},"epochs":[{",".join(epochs)}],"total":{total}}}'.encode()


# --------------------------------------------------------------------------- many polls, one query
#
# Polls of different jobs that wait for a poll thread at the same time (store.pollread) are
# answered together, by one query over the list of (job, caller) pairs: one round trip and one
# statement for all of them instead of one each. Each item is still resolved on its own, with
# exactly the rules of the single-poll queries above (the key, then the job in the key's
# project); ``tests/service/test_fastpath.py`` checks the answers are the same bytes. LATERAL
# subqueries pin the plan to index lookups per item, whatever the table sizes.

_KEY_LATERAL = (
    "JOIN LATERAL (SELECT id, project_id, last_used_at FROM api_keys "
    "WHERE key_hash = q.key_hash AND revoked_at IS NULL) k ON true "
    "JOIN LATERAL (SELECT requests_per_minute FROM projects WHERE id = k.project_id) p ON true"
)


@lru_cache(maxsize=4)
def _jobs_batch_sql(keyed: bool) -> str:
    cols = (", ".join(JOB_COLUMNS) + f", {position_sql('jobs')} AS queue_rank, project_id AS job_project"
            ", CAST(spec AS TEXT), CAST(info AS TEXT)")
    if keyed:
        return (
            "SELECT q.n, k.id, k.project_id, p.requests_per_minute, k.last_used_at, j.* "
            "FROM unnest(CAST(%(ids)s AS text[]), CAST(%(who)s AS text[])) WITH ORDINALITY AS q(id, key_hash, n) "
            f"{_KEY_LATERAL} "
            f"LEFT JOIN LATERAL (SELECT {cols} FROM jobs WHERE id = q.id AND project_id = k.project_id) j ON true"
        )
    return (
        "SELECT q.n, j.* "
        "FROM unnest(CAST(%(ids)s AS text[]), CAST(%(who)s AS text[])) WITH ORDINALITY AS q(id, project, n) "
        f"JOIN LATERAL (SELECT {cols} FROM jobs WHERE id = q.id AND project_id = q.project) j ON true"
    )


@lru_cache(maxsize=4)
def _metrics_batch_sql(keyed: bool) -> str:
    values = (
        "LEFT JOIN LATERAL (SELECT epoch, CAST(\"values\" AS TEXT) AS v FROM job_metrics "
        "WHERE job_id = j.id AND epoch > q.since) m ON true"
    )
    if keyed:
        return (
            "SELECT q.n, k.id, k.project_id, p.requests_per_minute, k.last_used_at, j.id, m.v "
            "FROM unnest(CAST(%(ids)s AS text[]), CAST(%(who)s AS text[]), CAST(%(since)s AS int[])) "
            "WITH ORDINALITY AS q(id, key_hash, since, n) "
            f"{_KEY_LATERAL} "
            "LEFT JOIN LATERAL (SELECT id FROM jobs WHERE id = q.id AND project_id = k.project_id) j ON true "
            f"{values} ORDER BY q.n, m.epoch"
        )
    return (
        "SELECT q.n, j.id, m.v "
        "FROM unnest(CAST(%(ids)s AS text[]), CAST(%(who)s AS text[]), CAST(%(since)s AS int[])) "
        "WITH ORDINALITY AS q(id, project, since, n) "
        "JOIN LATERAL (SELECT id FROM jobs WHERE id = q.id AND project_id = q.project) j ON true "
        f"{values} ORDER BY q.n, m.epoch"
    )


def _split(items: Sequence[tuple[Any, ...]]) -> list[tuple[bool, list[int]]]:
    """Item positions grouped by whether their caller is a key (one query per group)."""
    keyed = [i for i, it in enumerate(items) if it[1].key_hash is not None]
    plain = [i for i, it in enumerate(items) if it[1].key_hash is None]
    return [(flag, idx) for flag, idx in ((True, keyed), (False, plain)) if idx]


def _who(caller: Caller) -> str | None:
    return caller.key_hash if caller.key_hash is not None else caller.project_id


class _BatchKind:
    """A ``store.pollread`` batch kind of PostgreSQL queries: :meth:`queries` says what to ask for
    a batch of items, :meth:`answer` turns the rows into each item's result. The reader runs the
    queries on a thread's connection (:meth:`run_many`) or on the event loop's own asynchronous
    connection (:meth:`run_many_async`); both give the same results from the same rows."""

    limit = 64

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def queries(self, items: Sequence[Any]) -> list[tuple[bool, list[int], str, dict[str, Any]]]:
        raise NotImplementedError

    def answer(self, items: Sequence[Any], parts: list[tuple[bool, list[int], list[tuple[Any, ...]]]]) -> list[Any]:
        raise NotImplementedError

    def run_one(self, conn: Any, item: Any) -> Any:
        """An item's result without the batched query (SQLite)."""
        raise NotImplementedError

    def run_many(self, conn: Any, items: Sequence[Any]) -> list[Any]:
        if self.engine.dialect.name != "postgresql":
            return [self.run_one(conn, it) for it in items]
        return self.answer(items, [(keyed, idx, _fetch(self.engine, sql, params, conn))
                                   for keyed, idx, sql, params in self.queries(items)])

    async def run_many_async(self, conn: Any, items: Sequence[Any]) -> list[Any]:
        """:meth:`run_many` on a psycopg ``AsyncConnection`` (PostgreSQL, autocommit)."""
        parts = []
        for keyed, idx, sql, params in self.queries(items):
            async with conn.cursor() as cur:
                await cur.execute(sql, params)
                parts.append((keyed, idx, await cur.fetchall()))
        return self.answer(items, parts)


class JobPolls(_BatchKind):
    """``GET /v1/jobs/{id}`` for many (job id, caller) items at once (a ``store.pollread`` batch
    kind): the results are :func:`job_json`'s, item by item."""

    limit = 128  # items per query

    def run_one(self, conn: Any, item: tuple[str, Caller]) -> tuple[KeyRow, bytes | None]:
        return job_json(self.engine, item[0], item[1], conn)

    def queries(self, items: Sequence[tuple[str, Caller]]) -> list[tuple[bool, list[int], str, dict[str, Any]]]:
        return [(keyed, idx, _jobs_batch_sql(keyed),
                 {"ids": [items[i][0] for i in idx], "who": [_who(items[i][1]) for i in idx]})
                for keyed, idx in _split(items)]

    def answer(self, items: Sequence[tuple[str, Caller]],
               parts: list[tuple[bool, list[int], list[tuple[Any, ...]]]]) -> list[tuple[KeyRow, bytes | None]]:
        out: list[tuple[KeyRow, bytes | None]] = [(None, None)] * len(items)
        for keyed, idx, rows in parts:
            for row in rows:
                pos = idx[row[0] - 1]
                key: KeyRow = tuple(row[1:5]) if keyed else None  # type: ignore[assignment]
                job = row[5:] if keyed else row[1:]
                out[pos] = (key, _job_document(self.engine, job) if job[0] is not None else None)
        return out


class MetricsPolls(_BatchKind):
    """``GET /v1/jobs/{id}/metrics`` for many (job id, caller, since_epoch, max_points) items at
    once: the results are :func:`metrics_json`'s, item by item."""

    limit = 64

    def run_one(self, conn: Any, item: tuple[str, Caller, int, int | None]) -> tuple[KeyRow, bytes | None]:
        job_id, caller, since, max_points = item
        return metrics_json(self.engine, job_id, caller, since, max_points, conn)

    def queries(self, items: Sequence[tuple[str, Caller, int, int | None]]) -> list[tuple[bool, list[int], str, dict[str, Any]]]:
        return [(keyed, idx, _metrics_batch_sql(keyed),
                 {"ids": [items[i][0] for i in idx], "who": [_who(items[i][1]) for i in idx],
                  "since": [items[i][2] for i in idx]})
                for keyed, idx in _split(items)]

    def answer(self, items: Sequence[tuple[str, Caller, int, int | None]],
               parts: list[tuple[bool, list[int], list[tuple[Any, ...]]]]) -> list[tuple[KeyRow, bytes | None]]:
        out: list[tuple[KeyRow, bytes | None]] = [(None, None)] * len(items)
        for keyed, idx, rows in parts:
            groups: dict[int, list[Any]] = {}
            for row in rows:
                groups.setdefault(row[0], []).append(row)
            for n, group in groups.items():
                pos = idx[n - 1]
                job_id, _caller, _since, max_points = items[pos]
                key: KeyRow = tuple(group[0][1:5]) if keyed else None  # type: ignore[assignment]
                tail = [r[5:] if keyed else r[1:] for r in group]
                if tail[0][0] is None:
                    out[pos] = (key, None)
                else:
                    out[pos] = (key, _metrics_document(job_id, [t[1] for t in tail if t[1] is not None], max_points))
        return out


@lru_cache(maxsize=8)
def job_polls(engine: Engine) -> JobPolls:
    """The engine's :class:`JobPolls` (one object, so that its polls batch together)."""
    return JobPolls(engine)


@lru_cache(maxsize=8)
def metrics_polls(engine: Engine) -> MetricsPolls:
    """The engine's :class:`MetricsPolls`."""
    return MetricsPolls(engine)


async def read_job(engine: Engine, job_id: str, caller: Caller) -> tuple[KeyRow, bytes | None]:
    """:func:`job_json`'s answer, read on the poll reader's threads (:mod:`store.pollread`) with the
    polls waiting beside it: what the route and the fast path (``api.fastpath``) both serve."""
    return await get_reader(engine).run_item((job_id, caller), job_polls(engine), (job_id, caller))  # type: ignore[no-any-return]


async def read_metrics(
    engine: Engine, job_id: str, caller: Caller, since_epoch: int, max_points: int | None
) -> tuple[KeyRow, bytes | None]:
    """:func:`metrics_json`'s answer, read as :func:`read_job` reads a job."""
    item = (job_id, caller, since_epoch, max_points)
    return await get_reader(engine).run_item(item, metrics_polls(engine), item)  # type: ignore[no-any-return]
