"""Idempotency-Key on the POSTs that create things: the header, and replaying a recorded result.

``POST /v1/jobs`` keeps its key on the job row; ``POST /v1/jobs/batch`` and ``POST /v1/sweeps``
keep theirs in :mod:`store.idempotency`. Same semantics everywhere: the same key with the same
body again creates nothing and answers what the first request made (200); with a different body
it is a 409.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Header, HTTPException
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store import idempotency, repo

T = TypeVar("T")

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=200,
           description="retrying with the same key and body creates nothing new and returns the first answer"),
]

REPLAY_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"description": "the Idempotency-Key was already used with a different request body"},
}


def key_reused(key: str, what: str = "") -> HTTPException:
    return HTTPException(
        status_code=409,
        detail=f"Idempotency-Key {key!r} was already used with a different request body{what}; "
        "use a new key for a different request",
    )


def body_hash(body: Any) -> str:
    return repo.request_hash(body)


def find(session: Session, project: str, scope: str, key: str, digest: str) -> dict[str, Any] | None:
    """The recorded result of this key (None: first use); a 409 if the body differs."""
    try:
        return idempotency.find(session, project, scope, key, digest)
    except idempotency.KeyReused:
        raise key_reused(key) from None


def commit_once(
    session: Session, project: str, scope: str, key: str | None, digest: str | None, result: dict[str, Any],
    replay: Callable[[dict[str, Any]], T],
) -> T | None:
    """Record ``result`` under ``key`` (if any) and commit. If a concurrent request with the same key
    committed first, roll back (nothing of this request is kept) and return ``replay`` of its
    result; else None."""
    if key is None or digest is None:
        session.commit()
        return None
    try:
        idempotency.record(session, project, scope, key, digest, result)
        session.commit()
    except IntegrityError:
        session.rollback()
        first = find(session, project, scope, key, digest)
        if first is None:
            raise
        return replay(first)
    return None
