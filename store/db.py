"""Engines and sessions. SQLite runs in WAL mode with a busy timeout so the API and a worker can
share one file; PostgreSQL uses a plain pool."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from config.settings import CACHE_LOCK, get_settings, locked_cache

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # Writing transactions (sessions from ``session_scope(write=True)``) start with BEGIN
    # IMMEDIATE: they take the write lock up front and so wait on busy_timeout, instead of failing
    # with "database is locked" when a deferred transaction that has read tries to write.
    opts = conn.get_execution_options()
    if opts.get("isolation_level") == "AUTOCOMMIT":
        return
    conn.exec_driver_sql("BEGIN IMMEDIATE" if opts.get("sqlite_immediate") else "BEGIN")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout, foreign keys and its directory."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs
        )
        event.listen(engine, "connect", _sqlite_pragmas)

        # Let SQLAlchemy, not pysqlite, control transactions (pysqlite's legacy mode defers BEGIN).
        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # No pre-ping: it would add a round trip to every request (a poll is meant to be one query).
    # Connections are recycled instead, and a stale one fails one request at most.
    kwargs.setdefault("pool_pre_ping", False)
    kwargs.setdefault("pool_recycle", 300)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


@locked_cache(maxsize=1)
def get_engine() -> Engine:
    """The process's engine for the configured database (built on first use); its committed
    writes publish change notices (:mod:`store.notices`)."""
    from store import notices

    settings = get_settings()
    engine = make_engine(settings.database_url)
    notices.install(engine, settings)
    return engine


@locked_cache(maxsize=2)
def get_sessionmaker(write: bool = True) -> sessionmaker[Session]:
    """Sessions for writing (a transaction; BEGIN IMMEDIATE on SQLite) or for reading
    (autocommit: one round trip per query, no BEGIN/COMMIT)."""
    engine = get_engine()
    bind: Engine
    if write:
        bind = engine.execution_options(sqlite_immediate=True)
    elif engine.dialect.name == "sqlite":
        bind = engine  # a deferred BEGIN costs nothing locally, and WAL readers never block
    else:
        bind = engine.execution_options(isolation_level="AUTOCOMMIT")
    return sessionmaker(bind=bind, expire_on_commit=False)


@contextmanager
def session_scope(write: bool = True) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error: the boundary
    (request or task) owns the transaction, repositories never commit."""
    session = get_sessionmaker(write)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def reset_caches() -> None:
    """Forget the cached settings, engine and sessionmaker (tests change the environment)."""
    from config.settings import get_settings as gs
    from store.pollread import close_readers

    close_readers()  # (outside the lock: a reader thread may be waiting for it)
    with CACHE_LOCK:  # all three at once: no thread fills one from the others' old values
        if get_engine.cache_info().currsize:
            get_engine().dispose()
        get_engine.cache_clear()
        get_sessionmaker.cache_clear()
        gs.cache_clear()
