"""Where the polled routes' queries run: a few dedicated threads, each with its own persistent
connection, and identical polls that arrive while the same query is still waiting for a thread
share it.

Why not the request thread pool and the engine's pool: under 64 concurrent pollers, FastAPI ran
up to 40 polls at once in its thread pool, more than the engine pool's 10 connections, so the
overflow connections were opened and closed on every few requests (a PostgreSQL backend forked
per connection: ``bench/service.py`` found a quarter of the API's CPU in ``connect``). Here the
number of connections is fixed and small (a poll is one short query; more connections than
cores only queue inside PostgreSQL), and no request ever opens one.

Sharing (request coalescing, "single flight"): a poll joins a query only if that query has not yet
been sent, so every answer reflects the database as it was after the request arrived; a poll that
arrives once the query is under way waits for the next one. Only requests that are the same in
every input (the route, the job id, the query parameters and the API key's hash) share: what one
caller receives is exactly what its own query would have returned. Each request is still admitted
on its own (key check result, rate limit).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Hashable
from typing import Any

from sqlalchemy import Engine

#: threads (= connections) per API process: enough to keep PostgreSQL busy on a few cores
DEFAULT_THREADS = 4

#: called with each new PostgreSQL connection (the benchmark and the tests trace them with libpq)
CONNECT_HOOKS: list[Callable[[Any], None]] = []


class _Local(threading.local):
    conn: Any = None


class PollReader:
    """Runs ``fn(connection)`` on one of ``threads`` threads, each holding one DBAPI connection
    for its lifetime (PostgreSQL: a psycopg connection in autocommit; SQLite: one from the
    engine's pool, returned after each call). Safe to call from any thread and any event loop."""

    def __init__(self, engine: Engine, threads: int = DEFAULT_THREADS) -> None:
        self.engine = engine
        self._pg = engine.dialect.name == "postgresql"
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="poll-read")
        self._local = _Local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self._waiting: dict[Hashable, concurrent.futures.Future[Any]] = {}
        self.queries = 0  # queries run (for tests and the benchmark: requests / queries = sharing)

    # ---- connections
    def _connect(self) -> Any:
        import psycopg

        url = self.engine.url.set(drivername="postgresql")
        conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        for hook in CONNECT_HOOKS:
            hook(conn)
        with self._lock:
            self._conns.append(conn)
        return conn

    def _drop(self, conn: Any) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - it is broken already
            pass

    def _run(self, key: Hashable, fut: concurrent.futures.Future[Any], fn: Callable[[Any], Any]) -> Any:
        with self._lock:
            if self._waiting.get(key) is fut:
                del self._waiting[key]  # under way: later arrivals wait for a query of their own
            self.queries += 1
        global _total_queries
        with _readers_lock:
            _total_queries += 1
        if not self._pg:
            conn = self.engine.raw_connection()
            try:
                return fn(conn)
            finally:
                conn.close()  # back to the engine's pool
        conn = self._local.conn
        if conn is None or conn.closed:
            conn = self._local.conn = self._connect()
        try:
            return fn(conn)
        except Exception:
            # a broken connection (server restart, network): the next poll on this thread
            # reconnects; this one fails, as a request on a dead pooled connection would
            if conn.broken or conn.closed:
                self._local.conn = None
                self._drop(conn)
            raise

    # ---- submitting
    def submit(self, key: Hashable, fn: Callable[[Any], Any]) -> concurrent.futures.Future[Any]:
        """The future of ``fn``'s result: a query already waiting under the same ``key`` if there
        is one, else a new one. ``key`` must capture every input of ``fn``."""
        with self._lock:
            fut = self._waiting.get(key)
            if fut is not None:
                return fut
            fut = concurrent.futures.Future()
            self._waiting[key] = fut
        self._executor.submit(self._resolve, key, fut, fn)
        return fut

    def _resolve(self, key: Hashable, fut: concurrent.futures.Future[Any], fn: Callable[[Any], Any]) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(self._run(key, fut, fn))
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            fut.set_exception(exc)

    async def run(self, key: Hashable, fn: Callable[[Any], Any]) -> Any:
        """``submit`` awaited from the event loop (shielded: a client that goes away does not
        cancel the query others share)."""
        return await asyncio.shield(asyncio.wrap_future(self.submit(key, fn)))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass


_readers: dict[str, PollReader] = {}
_readers_lock = threading.Lock()
_total_queries = 0


def total_queries() -> int:
    """Queries run by every reader of this process so far."""
    return _total_queries


def get_reader(engine: Engine) -> PollReader:
    """The process's reader for ``engine`` (one per database URL), built on first use."""
    key = engine.url.render_as_string(hide_password=False)
    reader = _readers.get(key)
    if reader is not None and reader.engine is engine:
        return reader
    with _readers_lock:
        reader = _readers.get(key)
        if reader is None or reader.engine is not engine:
            if reader is not None:
                reader.close()
            reader = _readers[key] = PollReader(engine, threads=DEFAULT_THREADS)
    return reader


def close_readers() -> None:
    """Close every reader (their threads and connections): at shutdown, and when tests reset the
    engine."""
    with _readers_lock:
        readers = list(_readers.values())
        _readers.clear()
    for reader in readers:
        reader.close()
