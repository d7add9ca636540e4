"""Sending jobs to the broker by task name (the API never imports the worker).

Jobs reach the broker through the outbox (:mod:`store.outbox`): the submit transaction writes the
job and its outbox row; after the commit :meth:`Dispatcher.submit` sends the message inline and,
if the broker is down, leaves it to the relay thread (:meth:`Dispatcher.start_background`), so a
submission never fails because of the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from functools import cached_property
from typing import Any

import redis  # imported with the app, not on a first scrape (api.app freezes the GC after start-up)

from config.settings import Settings
from orchestration.messages import send_jobs
from orchestration.services.base import LoopService
from orchestration.services.outbox_relay import OutboxRelay
from orchestration.services.preemptor import Preemptor
from orchestration.services.reconciler import Reconciler
from store.broker import EXPORT_TASK, celery_config, prepare_embedded_broker

log = logging.getLogger("trainyard.api")

#: After a failed send, requests skip the inline send for this long (the relay sends instead), so
#: submissions stay fast while the broker is down.
BROKER_DOWN_BACKOFF_S = 2.0
#: The API's relay drops the outbox rows of messages it sent inline, and sends what failed, this often.
API_RELAY_EVERY_S = 1.0
#: A queued job this long untouched, with no message in an empty Redis queue, lost its message.
LOST_MESSAGE_AGE_S = 30.0


class DispatchError(RuntimeError):
    """The broker did not accept a message."""


class Dispatcher:
    """Publishes ``trainyard.run_job(job_id)`` messages. Call only after the job rows are
    committed, so a worker never sees an id whose row does not exist yet."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._sent: list[str] = []  # job ids sent inline: the relay drops their outbox rows
        self._down_until = 0.0
        self._failed_since_sent = False  # a send failed and none succeeded since
        self._services: list[LoopService] = []

    @cached_property
    def celery(self) -> Any:
        from celery import Celery

        app = Celery("trainyard-api", set_as_current=False)
        app.conf.update(celery_config(self.settings))
        prepare_embedded_broker(self.settings.broker_url)
        return app

    def send(self, jobs: Iterable[tuple[str, str]], max_retries: int = 3) -> None:
        """Send one message per ``(job_id, queue)`` over one producer connection
        (:func:`orchestration.messages.send_jobs`), noting whether the broker is down."""
        try:
            send_jobs(self.celery, list(jobs), max_retries=max_retries)
        except Exception as exc:  # noqa: BLE001 - any broker failure is a DispatchError
            with self._lock:
                self._down_until = time.monotonic() + BROKER_DOWN_BACKOFF_S
                self._failed_since_sent = True
            raise DispatchError(f"the broker did not accept the job: {type(exc).__name__}: {exc}") from exc
        with self._lock:
            self._down_until = 0.0
            self._failed_since_sent = False

    def send_export(self, artifact_id: int, queue: str) -> None:
        """Send ``trainyard.export(artifact_id)`` to ``queue`` (store.artifacts); raises
        :class:`DispatchError` when the broker does not take it (the artifact stays pending and
        the next request for it sends it again)."""
        try:
            self.celery.send_task(EXPORT_TASK, args=[artifact_id], queue=queue, retry=True,
                                  retry_policy={"max_retries": 1, "interval_start": 0.1, "interval_step": 0.5})
        except Exception as exc:  # noqa: BLE001 - any broker failure is a DispatchError
            raise DispatchError(f"the broker did not accept the export: {type(exc).__name__}: {exc}") from exc

    def submit(self, jobs: list[tuple[str, str]]) -> bool:
        """Send the messages of committed jobs (whose outbox rows are committed with them). On
        success the relay drops their outbox rows; on failure, or while the broker is known to
        be down, the rows stay and the relay sends them when the broker is back. Never raises.
        Returns whether the messages were sent now."""
        with self._lock:
            skip = time.monotonic() < self._down_until
        if skip:
            return False
        try:
            self.send(jobs, max_retries=1)
        except DispatchError as exc:
            log.warning("%d job(s) left in the outbox: %s", len(jobs), exc)
            return False
        with self._lock:
            self._sent.extend(job_id for job_id, _ in jobs)
        return True

    def take_sent(self) -> list[str]:
        """The ids sent inline since the last call (their outbox rows can go)."""
        with self._lock:
            sent, self._sent = self._sent, []
        return sent

    def resend_lost_messages(self, older_than_s: float = LOST_MESSAGE_AGE_S) -> list[str]:
        """Redis only: when a queue is empty but the database has jobs of that queue queued for
        longer than ``older_than_s`` without an outbox row, their messages were lost (Redis
        restarted without persistence): send them again. A duplicate is harmless (the claim is a
        compare-and-set). Returns the ids re-sent."""
        from store import outbox
        from store.db import session_scope

        resent: list[str] = []
        for queue, depth in self.queue_depths().items():
            if depth:
                continue
            with session_scope(write=False) as s:
                ids = outbox.queued_without_message(s, queue, older_than_s)
            if not ids:
                continue
            self.send([(job_id, queue) for job_id in ids])
            with session_scope() as s:
                outbox.touch_jobs(s, ids)
            log.warning("queue %s was empty with %d job(s) queued: their messages were lost; sent again", queue, len(ids))
            resent += ids
        return resent

    def resend_after_s(self) -> float:
        """How old an outbox row must be before the relay sends it: at once while this process
        has unsent messages (its inline sends failed), else RESEND_AFTER_S (a younger row's
        sender may still be about to send it or drop it)."""
        from store.outbox import RESEND_AFTER_S

        with self._lock:
            return 0.0 if self._failed_since_sent else RESEND_AFTER_S

    def start_background(self) -> None:
        """Start the API's loops (:mod:`orchestration.services`): the outbox relay, every second,
        and the reconciler of lost jobs, which also re-sends messages a restarted Redis lost."""
        if not self._services:
            queues = self.settings.queue_names()
            self._services = [
                OutboxRelay(self.send, queues, interval=API_RELAY_EVERY_S, sent_job_ids=self.take_sent,
                            resend_after_s=self.resend_after_s).start(),
                Reconciler(self.send, self.settings.heartbeat_stale_s, queues, also=self.resend_lost_messages).start(),
            ]
            if self.settings.preemption:
                self._services.append(Preemptor(self.settings).start())

    def stop_background(self) -> None:
        for service in self._services:
            service.stop()
        self._services = []

    def ping(self, timeout: float = 2.0) -> None:
        """Raise if the broker cannot be reached."""
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting per queue (Redis brokers only; {} otherwise)."""
        url = self.settings.broker_url
        if not url.startswith(("redis://", "rediss://")):
            return {}
        client = self._redis
        prefix = self.settings.queue_prefix
        out = {}
        for q in self.settings.queue_names():
            out[q] = int(client.llen(prefix + q))
        return out

    @cached_property
    def _redis(self) -> Any:
        return redis.Redis.from_url(self.settings.broker_url, socket_timeout=2)
