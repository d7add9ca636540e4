"""Alembic migrations from an empty database, on PostgreSQL and on SQLite: they build exactly the
models' schema, downgrade to nothing and upgrade again."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from store.db import make_engine
from store.migrate import downgrade, upgrade
from store.models import Base

TABLES = {
    "jobs", "job_metrics", "job_events", "checkpoints", "snapshots", "datasets", "alembic_version",
    "projects", "api_keys", "sweeps", "outbox", "artifacts",
}


def _check_roundtrip(url: str) -> None:
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) == set()
        upgrade(url)
        assert set(inspect(engine).get_table_names()) == TABLES
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
            assert diff == [], f"migrations and models disagree: {diff}"
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0005_i14a"
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
