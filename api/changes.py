"""The API's side of change notices: one reader per process fetches new job events (one query
for every open stream) when a notice arrives, and fans them out to the streams that follow
them: ``GET /v1/events`` (the project's jobs and sweeps) and ``GET /v1/jobs/{id}/events``.

How it wakes: on a Redis notice (:mod:`store.notices`), with a look every ``fallback_s`` in
case one was lost; without Redis (embedded mode), every ``poll_s`` (0.1 s) while a stream is open. Either way the database
sees one query per wake-up, however many clients are connected (bench/dashboards.py measures).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from config.settings import Settings
from store import notices
from store.db import session_scope
from store.models import TERMINAL_STATUSES, Job, JobEvent, Sweep

log = logging.getLogger("trainyard.changes")

#: how far back each fetch looks again for events whose transaction committed after a later
#: id's (ids are handed out at INSERT, not at COMMIT); those already sent are skipped
REREAD_IDS = 200
BATCH = 1000


@dataclass(frozen=True)
class Change:
    """One job event (or a sweep's own event: ``job_id`` None) with what a stream needs to route it."""

    id: int
    job_id: str | None
    project_id: str
    sweep_id: str | None
    kind: str
    data: dict[str, Any]


def fetch_changes(after: int, limit: int = BATCH, *, project_id: str | None = None,
                  job_id: str | None = None) -> list[Change]:
    """Job and sweep events after id ``after`` (of one project or job when given), in id order."""
    project = func.coalesce(Job.project_id, Sweep.project_id)
    q = (select(JobEvent.id, JobEvent.job_id, project, func.coalesce(Job.sweep_id, JobEvent.sweep_id), JobEvent.kind,
                JobEvent.data)
         .select_from(JobEvent).outerjoin(Job, Job.id == JobEvent.job_id).outerjoin(Sweep, Sweep.id == JobEvent.sweep_id)
         .where(JobEvent.id > after).order_by(JobEvent.id).limit(limit))
    if project_id is not None:
        q = q.where(project == project_id)
    if job_id is not None:
        q = q.where(JobEvent.job_id == job_id)
    with session_scope(write=False) as s:
        return [Change(*row) for row in s.execute(q)]


def live_keys(key_ids: set[str]) -> set[str]:
    """Which of these API keys are unrevoked."""
    from store.models import ApiKey

    with session_scope(write=False) as s:
        return set(s.scalars(select(ApiKey.id).where(ApiKey.id.in_(list(key_ids)), ApiKey.revoked_at.is_(None))))


def latest_event_id() -> int:
    with session_scope(write=False) as s:
        return int(s.scalar(select(func.max(JobEvent.id))) or 0)


def recent_event_ids(n: int = REREAD_IDS) -> list[int]:
    """The ids of the newest ``n`` committed events, newest first."""
    with session_scope(write=False) as s:
        return list(s.scalars(select(JobEvent.id).order_by(JobEvent.id.desc()).limit(n)))


@dataclass(eq=False)
class Subscription:
    project_id: str
    job_id: str | None
    key_id: str | None = None  # the API key it streams for (None: auth off); a revoke ends it
    queue: asyncio.Queue[Change | None] = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))
    overflowed: bool = False

    def wants(self, change: Change) -> bool:
        return change.project_id == self.project_id and (self.job_id is None or change.job_id == self.job_id)


