"""The FastAPI application factory: ``uvicorn api.app:create_app --factory``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy.exc
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.changes import ChangeHub
from api.deps import current_project, known_query_parameters, operations_of
from api.dispatch import Dispatcher
from api.errors import (
    SpecProblem,
    artifact_error_handler,
    database_unavailable_handler,
    document_problems,
    http_exception_handler,
    request_validation_handler,
    spec_problem_handler,
    unhandled_exception_handler,
)
from api.fastpath import PollFastPath, PollStats
from api.limits import BodyLimitMiddleware, RateLimiter, StreamSlots
from api.prom import make_registry
from api.request_ids import RequestIds
from api.routers import (
    catalog,
    dashboards,
    datasets,
    health,
    job_actions,
    jobs,
    models,
    schedules,
    sweeps,
    webhooks,
)
from api.schemas.common import ErrorResponse, Problem
from api.schemas.specs import add_components
from api.webhook_delivery import WebhookDeliverer
from config.logs import configure_logging
from config.process import freeze_startup_objects
from config.settings import Settings, get_settings
from store.artifact_store import ArtifactError
from store.pollread import close_readers
from ui import routes as ui_routes

DESCRIPTION = """JSON job specs in, PyTorch training on Celery workers, metrics and best checkpoints out.

Metric values that are not finite are served as the strings `"NaN"`, `"Infinity"` and
`"-Infinity"`; every other value is a JSON number. Errors are RFC 9457 problem documents; a 422's `errors` items name
the JSON `path` at fault."""


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "no API key, or an invalid or revoked one"},
    413: {"model": ErrorResponse, "description": "the request body is over the size limit"},
    429: {"model": ErrorResponse, "description": "the project's request rate or concurrent-jobs limit; see Retry-After"},
}


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # the outbox relay and the reconciler of lost jobs run for as long as the app does
    app.state.dispatcher.start_background()
    app.state.changes.start()  # the change reader of the event streams (api.changes)
    app.state.webhook_deliverer.start()  # webhook deliveries (api.webhook_delivery)
    app.openapi()  # built now, not on a first request (the query-parameter check reads it)
    if app.state.settings.gc_freeze:
        # Everything built so far lives as long as the process: keep it out of full collections
        # (config.process; measured in BENCHMARKS.md, "Service"). The broker client is built
        # first (it imports celery and kombu), so that it is frozen too.
        _ = app.state.dispatcher.celery
        freeze_startup_objects()
    try:
        yield
    finally:
        await app.state.changes.stop()
        app.state.dispatcher.stop_background()
        app.state.webhook_deliverer.stop()
        close_readers()  # the polled routes' connections (store.pollread); reopened on demand


async def _http_exception(request: Request, exc: StarletteHTTPException) -> Response:
    """As every error (a problem-details body), and a 405 lists in ``Allow`` every method the path
    supports (Starlette lists only those of the first route that matched the path)."""
    if exc.status_code == 405:
        allowed = _allowed_methods(request.app, request.url.path)
        if allowed:
            exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": ", ".join(allowed)})
    return await http_exception_handler(request, exc)


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    return sorted(operations_of(app, path) or ())


def _operation_id(route: APIRoute) -> str:
    """Readable operationIds: the route function's name (``create_job``, ``list_sweeps``)."""
    return route.name


def _openapi(app: FastAPI) -> Any:
    """The document as FastAPI builds it, with every error answer documented as the
    ``application/problem+json`` body the handlers send (api.errors.document_problems)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(problem_schema.pop("$defs", {}))
        schemas["Problem"] = problem_schema
        add_components(doc)
        app.openapi_schema = document_problems(doc)
    return app.openapi_schema


def create_app(settings: Settings | None = None, *, poll_fast_path: bool = True) -> FastAPI:
    """Build the app (nothing is built at import time). ``poll_fast_path=False`` leaves out
    :mod:`api.fastpath` (the tests compare the two)."""
    settings = settings or get_settings()
    configure_logging(settings, "api")
    # /docs and /redoc are served by ui.routes from installed assets (FastAPI's own load a CDN)
    app = FastAPI(title="Trainyard", version="1.0", description=DESCRIPTION, lifespan=_lifespan,
                  docs_url=None, redoc_url=None, generate_unique_id_function=_operation_id)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.changes = ChangeHub(settings)
    app.state.dispatcher = Dispatcher(settings)
    app.state.webhook_deliverer = WebhookDeliverer(settings)
    app.state.poll_stats = PollStats()
    app.state.registry = make_registry(app.state.dispatcher, app.state.poll_stats)
    app.add_exception_handler(RequestValidationError, request_validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(SpecProblem, spec_problem_handler)  # type: ignore[arg-type]
    app.add_exception_handler(ArtifactError, artifact_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception)  # type: ignore[arg-type]
    for unavailable in (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError):
        app.add_exception_handler(unavailable, database_unavailable_handler)
    app.add_exception_handler(Exception, unhandled_exception_handler)
    app.state.rate_limiter = RateLimiter()
    app.state.stream_slots = StreamSlots(settings.max_event_streams)
    app.add_middleware(BodyLimitMiddleware, settings=settings)  # type: ignore[arg-type]
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # browsers on these origins may call the API (with a bearer key; cookies stay same-site)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],  # type: ignore[arg-type]
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
                           expose_headers=["Retry-After", "X-Checkpoint-SHA256", "ETag"], max_age=600)
    if poll_fast_path:  # added last: the outermost of ours, so a served poll skips the rest
        app.add_middleware(PollFastPath, settings=settings, rate_limiter=app.state.rate_limiter,  # type: ignore[arg-type]
                           stats=app.state.poll_stats)
    app.add_middleware(RequestIds)  # outermost: every response, fast path included, echoes the id
    # every /v1 route needs the caller's project: the key check (401) and rate limit (429) run first
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(current_project), Depends(known_query_parameters)],
                   responses=AUTH_RESPONSES)
    for module in (jobs, job_actions, models, schedules, catalog, datasets, sweeps, dashboards, webhooks):
        v1.include_router(module.router)
    app.include_router(v1)
    # the polled routes resolve the key in their own query (one round trip): not current_project
    v1_polls = APIRouter(prefix="/v1", dependencies=[Depends(known_query_parameters)], responses=AUTH_RESPONSES)
    v1_polls.include_router(jobs.poll_router)
    app.include_router(v1_polls)
    app.include_router(health.router)
    ui_routes.install(app)
    return app
