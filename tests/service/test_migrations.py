"""Alembic migrations from an empty database, on PostgreSQL and on SQLite: they build exactly the
models' schema, downgrade to nothing and upgrade again."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from store.db import make_engine
from store.migrate import downgrade, upgrade
from store.models import Base

TABLES = {
    "jobs", "job_metrics", "job_events", "checkpoints", "snapshots", "datasets", "alembic_version",
    "projects", "api_keys", "sweeps", "outbox", "artifacts", "idempotency_records", "webhooks",
    "webhook_deliveries", "job_curves",
}


def _check_roundtrip(url: str) -> None:
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) == set()
        upgrade(url)
        assert set(inspect(engine).get_table_names()) == TABLES
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
            if engine.dialect.name == "postgresql":
                # 0007's generated jsonb copy of job_metrics.values (PostgreSQL only, not in the models)
                assert [(d[0], d[2], d[3].name) for d in diff] == [("remove_column", "job_metrics", "values_b")], diff
                assert str(diff[0][3].type) == "JSONB" and diff[0][3].computed is not None
                diff = []
            assert diff == [], f"migrations and models disagree: {diff}"
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0007_bulkcold"
        downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(url)
        assert set(inspect(engine).get_table_names()) == TABLES
    finally:
        engine.dispose()


def test_migrations_from_empty_postgresql(pg):
    _check_roundtrip(pg.create("migrations"))


def test_migrations_from_empty_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    _check_roundtrip(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    engine.dispose()


#: the revision 0005_i14a follows
BEFORE_ARTIFACT_STORE = "0005_i11b"


def _move_blobs_out_and_back(url: str, store_dir: Any) -> None:
    """0005_i14a moves the checkpoint, snapshot and export blobs of an older database into the
    artifact store (keys recorded, ``data`` columns dropped), and its downgrade reads them back."""
    import hashlib

    from sqlalchemy import select

    from store.artifact_store import get_store

    weights, snap, onnx = b"\x08" + b"w" * 1000, b"s" * 3000, b"o" * 500
    digest = {k: hashlib.sha256(v).hexdigest() for k, v in (("w", weights), ("s", snap), ("o", onnx))}
    engine = make_engine(url)
    try:
        upgrade(url, BEFORE_ARTIFACT_STORE)
        with engine.begin() as conn:
            now = "2026-12-04 12:00:00"
            conn.execute(text(
                "INSERT INTO jobs (id, project_id, name, status, queue, spec, epoch, epochs, attempts, cancel_requested, "
                "created_at, updated_at) VALUES ('j0', 'default', 'old', 'succeeded', 'cpu', '{}', 1, 1, 1, false, :t, :t)"),
                {"t": now})
            conn.execute(text("INSERT INTO checkpoints (job_id, epoch, step, size, sha256, is_best, data, created_at) "
                              "VALUES ('j0', 1, 1, :n, :h, true, :d, :t)"), {"n": len(weights), "h": digest["w"], "d": weights, "t": now})
            conn.execute(text("INSERT INTO checkpoints (job_id, epoch, step, size, sha256, is_best, data, created_at) "
                              "VALUES ('j0', 0, 0, 1, :h, false, NULL, :t)"), {"h": "0" * 64, "t": now})
            conn.execute(text("INSERT INTO snapshots (job_id, epoch, step, size, sha256, data, created_at) "
                              "VALUES ('j0', 1, 1, :n, :h, :d, :t)"), {"n": len(snap), "h": digest["s"], "d": snap, "t": now})
            conn.execute(text("INSERT INTO artifacts (job_id, format, checkpoint_sha256, checkpoint_epoch, status, size, "
                              "sha256, data, created_at, updated_at) VALUES ('j0', 'onnx', :c, 1, 'ready', :n, :h, :d, :t, :t)"),
                         {"c": digest["w"], "n": len(onnx), "h": digest["o"], "d": onnx, "t": now})
        upgrade(url)
        store = get_store()
        assert store.local_path("x") is not None and str(store_dir) in str(store.local_path("x"))
        with engine.connect() as conn:
            for table, name, data in (("checkpoints", "w", weights), ("snapshots", "s", snap), ("artifacts", "o", onnx)):
                assert "data" not in {c["name"] for c in inspect(conn).get_columns(table)}
                uri, size = conn.execute(text(f"SELECT uri, size FROM {table} WHERE sha256 = :h"), {"h": digest[name]}).one()
                assert uri.startswith("jobs/j0/") and size == len(data)
                assert store.read(uri, digest[name], size) == data
            assert conn.execute(text("SELECT uri FROM checkpoints WHERE epoch = 0")).scalar() is None  # not kept before either
        downgrade(url, BEFORE_ARTIFACT_STORE)
        with engine.connect() as conn:
            from sqlalchemy import column, table

            for name, data in (("checkpoints", weights), ("snapshots", snap), ("artifacts", onnx)):
                got = conn.execute(select(column("data")).select_from(table(name)).where(column("data").is_not(None))).scalars().all()
                assert [bytes(d) for d in got] == [data]
    finally:
        engine.dispose()


@pytest.fixture()
def artifacts_here(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    from store.db import reset_caches

    monkeypatch.setenv("TRAINYARD_ARTIFACTS_URL", str(tmp_path / "store"))
    reset_caches()
    yield tmp_path / "store"
    monkeypatch.undo()
    reset_caches()


def test_the_artifact_migration_moves_blobs_out_of_postgresql_and_back(pg, artifacts_here):
    _move_blobs_out_and_back(pg.create("blobs"), artifacts_here)


def test_the_artifact_migration_moves_blobs_out_of_sqlite_and_back(tmp_path, artifacts_here):
    _move_blobs_out_and_back(f"sqlite:///{tmp_path / 'old.db'}", artifacts_here)
