"""Bulk metrics: the curves of up to 1,000 jobs in one query, each epoch's stored JSON spliced
into the answer as text (never parsed and re-encoded), as :mod:`store.fastread` does for one job."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import Engine, bindparam, text

from store.fastread import downsample


def _epoch_expr(dialect: str, keys: Sequence[str] | None) -> tuple[str, dict[str, str]]:
    """The SQL text of an epoch's JSON: as stored, or only ``epoch`` and ``keys`` (built in SQL,
    so the Python side still never parses it)."""
    if not keys:
        return 'CAST(m."values" AS TEXT)', {}
    names = ["epoch", *[k for k in keys if k != "epoch"]]
    params = {f"k{i}": k for i, k in enumerate(names)}
    if dialect == "postgresql":
        pairs = ", ".join(f'CAST(:k{i} AS TEXT), m."values" -> CAST(:k{i} AS TEXT)' for i in range(len(names)))
        # json_strip_nulls: a key an epoch does not have is left out, as in the stored object
        return f"CAST(json_strip_nulls(json_build_object({pairs})) AS TEXT)", params
    pairs = ", ".join(f"""CAST(:k{i} AS TEXT), json_extract(m."values", '$."' || :k{i} || '"')"""
                      for i in range(len(names)))
    return f"json_object({pairs})", params


def bulk_metrics_json(
    engine: Engine, project_id: str, since: dict[str, int], keys: Sequence[str] | None = None,
    max_points: int | None = None,
) -> bytes:
    """``POST /v1/metrics/bulk`` as JSON bytes: ``{"jobs": {id: {"epochs": [...], "total": n}},
    "missing": [ids not in the project]}``. Each job's epochs come after its own ``since_epoch``;
    one round trip for all of them (the job rows LEFT JOIN their epochs, so a job without epochs
    yet is told from a missing one)."""
    epoch_sql, params = _epoch_expr(engine.dialect.name, keys)
    sql = text(
        f"SELECT j.id, m.epoch, {epoch_sql} FROM jobs j "
        "LEFT JOIN job_metrics m ON m.job_id = j.id AND m.epoch > :min_since "
        "WHERE j.id IN :ids AND j.project_id = :project ORDER BY j.id, m.epoch"
    ).bindparams(bindparam("ids", expanding=True))
    curves: dict[str, list[str]] = {}
    with engine.connect() as conn:
        rows = conn.execute(sql, {"ids": list(since), "project": project_id, "min_since": min(since.values()),
                                  **params}).all()
    for job_id, epoch, body in rows:
        curve = curves.setdefault(job_id, [])
        if epoch is not None and epoch > since[job_id]:
            curve.append(body)
    parts = []
    for job_id, epochs in curves.items():
        total = len(epochs)
        if max_points is not None:
            epochs = downsample(epochs, max_points)
        parts.append(f'"{job_id}":{{"epochs":[{",".join(epochs)}],"total":{total}}}')
    missing = [i for i in since if i not in curves]
    return f'{{"jobs":{{{",".join(parts)}}},"missing":{json.dumps(missing)}}}'.encode()
