"""/v1/jobs: submit, list, inspect, follow, cancel jobs and fetch their checkpoints."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from pydantic import StringConstraints
from sqlalchemy.exc import IntegrityError
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from api import idempotency as idem
from api.annotations import annotate, split_annotations
from api.auth import admit_poll, authenticate
from api.changes import follow
from api.deps import DispatcherDep, PollCallerDep, ProjectDep, ReadSessionDep, SessionDep, SettingsDep
from api.errors import SpecProblem
from api.idempotency import REPLAY_RESPONSES, IdempotencyKey, key_reused
from api.ids import AMBIGUOUS, is_prefix, resolve_id, resolve_id_async
from api.limits import MAX_LIST_IDS, check_job_slots, slots_full
from api.listing import (
    ID,
    LABEL_FILTER,
    STOP_REASON_FILTERS,
    decode_cursor,
    encode_cursor,
    parse_label_filters,
)
from api.predict import MODEL_REFS
from api.schemas.common import LOCATION, ErrorItem, ErrorResponse, IsoDatetime
from api.schemas.jobs import (
    BatchCreate,
    BatchItem,
    BatchResult,
    CheckpointList,
    JobList,
    JobPatch,
    JobQuery,
    JobQueryResult,
    JobRead,
    JobStatus,
    MetricsRead,
)
from api.views import checkpoint_read, job_read, job_summary
from config.settings import get_settings
from orchestration.admission import check_job_spec, dataset_resolver
from store import auth as keys
from store import fastread, notices, repo, scheduling, submit
from store.artifact_store import get_store
from store.db import get_engine, session_scope
from store.models import TERMINAL_STATUSES, Job
from training import SpecError

router = APIRouter(prefix="/jobs", tags=["jobs"])

PriorityQuery = Annotated[int, Query(
    ge=scheduling.PRIORITY_MIN, le=scheduling.PRIORITY_MAX,
    description="higher starts first among queued jobs of its queue (then the oldest); changeable by PATCH "
                "while queued",
)]

#: Bounds of integer parameters compared with database columns (INTEGER epochs, BIGINT event ids):
#: a larger number is a 422, not a database overflow (500).
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
#: a Last-Event-ID: an event id (up to 18 digits, so below MAX_INT64), spaces around allowed;
#: an empty one (an EventSource whose last event had no id) means none
LAST_EVENT_ID = re.compile(r"^[ \t]*([0-9]{1,18})?[ \t]*$")

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


def _checkpoint_problem(head: bytes, size: int) -> str | None:
    """Why checkpoint bytes whose sha256 is the recorded one must still not be served (None if
    they are sound): they are not a safetensors file (a length-prefixed JSON header, checked on
    ``head``, their first bytes; a pickle, say, is not)."""
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not 0 < n <= size - 8:
        return "it is not a safetensors file"
    if 8 + n <= len(head):
        try:
            header = json.loads(head[8 : 8 + n])
        except ValueError:
            header = None
        if not isinstance(header, dict):
            return "it is not a safetensors file"
    return None


#: the other answers of a file download (checkpoints)
DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    206: {"content": {"application/octet-stream": {}}, "description": "the byte range asked for (Range header)"},
    307: {"description": "the artifact store serves the file: a presigned URL in Location (S3), valid for "
                         "TRAINYARD_ARTIFACTS_PRESIGN_S; the sha256 is in X-Checkpoint-SHA256"},
    416: {"description": "the Range asked for is not within the file"},
}


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no job {job_id!r}")


def _full_id(session: Any, job_id: str, project: str) -> str:
    """The job id that ``job_id`` (a full id or a unique prefix, api.ids) stands for."""
    return resolve_id(session, Job, job_id, project, "job")


async def _polled_prefix(job_id: str, caller: fastread.Caller, key: fastread.KeyRow) -> str | None:
    """For a poll that found nothing: the full id when ``job_id`` is a unique prefix of one of the
    caller's jobs (a 409 when it is the prefix of several), else None."""
    if not is_prefix(job_id):
        return None
    project = caller.project_id if caller.key_hash is None else (key[1] if key is not None else None)
    if project is None:
        return None
    full = await resolve_id_async(Job, job_id, project, "job")
    return full if full != job_id else None


