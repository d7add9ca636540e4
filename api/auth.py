"""Who is calling: an API key (``Authorization: Bearer ty_...``) resolves to its project.

With ``TRAINYARD_AUTH=off`` (embedded mode) every caller is in the default project and no key is
read. Otherwise a missing, unknown or revoked key is a 401 with ``WWW-Authenticate: Bearer``.
Keys are looked up by their sha256 on every request (one indexed query on a short-lived read
session, never cached), so a revoke takes effect on the next request.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException, Request

from store import auth as keys
from store.db import session_scope
from store.models import DEFAULT_PROJECT

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


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("the Authorization header must be 'Bearer <API key>'")
    return token.strip()


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
    if not keys.looks_like_key(token):
        raise _unauthorized("invalid or revoked API key")
    return keys.hash_key(token)


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
    settings = request.app.state.settings
    rpm = caller.requests_per_minute if caller.requests_per_minute is not None else settings.requests_per_minute
    request.app.state.rate_limiter.check(caller.project_id, rpm)
    request.state.caller = caller
    return caller
