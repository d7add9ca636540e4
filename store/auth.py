"""Repositories of projects and API keys. Like :mod:`store.repo`, functions take a session and
never commit.

A key is ``ty_`` followed by 43 urlsafe characters (32 random bytes). Only its sha256 is stored;
``prefix`` (its first 12 characters) is what ``trainyard keys list`` shows and what ``keys revoke``
accepts besides the key's id.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from store.ids import new_id
from store.models import ApiKey, Project
from store.repo import as_utc, utcnow

KEY_PREFIX = "ty_"
SHOWN_PREFIX_LEN = 12  # "ty_" + 9 characters: enough to tell keys apart in a listing
#: ``last_used_at`` is written at most this often per key, so a request costs no write.
LAST_USED_RESOLUTION = timedelta(seconds=60)
PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def hash_key(token: str) -> str:
    """The stored form of a key: its sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX) and 20 <= len(token) <= 200


@dataclass(frozen=True)
class KeyOwner:
    """What a valid key resolves to: its id, its project and the project's own request rate."""

    key_id: str
    project_id: str
    requests_per_minute: int | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class NewKey:
    id: str
    project_id: str
    project_name: str
    name: str | None
    prefix: str
    token: str  # the only time the key exists in clear


def get_project_by_name(session: Session, name: str) -> Project | None:
    return session.scalars(select(Project).where(Project.name == name)).one_or_none()


def get_project(session: Session, project_id: str) -> Project | None:
    return session.get(Project, project_id)


def ensure_project(session: Session, name: str) -> Project:
    """The project called ``name``, created if missing (the default project keeps id 'default')."""
    if not PROJECT_NAME.match(name):
        raise ValueError(f"invalid project name {name!r}: use letters, digits, '_', '.', '-' (at most 100)")
    project = get_project_by_name(session, name)
    if project is None:
        project = Project(id=new_id(), name=name, created_at=utcnow())
        session.add(project)
        session.flush()
    return project


#: "leave this limit as it is" (the default of :func:`set_project_limits`' arguments)
KEEP: Any = object()


def set_project_limits(
    session: Session, project_id: str, *, max_concurrent_jobs: int | None = KEEP, requests_per_minute: int | None = KEEP
) -> None:
    """Set a project's own limits: None means the service-wide default; a limit not given is kept."""
    values = {k: v for k, v in (("max_concurrent_jobs", max_concurrent_jobs), ("requests_per_minute", requests_per_minute))
              if v is not KEEP}
    if values:
        session.execute(
            update(Project).where(Project.id == project_id).values(**values).execution_options(synchronize_session=False)
        )


def set_project_weight(session: Session, project_id: str, weight: float) -> None:
    """Set a project's fair-share weight (store.scheduling): when projects compete for a queue,
    each receives worker time in proportion to its weight. ``weight`` must be a finite number > 0."""
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"invalid weight {weight!r}: a project's weight is a finite number > 0 (default 1)")
    session.execute(
        update(Project).where(Project.id == project_id).values(weight=float(weight))
        .execution_options(synchronize_session=False)
    )


def create_key(session: Session, project_name: str, name: str | None = None) -> NewKey:
    """Make a key for project ``project_name`` (created if missing); the clear token is returned
    once and never stored."""
    project = ensure_project(session, project_name)
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id(), project_id=project.id, name=name, prefix=token[:SHOWN_PREFIX_LEN], key_hash=hash_key(token),
        created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    return NewKey(id=key.id, project_id=project.id, project_name=project.name, name=name, prefix=key.prefix,
                  token=token)


def resolve_key(session: Session, token: str) -> KeyOwner | None:
    """The owner of an unrevoked key, in one query by the key's hash (None if unknown or revoked).
    Nothing is cached: a revoke takes effect on the next request."""
    if not looks_like_key(token):
        return None
    return resolve_key_hash(session, hash_key(token))


def resolve_key_hash(session: Session, key_hash: str) -> KeyOwner | None:
    """:func:`resolve_key` for a key known by its sha256 (a browser session's cookie holds that)."""
    row = session.execute(
        select(ApiKey.id, ApiKey.project_id, Project.requests_per_minute, ApiKey.last_used_at)
        .join(Project, Project.id == ApiKey.project_id)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    return KeyOwner(key_id=row[0], project_id=row[1], requests_per_minute=row[2], last_used_at=as_utc(row[3]))


def touch_key(session: Session, owner: KeyOwner) -> bool:
    """Record a use of the key, at most once per :data:`LAST_USED_RESOLUTION` (so most requests
    write nothing). Returns whether a write was issued."""
    now = utcnow()
    if owner.last_used_at is not None and now - owner.last_used_at < LAST_USED_RESOLUTION:
        return False
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == owner.key_id,
               or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_RESOLUTION))
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    return True


def key_is_live(key_id: str) -> Any:
    """A clause true while key ``key_id`` is unrevoked: a long-lived request (an SSE stream) adds
    it to the query it repeats anyway, so a revoke ends it at the next poll at no extra cost."""
    return exists().where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))


def list_keys(session: Session, project_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Keys (with their project's name), oldest first, optionally of one project."""
    q = select(ApiKey, Project.name).join(Project, Project.id == ApiKey.project_id)
    if project_name is not None:
        q = q.where(Project.name == project_name)
    return [(k, n) for k, n in session.execute(q.order_by(ApiKey.created_at, ApiKey.id))]


def find_keys(session: Session, id_or_prefix: str) -> list[ApiKey]:
    """Keys whose id is ``id_or_prefix`` or whose shown prefix starts with it (a full key also
    finds its own row)."""
    if looks_like_key(id_or_prefix) and len(id_or_prefix) > SHOWN_PREFIX_LEN:
        by_hash = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(id_or_prefix))).all()
        if by_hash:
            return list(by_hash)
    q = select(ApiKey).where(
        or_(ApiKey.id == id_or_prefix,
            ApiKey.prefix == id_or_prefix[:SHOWN_PREFIX_LEN] if len(id_or_prefix) >= SHOWN_PREFIX_LEN
            else ApiKey.prefix.startswith(id_or_prefix, autoescape=True))
    )
    return list(session.scalars(q))


def revoke_key(session: Session, key_id: str) -> bool:
    """Revoke a key now; False if it was already revoked (or does not exist)."""
    res = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]
