"""Bulk metrics: the curves of up to 1,000 jobs in one query, each epoch's stored JSON spliced
into the answer as text (never parsed and re-encoded), as :mod:`store.fastread` does for one job;
finished jobs' whole curves come precompacted, one row each (:mod:`store.curves`)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Engine, bindparam, text

from store.fastread import downsample


def _name(i: int) -> str:
    """A bind parameter name of letters only (store.fastread._sql rewrites ``:[a-z_]+``)."""
    out = ""
    while True:
        out = chr(97 + i % 26) + out
        i = i // 26 - 1
        if i < 0:
            return f"key_{out}"


def _epoch_expr(dialect: str, keys: Sequence[str] | None) -> tuple[str, dict[str, str]]:
    """The SQL text of an epoch's JSON: as stored, or only ``epoch`` and ``keys`` (built in SQL,
    so the Python side still never parses it)."""
    if not keys:
        return 'CAST(m."values" AS TEXT)', {}
    names = list(dict.fromkeys(["epoch", *keys]))
    # '{' + the ',"key":value' pairs the epoch has (a missing key's -> is NULL, and so is its
    # pair) + '}', as text. Each value is the stored text that -> returns: no object built and
    # re-parsed (PostgreSQL's json_build_object + json_strip_nulls took 2-3x longer at 100,000
    # epochs; SQLite's json_object wrote reals with 15 digits and missing keys as null).
    params: dict[str, str] = {}
    pairs = []
    for i, k in enumerate(names):
        label, path = _name(2 * i), _name(2 * i + 1)
        params[label] = "," + json.dumps(k) + ":"
        if dialect == "postgresql":
            params[path] = k
            value = f'CAST(m."values" -> CAST(:{path} AS TEXT) AS TEXT)'
        else:
            params[path] = "$." + json.dumps(k)
            value = f'(m."values" -> :{path})'
        pairs.append(f"COALESCE(:{label} || {value}, '')")
    return f"'{{' || substr({' || '.join(pairs)}, 2) || '}}'", params


class CurveCache:
    """Finished jobs' compacted curves (:mod:`store.curves`) kept in this process, up to
    ``max_chars`` characters, least recently used out first. A compacted row never changes: it
    is written once, at the job's terminal move, and may only be dropped (an epoch written after
    it; the job is terminal, so it is never compacted again). Each request still asks the
    database which of its jobs have one, so a dropped row is never answered from here; what the
    cache saves is the 16 MB of curve text per 1,000 x 100 epochs, read, decompressed and sent
    by the database on every request (BENCHMARKS.md, dashboards)."""

    def __init__(self, max_chars: int = 64_000_000) -> None:
        self.max_chars = max_chars
        self._curves: OrderedDict[str, str] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def snapshot(self, job_ids: Iterable[str]) -> dict[str, str]:
        with self._lock:
            out = {i: self._curves[i] for i in job_ids if i in self._curves}
            for i in out:
                self._curves.move_to_end(i)
            return out

    def put(self, job_id: str, body: str) -> None:
        if len(body) > self.max_chars:
            return
        with self._lock:
            if job_id in self._curves:
                return
            self._curves[job_id] = body
            self._chars += len(body)
            while self._chars > self.max_chars:
                _, old = self._curves.popitem(last=False)
                self._chars -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._curves.clear()
            self._chars = 0


#: this process's cache (the API's bulk route reads through it)
CURVES = CurveCache()

#: what a dialect's reader answers per job of the project: (epochs after its since_epoch, the
#: curve's JSON text or None when ``cached`` has it, whether it is the compacted curve)
Found = dict[str, tuple[int, str | None, bool]]


def bulk_metrics_json(
    engine: Engine, project_id: str, since: dict[str, int], keys: Sequence[str] | None = None,
    max_points: int | None = None, cache: CurveCache | None = CURVES,
) -> bytes:
    """``POST /v1/metrics/bulk`` as JSON bytes: ``{"jobs": {id: {"epochs": [...], "total": n}},
    "missing": [ids not in the project]}``. Each job's epochs come after its own ``since_epoch``;
    a job without epochs yet is told from a missing one. Downsampling keeps the rows
    :func:`store.fastread.downsample` keeps (the single-job route's rule). Whole curves of
    finished jobs come from ``cache`` when it has them (see :class:`CurveCache`)."""
    whole = not keys and max_points is None
    cached = cache.snapshot(i for i, s in since.items() if s == 0) if cache is not None and whole else {}
    read = _pg_curves if engine.dialect.name == "postgresql" else _portable_curves
    found = read(engine, project_id, since, keys, max_points, cached)
    parts = []
    for job_id, (total, body, compacted) in found.items():
        if body is None:
            body = cached[job_id]
        elif compacted and cache is not None:
            cache.put(job_id, body)
        parts.append(f'"{job_id}":{{"epochs":{body},"total":{total}}}')
    missing = [i for i in since if i not in found]
    return f'{{"jobs":{{{",".join(parts)}}},"missing":{json.dumps(missing)}}}'.encode()


#: Whether row ``i`` of ``n`` is one that :func:`store.fastread.downsample` keeps for ``:mp``
#: points (``round(k * (n - 1) / (mp - 1))`` for k = 0..mp-1, Python's round: half to even),
#: in exact integer arithmetic: only k0 = floor(i (mp-1) / (n-1)) or k0 + 1 can round to i.
#: (NULLIF: the terms that do not apply must not divide by zero; SQL does not promise to skip them.)
_D = "NULLIF(:mp - 1, 0)"
_ROUND = ("(({k}) * (n - 1) / " + _D + " + CASE WHEN 2 * (({k}) * (n - 1) % " + _D + ") > :mp - 1 THEN 1 "
          "WHEN 2 * (({k}) * (n - 1) % " + _D + ") < :mp - 1 THEN 0 ELSE (({k}) * (n - 1) / " + _D + ") % 2 END)")
_K0 = "(i * (:mp - 1) / NULLIF(n - 1, 0))"
_KEEP = (f"(n <= :mp OR (:mp = 1 AND i = n - 1) OR (:mp > 1 AND ({_ROUND.format(k=_K0)} = i "
         f"OR ({_K0} + 1 <= :mp - 1 AND {_ROUND.format(k=_K0 + ' + 1')} = i))))")


def _pg_curves(
    engine: Engine, project_id: str, since: dict[str, int], keys: Sequence[str] | None, max_points: int | None,
    cached: dict[str, str],
) -> Found:
    """On PostgreSQL, one row per job: a finished job's compacted curve (:mod:`store.curves`) when
    the whole curve is asked for, else its epochs aggregated in the database, job by job (a
    LATERAL subquery over the primary key's index: no sort of all the rows, which spilled to disk
    at 100,000 epochs). Downsampling is a FILTER of the aggregate; ``keys`` are picked only from
    the epochs it keeps."""
    from store.fastread import _fetch, _sql

    epoch_sql, key_params = _epoch_expr("postgresql", keys)
    # the ids and since_epochs as two comma-separated strings: psycopg adapts a 1,000-item list
    # to an array in Python (~3 ms each on the 2-core VM); the server splits a string at once
    params: dict[str, Any] = {"ids": ",".join(since), "sinces": ",".join(map(str, since.values())),
                              "project": project_id, **key_params}
    whole = not keys and max_points is None
    rows = 'SELECT m.epoch, m."values" FROM job_metrics m WHERE m.job_id = w.id AND m.epoch > w.since'
    agg = f"string_agg({epoch_sql}, ',' ORDER BY m.epoch)"
    if max_points is not None:
        params["mp"] = max_points
        rows = (rows.replace("SELECT m.epoch", "SELECT CAST(count(*) OVER () AS bigint) AS n, "
                             "CAST(row_number() OVER (ORDER BY m.epoch) - 1 AS bigint) AS i, m.epoch"))
        agg += f" FILTER (WHERE {_KEEP})"
    if whole:
        rows += " AND c.job_id IS NULL"  # a compacted curve answers instead (a one-time filter)
    curve = f"SELECT count(*) AS n, '[' || COALESCE({agg}, '') || ']' AS body FROM ({rows}) m"
    # whether this process has each job's compacted curve: a third column of w (t/f), not an
    # id list searched per row (= ANY of 1,000 ids, per row, cost more than the bodies it saved)
    params["cached"] = ",".join("t" if i in cached else "f" for i in since)
    sql = ("SELECT w.id, " + ("COALESCE(c.n, x.n), CASE WHEN c.job_id IS NOT NULL AND w.cached THEN NULL "
                              "ELSE COALESCE(c.body, x.body) END, c.job_id IS NOT NULL "
                              if whole else "x.n, x.body, false ")
           + "FROM unnest(string_to_array(:ids, ','), CAST(string_to_array(:sinces, ',') AS int[]), "
           "CAST(string_to_array(:cached, ',') AS boolean[])) AS w(id, since, cached) "
           "JOIN jobs j ON j.id = w.id AND j.project_id = :project "
           + ("LEFT JOIN job_curves c ON c.job_id = w.id AND w.since = 0 " if whole else "")
           + f"CROSS JOIN LATERAL ({curve}) x")
    sql = _sql(engine, sql.replace("%", "%%"))  # the modulo operator, escaped for pyformat
    return {job_id: (int(n), body, compacted) for job_id, n, body, compacted in _fetch(engine, sql, params)}


def _portable_curves(
    engine: Engine, project_id: str, since: dict[str, int], keys: Sequence[str] | None, max_points: int | None,
    cached: dict[str, str],
) -> Found:
    """Elsewhere (SQLite, embedded mode): finished jobs' compacted curves when whole curves are
    asked for; the other jobs' epochs one row each, spliced together here."""
    epoch_sql, params = _epoch_expr(engine.dialect.name, keys)
    out: Found = {}
    rest = list(since)
    with engine.connect() as conn:
        if not keys and max_points is None:
            compacted = text(
                "SELECT j.id, c.n, CASE WHEN j.id IN :cached THEN NULL ELSE c.body END, c.job_id IS NOT NULL "
                "FROM jobs j LEFT JOIN job_curves c ON c.job_id = j.id WHERE j.id IN :ids AND j.project_id = :project"
            ).bindparams(bindparam("ids", expanding=True), bindparam("cached", expanding=True))
            found = conn.execute(compacted, {"ids": rest, "cached": list(cached), "project": project_id}).all()
            out = {job_id: (n, body, True) for job_id, n, body, has in found if has and since[job_id] == 0}
            rest = [row[0] for row in found if row[0] not in out]
        rows = []
        if rest:
            sql = text(
                f"SELECT j.id, m.epoch, {epoch_sql} FROM jobs j "
                "LEFT JOIN job_metrics m ON m.job_id = j.id AND m.epoch > :min_since "
                "WHERE j.id IN :ids AND j.project_id = :project ORDER BY j.id, m.epoch"
            ).bindparams(bindparam("ids", expanding=True))
            rows = conn.execute(sql, {"ids": rest, "project": project_id,
                                      "min_since": min(since[i] for i in rest), **params}).all()
    rows_by_job: dict[str, list[str]] = {}
    for job_id, epoch, body in rows:
        curve = rows_by_job.setdefault(job_id, [])
        if epoch is not None and epoch > since[job_id]:
            curve.append(body)
    for job_id, epochs in rows_by_job.items():
        total = len(epochs)
        if max_points is not None:
            epochs = downsample(epochs, max_points)
        out[job_id] = (total, f"[{','.join(epochs)}]", False)
    return out