class ChangeHub:
    """Fetches new job events once per wake-up and hands each to the subscriptions that want it."""

    def __init__(self, settings: Settings, *, poll_s: float = 0.1, fallback_s: float = 5.0,
                 key_check_s: float = 5.0) -> None:
        self.settings = settings
        self.poll_s = poll_s
        self.fallback_s = fallback_s
        self.subs: set[Subscription] = set()
        self.last: int | None = None
        self.sent: collections.deque[int] = collections.deque(maxlen=4 * REREAD_IDS)
        self._sent_set: set[int] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self.key_check_s = key_check_s
        self._keys_checked = 0.0
        self.fetches = 0  # queries made (the bench reads it)

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        if notices.uses_redis(self.settings):
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel the reader and the Redis listener and wait for them, at most ``timeout_s``: a
        listener whose Redis went away can sit in its client's clean-up past the cancel (seen once
        as a hang of the app's shutdown in a test that stops and restarts Redis); the app's
        shutdown must not wait for it."""
        tasks = [t for t in (self._task, self._listener) if t is not None]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            log.warning("the change reader's task %s did not stop within %.0f s; left behind", task.get_name(), timeout_s)
        for task in tasks:
            if task.done() and not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()  # retrieved: no "exception was never retrieved" at exit

    def poke(self) -> None:
        """Wake the reader now (this process wrote something)."""
        self._wake.set()

    async def _listen(self) -> None:
        import redis.asyncio as aioredis

        while True:
            try:
                client = aioredis.Redis.from_url(self.settings.broker_url)
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(notices.channel(self.settings))
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: the fallback looks carry on
                log.warning("change notices unavailable (%s); retrying in 5 s", exc)
                await asyncio.sleep(5)

    async def _run(self) -> None:
        interval = self.fallback_s if self._listener is not None else self.poll_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()
            if not self.subs:
                self.last = None  # the next subscriber sets it afresh
                continue
            try:
                await self._fetch_and_fan_out()
                await self._end_revoked()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database is away: try again on the next wake
                log.warning("fetching changes failed: %s", exc)

    async def _fetch_and_fan_out(self) -> None:
        while self.last is not None:
            start = max(0, self.last - REREAD_IDS)
            changes = await run_in_threadpool(fetch_changes, start)
            self.fetches += 1
            fresh = [c for c in changes if c.id not in self._sent_set]
            for c in fresh:
                self._remember(c.id)
                for sub in list(self.subs):
                    if sub.wants(c):
                        try:
                            sub.queue.put_nowait(c)
                        except asyncio.QueueFull:
                            sub.overflowed = True
            if changes:
                self.last = max(self.last, changes[-1].id)
            if len(changes) < BATCH:
                return

    async def _end_revoked(self) -> None:
        """Every ``key_check_s``: one query for the keys of all keyed streams; the streams of a
        revoked key end (a revoke takes effect within seconds, at one query for every client)."""
        loop = asyncio.get_running_loop()
        key_ids = {s.key_id for s in self.subs if s.key_id is not None}
        if not key_ids or loop.time() - self._keys_checked < self.key_check_s:
            return
        self._keys_checked = loop.time()
        live = await run_in_threadpool(live_keys, key_ids)
        for sub in list(self.subs):
            if sub.key_id is not None and sub.key_id not in live:
                self.subs.discard(sub)
                sub.queue.put_nowait(None)  # the stream's end

    def _remember(self, event_id: int) -> None:
        if len(self.sent) == self.sent.maxlen:
            self._sent_set.discard(self.sent[0])
        self.sent.append(event_id)
        self._sent_set.add(event_id)

    # ------------------------------------------------------------------ streams
    async def subscribe(self, project_id: str, job_id: str | None = None, key_id: str | None = None) -> Subscription:
        """A subscription that receives every change from now on (the caller then reads its
        backlog from the database: events up to now, from its own Last-Event-ID)."""
        if self.last is None:
            # what is already committed counts as sent: the first look back must not replay it
            recent = await run_in_threadpool(recent_event_ids)
            for event_id in reversed(recent):
                self._remember(event_id)
            self.last = recent[0] if recent else 0
        sub = Subscription(project_id=project_id, job_id=job_id, key_id=key_id)
        self.subs.add(sub)
        if key_id is not None:
            self._wake.set()  # so the key checks run on this hub's schedule even when nothing changes
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subs.discard(sub)


def change_payload(c: Change) -> dict[str, Any]:
    return {"job_id": c.job_id, "sweep_id": c.sweep_id, "kind": c.kind, "data": c.data}


def project_sse(c: Change) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of ``GET /v1/events`` for one change, all with its id: a job's
    event is a ``job`` event, and also a ``sweep`` event (``kind: "trial_changed"``) when the job
    is a trial; a sweep's own event is a ``sweep`` event (``kind: "created" | "trial" | "state"``)."""
    if c.job_id is None:
        return [("sweep", {"sweep_id": c.sweep_id, "job_id": c.data.get("job_id"), "kind": c.kind, "data": c.data})]
    out = [("job", change_payload(c))]
    if c.sweep_id is not None:
        out.append(("sweep", {"sweep_id": c.sweep_id, "job_id": c.job_id, "kind": "trial_changed"}))
    return out


async def follow(
    hub: ChangeHub, *, project_id: str, after: int, job_id: str | None = None,
    is_disconnected: Callable[[], Any], key_id: str | None = None,
) -> AsyncIterator[Change]:
    """The changes after event id ``after`` (the backlog from the database, then those the hub
    pushes), each once, in id order per batch; for one job, it ends after the job's terminal
    state. It also ends when the caller's key (``key_id``) is revoked."""
    sub = await hub.subscribe(project_id, job_id, key_id)
    last = after
    seen: collections.deque[int] = collections.deque(maxlen=4 * REREAD_IDS)
    try:
        while True:  # the backlog, in pages
            backlog = await run_in_threadpool(fetch_changes, last, project_id=project_id, job_id=job_id)
            for c in backlog:
                seen.append(c.id)
                last = c.id
                yield c
                if job_id is not None and _ends(c):
                    return
            if len(backlog) < BATCH:
                break
        if job_id is not None and await run_in_threadpool(_job_ended, job_id):
            return  # ended before: its terminal event was in the backlog or before ``after``
        while True:
            try:
                c = await asyncio.wait_for(sub.queue.get(), timeout=1.0)
            except TimeoutError:
                if await is_disconnected():
                    return
                continue
            if c is None:
                return  # the key was revoked
            if c.id in seen or c.id <= after:
                continue
            seen.append(c.id)
            yield c
            if job_id is not None and _ends(c):
                return
    finally:
        hub.unsubscribe(sub)


def _job_ended(job_id: str) -> bool:
    with session_scope(write=False) as s:
        return s.scalar(select(Job.status).where(Job.id == job_id)) in TERMINAL_STATUSES


def _ends(c: Change) -> bool:
    return c.kind == "state" and c.data.get("status") in TERMINAL_STATUSES


def sse_data(payload: dict[str, Any]) -> str:
    return json.dumps(payload, allow_nan=False)
