"""/v1/jobs: submit, list, inspect, follow, cancel jobs and fetch their checkpoints."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from api.deps import DispatcherDep, ReadSessionDep, SessionDep, SettingsDep
from api.dispatch import DispatchError
from api.errors import SpecProblem
from api.schemas.common import ErrorItem, ErrorResponse
from api.schemas.jobs import (
    BatchCreate,
    BatchItem,
    BatchResult,
    CheckpointList,
    JobList,
    JobRead,
    JobStatus,
    MetricsRead,
)
from api.validation import check_job_spec, dataset_resolver
from api.views import checkpoint_read, job_read, job_summary
from store import repo
from store.db import session_scope
from store.models import TERMINAL_STATUSES
from training import SpecError

router = APIRouter(prefix="/jobs", tags=["jobs"])

#: Bounds of integer parameters compared with database columns (INTEGER epochs, BIGINT event ids):
#: a larger number is a 422, not a database overflow (500).
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1

SPEC_EXAMPLE: dict[str, Any] = {
    "name": "digits-mlp",
    "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 64, "standardize": True},
    "model": {"layers": [{"type": "dense", "units": 64, "activation": "relu"}, {"type": "dense", "units": 10}]},
    "loss": "sparse_categorical_crossentropy",
    "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "learning_rate": 0.001},
    "epochs": 20,
    "callbacks": {"early_stopping": {"monitor": "val_loss", "patience": 5, "restore_best_weights": True}},
}


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no job {job_id!r}")


def _dispatch(session: Any, dispatcher: Any, jobs: list[tuple[str, str]]) -> None:
    """Enqueue committed jobs; if the broker refuses, mark them failed and answer 503."""
    try:
        dispatcher.send(jobs)
    except DispatchError as exc:
        for job_id, _ in jobs:
            repo.fail_unstarted_job(session, job_id, str(exc))
        session.commit()
        raise HTTPException(status_code=503, detail=str(exc)) from exc


@router.post(
    "",
    response_model=JobRead,
    status_code=201,
    responses={
        200: {"model": JobRead, "description": "a job with this Idempotency-Key and body already exists"},
        409: {"description": "the Idempotency-Key was already used with a different body"},
        422: {"model": ErrorResponse, "description": "invalid spec; each error names its JSON path"},
        503: {"description": "the broker is unavailable; the job is recorded as failed"},
    },
)
def create_job(
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    response: Response,
    spec: Annotated[dict[str, Any], Body(examples=[SPEC_EXAMPLE])],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> JobRead:
    """Validate, store and enqueue a job. The same Idempotency-Key with the same body again returns
    the same job (200); with a different body it is a 409."""
    body_hash = repo.request_hash(spec) if idempotency_key else None
    if idempotency_key:
        existing = repo.get_job_by_idempotency_key(session, idempotency_key)
        if existing is not None:
            response.status_code = 200
            return _replay(existing, body_hash)
    try:
        valid = check_job_spec(spec, dataset_resolver(session), settings)
    except SpecError as exc:
        raise SpecProblem(exc.errors) from None
    try:
        job = repo.create_job(
            session, spec=valid.spec, queue=valid.queue, idempotency_key=idempotency_key, idempotency_hash=body_hash
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = repo.get_job_by_idempotency_key(session, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        response.status_code = 200
        return _replay(existing, body_hash)
    _dispatch(session, dispatcher, [(job.id, job.queue)])
    return job_read(job)


def _replay(existing: Any, body_hash: str | None) -> JobRead:
    """The job an Idempotency-Key already made, if this request's body is the one it was made with."""
    if existing.idempotency_hash is not None and existing.idempotency_hash != body_hash:
        raise HTTPException(
            status_code=409,
            detail=f"Idempotency-Key {existing.idempotency_key!r} was already used with a different request body "
            f"(job {existing.id}); use a new key for a different job",
        )
    return job_read(existing)


