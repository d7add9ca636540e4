"""What dashboards need beyond the resources' own routes: labels and notes (PATCH), bulk
metrics, the project's event stream, and a dry run of a job spec."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from api.annotations import split_annotations
from api.auth import authenticate
from api.changes import follow, latest_event_id, project_sse
from api.deps import ProjectDep, ReadSessionDep, SettingsDep
from api.errors import SpecProblem
from api.routers.jobs import LAST_EVENT_ID, MAX_INT64, SPEC_EXAMPLE
from api.schemas.common import ErrorResponse
from api.schemas.dashboards import BulkMetrics, BulkMetricsQuery, DryRun
from orchestration.admission import check_job_spec, dataset_resolver
from store.bulkread import bulk_metrics_json
from store.db import get_engine
from training import SpecError

router = APIRouter(tags=["dashboards"])

@router.post("/metrics/bulk", response_model=BulkMetrics, tags=["jobs"],
             responses={422: {"model": ErrorResponse}})
def bulk_metrics(query: BulkMetricsQuery, project: ProjectDep) -> Response:
    """The curves of up to 1,000 jobs in one request: each job's epochs after its own
    ``since_epoch``, only ``keys`` when given, ``max_points`` evenly spaced when given. Ids that
    are not jobs of the project are listed in ``missing``."""
    since: dict[str, int] = {}
    for j in query.jobs:
        since[j.id] = min(since.get(j.id, j.since_epoch), j.since_epoch)
    body = bulk_metrics_json(get_engine(), project, since, query.keys, query.max_points)
    return Response(content=body, media_type="application/json")


@router.post("/jobs/validate", response_model=DryRun, tags=["jobs"],
             responses={422: {"model": ErrorResponse, "description": "invalid spec; each error names its JSON path"}})
def validate_job(session: ReadSessionDep, settings: SettingsDep, project: ProjectDep,
                 spec: Annotated[dict[str, Any], Body(examples=[SPEC_EXAMPLE])]) -> DryRun:
    """A dry run of ``POST /v1/jobs``: the same checks, nothing stored. Answers the normalized
    spec and what it implies (parameter count, steps per epoch), or the same 422."""
    spec, annotations = split_annotations(spec)
    try:
        valid = check_job_spec(spec, dataset_resolver(session, project), settings)
    except SpecError as exc:
        raise SpecProblem(exc.errors) from None
    return DryRun(spec=valid.spec, queue=valid.queue, parameters=valid.parameters,
                  steps_per_epoch=valid.steps_per_epoch, labels=annotations.labels or {}, notes=annotations.notes)


@router.get(
    "/events",
    response_class=EventSourceResponse,
    tags=["dashboards"],
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "event 'job': {job_id, sweep_id, kind: state|epoch, data}, and also 'sweep' "
                                    "{sweep_id, job_id, kind: trial_changed} when the job is a sweep's trial; "
                                    "event 'sweep': {sweep_id, job_id, kind: created|trial|state, data} for a "
                                    "sweep's own changes (created, a trial added, ended)"},
               400: {"model": ErrorResponse, "description": "Last-Event-ID is not an event id"}},
)
async def project_events(
    request: Request,
    project: ProjectDep,
    last_event_id: Annotated[
        str, Header(alias="Last-Event-ID", description="an event id", json_schema_extra={"pattern": LAST_EVENT_ID.pattern})
    ] = None,  # type: ignore[assignment]
    after: Annotated[int | None, Query(ge=0, le=MAX_INT64, description="like Last-Event-ID; default: from now")] = None,
) -> EventSourceResponse:
    """Server-Sent Events of every change to the project's jobs (state changes and epochs) and
    sweeps (created, a trial added, ended, and a change to one of its trials), pushed as they commit (change notices, not a poll per
    client). Each event has an increasing id: resume with ``Last-Event-ID``. Without one, the
    stream starts from now. Comment pings every 15 s keep proxies from closing it."""
    start: int | None = after
    if last_event_id is not None:
        m = LAST_EVENT_ID.match(last_event_id)
        if m is None:
            raise HTTPException(status_code=400, detail="Last-Event-ID must be an event id (an integer)")
        if m.group(1):
            start = int(m.group(1))
    hub = request.app.state.changes
    key_id = authenticate(request).key_id
    if start is None:
        start = await run_in_threadpool(latest_event_id)

    slots = request.app.state.stream_slots
    slots.open(project)  # 429 past the project's open streams (api.limits.StreamSlots)

    async def stream() -> Any:
        try:
            async for c in follow(hub, project_id=project, after=start, is_disconnected=request.is_disconnected,
                                  key_id=key_id):
                for event, payload in project_sse(c):
                    yield ServerSentEvent(data=json.dumps(payload, allow_nan=False), event=event, id=str(c.id))
        finally:
            slots.close(project)

    return EventSourceResponse(stream(), ping=15)


