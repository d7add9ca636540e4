"""Request dependencies as named ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.dispatch import Dispatcher
from store.db import get_sessionmaker, session_scope
from store.models import DEFAULT_PROJECT
from store.settings import Settings


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


def _project(request: Request) -> str:
    """The id of the caller's project: every route that reads or writes jobs, datasets or sweeps
    filters by it, and answers 404 for another project's ids. (Until API keys exist every caller
    is in the default project.)"""
    return DEFAULT_PROJECT


def _dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher  # type: ignore[no-any-return]


SessionDep = Annotated[Session, Depends(_write_session)]
ReadSessionDep = Annotated[Session, Depends(_read_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]
DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]
ProjectDep = Annotated[str, Depends(_project)]
