"""Change notices: every committed write to the database says so on a Redis channel, so API
processes wake their event streams on a push instead of querying on a timer.

A notice carries nothing but "something changed" (the readers fetch what, in one query for all
their clients: :mod:`api.changes`). It is published after the commit of any transaction that
ran an INSERT, UPDATE or DELETE through a SQLAlchemy engine of this process (workers' epoch
batches, state changes, the API's own writes). Without Redis (the embedded broker) nothing is
published: the API then looks for new events once per interval, one query however many clients.
A lost notice only delays an update until the reader's next fallback look (a few seconds)."""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from sqlalchemy import Engine, event

from config.settings import Settings

log = logging.getLogger("trainyard.notices")

_WRITES = ("insert", "update", "delete")


def channel(settings: Settings) -> str:
    """The Redis channel of this deployment's notices (namespaced like its queues)."""
    return f"{settings.queue_prefix}trainyard:changes"


def uses_redis(settings: Settings) -> bool:
    return settings.broker_url.startswith(("redis://", "rediss://"))


class Publisher:
    """Publishes notices on Redis; a failure is logged (once a minute) and never fails the write."""

    def __init__(self, settings: Settings) -> None:
        self.channel = channel(settings)
        self.url = settings.broker_url
        self._client: Any = None
        self._warned = 0.0
        self.published = 0

    def publish(self) -> None:
        try:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
            self._client.publish(self.channel, b"1")
            self.published += 1
        except Exception as exc:  # noqa: BLE001 - a notice is an optimisation; the write stands
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("change notice not published (%s); readers fall back to polling", exc)


#: each engine's publisher (engines with Redis only)
_publishers: weakref.WeakKeyDictionary[Engine, Publisher] = weakref.WeakKeyDictionary()


def publish(engine: Engine) -> None:
    """Publish a notice now for a committed write on ``engine`` that was not marked through its
    connection's events (``store.submit.insert_queued_jobs(..., notice=False)``: the API sends the
    jobs' broker messages first, then says so); nothing without Redis."""
    publisher = _publishers.get(engine)
    if publisher is not None:
        publisher.publish()


def install(engine: Engine, settings: Settings) -> Publisher | None:
    """Publish a notice after each committed writing transaction on ``engine`` (None: no Redis).

    The engine's "commit" event fires before the COMMIT is sent, so it only marks the connection;
    the notice goes out when the connection returns to the pool, after the commit."""
    if not uses_redis(settings):
        return None
    publisher = _publishers[engine] = Publisher(settings)

    @event.listens_for(engine, "before_cursor_execute")
    def _mark(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        head = statement.lstrip()[:6].lower()
        if head in _WRITES or head.startswith("with"):
            conn.info["ty_wrote"] = True

    @event.listens_for(engine, "commit")
    def _commit(conn: Any) -> None:
        if conn.info.pop("ty_wrote", False):
            conn.info["ty_notify"] = True

    @event.listens_for(engine, "rollback")
    def _rollback(conn: Any) -> None:
        if conn.invalidated:  # a lost connection (database restarted): its info goes with it, and
            return  # reading conn.info would try to reconnect inside the failed transaction
        conn.info.pop("ty_wrote", None)
        conn.info.pop("ty_notify", None)

    @event.listens_for(engine.pool, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        if record is not None and record.info.pop("ty_notify", False):
            publisher.publish()

    return publisher
