"""Browser sessions: the sign-in page trades an API key for a signed cookie, so pages and their
event streams are authenticated without a key in any URL or in JavaScript's reach.

The cookie (``trainyard_session``: HttpOnly, SameSite=Strict, Secure on https) holds the key's
sha256 and a CSRF token, signed with itsdangerous; the key is looked up by that hash on every
request, so a revoke ends the session too. A request authenticated by the cookie that changes
state (any method but GET/HEAD/OPTIONS) must also carry the token in ``X-CSRF-Token`` (pages
read it from their ``<meta name="csrf-token">``): another site can make a browser send the
cookie, never the header."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from config.settings import Settings

COOKIE = "trainyard_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class BrowserSession:
    key_hash: str
    csrf: str


def _secret(settings: Settings) -> str:
    """The signing secret: the configured one, else one made once and kept (0600) in the data
    directory, so every API process of a deployment shares it and restarts keep sessions."""
    if settings.session_secret:
        return settings.session_secret
    path = Path(settings.data_dir) / "session-secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = secrets.token_urlsafe(48)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(fresh)
        return fresh


def serializer(app: Any) -> URLSafeTimedSerializer:
    cached = getattr(app.state, "session_serializer", None)
    if cached is None:
        cached = URLSafeTimedSerializer(_secret(app.state.settings), salt="trainyard-session")
        app.state.session_serializer = cached
    return cached


def make_cookie(app: Any, key_hash: str) -> tuple[str, BrowserSession]:
    session = BrowserSession(key_hash=key_hash, csrf=secrets.token_urlsafe(24))
    return serializer(app).dumps({"h": session.key_hash, "c": session.csrf}), session


def read_cookie(app: Any, cookies: dict[str, str]) -> BrowserSession | None:
    """The signed session of these cookies, if any and still valid (its age within the limit)."""
    raw = cookies.get(COOKIE)
    if not raw:
        return None
    try:
        data = serializer(app).loads(raw, max_age=app.state.settings.session_max_age_s)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("h"), str) or not isinstance(data.get("c"), str):
        return None
    return BrowserSession(key_hash=data["h"], csrf=data["c"])


def check_csrf(method: str, headers: Any, session: BrowserSession) -> bool:
    """Whether a cookie-authenticated request may proceed (safe methods always may)."""
    if method.upper() in SAFE_METHODS:
        return True
    sent = headers.get(CSRF_HEADER) or ""
    return bool(sent) and secrets.compare_digest(sent, session.csrf)
