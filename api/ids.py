"""Ids in URLs: a full id, or any unique prefix of one, as git and docker take them.

A prefix is 4 to 31 lower-case hex digits and is looked up within the caller's project only.
No match: the route's own 404. Several: a 409 that lists them (up to ten), so the caller can
give more characters. Ids start with their creation time (store.ids), so jobs made together
share their first 10-12 digits; the random part that follows tells them apart.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool

from store import repo
from store.db import session_scope

FULL_ID = re.compile(r"^[0-9a-f]{32}$")
PREFIX = re.compile(r"^[0-9a-f]{4,31}$")
MAX_CANDIDATES = 10
#: the OpenAPI entry of the 409 every route that takes an id may answer
AMBIGUOUS: dict[int | str, dict[str, str]] = {
    409: {"description": "the id is a prefix of several ids (the detail lists them)"},
}


def is_prefix(given: str) -> bool:
    """Whether ``given`` is a shortened id (to be resolved), not a full one."""
    return PREFIX.match(given) is not None


def resolve_id(session: Any, model: Any, given: str, project: str | None, what: str) -> str:
    """The full id ``given`` stands for in ``project``; ``given`` itself when it is a full id or
    matches nothing (the caller then answers its 404); a 409 listing the candidates when it is
    the prefix of several ids."""
    if not is_prefix(given):
        return given
    found = repo.ids_with_prefix(session, model, given, project, limit=MAX_CANDIDATES + 1)
    if len(found) > 1:
        more = len(found) > MAX_CANDIDATES
        shown = ", ".join(found[:MAX_CANDIDATES]) + (", ..." if more else "")
        count = f"more than {MAX_CANDIDATES}" if more else str(len(found))
        raise HTTPException(
            status_code=409,
            detail=f"{what} id prefix {given!r} is ambiguous: {count} {what}s start with it ({shown}); "
            "give more characters",
        )
    return found[0] if found else given


async def resolve_id_async(model: Any, given: str, project: str | None, what: str) -> str:
    """:func:`resolve_id` from an async route (its own read session, off the event loop)."""

    def run() -> str:
        with session_scope(write=False) as s:
            return resolve_id(s, model, given, project, what)

    return await run_in_threadpool(run)