def _dispatch(session: Any, dispatcher: Any, jobs: list[tuple[str, str]], notice: bool = False) -> None:
    """Send the messages of committed jobs. Their outbox rows were committed with them, so if
    the broker is down the jobs stay queued and the outbox relay sends them when it is back
    (store.outbox): a broker outage delays jobs, it does not fail them. ``notice``: then publish
    the change notice that :func:`_insert_one` left to us (store.submit), after the send, so that
    its Redis round trip is not inside submit->running."""
    try:
        dispatcher.submit(jobs)
    finally:  # the jobs are committed either way: readers hear of them even if the send failed
        if notice:
            notices.publish(get_engine())


@router.post(
    "",
    response_model=JobRead,
    status_code=201,
    responses={
        201: {"headers": LOCATION},
        200: {"model": JobRead, "description": "a job with this Idempotency-Key and body already exists"},
        **REPLAY_RESPONSES,
        422: {"model": ErrorResponse, "description": "invalid spec; each error names its JSON path"},
    },
)
def create_job(
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    project: ProjectDep,
    response: Response,
    spec: Annotated[dict[str, Any], Body(examples=[SPEC_EXAMPLE])],
    idempotency_key: IdempotencyKey = None,
    priority: PriorityQuery = 0,
) -> JobRead:
    """Validate, store and enqueue a job. The same Idempotency-Key with the same body again returns
    the same job (200); with a different body it is a 409. A new job's URL is in ``Location``.
    ``labels`` (string -> string) and ``notes`` may be given beside the spec's fields; they
    annotate the job, not its training."""
    body_hash = repo.request_hash(spec) if idempotency_key else None
    spec, annotations = split_annotations(spec)
    return submit_one(session, settings, dispatcher, project, response, spec, annotations, idempotency_key,
                      body_hash, priority)


def submit_one(session: Any, settings: Any, dispatcher: Any, project: str, response: Response, spec: dict[str, Any],
               annotations: Any, idempotency_key: str | None, body_hash: str | None, priority: int) -> JobRead:
    """Submit one job spec as ``POST /v1/jobs`` does (a clone too): replay a known Idempotency-Key
    (200), admit the spec (422 at its paths), store and enqueue it (201 with ``Location``)."""
    if idempotency_key:
        existing = repo.get_job_by_idempotency_key(session, idempotency_key, project)
        if existing is not None:
            response.status_code = 200
            return _replay(existing, body_hash)
    try:
        valid = check_job_spec(spec, dataset_resolver(session, project), settings)
    except SpecError as exc:
        raise SpecProblem(exc.errors) from None
    try:
        job = _insert_one(session, settings, project, valid, idempotency_key, body_hash, annotations, priority)
    except IntegrityError:  # a concurrent request with the same key won
        session.rollback()
        existing = repo.get_job_by_idempotency_key(session, idempotency_key, project) if idempotency_key else None
        if existing is None:
            raise
        response.status_code = 200
        return _replay(existing, body_hash)
    _dispatch(session, dispatcher, [(job.id, job.queue)], notice=get_engine().dialect.name == "postgresql")
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_read(job)