@router.post("/batch", response_model=BatchResult, responses={503: {"description": "broker unavailable"}})
def create_batch(
    body: BatchCreate, session: SessionDep, settings: SettingsDep, dispatcher: DispatcherDep
) -> BatchResult:
    """Submit up to 1000 specs: a result per item (an id, or errors with JSON paths). Valid items
    are stored and enqueued even when others fail."""
    resolver = dataset_resolver(session)
    results: list[BatchItem] = []
    valid_items: list[tuple[int, Any]] = []
    for i, raw in enumerate(body.jobs):
        try:
            valid_items.append((i, check_job_spec(raw, resolver, settings)))
        except SpecError as exc:
            results.append(BatchItem(index=i, status="invalid", errors=[ErrorItem(**e) for e in exc.errors]))
    jobs = repo.create_jobs(session, [(v.spec, v.queue, None) for _, v in valid_items]) if valid_items else []
    session.commit()
    if jobs:
        _dispatch(session, dispatcher, [(j.id, j.queue) for j in jobs])
    results += [BatchItem(index=i, id=j.id, status="created") for (i, _), j in zip(valid_items, jobs, strict=True)]
    results.sort(key=lambda r: r.index)
    return BatchResult(created=len(jobs), invalid=len(body.jobs) - len(jobs), results=results)


@router.get("", response_model=JobList)
def list_jobs(
    session: ReadSessionDep,
    status: Annotated[list[JobStatus] | None, Query(description="repeat to give several")] = None,
    name: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    """Jobs, newest first, with cursor pagination."""
    flt = repo.JobFilter(status=status or (), name=name, created_after=created_after, created_before=created_before)
    rows = repo.list_jobs(session, flt, limit=limit, cursor=cursor)
    page = rows[:limit]
    return JobList(jobs=[job_summary(j) for j in page], next_cursor=page[-1].id if len(rows) > limit else None)


@router.get("/{job_id}", response_model=JobRead, responses={404: {"description": "no such job"}})
def get_job(job_id: str, session: ReadSessionDep) -> JobRead:
    job = repo.get_job(session, job_id)
    if job is None:
        raise _not_found(job_id)
    return job_read(job)


def _downsample(rows: list[dict[str, Any]], max_points: int) -> list[dict[str, Any]]:
    n = len(rows)
    if n <= max_points:
        return rows
    if max_points == 1:
        return [rows[-1]]
    idx = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return [rows[i] for i in idx]


@router.get("/{job_id}/metrics", response_model=MetricsRead, responses={404: {"description": "no such job"}})
def get_metrics(
    job_id: str,
    session: ReadSessionDep,
    since_epoch: Annotated[int, Query(ge=0, le=MAX_INT32, description="only epochs after this one")] = 0,
    max_points: Annotated[int | None, Query(ge=1, le=100_000, description="downsample evenly (keeps the last)")] = None,
) -> MetricsRead:
    """Per-epoch metrics. Non-finite values are the strings "NaN", "Infinity", "-Infinity"."""
    rows = repo.metrics(session, job_id, since_epoch)
    if not rows and not repo.job_exists(session, job_id):
        raise _not_found(job_id)
    total = len(rows)
    if max_points is not None:
        rows = _downsample(rows, max_points)
    return MetricsRead(job_id=job_id, epochs=rows, total=total)


def _poll_events(job_id: str, after: int) -> tuple[list[tuple[int, str, dict[str, Any]]], str | None]:
    with session_scope(write=False) as s:
        status = s.scalar(repo.select_job_status(job_id))
        events = [(e.id, e.kind, e.data) for e in repo.events_after(s, job_id, after)]
    return events, status


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "events 'state' and 'epoch'"},
               404: {"description": "no such job"}},
)
async def job_events(
    job_id: str,
    request: Request,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_INT64, description="like Last-Event-ID, for clients that cannot set headers")
    ] = None,
    poll_interval: Annotated[float, Query(ge=0.05, le=10)] = 0.25,
) -> EventSourceResponse:
    """Server-Sent Events: ``state`` (status changes) and ``epoch`` (an epoch's metrics) as they
    land, each with an increasing id; resume with Last-Event-ID. The stream ends after the job's
    terminal state."""
    start = after or 0
    if last_event_id:
        try:
            start = int(last_event_id.strip()) if len(last_event_id) <= 20 else -1
        except ValueError:
            start = -1
        if not 0 <= start <= MAX_INT64:
            raise HTTPException(status_code=400, detail="Last-Event-ID must be an event id (an integer)") from None
    first, status = await run_in_threadpool(_poll_events, job_id, start)
    if status is None:
        raise _not_found(job_id)

    async def stream() -> Any:
        events, last = first, start
        st: str | None = status
        while True:
            for ev_id, kind, data in events:
                last = ev_id
                yield ServerSentEvent(data=json.dumps(data, allow_nan=False), event=kind, id=str(ev_id))
            if st in TERMINAL_STATUSES and not events:
                return
            if await request.is_disconnected():
                return
            if not events:
                await asyncio.sleep(poll_interval)
            events, st = await run_in_threadpool(_poll_events, job_id, last)

    return EventSourceResponse(stream(), ping=15)


