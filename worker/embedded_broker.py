"""The embedded broker's idle poll, made cheap (the worker side of ``store.broker``'s SQLite broker).

kombu's SQLAlchemy transport has no way to wait for a message: an idle worker polls each of its
queues every ``store.broker.SQLA_POLLING_INTERVAL_S``, and each poll of a queue is an ORM lookup
of the queue, a ``BEGIN IMMEDIATE`` (the file's write lock), a query and a commit: 3 queues every
0.05 s kept an idle ``trainyard serve`` worker at 8.75 % of a core on this machine.

:class:`QuietChannel` asks SQLite first whether anything was committed to the broker's file since
a queue was last found empty (``PRAGMA data_version`` on a connection of its own that never
writes: its value changes whenever any other connection commits, in this process or another)
and, if nothing was, answers "empty" without the query. A message only ever becomes visible
through a commit (a send, or kombu's restore of an unacknowledged one; this transport has no
visibility timeout), so no message waits longer than one polling interval, as before. The
version is read before the queue is queried: a commit landing during the query changes it, and
the next poll queries again.

kombu's transport also keeps every delivered message in the file for good (``visible = 0``; its
acknowledgement deletes nothing): 100,000 jobs left 144 MB. Such a row is never read again
(kombu restores an unacknowledged message by storing its payload anew, and this transport has no
visibility timeout; a lost job is recovered by Trainyard's own leases and outbox, not by the
broker), so an idle channel deletes the delivered rows every :data:`PRUNE_EVERY_S` (and at its
first idle poll): the file stops growing.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from queue import Empty
from typing import Any

from kombu.transport import sqlalchemy as sqla_transport
from sqlalchemy import select

from store.broker import SQLA_POLLING_INTERVAL_S, embedded_broker_path

log = logging.getLogger("trainyard.worker")

#: how often an idle channel deletes the messages already delivered (see the module's docstring)
PRUNE_EVERY_S = 60.0
#: at most this many rows a prune: the file's write lock is held while they go (10,000 rows took
#: 65-92 ms here, a test run beside it); a full chunk is followed by another at the next idle poll
PRUNE_CHUNK = 10_000


class QuietChannel(sqla_transport.Channel):
    """kombu's SQLAlchemy channel whose ``_get`` skips the query of a queue found empty while the
    broker's SQLite file has not changed since (see the module's docstring)."""

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._empty_at: dict[str, int] = {}  # queue -> the file's data_version when it was last found empty
        self._watch: sqlite3.Connection | None = None
        self._pruned_at: float | None = None  # never: the first idle poll prunes
        path = embedded_broker_path("sqla+" + str(connection.client.hostname or ""))
        if path is not None and path.exists():
            # autocommit (no transaction held open), so each read sees the latest commit
            self._watch = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def _data_version(self) -> int | None:
        if self._watch is None:
            return None
        try:
            return int(self._watch.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return None  # the full query then says (and raises what kombu handles)

    def _get(self, queue: str) -> Any:
        version = self._data_version()
        if version is not None and self._empty_at.get(queue) == version:
            self._prune_delivered()
            raise Empty()
        try:
            return super()._get(queue)
        except Empty:
            if version is not None:
                self._empty_at[queue] = version
            self._prune_delivered()
            raise

    def _prune_delivered(self) -> None:
        """Delete the messages already delivered (``visible = 0``), at most every
        :data:`PRUNE_EVERY_S`; called when a queue was just found empty (the worker is idle)."""
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        try:
            msg = self.message_cls
            chunk = select(msg.id).where(msg.visible == False).limit(PRUNE_CHUNK).scalar_subquery()  # noqa: E712 - SQL
            gone = self.session.query(msg).filter(msg.id.in_(chunk)).delete(synchronize_session=False)
            self.session.commit()
        except Exception:  # noqa: BLE001 - a busy file: the next idle minute tries again
            self.session.rollback()
            log.warning("the embedded broker's delivered messages could not be deleted; retried in %.0f s",
                        PRUNE_EVERY_S, exc_info=True)
            return
        if gone:
            log.info("embedded broker: deleted %d delivered message(s)", gone)
        if gone >= PRUNE_CHUNK:
            self._pruned_at = None  # more left (a file from before this release): the next idle poll goes on

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        super().close()


def use_quiet_polling() -> None:
    """Make kombu's SQLAlchemy transport (the embedded broker; this process only) poll every
    ``SQLA_POLLING_INTERVAL_S`` with :class:`QuietChannel`. Set on the transport class because
    kombu's SQLAlchemy transport passes every transport option on to ``create_engine``."""
    sqla_transport.Transport.polling_interval = SQLA_POLLING_INTERVAL_S
    sqla_transport.Transport.Channel = QuietChannel