def _insert_one(
    session: Any, settings: Any, project: str, valid: Any, idempotency_key: str | None, body_hash: str | None,
    annotations: Any,
    priority: int = 0,
) -> Any:
    """Store one queued job with its event and outbox row, within the project's concurrent-jobs
    limit (429 otherwise). On PostgreSQL one pipelined transaction does it all (store.submit: the
    submit→running latency is the product's most visible number); elsewhere the ORM does."""
    engine = get_engine()
    if engine.dialect.name == "postgresql":
        try:
            return submit.insert_queued_jobs(
                engine, [(valid.spec, valid.queue, idempotency_key)], project_id=project,
                idempotency_hash=body_hash, max_active=settings.max_concurrent_jobs, priority=priority,
                labels=annotations.labels, notes=annotations.notes, notice=False,
            )[0]
        except submit.SlotsFull as full:
            raise slots_full(full.active, full.limit, 1) from None
    check_job_slots(session, project, 1, settings)
    job = repo.create_job(
        session, spec=valid.spec, queue=valid.queue, idempotency_key=idempotency_key, idempotency_hash=body_hash,
        project_id=project, priority=priority, labels=annotations.labels, notes=annotations.notes,
    )
    session.commit()
    return job


def _replay(existing: Any, body_hash: str | None) -> JobRead:
    """The job an Idempotency-Key already made, if this request's body is the one it was made with."""
    if existing.idempotency_hash is not None and existing.idempotency_hash != body_hash:
        raise key_reused(existing.idempotency_key, f" (job {existing.id})")
    return job_read(existing)


@router.post("/batch", response_model=BatchResult, responses=REPLAY_RESPONSES)
def create_batch(
    body: BatchCreate, session: SessionDep, settings: SettingsDep, dispatcher: DispatcherDep, project: ProjectDep,
    idempotency_key: IdempotencyKey = None,
) -> BatchResult:
    """Submit up to 1000 specs: a result per item (an id, or errors with JSON paths). Valid items
    are stored and enqueued even when others fail. With an Idempotency-Key, a retry with the same
    body creates nothing and returns the first answer (the same ids); another body is a 409."""
    digest = idem.body_hash(body.model_dump(mode="json")) if idempotency_key else None
    if idempotency_key and digest:
        first = idem.find(session, project, "jobs.batch", idempotency_key, digest)
        if first is not None:
            return BatchResult.model_validate(first)
    resolver = dataset_resolver(session, project)
    results: list[BatchItem] = []
    valid_items: list[tuple[int, Any]] = []
    for i, raw in enumerate(body.jobs):
        try:
            valid_items.append((i, check_job_spec(raw, resolver, settings)))
        except SpecError as exc:
            results.append(BatchItem(index=i, status="invalid", errors=[ErrorItem(**e) for e in exc.errors]))
    if valid_items:
        check_job_slots(session, project, len(valid_items), settings)
    jobs = (
        repo.create_jobs(session, [(v.spec, v.queue, None) for _, v in valid_items], project_id=project,
                         priority=body.priority)
        if valid_items else []
    )
    results += [BatchItem(index=i, id=j.id, status="created") for (i, _), j in zip(valid_items, jobs, strict=True)]
    results.sort(key=lambda r: r.index)
    result = BatchResult(created=len(jobs), invalid=len(body.jobs) - len(jobs), results=results)
    replayed = idem.commit_once(session, project, "jobs.batch", idempotency_key, digest, result.model_dump(mode="json"),
                                BatchResult.model_validate)
    if replayed is not None:
        return replayed
    if jobs:
        _dispatch(session, dispatcher, [(j.id, j.queue) for j in jobs])
    return result


