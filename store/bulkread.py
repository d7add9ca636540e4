"""Bulk metrics: the curves of up to 1,000 jobs in one query, each epoch's stored JSON spliced
into the answer as text (never parsed and re-encoded), as :mod:`store.fastread` does for one job."""

from __future__ import annotations

import json
from collections.abc import Sequence
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


def _epoch_expr(dialect: str, keys: Sequence[str] | None, *, as_text: bool = True) -> tuple[str, dict[str, str]]:
    """The SQL text of an epoch's JSON: as stored, or only ``epoch`` and ``keys`` (built in SQL,
    so the Python side still never parses it)."""
    if not keys:
        return ('CAST(m."values" AS TEXT)' if as_text else 'm."values"'), {}
    names = ["epoch", *[k for k in keys if k != "epoch"]]
    params = {_name(i): k for i, k in enumerate(names)}
    if dialect == "postgresql":
        pairs = ", ".join(f'CAST(:{_name(i)} AS TEXT), m."values" -> CAST(:{_name(i)} AS TEXT)' for i in range(len(names)))
        # json_strip_nulls: a key an epoch does not have is left out, as in the stored object
        built = f"json_strip_nulls(json_build_object({pairs}))"
        return (f"CAST({built} AS TEXT)" if as_text else built), params
    pairs = ", ".join(f"""CAST(:{_name(i)} AS TEXT), json_extract(m."values", '$."' || :{_name(i)} || '"')"""
                      for i in range(len(names)))
    return f"json_object({pairs})", params


def bulk_metrics_json(
    engine: Engine, project_id: str, since: dict[str, int], keys: Sequence[str] | None = None,
    max_points: int | None = None,
) -> bytes:
    """``POST /v1/metrics/bulk`` as JSON bytes: ``{"jobs": {id: {"epochs": [...], "total": n}},
    "missing": [ids not in the project]}``. Each job's epochs come after its own ``since_epoch``;
    a job without epochs yet is told from a missing one. Downsampling keeps the rows
    :func:`store.fastread.downsample` keeps (the single-job route's rule)."""
    if engine.dialect.name == "postgresql":
        curves = _pg_curves(engine, project_id, since, keys, max_points)
    else:
        curves = _portable_curves(engine, project_id, since, keys, max_points)
    parts = [f'"{job_id}":{{"epochs":{body},"total":{total}}}' for job_id, (total, body) in curves.items()]
    missing = [i for i in since if i not in curves]
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
) -> dict[str, tuple[int, str]]:
    """On PostgreSQL each curve is aggregated in the database (json_agg keeps each stored epoch's
    text): one row per job instead of one per epoch; downsampling is a FILTER of the aggregate."""
    from store.fastread import _fetch, _sql

    epoch_sql, key_params = _epoch_expr("postgresql", keys, as_text=False)
    wanted = ("unnest(CAST(:ids AS text[]), CAST(:sinces AS int[])) AS w(id, since) "
              "JOIN jobs j ON j.id = w.id AND j.project_id = :project "
              "LEFT JOIN job_metrics m ON m.job_id = w.id AND m.epoch > w.since")
    params: dict[str, Any] = {"ids": list(since), "sinces": list(since.values()), "project": project_id, **key_params}
    if max_points is None:
        sql = (f"SELECT w.id, count(m.epoch), CAST(COALESCE(json_agg({epoch_sql} ORDER BY m.epoch) "
               f"FILTER (WHERE m.epoch IS NOT NULL), '[]') AS TEXT) FROM {wanted} GROUP BY w.id")
    else:
        params["mp"] = max_points
        sql = ("SELECT id, n, CAST(COALESCE(json_agg(v ORDER BY epoch) FILTER (WHERE epoch IS NOT NULL AND "
               f"{_KEEP}), '[]') AS TEXT) FROM (SELECT w.id, m.epoch, {epoch_sql} AS v, "
               "CAST(count(m.epoch) OVER (PARTITION BY w.id) AS bigint) AS n, "
               "CAST(row_number() OVER (PARTITION BY w.id ORDER BY m.epoch) - 1 AS bigint) AS i "
               f"FROM {wanted}) t GROUP BY id, n")
    sql = _sql(engine, sql.replace("%", "%%"))  # the modulo operator, escaped for pyformat
    return {job_id: (int(n), body) for job_id, n, body in _fetch(engine, sql, params)}


def _portable_curves(
    engine: Engine, project_id: str, since: dict[str, int], keys: Sequence[str] | None, max_points: int | None,
) -> dict[str, tuple[int, str]]:
    """Elsewhere (SQLite, embedded mode): one row per epoch, spliced together here."""
    epoch_sql, params = _epoch_expr(engine.dialect.name, keys)
    sql = text(
        f"SELECT j.id, m.epoch, {epoch_sql} FROM jobs j "
        "LEFT JOIN job_metrics m ON m.job_id = j.id AND m.epoch > :min_since "
        "WHERE j.id IN :ids AND j.project_id = :project ORDER BY j.id, m.epoch"
    ).bindparams(bindparam("ids", expanding=True))
    rows_by_job: dict[str, list[str]] = {}
    with engine.connect() as conn:
        rows = conn.execute(sql, {"ids": list(since), "project": project_id, "min_since": min(since.values()),
                                  **params}).all()
    for job_id, epoch, body in rows:
        curve = rows_by_job.setdefault(job_id, [])
        if epoch is not None and epoch > since[job_id]:
            curve.append(body)
    out = {}
    for job_id, epochs in rows_by_job.items():
        total = len(epochs)
        if max_points is not None:
            epochs = downsample(epochs, max_points)
        out[job_id] = (total, f"[{','.join(epochs)}]")
    return out