@router.post(
    "/{job_id}/cancel",
    response_model=JobRead,
    responses={404: {"description": "no such job"},
               409: {"description": "the job already ended (succeeded, failed or cancelled)"}},
)
def cancel_job(job_id: str, session: SessionDep) -> JobRead:
    """A queued job is cancelled at once and never starts; a running one stops within about a
    second of training and ends ``cancelled`` (cancelling it again while it stops is a 200). A
    job that already ended (succeeded, failed or cancelled) is a 409."""
    before = session.scalar(repo.select_job_status(job_id))
    if before is None:
        raise _not_found(job_id)
    if before in TERMINAL_STATUSES:
        raise HTTPException(status_code=409, detail=f"job {job_id} already ended: {before}")
    status = repo.request_cancel(session, job_id)
    if status is None:
        raise _not_found(job_id)
    if status in ("succeeded", "failed"):
        raise HTTPException(status_code=409, detail=f"job {job_id} already ended: {status}")
    session.commit()
    job = repo.get_job(session, job_id)
    assert job is not None
    return job_read(job)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses={404: {"description": "no such job"}})
def list_checkpoints(job_id: str, session: ReadSessionDep) -> CheckpointList:
    rows = repo.list_checkpoints(session, job_id)
    if not rows and not repo.job_exists(session, job_id):
        raise _not_found(job_id)
    return CheckpointList(checkpoints=[checkpoint_read(c, stored) for c, stored in rows])


@router.get(
    "/{job_id}/checkpoints/best",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}},
              "description": "safetensors file; its sha256 (hex) in X-Checkpoint-SHA256 and ETag"},
        404: {"description": "no such job, or no checkpoint yet"},
    },
)
def best_checkpoint(job_id: str, session: ReadSessionDep) -> Response:
    """The best weights as a ``.safetensors`` file."""
    ck = repo.best_checkpoint(session, job_id)
    if ck is None:
        status = session.scalar(repo.select_job_status(job_id))
        if status is None:
            raise _not_found(job_id)
        if status in TERMINAL_STATUSES:
            raise HTTPException(status_code=404, detail=f"job {job_id} ended without a checkpoint ({status})")
        raise HTTPException(status_code=404, detail=f"job {job_id} has no checkpoint yet")
    assert ck.data is not None
    return Response(
        content=ck.data,
        media_type="application/octet-stream",
        headers={
            "X-Checkpoint-SHA256": ck.sha256,
            "X-Checkpoint-Epoch": str(ck.epoch),
            "ETag": f'"{ck.sha256}"',
            "Content-Disposition": f'attachment; filename="{job_id}-best.safetensors"',
        },
    )