@router.get("", response_model=JobList, responses={422: {"model": ErrorResponse}})
def list_jobs(
    session: ReadSessionDep,
    project: ProjectDep,
    status: Annotated[list[JobStatus] | None, Query(description="repeat to give several")] = None,
    name: Annotated[str | None, Query(pattern=r"^[^\x00]*$", description="exact name")] = None,
    name_prefix: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$", description="names starting so")] = None,
    label: Annotated[list[Annotated[str, StringConstraints(pattern=LABEL_FILTER.pattern)]] | None,
                     Query(description="key=value; repeat to require several labels")] = None,
    stop_reason: Annotated[list[Literal[STOP_REASON_FILTERS]] | None,  # type: ignore[valid-type]
                           Query(description="repeat to give several")] = None,
    id: Annotated[list[Annotated[str, StringConstraints(pattern=ID.pattern)]] | None,  # noqa: A002
                  Query(max_length=MAX_LIST_IDS, description=f"only these job ids; repeat (up to {MAX_LIST_IDS}; "
                        "more through POST /v1/jobs/query)")] = None,
    created_after: IsoDatetime | None = None,
    created_before: IsoDatetime | None = None,
    updated_after: Annotated[IsoDatetime | None, Query(description="changed after this time")] = None,
    sweep_id: Annotated[
        str | None, Query(pattern="^[0-9a-f]{32}$", description="only the trials of this sweep")
    ] = None,
    order_by: Annotated[Literal["created", "updated", "best"], Query(
        description="created: newest first; updated: most recently changed first; best: the smallest best "
                    "value first (jobs without a finite one last)")] = "created",
    order: Annotated[Literal["asc", "desc"] | None, Query(description="reverse the order's direction")] = None,
    cursor: Annotated[str | None, Query(max_length=300, pattern="^[A-Za-z0-9_-]+$",
                                        description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    """Jobs, filtered, in ``order_by`` order, with cursor pagination."""
    flt = repo.JobFilter(
        status=status or (), name=name, name_prefix=name_prefix, created_after=created_after,
        created_before=created_before, updated_after=updated_after, sweep_id=sweep_id, stop_reason=stop_reason or (),
        labels=parse_label_filters(label), ids=id or (),
    )
    rows = repo.list_jobs(session, flt, limit=limit, cursor=decode_cursor(cursor, order_by), project_id=project,
                          order_by=order_by, descending=None if order is None else order == "desc")
    page = rows[:limit]
    more = len(rows) > limit
    return JobList(jobs=[job_summary(j) for j in page],
                   next_cursor=encode_cursor(repo.job_cursor(page[-1], order_by), order_by) if more else None)


@router.post("/query", response_model=JobQueryResult,
             responses={422: {"model": ErrorResponse, "description": "a bad body; each error names its JSON path"}})
def query_jobs(body: JobQuery, session: ReadSessionDep, project: ProjectDep) -> JobQueryResult:
    """The jobs ``ids`` (up to 10,000, in a JSON body: a list request's ``?id=`` takes 500) as the
    list shows them, in the order given; ids that are not jobs of the project are listed in
    ``missing`` (not a 404). A read: nothing changes, so a client may repeat it freely. This is
    what the Python client's ``wait(ids)`` asks once per cycle."""
    ids = list(dict.fromkeys(body.ids))
    rows = repo.list_jobs(session, repo.JobFilter(ids=ids), limit=len(ids), project_id=project)
    found = {j.id: job_summary(j) for j in rows}
    return JobQueryResult(jobs=[found[j] for j in ids if j in found], missing=[j for j in ids if j not in found])


# The two routes dashboards poll live on their own router (see api.app): their single query also
# resolves the API key (store.fastread), instead of the separate key lookup of every other route,
# so a poll is one database round trip with or without keys.
poll_router = APIRouter(prefix="/jobs", tags=["jobs"])


def _json(body: bytes) -> Response:
    return Response(content=body, media_type="application/json")


@poll_router.get("/{job_id}", response_model=JobRead, responses={404: {"description": "no such job"}, **AMBIGUOUS})
async def get_job(job_id: str, request: Request, caller: PollCallerDep) -> Response:
    """The job, its progress, best value, spec (with effective defaults) and what the engine reported.
    (Served by :mod:`store.fastread` on :mod:`store.pollread`'s connections: one query, the stored
    spec passed through as JSON text.)"""
    engine = get_engine()
    key, body = await fastread.read_job(engine, job_id, caller)
    await admit_poll(request, caller, key)
    if body is None and (full := await _polled_prefix(job_id, caller, key)) is not None:
        key, body = await run_in_threadpool(fastread.job_json, engine, full, caller)
    if body is None:
        raise _not_found(job_id)
    return _json(body)


@poll_router.get("/{job_id}/metrics", response_model=MetricsRead,
                 responses={404: {"description": "no such job"}, **AMBIGUOUS})
async def get_metrics(
    job_id: str,
    request: Request,
    caller: PollCallerDep,
    since_epoch: Annotated[int, Query(ge=0, le=MAX_INT32, description="only epochs after this one")] = 0,
    max_points: Annotated[int | None, Query(ge=1, le=fastread.MAX_POINTS, description="downsample evenly (keeps the last)")] = None,
) -> Response:
    """Per-epoch metrics. Non-finite values are the strings "NaN", "Infinity", "-Infinity"."""
    engine = get_engine()
    key, body = await fastread.read_metrics(engine, job_id, caller, since_epoch, max_points)
    await admit_poll(request, caller, key)
    if body is None and (full := await _polled_prefix(job_id, caller, key)) is not None:
        key, body = await run_in_threadpool(fastread.metrics_json, engine, full, caller, since_epoch, max_points)
    if body is None:
        raise _not_found(job_id)
    return _json(body)


def _poll_events(
    job_id: str, after: int, project: str, key_id: str | None = None
) -> tuple[list[tuple[int, str, dict[str, Any]]], str | None]:
    """New events and the job's status (None when the job is not the project's, or the caller's
    key has been revoked since the stream began: the stream then ends)."""
    status_q = repo.select_job_status(job_id, project)
    if key_id is not None:
        status_q = status_q.where(keys.key_is_live(key_id))
    with session_scope(write=False) as s:
        status = s.scalar(status_q)
        if status is None:
            return [], None
        events = [(e.id, e.kind, e.data) for e in repo.events_after(s, job_id, after)]
    return events, status


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "events 'state' and 'epoch'"},
               400: {"model": ErrorResponse, "description": "Last-Event-ID is not an event id"},
               404: {"description": "no such job"}, **AMBIGUOUS},
)
async def job_events(
    job_id: str,
    request: Request,
    project: ProjectDep,
    # typed str (not str | None) so the document says "a string of digits", without a null branch;
    # the pattern is documented, and checked below (a 400, as before, rather than FastAPI's 422)
    last_event_id: Annotated[
        str, Header(alias="Last-Event-ID", description="an event id",
                    json_schema_extra={"pattern": LAST_EVENT_ID.pattern})
    ] = None,  # type: ignore[assignment]
    after: Annotated[
        int | None, Query(ge=0, le=MAX_INT64, description="like Last-Event-ID, for clients that cannot set headers")
    ] = None,
    poll_interval: Annotated[float, Query(ge=0.05, le=10, description="ignored: events are pushed as they commit "
                                          "(kept so older clients' URLs still work)")] = 0.25,
) -> EventSourceResponse:
    """Server-Sent Events: ``state`` (status changes) and ``epoch`` (an epoch's metrics) as they
    land, each with an increasing id; resume with Last-Event-ID. The stream ends after the job's
    terminal state."""
    start = after or 0
    if last_event_id is not None:
        m = LAST_EVENT_ID.match(last_event_id)
        start = (int(m.group(1)) if m.group(1) else start) if m else -1
        if not 0 <= start <= MAX_INT64:
            raise HTTPException(status_code=400, detail="Last-Event-ID must be an event id (an integer)") from None
    key_id = authenticate(request).key_id
    job_id = await resolve_id_async(Job, job_id, project, "job")
    slots = request.app.state.stream_slots
    slots.open(project)  # 429 past the project's open streams (api.limits.StreamSlots)
    try:
        _, status = await run_in_threadpool(_poll_events, job_id, MAX_INT64, project, key_id)
    except BaseException:
        slots.close(project)
        raise
    if status is None:
        slots.close(project)
        raise _not_found(job_id)

    async def stream() -> Any:
        try:
            # pushed by the process's change reader (api.changes): no query per client per tick
            async for c in follow(request.app.state.changes, project_id=project, after=start, job_id=job_id,
                                  is_disconnected=request.is_disconnected, key_id=key_id):
                yield ServerSentEvent(data=json.dumps(c.data, allow_nan=False), event=c.kind, id=str(c.id))
        finally:
            slots.close(project)

    return EventSourceResponse(stream(), ping=15)


