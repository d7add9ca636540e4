"""Limits: request body size and JSON nesting (ASGI middleware), what a job spec may ask for,
per-project concurrent jobs, and per-project request rate.

The rate limit is a token bucket per project held in this API process: with N uvicorn workers or N
API processes a project gets up to N times its rate. The concurrent-jobs limit is exact: it is
checked in the submitting transaction under a lock on the project's row.
"""

from __future__ import annotations

import math
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException
from sqlalchemy.orm import Session

from api.errors import PROBLEM_JSON, problem_bytes
from config.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: job ids one request may name: ``GET /v1/jobs?id=...`` (each id a query parameter: 500 of them
#: make a ~20 KB URL, under the server's 32 KiB header cap) and ``POST /v1/jobs/query`` (a JSON body)
MAX_LIST_IDS = 500
MAX_QUERY_IDS = 10_000

#: multipart bodies carry a file of up to ``max_upload_bytes`` plus form fields and boundaries
MULTIPART_OVERHEAD = 64 * 1024


def json_too_deep(body: bytes, max_depth: int) -> bool:
    """Whether the JSON text ``body`` nests arrays/objects deeper than ``max_depth`` (brackets
    inside strings do not count). Linear time, vectorized; a cheap count settles most bodies."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    import numpy as np

    text = re.sub(rb"\\.", b"", body)  # escapes first, so \" does not end a string
    text = re.sub(rb'"[^"]*"', b"", text)
    arr = np.frombuffer(text, dtype=np.uint8)
    opens = (arr == ord("[")) | (arr == ord("{"))
    closes = (arr == ord("]")) | (arr == ord("}"))
    steps = opens.astype(np.int8)[opens | closes] - closes.astype(np.int8)[opens | closes]
    return bool(steps.size) and int(np.cumsum(steps, dtype=np.int64).max()) > max_depth


_ESCAPES = re.compile(rb"\\(?:\\|u[dD][89a-fA-F][0-9a-fA-F]{2})")  # an escaped backslash, or \uD800-\uDFFF
_LOW = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def lone_surrogate(body: bytes) -> list[Any] | None:
    """The location (keys and indexes) of the first JSON string, key or value, that holds a lone
    UTF-16 surrogate escape (``"\udc00"``: valid JSON text, but no UTF-8 encoder, PostgreSQL
    included, can write it); None when there is none. Linear; a body without such an escape
    costs one search."""
    if not re.search(rb"\\u[dD][89a-fA-F]", body):
        return None
    paired_low_at = -1
    lone = False
    for m in _ESCAPES.finditer(body):
        tok = m.group()
        if len(tok) == 2:  # an escaped backslash: whatever follows is literal text
            continue
        if int(tok[2:], 16) < 0xDC00:  # a high surrogate must be followed at once by a low one
            if _LOW.match(body, m.end()):
                paired_low_at = m.end()
                continue
            lone = True
            break
        if m.start() != paired_low_at:
            lone = True
            break
    if not lone:
        return None
    import json

    try:
        data = json.loads(body)
    except ValueError:
        return None  # not JSON: the app says so
    return _surrogate_loc(data, [])


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _surrogate_loc(value: Any, loc: list[Any]) -> list[Any] | None:
    if isinstance(value, str):
        return loc if _has_surrogate(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            if _has_surrogate(k):
                return [*loc, _printable(k)]
            found = _surrogate_loc(v, [*loc, k])
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _surrogate_loc(v, [*loc, i])
            if found is not None:
                return found
    return None


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
#: an integer literal (not a float's fraction or exponent) of more digits than Python converts
_LONG_INT = re.compile(rb"(?<![.eE0-9])(?<![eE][+-])[0-9]{%d,}(?![0-9.eE])" % (sys.get_int_max_str_digits() + 1))


def long_integer(body: bytes) -> tuple[int, int] | None:
    """(character offset, digits) of an integer literal longer than Python's int conversion limit
    (4300 digits: ``json.loads`` raises, and FastAPI answered 400 "error parsing the body");
    digits inside strings do not count. None when there is none; one search for most bodies."""
    limit = sys.get_int_max_str_digits()
    if limit <= 0 or not re.search(rb"[0-9]{%d}" % (limit + 1), body):
        return None
    text = _STRING.sub(lambda m: b" " * len(m.group()), body)  # same offsets, no string contents
    m = _LONG_INT.search(text)
    return (m.start(), m.end() - m.start()) if m else None


class BodyLimitMiddleware:
    """413 for a body over the limit, decided from Content-Length when there is one and else by
    counting bytes as they arrive (never reading more than the limit). JSON bodies (they are read
    whole by the app anyway) are also refused with a 422 when nested deeper than
    ``max_json_depth``, before anything parses them, and when a string holds a lone UTF-16
    surrogate (:func:`lone_surrogate`; it used to be a 500 wherever it reached the database or an
    error message)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def _limit(self, scope: Scope) -> tuple[int, bool]:
        ctype = ""
        for k, v in scope.get("headers") or ():
            if k == b"content-type":
                ctype = v.decode("latin-1").lower()
        if ctype.startswith("multipart/"):
            return self.settings.max_upload_bytes + MULTIPART_OVERHEAD, False
        return self.settings.max_body_bytes, "json" in ctype or not ctype

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        limit, is_json = self._limit(scope)
        too_large = f"the request body is larger than the limit of {limit} bytes"
        for k, v in scope.get("headers") or ():
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = -1
                if declared > limit:
                    await _respond(send, 413, too_large)
                    return
        if is_json:
            body, over = await _read_all(receive, limit)
            if over:
                await _respond(send, 413, too_large)
                return
            if body and not _decodes(body):
                await _respond(send, 422, errors=[{
                    "loc": ["body"], "path": "", "type": "json_invalid",
                    "msg": "the request body is not valid JSON: it is not UTF-8 text",
                }])
                return
            bad = lone_surrogate(body)
            if bad is not None:
                from training.spec import json_path

                await _respond(send, 422, errors=[{
                    "loc": ["body", *bad], "path": json_path(bad), "type": "string_unicode",
                    "msg": "text must be valid Unicode: this string holds a lone UTF-16 surrogate escape "
                           "(\\ud800-\\udfff); a high surrogate must be followed by a low one",
                }], close=False)
                return
            too_long = long_integer(body)
            if too_long is not None:
                await _respond(send, 422, errors=[{
                    "loc": ["body"], "path": "", "type": "int_too_long",
                    "msg": f"an integer in the request body has {too_long[1]} digits (at character {too_long[0]}); "
                           f"at most {sys.get_int_max_str_digits()} are allowed: send it as a float or a string",
                }], close=False)
                return
            if json_too_deep(body, self.settings.max_json_depth):
                await _respond(send, 422, errors=[{
                    "loc": ["body"], "path": "", "type": "json_too_deep",
                    "msg": f"the request body nests arrays/objects deeper than {self.settings.max_json_depth} levels",
                }])
                return
            await self.app(scope, _replay(body), send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI re-raises HTTPExceptions met while parsing a body; its handler renders it
                    raise HTTPException(status_code=413, detail=too_large)
            return message

        await self.app(scope, counting_receive, send)


def _decodes(body: bytes) -> bool:
    """Whether the body is text in the encoding JSON's rules detect (UTF-8, or UTF-16/32)."""
    import json

    try:
        body.decode(json.detect_encoding(body))
    except (UnicodeDecodeError, LookupError):
        return False
    return True


async def _read_all(receive: Receive, limit: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), False


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _respond(send: Send, status: int, detail: str | None = None,
                   errors: list[dict[str, Any]] | None = None, *, close: bool = True) -> None:
    """An error answer (a problem document); ``close=False`` once the whole body was read (the
    connection stays usable)."""
    body = problem_bytes(status, detail, errors)
    headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- concurrent jobs


def too_many_requests(detail: str, retry_after: float) -> HTTPException:
    return HTTPException(status_code=429, detail=detail, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


#: what a 429 for the concurrent-jobs limit suggests: jobs take minutes
JOBS_RETRY_AFTER_S = 30


def check_job_slots(session: Session, project_id: str, adding: int, settings: Settings) -> None:
    """429 (Retry-After) unless the project's queued + running jobs plus ``adding`` fit its
    limit (:func:`store.repo.project_job_slots`, which locks the project's row until the
    caller's transaction ends)."""
    from store.repo import project_job_slots

    active, limit = project_job_slots(session, project_id, settings.max_concurrent_jobs)
    if limit > 0 and active + adding > limit:
        raise slots_full(active, limit, adding)


def slots_full(active: int, limit: int, adding: int) -> HTTPException:
    """The 429 of a submission that does not fit the project's concurrent-jobs limit."""
    return too_many_requests(
        f"project has {active} queued or running jobs and may have at most {limit}; "
        f"{'this job does' if adding == 1 else f'these {adding} jobs do'} not fit; retry when some have finished",
        JOBS_RETRY_AFTER_S,
    )


# --------------------------------------------------------------------------- request rate


class RateLimiter:
    """Token buckets per project: ``per_minute`` tokens a minute, holding at most a minute's worth
    (so a burst of ``per_minute`` requests passes, then one every ``60/per_minute`` s)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, key: str, per_minute: int) -> float:
        """Take a token: 0.0 if granted, else the seconds until one is available."""
        if per_minute <= 0:
            return 0.0
        rate = per_minute / 60.0
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate

    def check(self, key: str, per_minute: int) -> None:
        """Raise a 429 with Retry-After when the bucket of ``key`` is empty."""
        wait = self.acquire(key, per_minute)
        if wait > 0:
            raise too_many_requests(f"rate limit of {per_minute} requests per minute exceeded; retry later", wait)


# --------------------------------------------------------------------------- open event streams


class StreamSlots:
    """Open event streams per project in this API process: each polls the database, so a caller
    holding hundreds of them loaded every other request (issue 18: 200 streams took GET /v1/jobs
    from 14 ms to 1.4 s). ``open`` answers 429 past ``per_project``; ``close`` frees the slot."""

    def __init__(self, per_project: int) -> None:
        self.per_project = per_project
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def open(self, project_id: str) -> None:
        with self._lock:
            n = self._open.get(project_id, 0)
            if 0 < self.per_project <= n:
                raise too_many_requests(
                    f"this project already has {n} open event streams on this server, the most allowed; close one "
                    "(or poll GET /v1/jobs/{id}?wait=...) and retry", 5)
            self._open[project_id] = n + 1

    def close(self, project_id: str) -> None:
        with self._lock:
            n = self._open.get(project_id, 0) - 1
            if n > 0:
                self._open[project_id] = n
            else:
                self._open.pop(project_id, None)

    def count(self, project_id: str) -> int:
        return self._open.get(project_id, 0)
