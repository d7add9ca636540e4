"""Idempotency-Key records of the POSTs whose result is not one job row (a batch, a sweep).

The record is added in the transaction that creates what the request made, so the two commit
together: a retried request either finds the record (and replays it) or made nothing. Two
concurrent requests with one key: the second commit fails on the primary key, its transaction
(its jobs or sweep too) rolls back, and it replays the first one's record.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import IdempotencyRecord


class KeyReused(Exception):
    """The key was already used with a different request body."""

    def __init__(self, key: str, result: dict[str, Any]) -> None:
        super().__init__(key)
        self.key, self.result = key, result


def find(session: Session, project_id: str, scope: str, key: str, request_hash: str) -> dict[str, Any] | None:
    """The result recorded for this key, if any; :class:`KeyReused` if it came with another body."""
    rec = session.scalars(
        select(IdempotencyRecord).where(
            IdempotencyRecord.project_id == project_id, IdempotencyRecord.scope == scope, IdempotencyRecord.key == key
        )
    ).one_or_none()
    if rec is None:
        return None
    if rec.request_hash != request_hash:
        raise KeyReused(key, rec.result)
    return rec.result


def record(session: Session, project_id: str, scope: str, key: str, request_hash: str, result: dict[str, Any]) -> None:
    """Add the record in the caller's transaction (flushed now: a duplicate fails here or at commit)."""
    from store.repo import utcnow

    session.add(IdempotencyRecord(project_id=project_id, scope=scope, key=key, request_hash=request_hash,
                                  result=result, created_at=utcnow()))
    session.flush()
