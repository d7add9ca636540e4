"""Sending jobs to the broker by task name (the API never imports the worker)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from typing import Any

from store.broker import RUN_JOB_TASK, celery_config
from store.settings import Settings


class DispatchError(RuntimeError):
    """The broker did not accept a message."""


class Dispatcher:
    """Publishes ``trainyard.run_job(job_id)`` messages. Call only after the job rows are
    committed, so a worker never sees an id whose row does not exist yet."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def celery(self) -> Any:
        from celery import Celery

        app = Celery("trainyard-api", set_as_current=False)
        app.conf.update(celery_config(self.settings))
        return app

    def send(self, jobs: Iterable[tuple[str, str]]) -> None:
        """Send one message per ``(job_id, queue)`` over one producer connection."""
        try:
            with self.celery.producer_or_acquire() as producer:
                for job_id, queue in jobs:
                    self.celery.send_task(
                        RUN_JOB_TASK, args=[job_id], queue=queue, producer=producer,
                        retry=True, retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5},
                    )
        except Exception as exc:  # noqa: BLE001 - any broker failure becomes a 503
            raise DispatchError(f"the broker did not accept the job: {type(exc).__name__}: {exc}") from exc

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
        for base in ("gpu", "cpu"):
            q = self.settings.queue_name(base)
            out[q] = int(client.llen(prefix + q))
        return out

    @cached_property
    def _redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.settings.broker_url, socket_timeout=2)
