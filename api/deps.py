"""Request dependencies as named ``Annotated`` aliases."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import authenticate, required_key_hash
from api.auth import poll_caller as poll_caller_of
from api.dispatch import Dispatcher
from api.errors import SpecProblem, error
from config.settings import Settings
from store import fastread
from store.db import get_sessionmaker, session_scope


def _write_session() -> Iterator[Session]:
    with session_scope(write=True) as session:
        yield session


def _read_session() -> Iterator[Session]:
    session = get_sessionmaker(write=False)()
    try:
        yield session
    finally:
        session.close()


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


#: declares the bearer scheme in the OpenAPI document (the docs' "Authorize" button); the key is
#: checked by :func:`api.auth.authenticate`, which answers 401 itself
_bearer = HTTPBearer(auto_error=False, description="an API key: trainyard keys create --project NAME")


def current_project(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None
) -> str:
    """The id of the caller's project (from its API key; the default project when auth is off):
    every route that reads or writes jobs, datasets or sweeps filters by it, and answers 404 for
    another project's ids. Every /v1 route depends on it, so it also enforces the key (401) and
    the project's request rate (429)."""
    return authenticate(request).project_id


async def poll_caller(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None
) -> fastread.Caller:
    """The caller of a polled route, for its own query to resolve: the default project when auth
    is off, else the hash of the bearer token (the route answers 401/429 from what its query found).
    ``async``: it only parses a header, and a sync dependency costs a thread-pool hop per request."""
    caller = poll_caller_of(request.app.state.settings, request.headers.get("authorization"))
    return caller if caller is not None else fastread.Caller(key_hash=required_key_hash(request))


def operations_of(app: Any, path: str) -> dict[str, dict[str, Any]] | None:
    """The OpenAPI operations (by upper-case method) of the documented path that ``path``
    matches, or None; a literal path wins over a templated one that also matches, as in
    routing. The table is built once per app."""
    table = getattr(app.state, "operation_table", None)
    if table is None:
        table = [
            (re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)) + "$"),
             {m.upper(): op for m, op in ops.items()})
            # literal paths first (/v1/jobs/validate before /v1/jobs/{job_id}), as routing resolves them
            for p, ops in sorted(app.openapi()["paths"].items(), key=lambda item: item[0].count("{"))
        ]
        app.state.operation_table = table
    return next((ops for pattern, ops in table if pattern.match(path)), None)


async def known_query_parameters(request: Request) -> None:
    """422 for a query parameter the operation does not have (``?statsu=failed`` would
    otherwise be ignored silently and list every job), for one given twice that takes one value
    (FastAPI would keep the last silently), and for NUL characters in the query (no database
    column can hold them; one in the path is a 404: no object has such an id)."""
    if "\x00" in request.url.path:
        raise HTTPException(status_code=404, detail="no such resource (the path contains a NUL character)")
    nul = [error(["query", k], f"query parameter {k!r} contains a NUL character", "string_nul")
           for k, v in request.query_params.multi_items() if "\x00" in k or "\x00" in v]
    if nul:
        raise SpecProblem(nul)
    if not request.query_params:
        return
    operations = operations_of(request.app, request.url.path)
    if operations is None:
        return
    op = operations.get(request.method, {})
    # name -> whether it takes several values (an array)
    known = {p["name"]: '"array"' in json.dumps(p.get("schema", {}))
             for p in op.get("parameters", ()) if p.get("in") == "query"}
    problems = [
        error(["query", name], f"unknown query parameter {name!r}; allowed: {', '.join(sorted(known)) or 'none'}",
              "extra_forbidden")
        for name in sorted(set(request.query_params.keys()) - set(known))
    ] + [
        error(["query", name], f"query parameter {name!r} takes one value; it was given "
              f"{len(request.query_params.getlist(name))}", "too_many_values")
        for name, is_array in sorted(known.items())
        if not is_array and len(request.query_params.getlist(name)) > 1
    ]
    if problems:
        raise SpecProblem(problems)


def _dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher  # type: ignore[no-any-return]


SessionDep = Annotated[Session, Depends(_write_session)]
ReadSessionDep = Annotated[Session, Depends(_read_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]
DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]
ProjectDep = Annotated[str, Depends(current_project)]
PollCallerDep = Annotated[fastread.Caller, Depends(poll_caller)]
