"""Where the polled routes' queries run. On PostgreSQL, a poll awaited on an event loop (the API's
routes and fast path, ``store.fastread.read_job`` / ``read_metrics``) runs on that loop's own
asynchronous connections (:class:`_LoopReader`, a few per loop, persistent); anything else
(a synchronous caller, SQLite) runs on a few dedicated threads, each with its own persistent
connection. Identical polls that arrive while the same query is still waiting to be sent share
it, and waiting polls of different jobs are answered together by one query
(``store.fastread.JobPolls``, ``MetricsPolls``), on the loop and on the threads alike.

Why not the request thread pool and the engine's pool: under 64 concurrent pollers, FastAPI ran
up to 40 polls at once in its thread pool, more than the engine pool's 10 connections, so the
overflow connections were opened and closed on every few requests (a PostgreSQL backend forked
per connection: ``bench/service.py`` found a quarter of the API's CPU in ``connect``). Here the
number of connections is fixed and small (a poll is one short query; more connections than
cores only queue inside PostgreSQL), and no request ever opens one. Why the loop's own
connections rather than the threads for the API: a poll answered by a thread crossed threads
twice, and the thread waited for the GIL while the loop was busy; on the loop a poll costs half
the CPU (:class:`_LoopReader`).

Sharing (request coalescing, "single flight"): a poll joins a query only if that query has not yet
been sent, so every answer reflects the database as it was after the request arrived; a poll that
arrives once the query is under way waits for the next one. Only requests that are the same in
every input (the route, the job id, the query parameters and the API key's hash) share: what one
caller receives is exactly what its own query would have returned. Each request is still admitted
on its own (key check result, rate limit).

Batching: a connection that becomes free takes the oldest waiting poll and every other waiting
poll of the same kind; the kind's query answers each item with the single poll's rules. A lone
poll is still one round trip; under load, queries grow with the number of connections, not of
requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg  # imported with the app, not on a first poll (api.app freezes the GC after start-up)
from sqlalchemy import Engine

#: threads (= connections) per API process: enough to keep PostgreSQL busy on a few cores
DEFAULT_THREADS = 4

#: a poll thread reconnects after this many seconds (as the engine's pool_recycle)
RECYCLE_S = 300.0
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}

#: called with each new PostgreSQL connection (the benchmark and the tests trace them with libpq)
CONNECT_HOOKS: list[Callable[[Any], None]] = []


def _connect_args(engine: Engine) -> tuple[list[Any], dict[str, Any]]:
    """A poll connection's arguments (threads and loops alike): the engine's own (a URL rendered
    back to text can lose its escaping), with TCP keepalives (a connection a proxy or firewall
    dropped silently fails in seconds), in autocommit."""
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    return list(cargs), {**KEEPALIVES, **cparams, "autocommit": True}


def _take(waiting: dict[Hashable, Any], kind_of: Callable[[Any], BatchKind | None]) -> list[Any]:
    """The batching rule (threads and loops alike): the oldest waiting poll, taken off ``waiting``
    (under way: later arrivals wait for a query of their own) and, for a batch kind, every other
    waiting one of its kind, up to the kind's ``limit``."""
    first = waiting.pop(next(iter(waiting)))
    kind = kind_of(first)
    if kind is None:
        return [first]
    same = [k for k, w in waiting.items() if kind_of(w) is kind][: kind.limit - 1]
    return [first] + [waiting.pop(k) for k in same]


class BatchKind(Protocol):
    """A kind of read that many requests can share one query for (store.fastread.JobPolls)."""

    limit: int

    def run_many(self, conn: Any, items: Sequence[Any]) -> list[Any]: ...

    async def run_many_async(self, conn: Any, items: Sequence[Any]) -> list[Any]: ...


@dataclass(eq=False)
class _Flight:
    """One query-to-be: a function of the connection, or an item of a batch kind."""

    key: Hashable
    future: concurrent.futures.Future[Any]
    fn: Callable[[Any], Any] | None = None
    kind: BatchKind | None = None
    item: Any = None


