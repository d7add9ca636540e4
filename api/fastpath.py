"""A fast path for the two routes dashboards and batch scripts poll, ``GET /v1/jobs/{id}`` and
``GET /v1/jobs/{id}/metrics``: an ASGI layer in front of FastAPI that answers the ordinary
successful poll itself and hands every other request, unchanged, to the app.

Why: with the query down to one shared round trip (``store.pollread``, ``store.fastread``), most
of a poll's server time was FastAPI's per-request machinery (nested router matching, dependency
solving, the exit-stack and exception layers: ``bench/service.py`` profiles). A poll served here
costs about what a bare FastAPI route returning a constant costs.

What it serves, and nothing else: a GET on exactly one of the two paths, with no query string or
only ``since_epoch`` / ``max_points`` given once each as plain in-range integers, a well-formed
``Authorization: Bearer ty_...`` header when keys are required, and an answer that is a 200: the
key resolved (the same query reads it), the job is the caller's, the key's use was recorded
within the last minute, and the project's request-rate bucket had a token. Anything else (a 401,
404, 422, 429, a key whose use is due to be recorded, an odd query string, a database error)
goes to the FastAPI route, which decides it again from scratch, so errors look exactly as they
do everywhere else. The route stays the documented operation (OpenAPI). Both layers call the same
functions for every rule: the caller (``api.auth.poll_caller``), the read
(``store.fastread.read_job`` / ``read_metrics``, whose view is ``store.fastread.job_view``) and the
admission (``api.auth.poll_owner``, ``needs_touch``, ``rate_of``); what is left here is only
which requests to hand on. ``tests/service/test_fastpath.py`` compares the two layers' responses,
status, headers and body, case by case.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException

from api.auth import poll_admitted_at_once, poll_caller
from config.settings import Settings
from store import fastread
from store.db import get_engine

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_PATH = re.compile(r"^/v1/jobs/([^/\x00]+)(/metrics)?$")
# one parameter, given once, as the plain digits FastAPI would read as the same int
_QUERY_PARAM = re.compile(rb"^(since_epoch|max_points)=([0-9]{1,9})$")


def _query(raw: bytes) -> tuple[int, int | None] | None:
    """(since_epoch, max_points) of a plain query string, or None to let the route decide."""
    since, max_points = 0, None
    if not raw:
        return since, max_points
    seen: set[bytes] = set()
    for part in raw.split(b"&"):
        m = _QUERY_PARAM.match(part)
        if m is None or m.group(1) in seen:
            return None
        seen.add(m.group(1))
        value = int(m.group(2))
        if m.group(1) == b"since_epoch":
            since = value  # 0 ... 999,999,999: within the route's bounds (ge=0, le=2**31-1)
        elif 1 <= value <= fastread.MAX_POINTS:
            max_points = value
        else:
            return None
    return since, max_points


class PollStats:
    """Polls answered by the fast path (the rest went to the route): Prometheus' ``/metrics``."""

    def __init__(self) -> None:
        self.served = 0


class PollFastPath:
    """The ASGI layer (see the module's docstring); ``rate_limiter`` is the app's own bucket."""

    def __init__(self, app: ASGIApp, settings: Settings, rate_limiter: Any, stats: PollStats) -> None:
        self.app = app
        self.settings = settings
        self.rate_limiter = rate_limiter
        self.stats = stats

    def _caller(self, scope: Scope) -> fastread.Caller | None:
        """The route's caller (:func:`api.auth.poll_caller`), or None to let the route answer (a
        browser session's request, a 401)."""
        header = None
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                header = value.decode("latin-1")  # the first one, as the route's request.headers
                break
        try:
            return poll_caller(self.settings, header)
        except HTTPException:
            return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        m = _PATH.match(scope["path"])
        query = scope.get("query_string", b"")
        # the job's route takes no query parameter; the metrics route takes two
        params = (_query(query) if m.group(2) else (None if query else (0, None))) if m is not None else None
        caller = self._caller(scope) if params is not None else None
        if m is None or params is None or caller is None:
            await self.app(scope, receive, send)
            return
        job_id = m.group(1)
        engine = get_engine()
        try:
            if m.group(2):
                key, body = await fastread.read_metrics(engine, job_id, caller, *params)
            else:
                key, body = await fastread.read_job(engine, job_id, caller)
        except Exception:  # noqa: BLE001 - the route meets the same error and answers it
            await self.app(scope, receive, send)
            return
        if body is None or not poll_admitted_at_once(self.settings, self.rate_limiter, caller, key):
            await self.app(scope, receive, send)
            return
        self.stats.served += 1
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