@router.post(
    "/{job_id}/cancel",
    response_model=JobRead,
    responses={404: {"description": "no such job"},
               409: {"description": "the job already ended (succeeded, failed or cancelled), or the id is a prefix "
                                    "of several ids (the detail lists them)"}},
)
def cancel_job(job_id: str, session: SessionDep, project: ProjectDep) -> JobRead:
    """A queued job is cancelled at once and never starts; a running one stops within about a
    second of training and ends ``cancelled`` (cancelling it again while it stops is a 200). A
    job that already ended (succeeded, failed or cancelled) is a 409."""
    job_id = _full_id(session, job_id, project)
    before = session.scalar(repo.select_job_status(job_id, project))
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


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    responses={404: {"description": "no such job"},
               409: {"description": "the job has not ended (cancel it first), or it is a sweep trial (delete its "
                                    "sweep), or the id is a prefix of several ids"}},
)
def delete_job(job_id: str, session: SessionDep, project: ProjectDep) -> Response:
    """Delete a job that ended (succeeded, failed or cancelled): its row, metrics, events,
    checkpoints and exports, and their files in the artifact store. A queued, running or paused
    job is a 409 (cancel it first); so is a sweep's trial (``DELETE /v1/sweeps/{id}`` deletes the
    sweep with its trials)."""
    job_id = _full_id(session, job_id, project)
    job = repo.get_job(session, job_id, project)
    if job is None:
        raise _not_found(job_id)
    if job.sweep_id is not None:
        raise HTTPException(status_code=409, detail=f"job {job_id} is a trial of sweep {job.sweep_id}: delete the "
                                                    "sweep (DELETE /v1/sweeps/{id}) to delete its trials")
    if not repo.delete_jobs(session, [job_id]):
        raise HTTPException(status_code=409, detail=f"job {job_id} is {job.status}: only a job that ended "
                                                    "(succeeded, failed or cancelled) can be deleted; cancel it first")
    session.commit()
    MODEL_REFS.forget_jobs([job_id])  # its cached prediction model (this process's)
    return Response(status_code=204)