class PollReader:
    """Runs polls on up to ``threads`` threads, each holding one DBAPI connection for its
    lifetime (PostgreSQL: a psycopg connection in autocommit; SQLite: one from the engine's pool,
    returned after each query). Safe to call from any thread and any event loop.

    A thread that becomes free takes the oldest waiting poll and, if that poll is of a batch kind,
    every other waiting poll of the same kind (up to the kind's ``limit``): one query answers
    them all. Under light load every poll runs alone, at once; under heavy load the number of
    queries grows with the number of threads, not with the number of requests."""

    def __init__(self, engine: Engine, threads: int = DEFAULT_THREADS) -> None:
        self.engine = engine
        self._pg = engine.dialect.name == "postgresql"
        self._max_threads = threads
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: dict[Hashable, _Flight] = {}  # in arrival order
        self._loops: dict[asyncio.AbstractEventLoop, _LoopReader] = {}  # PostgreSQL polls from event loops
        self.queries = 0  # queries run (for tests and the benchmark: requests / queries = sharing)

    # ---- connections
    def _connect(self) -> Any:
        cargs, cparams = _connect_args(self.engine)
        conn = psycopg.connect(*cargs, **cparams)
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

    # ---- the threads
    def _take(self) -> list[_Flight]:
        """The oldest waiting flight and, for a batch kind, the others of its kind (lock held)."""
        return _take(self._waiting, lambda f: f.kind)

    def _serve(self) -> None:
        conn: Any = None
        born = 0.0
        while True:
            with self._lock:
                self._idle += 1
                while not self._waiting and not self._closed:
                    self._wake.wait()
                self._idle -= 1
                if not self._waiting:  # closed, nothing left
                    break
                batch = self._take()
                self.queries += 1
            global _total_queries
            with _readers_lock:
                _total_queries += 1
            batch = [f for f in batch if f.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                if self._pg and (conn is None or conn.closed or time.monotonic() - born > RECYCLE_S):
                    if conn is not None:
                        self._drop(conn)
                    conn, born = self._connect(), time.monotonic()
                try:
                    results = self._run(conn, batch)
                except Exception:
                    if not (self._pg and (conn.broken or conn.closed)):
                        raise
                    # the server ended the connection while it sat idle (a restart, an idle
                    # timeout): polls only read, so they are asked once more on a new one
                    self._drop(conn)
                    conn, born = self._connect(), time.monotonic()
                    results = self._run(conn, batch)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                if conn is not None and (conn.broken or conn.closed):
                    # still broken (the database is down): these polls fail, the next ones
                    # reconnect
                    self._drop(conn)
                    conn = None
                for f in batch:
                    f.future.set_exception(exc)
                continue
            for f, result in zip(batch, results, strict=True):
                f.future.set_result(result)
        if conn is not None:
            self._drop(conn)

    def _run(self, conn: Any, batch: list[_Flight]) -> list[Any]:
        if not self._pg:
            conn = self.engine.raw_connection()
            try:
                return self._call(conn, batch)
            finally:
                conn.close()  # back to the engine's pool
        return self._call(conn, batch)

    @staticmethod
    def _call(conn: Any, batch: list[_Flight]) -> list[Any]:
        first = batch[0]
        if first.kind is None:
            assert first.fn is not None
            return [first.fn(conn)]
        return first.kind.run_many(conn, [f.item for f in batch])

    # ---- submitting
    def _submit(self, flight: _Flight) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the poll reader is closed")
            waiting = self._waiting.get(flight.key)
            if waiting is not None:
                return waiting.future
            self._waiting[flight.key] = flight
            if self._idle == 0 and len(self._threads) < self._max_threads:
                t = threading.Thread(target=self._serve, name=f"poll-read-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
            else:
                self._wake.notify()
        return flight.future

    def submit(self, key: Hashable, fn: Callable[[Any], Any]) -> concurrent.futures.Future[Any]:
        """The future of ``fn(connection)``: a query already waiting under the same ``key`` if
        there is one, else a new one. ``key`` must capture every input of ``fn``."""
        return self._submit(_Flight(key, concurrent.futures.Future(), fn=fn))

    def submit_item(self, key: Hashable, kind: BatchKind, item: Any) -> concurrent.futures.Future[Any]:
        """The future of ``kind.run_many(connection, [item, ...])[i]``, answered together with the
        other waiting items of ``kind``; shared with a waiting one of the same ``key``."""
        return self._submit(_Flight((kind, key), concurrent.futures.Future(), kind=kind, item=item))

    async def run(self, key: Hashable, fn: Callable[[Any], Any]) -> Any:
        """``submit`` awaited from the event loop (shielded: a client that goes away does not
        cancel the query others share)."""
        return await asyncio.shield(asyncio.wrap_future(self.submit(key, fn)))

    async def run_item(self, key: Hashable, kind: BatchKind, item: Any) -> Any:
        """``submit_item`` awaited from the event loop (shielded, as :meth:`run`). On PostgreSQL
        the query runs on the loop itself (:class:`_LoopReader`), with the same sharing and
        batching as the threads'."""
        if not self._pg:
            return await asyncio.shield(asyncio.wrap_future(self.submit_item(key, kind, item)))
        loop = asyncio.get_running_loop()
        reader = self._loops.get(loop)
        if reader is None:
            reader = self._loop_reader(loop)
        return await asyncio.shield(reader.submit((kind, key), kind, item))

    def _loop_reader(self, loop: asyncio.AbstractEventLoop) -> _LoopReader:
        with self._lock:
            if self._closed:
                raise RuntimeError("the poll reader is closed")
            # a finished asyncio.run's or test client's loop: its connections are closed below
            gone = [self._loops.pop(lp) for lp in [lp for lp in self._loops if lp.is_closed()]]
            reader = self._loops[loop] = _LoopReader(self, loop, self._max_threads)
        for old in gone:
            old.close()
        return reader

    def _count_query(self) -> None:
        global _total_queries
        with self._lock:
            self.queries += 1
        with _readers_lock:
            _total_queries += 1

    def close(self) -> None:
        """Finish the waiting polls, stop the threads, close the connections."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            threads = list(self._threads)
            loops, self._loops = list(self._loops.values()), {}
        for lr in loops:
            lr.close()  # its connections leave self._conns
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=30)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass


class _LoopReader:
    """A :class:`PollReader`'s polls from one event loop, on PostgreSQL: up to ``limit`` psycopg
    ``AsyncConnection`` objects of that loop, in autocommit. The same rules as the threads': a
    poll joins a waiting query of the same key, never one already sent; the oldest waiting poll
    goes first, with every other waiting one of its kind (up to the kind's ``limit``).

    Why on the loop: a poll answered by a thread crossed threads twice (the request's future handed
    to a thread, the answer handed back with ``call_soon_threadsafe``, once per waiting request),
    and the answering thread waited for the GIL while the loop was busy. Measured in-process, 64
    concurrent polls of one job at a time (BENCHMARKS.md, "Service"): CPU per poll 64 -> 34 us and
    the loop's idle time per poll 29 -> 10 us. Waiting polls are sent once per loop iteration
    (``call_soon``), so a burst of requests read in one iteration shares one query."""

    def __init__(self, owner: PollReader, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.owner = owner
        self.loop = loop
        self.limit = max(1, limit)
        self.conns: list[Any] = []  # every connection of this loop
        self.born: dict[int, float] = {}
        self.idle: list[Any] = []
        self.opening = 0
        self.waiting: dict[Hashable, tuple[asyncio.Future[Any], BatchKind, Any]] = {}  # in arrival order
        self.scheduled = False
        self.closed = False

    def submit(self, key: Hashable, kind: BatchKind, item: Any) -> asyncio.Future[Any]:
        if self.closed:
            raise RuntimeError("the poll reader is closed")
        got = self.waiting.get(key)
        if got is not None:
            return got[0]
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.waiting[key] = (fut, kind, item)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._dispatch)
        return fut

    def _take(self) -> list[tuple[asyncio.Future[Any], BatchKind, Any]]:
        return _take(self.waiting, lambda w: w[1])

    def _dispatch(self) -> None:
        self.scheduled = False
        while self.waiting:  # closed too: close() finishes the waiting polls
            if self.idle:
                self.loop.create_task(self._run(self.idle.pop(), self._take()))
            elif len(self.conns) + self.opening < self.limit:
                self.opening += 1
                self.loop.create_task(self._run(None, self._take()))
            else:
                return  # a connection that comes back dispatches the rest

    async def _connect(self) -> Any:
        cargs, cparams = _connect_args(self.owner.engine)
        conn = await psycopg.AsyncConnection.connect(*cargs, **cparams)
        for hook in CONNECT_HOOKS:
            hook(conn)
        self.born[id(conn)] = time.monotonic()
        self.conns.append(conn)
        if not self.closed:  # (once closed, this reader closes it: the owner's close() would not await it)
            with self.owner._lock:
                self.owner._conns.append(conn)  # listed with the threads' (tests look at their backends)
        return conn

    def _forget(self, conn: Any) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        self.born.pop(id(conn), None)
        with self.owner._lock:
            if conn in self.owner._conns:
                self.owner._conns.remove(conn)

    async def _drop(self, conn: Any) -> None:
        self._forget(conn)
        try:
            await conn.close()
        except Exception:  # noqa: BLE001 - it is broken already
            pass

    async def _replace(self, conn: Any) -> Any:
        """A new connection for ``conn`` (closed first); counted as opening meanwhile, so that the
        loop never holds more than ``limit`` (a poll that arrives meanwhile waits for it)."""
        self.opening += 1
        try:
            await self._drop(conn)
            return await self._connect()
        finally:
            self.opening -= 1

    async def _run(self, conn: Any, batch: list[tuple[asyncio.Future[Any], BatchKind, Any]]) -> None:
        batch = [b for b in batch if not b[0].done()]
        try:
            if conn is None:
                try:
                    conn = await self._connect()
                finally:
                    self.opening -= 1
            elif conn.closed or time.monotonic() - self.born.get(id(conn), 0.0) > RECYCLE_S:
                conn = await self._replace(conn)
            if batch:
                self.owner._count_query()
                kind = batch[0][1]
                items = [b[2] for b in batch]
                try:
                    results = await kind.run_many_async(conn, items)
                except Exception:
                    if not (conn.broken or conn.closed):
                        raise
                    # the server ended the connection while it sat idle (a restart, an idle
                    # timeout): polls only read, so they are asked once more on a new one
                    conn = await self._replace(conn)
                    results = await kind.run_many_async(conn, items)
                for (fut, _, _), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            if conn is not None and (conn.broken or conn.closed):
                await self._drop(conn)  # still broken (the database is down): the next polls reconnect
                conn = None
            for fut, _, _ in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if conn is not None:
                if self.closed and not self.waiting:
                    await self._drop(conn)
                else:
                    self.idle.append(conn)
            if self.waiting:
                self._dispatch()

    def close(self) -> None:
        """Take no more polls, from any thread. On the loop (at once, or as soon as it runs the
        call if it runs in another thread), the polls still waiting are finished as the threads
        finish theirs, then each connection closes once it is idle: never under a query that is
        under way (its socket is the loop's). A loop that no longer runs has its connections
        closed at once (libpq's own close; nothing is waited for)."""
        self.closed = True
        with self.owner._lock:  # the owner's close() no longer counts them: they close here
            self.owner._conns = [c for c in self.owner._conns if c not in self.conns]
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._close_idle()
            return
        if self.loop.is_running():
            try:
                self.loop.call_soon_threadsafe(self._close_idle)
                return
            except RuntimeError:  # closed meanwhile
                pass
        # nothing runs the loop: its polls cannot be answered, its connections are unused
        waiting, self.waiting = list(self.waiting.values()), {}
        if not self.loop.is_closed():
            for fut, _, _ in waiting:
                if not fut.done():
                    fut.set_exception(RuntimeError("the poll reader is closed"))
        conns, self.idle = list(self.conns), []
        for conn in conns:
            self._forget(conn)
            _finish(conn)

    def _close_idle(self) -> None:
        """(On the loop, once closed) the waiting polls go on, else the idle connections close."""
        if self.waiting:
            self._dispatch()  # the last batch to end closes its connection (``_run``)
        idle, self.idle = self.idle, []
        for conn in idle:
            self._forget(conn)
            _finish(conn)


def _finish(conn: Any) -> None:
    try:
        conn.pgconn.finish()
    except Exception:  # noqa: BLE001 - it is broken already
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
    old = None
    with _readers_lock:
        reader = _readers.get(key)
        if reader is None or reader.engine is not engine:
            old = reader
            reader = _readers[key] = PollReader(engine, threads=DEFAULT_THREADS)
    if old is not None:
        old.close()  # outside the lock: its threads take the lock to count their last queries
    return reader


def close_readers() -> None:
    """Close every reader (their threads and connections): at shutdown, and when tests reset the
    engine."""
    with _readers_lock:
        readers = list(_readers.values())
        _readers.clear()
    for reader in readers:
        reader.close()
