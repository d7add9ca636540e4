"""Run the Alembic migrations programmatically (``trainyard migrate``, tests).

Two migrations at once (two ``trainyard migrate``, or several containers starting together) are
serialized: on PostgreSQL by a session-level advisory lock, on SQLite by an exclusive file lock
next to the database. The second one then finds the schema at head and does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations

#: The advisory-lock key of migrations on PostgreSQL (any constant bigint; "trainyard" in hex-ish).
PG_MIGRATION_LOCK_KEY = 0x7472_6169_6E79_6172 & 0x7FFF_FFFF_FFFF_FFFF


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the packaged ``migrations`` directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["configure_logging"] = False
    if url:
        cfg.attributes["url"] = url
    return cfg


@contextlib.contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """Hold the database's migration lock (blocking until it is free)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if not path or path == ":memory:":
            yield
            return
        import fcntl

        lock_path = Path(path).with_name(Path(path).name + ".migrate-lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with lock_path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    if url.startswith("postgresql"):
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK_KEY})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK_KEY})
        finally:
            engine.dispose()
        return
    yield


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at ``url`` (default: the configured one) to ``revision``, under the
    migration lock."""
    if url is None:
        from config.settings import get_settings

        url = get_settings().database_url
    with migration_lock(url):
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    if url is None:
        from config.settings import get_settings

        url = get_settings().database_url
    with migration_lock(url):
        command.downgrade(alembic_config(url), revision)