@router.patch(
    "/{job_id}",
    response_model=JobRead,
    responses={404: {"description": "no such job"},
               409: {"description": "the job is no longer queued (its priority no longer matters)"},
               422: {"model": ErrorResponse, "description": "invalid body; each error names its JSON path"}},
)
def patch_job(job_id: str, session: SessionDep, project: ProjectDep, body: JobPatch | None = None) -> JobRead:
    """Change a queued job's ``priority`` (it moves in the queue at once: the next free worker
    of its queue claims the highest-priority queued job; a job that already started is a 409),
    and/or its ``labels`` (replaced whole) and ``notes`` (any time)."""
    body = body or JobPatch()  # no body: nothing to change (the job's existence is still checked)
    job_id = _full_id(session, job_id, project)
    status = session.scalar(repo.select_job_status(job_id, project))
    if status is None:
        raise _not_found(job_id)
    if body.priority is not None and not scheduling.set_priority(session, job_id, body.priority):
        session.rollback()
        raise HTTPException(status_code=409, detail=f"job {job_id} is {status}, not queued: its priority can "
                                                    "only change while it waits in the queue")
    annotate(session, Job, job_id, project, body)
    session.commit()
    job = repo.get_job(session, job_id)
    assert job is not None
    return job_read(job)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList,
            responses={404: {"description": "no such job"}, **AMBIGUOUS})
def list_checkpoints(job_id: str, session: ReadSessionDep, project: ProjectDep) -> CheckpointList:
    job_id = _full_id(session, job_id, project)
    rows = repo.list_checkpoints(session, job_id, project)
    if not rows and not repo.job_exists(session, job_id, project):
        raise _not_found(job_id)
    return CheckpointList(checkpoints=[checkpoint_read(c, stored) for c, stored in rows])


