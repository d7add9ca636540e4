"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
import os

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.schemas.misc import Health, Readiness
from store.db import get_engine

router = APIRouter(tags=["health"])
log = logging.getLogger("trainyard.api")


#: ``trainyard serve`` gives its API child a per-start token, echoed by /healthz, so it can tell
#: its own child from another server already answering on the port.
INSTANCE_HEADER = "X-Trainyard-Instance"


@router.get("/healthz", response_model=Health)
def healthz(response: Response) -> Health:
    """The process is up."""
    token = os.environ.get("TRAINYARD_INSTANCE_TOKEN")
    if token:
        response.headers[INSTANCE_HEADER] = token
    return Health(status="ok")


def _failure(what: str, exc: Exception) -> str:
    """What /readyz says of a failed check: the kind of error only. /readyz needs no key, and the
    error's text names the server's host, port and database; it goes to the log."""
    log.warning("readiness: %s: %s: %s", what, type(exc).__name__, exc)
    return f"error: {type(exc).__name__} (details in the server log)"


def _check_db() -> str:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return _failure("database", exc)


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> Response | Readiness:
    """Ready when both the database and the broker answer."""
    db = await run_in_threadpool(_check_db)
    try:
        await run_in_threadpool(request.app.state.dispatcher.ping)
        broker = "ok"
    except Exception as exc:  # noqa: BLE001
        broker = _failure("broker", exc)
    body = Readiness(status="ok" if db == broker == "ok" else "unavailable", database=db, broker=broker)
    if body.status != "ok":
        return JSONResponse(body.model_dump(), status_code=503)
    return body


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
            operation_id="prometheus_metrics")
def metrics(request: Request) -> Response:
    """Prometheus exposition: jobs by state, queue depth, job durations."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
