"""Request ids: every request gets one (the caller's ``X-Request-ID`` if it is a sane token, a
new one otherwise), every log line written while it is handled carries it (config.logs), and the
response echoes it as ``X-Request-ID``. With ``TRAINYARD_ACCESS_LOG`` on, one line per request
(method, path, status, milliseconds) goes to the ``trainyard.access`` logger.

A plain ASGI layer (no BaseHTTPMiddleware): it is the outermost one, in front of the poll fast
path, and costs a context-variable set and one header.

A new id comes from a per-process generator (``random.Random``, seeded from the OS and again in
each forked child), not from ``os.urandom``: that call releases the GIL, once per request on the
event loop's thread, and a poll thread (``store.pollread``) woken by the first poll of a burst then
took its query at once instead of after the burst, so concurrent polls stopped sharing queries
(0.035 -> 0.2 queries per poll under 64 clients, +40 % server CPU per poll; BENCHMARKS.md,
"Service", issue 10). The ids only need to be unique, not unpredictable.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from config.logs import ACCESS_LOGGER, request_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

HEADER = b"x-request-id"
_SANE = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
access_log = logging.getLogger(ACCESS_LOGGER)
_ids = random.Random()  # seeded from os.urandom once; see the module's docstring
os.register_at_fork(after_in_child=_ids.seed)  # a forked server process gets a sequence of its own


def new_id() -> str:
    """A fresh request id: 32 hex digits (128 random bits, as a uuid4's), without a system call."""
    return f"{_ids.getrandbits(128):032x}"


def _incoming(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == HEADER:
            return value.decode("ascii") if _SANE.match(value) else None
    return None


class RequestIds:
    """The ASGI layer (see the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming(scope) or new_id()
        token = request_id.set(rid)
        header = (HEADER, rid.encode("ascii"))
        status = 0
        timed = not access_log.disabled
        started = time.perf_counter() if timed else 0.0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if timed and access_log.isEnabledFor(logging.INFO):
                access_log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status,
                                (time.perf_counter() - started) * 1000)
            request_id.reset(token)