@router.get(
    "/{job_id}/checkpoints/best",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}},
              "description": "safetensors file; its sha256 (hex) in X-Checkpoint-SHA256 and ETag"},
        **DOWNLOAD_RESPONSES,
        404: {"description": "no such job, or no checkpoint yet"},
        **AMBIGUOUS,
        500: {"model": ErrorResponse, "description": "the stored checkpoint is corrupt (its bytes no longer match "
                                                     "their sha256, or are not a safetensors file) or missing from "
                                                     "the artifact store; never served"},
    },
)
def best_checkpoint(job_id: str, session: ReadSessionDep, project: ProjectDep) -> Response:
    """The best weights as a ``.safetensors`` file, from the artifact store (see
    :func:`serve_checkpoint`: Range requests, or a redirect to a presigned URL). Bytes whose
    sha256 is not the recorded one, or that are not a safetensors file, are refused (500), never
    served; so is a file missing from the store. HEAD answers the same status and headers without
    the body."""
    job_id = _full_id(session, job_id, project)
    ck = repo.best_checkpoint(session, job_id, project)
    if ck is None:
        status = session.scalar(repo.select_job_status(job_id, project))
        if status is None:
            raise _not_found(job_id)
        if status in TERMINAL_STATUSES:
            raise HTTPException(status_code=404, detail=f"job {job_id} ended without a checkpoint ({status})")
        raise HTTPException(status_code=404, detail=f"job {job_id} has no checkpoint yet")
    return serve_checkpoint(job_id, ck, "best")


def serve_checkpoint(job_id: str, ck: Any, label: str) -> Response:
    """Serve checkpoint ``ck`` (its row) as ``{job_id}-{label}.safetensors``: the best's route
    and those of the others (api.routers.models) share it.

    - A store that presigns URLs (S3) answers 307 to one, with the sha256 in the headers: the
      bytes go from the bucket to the client, which verifies them (client/api.py does).
    - Otherwise the file is checked first (its sha256, hashed in chunks, and the safetensors
      format: 500 if either is wrong, 500 if it is missing) and sent by Starlette's FileResponse,
      which answers Range requests (206) and HEAD. A local file checked once is not re-hashed
      until it changes (store.artifact_store.ArtifactStore.verify)."""
    store = get_store()
    sha256, epoch, what = ck.sha256, ck.epoch, f"the {label} checkpoint of job {job_id} (epoch {ck.epoch})"
    headers = {"X-Checkpoint-SHA256": sha256, "X-Checkpoint-Epoch": str(epoch), "ETag": f'"{sha256}"'}
    filename = f"{job_id}-{label}.safetensors"
    url = store.presign(ck.uri, get_settings().artifacts_presign_s)
    if url is not None:
        return RedirectResponse(url, status_code=307, headers=headers)
    head = store.verify(ck.uri, sha256, ck.size, what)
    problem = _checkpoint_problem(head, ck.size)
    if problem is not None:
        raise HTTPException(status_code=500, detail=f"{what} is corrupt: {problem}; refusing to serve it")
    path = store.local_path(ck.uri)
    if path is not None:
        return FileResponse(path, media_type="application/octet-stream", headers=headers, filename=filename)

    def send() -> Any:
        again = hashlib.sha256()
        for chunk in store.chunks(ck.uri):
            again.update(chunk)
            yield chunk
        if again.hexdigest() != sha256:  # changed between the check and the send: cut the download
            raise RuntimeError(f"{what} changed while it was sent")

    return StreamingResponse(send(), media_type="application/octet-stream", headers={
        **headers, "Content-Length": str(ck.size), "Content-Disposition": f'attachment; filename="{filename}"'})


# HEAD on the checkpoint URL (download tools and proxies ask before fetching): the GET route's
# own status and headers; the server sends no body for a HEAD.
router.add_api_route(
    "/{job_id}/checkpoints/best", best_checkpoint, methods=["HEAD"], response_class=Response, include_in_schema=False
)
