"""Who is calling: an API key (``Authorization: Bearer ty_...``) resolves to its project.

With ``TRAINYARD_AUTH=off`` (embedded mode) every caller is in the default project and no key is
read. Otherwise a missing, unknown or revoked key is a 401 with ``WWW-Authenticate: Bearer``.
Keys are looked up by their sha256 on every request (one indexed query on a short-lived read
session, never cached), so a revoke takes effect on the next request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from config.settings import Settings
from store import auth as keys
from store import fastread
from store.db import session_scope
from store.models import DEFAULT_PROJECT
from store.repo import as_utc

AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Caller:
    """The caller's project, its key, and the project's own request rate (None: the service's)."""

    project_id: str
    key_id: str | None = None
    requests_per_minute: int | None = None


ANONYMOUS = Caller(project_id=DEFAULT_PROJECT)


def _unauthorized(msg: str) -> HTTPException:
    return HTTPException(status_code=401, detail=msg, headers=AUTH_HEADERS)


def parse_bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, None without one; 401 for
    another scheme or an empty token."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("the Authorization header must be 'Bearer <API key>'")
    return token.strip()


def bearer_token(request: Request) -> str | None:
    """The token of the request's ``Authorization: Bearer <token>`` header, if any."""
    return parse_bearer(request.headers.get("authorization"))


def key_hash_of(token: str) -> str:
    """The stored hash of an API key; 401 for a token that cannot be one."""
    if not keys.looks_like_key(token):
        raise _unauthorized("invalid or revoked API key")
    return keys.hash_key(token)


def authenticate(request: Request) -> Caller:
    """The caller of this request (cached on ``request.state``): 401 without a valid key when
    keys are required; 429 with Retry-After when the project's request rate is exceeded."""
    cached = getattr(request.state, "caller", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    settings = request.app.state.settings
    if settings.auth == "off":
        caller = ANONYMOUS
    else:
        token = bearer_token(request)
        if token is None:
            key_hash = _browser_key_hash(request)
            with session_scope(write=False) as session:
                owner = keys.resolve_key_hash(session, key_hash)
        else:
            with session_scope(write=False) as session:
                owner = keys.resolve_key(session, token)
        caller = admit(request, owner)
    request.state.caller = caller
    return caller


def _browser_key_hash(request: Request) -> str:
    """The key hash of the request's browser session (api.session), checking its CSRF token for
    state changes; 401 without a session, 403 for a state change without the token."""
    from api.session import check_csrf, read_cookie

    browser = read_cookie(request.app, request.cookies)
    if browser is None:
        raise _unauthorized("this server requires an API key: send 'Authorization: Bearer <key>' "
                            "(create one with 'trainyard keys create --project NAME'), or sign in at /ui/signin")
    if not check_csrf(request.method, request.headers, browser):
        raise HTTPException(status_code=403, detail="a change made with a browser session needs its X-CSRF-Token header "
                                                    "(pages send it from <meta name=\"csrf-token\">)")
    return browser.key_hash


def required_key_hash(request: Request) -> str | None:
    """For routes whose own query resolves the key (:mod:`store.fastread`): None when auth is
    off, else the sha256 of the bearer token (401 without one)."""
    if request.app.state.settings.auth == "off":
        return None
    token = bearer_token(request)
    if token is None:
        return _browser_key_hash(request)
    return key_hash_of(token)


def poll_caller(settings: Settings, authorization: str | None) -> fastread.Caller | None:
    """The caller of a poll, for the poll's own query to resolve (:mod:`store.fastread`): the
    default project when auth is off, else the hash of the bearer key (401: a malformed header or
    a token that cannot be a key); None without an Authorization header (a browser session's
    request: :func:`required_key_hash`). Used by the route and the fast path alike."""
    if settings.auth == "off":
        return fastread.Caller(project_id=DEFAULT_PROJECT)
    token = parse_bearer(authorization)
    return None if token is None else fastread.Caller(key_hash=key_hash_of(token))


def poll_owner(key: fastread.KeyRow) -> keys.KeyOwner | None:
    """The key a poll's query resolved (:data:`store.fastread.KeyRow`), None if unknown or revoked."""
    if key is None:
        return None
    return keys.KeyOwner(key_id=key[0], project_id=key[1], requests_per_minute=key[2], last_used_at=as_utc(key[3]))


def rate_of(settings: Settings, requests_per_minute: int | None) -> int:
    """A project's request rate: its own, else the service's."""
    return requests_per_minute if requests_per_minute is not None else settings.requests_per_minute


def needs_touch(owner: keys.KeyOwner) -> bool:
    """Whether this request should record the key's use (at most once a minute)."""
    return owner.last_used_at is None or keys.utcnow() - owner.last_used_at >= keys.LAST_USED_RESOLUTION


def touch(owner: keys.KeyOwner) -> None:
    """Record the key's use (its own short write transaction)."""
    with session_scope(write=True) as session:
        keys.touch_key(session, owner)


def admit(request: Request, owner: keys.KeyOwner | None, *, record_use: bool = True) -> Caller:
    """The caller a resolved key makes (401 if it resolved to nothing), after recording its use
    (at most once a minute; ``record_use=False``: the caller did it) and taking a token from its
    project's request-rate bucket (429)."""
    if owner is None:
        raise _unauthorized("invalid or revoked API key")
    if record_use and needs_touch(owner):
        touch(owner)
    caller = Caller(project_id=owner.project_id, key_id=owner.key_id, requests_per_minute=owner.requests_per_minute)
    rpm = rate_of(request.app.state.settings, caller.requests_per_minute)
    request.app.state.rate_limiter.check(caller.project_id, rpm)
    request.state.caller = caller
    return caller


async def admit_poll(request: Request, caller: fastread.Caller, key: fastread.KeyRow) -> None:
    """401/429 for a keyed poll, from the key row its own query returned (:func:`admit`). The
    key's use is recorded (at most once a minute) off the event loop."""
    if caller.key_hash is None:
        return
    owner = poll_owner(key)
    if owner is not None and needs_touch(owner) and _touches.claim(owner.key_id):
        await run_in_threadpool(touch, owner)
    admit(request, owner, record_use=False)


class _Touches:
    """Which keys this process recorded a use of in the last minute: polls that shared a query
    (store.pollread) saw the same stale ``last_used_at``, and one write records them all."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def claim(self, key_id: str) -> bool:
        now = time.monotonic()
        if now - self._at.get(key_id, -math.inf) < keys.LAST_USED_RESOLUTION.total_seconds():
            return False
        if len(self._at) > 10_000:
            self._at.clear()
        self._at[key_id] = now
        return True


_touches = _Touches()


def poll_admitted_at_once(settings: Settings, rate_limiter: Any, caller: fastread.Caller, key: fastread.KeyRow) -> bool:
    """Whether :func:`admit_poll` would admit this poll with nothing to write: no key needed, or
    a key that resolved, whose use was recorded within the minute, and whose project's bucket
    gives a token (taken). False: the caller must go through :func:`admit_poll` (the fast path
    hands the request to the route)."""
    if caller.key_hash is None:
        return True
    owner = poll_owner(key)
    if owner is None or needs_touch(owner):
        return False
    return rate_limiter.acquire(owner.project_id, rate_of(settings, owner.requests_per_minute)) == 0.0
