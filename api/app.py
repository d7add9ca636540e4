"""The FastAPI application factory: ``uvicorn api.app:create_app --factory``."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError

from api.dispatch import Dispatcher
from api.errors import SpecProblem, request_validation_handler, spec_problem_handler
from api.prom import make_registry
from api.routers import catalog, datasets, health, jobs, schedules
from store.settings import Settings, get_settings

DESCRIPTION = """JSON job specs in, PyTorch training on Celery workers, metrics and best checkpoints out.

Metric values that are not finite are served as the strings `"NaN"`, `"Infinity"` and
`"-Infinity"`; every other value is a JSON number. Spec errors are 422s whose `detail` items name
the JSON `path` at fault."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app (nothing is built at import time)."""
    settings = settings or get_settings()
    app = FastAPI(title="Trainyard", version="1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.dispatcher = Dispatcher(settings)
    app.state.registry = make_registry(app.state.dispatcher)
    app.add_exception_handler(RequestValidationError, request_validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(SpecProblem, spec_problem_handler)  # type: ignore[arg-type]
    v1 = APIRouter(prefix="/v1")
    for module in (jobs, schedules, catalog, datasets):
        v1.include_router(module.router)
    app.include_router(v1)
    app.include_router(health.router)
    return app
