"""/v1/jobs/{id}/continue and /v1/jobs/{id}/clone: more epochs for a finished job, and a new job
from an old one's spec with a JSON merge patch (RFC 7386)."""

from __future__ import annotations

from typing import Annotated, Any

import json_merge_patch
from fastapi import APIRouter, Body, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field

from api.annotations import split_annotations
from api.deps import DispatcherDep, ProjectDep, SessionDep, SettingsDep
from api.errors import SpecProblem, error
from api.idempotency import IdempotencyKey
from api.ids import resolve_id
from api.limits import check_job_slots
from api.schemas.common import LOCATION, ErrorResponse, JsonInt
from api.schemas.jobs import JobRead
from api.views import job_read
from store import continuation, repo
from store.models import Job

router = APIRouter(prefix="/jobs", tags=["jobs"])


class ContinueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: JsonInt = Field(ge=1, le=1_000_000, description="how many more epochs to train")


def _job(session: Any, job_id: str, project: str) -> Any:
    """The project's job ``job_id`` (a full id or a unique prefix: api.ids), else a 404."""
    job = repo.get_job(session, resolve_id(session, Job, job_id, project, "job"), project)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return job


def _epochs_span_problem(spec: dict[str, Any]) -> str | None:
    """Why more epochs would change the epochs already run: a schedule derived from the job's
    epochs (one_cycle without total_steps) would have run differently with the total."""
    lr = (spec.get("optimizer") or {}).get("learning_rate")
    if isinstance(lr, dict) and lr.get("schedule") == "one_cycle" and not lr.get("total_steps"):
        return ("its learning-rate schedule (one_cycle without total_steps) spans the job's epochs, so more epochs "
                "would not continue the same run; clone it with the total instead")
    return None


@router.post(
    "/{job_id}/continue",
    response_model=JobRead,
    responses={404: {"description": "no such job"},
               409: {"description": "the job cannot be continued (it did not run all its epochs, is a sweep "
                                    "trial, or has no state of its last epoch), or the id is a prefix of several"},
               422: {"model": ErrorResponse, "description": "the total epochs are over the server's limit"}},
)
def continue_job(job_id: str, session: SessionDep, settings: SettingsDep, dispatcher: DispatcherDep,
                 project: ProjectDep, body: ContinueRequest | None = None) -> JobRead:
    """Train a job that ran all its epochs for ``epochs`` more, from the state after its last
    one: the job goes back to ``queued``, and its metrics, checkpoints and best value carry on as
    if it had been submitted with the total (on CPU in deterministic mode, the same numbers)."""
    job = _job(session, job_id, project)  # (an unknown id is a 404 before the body is looked at)
    if body is None:
        raise SpecProblem([error(["epochs"], "required: how many more epochs, e.g. {\"epochs\": 10}", "missing")])
    why = continuation.why_not(session, job) or _epochs_span_problem(job.spec)
    if why:
        raise HTTPException(status_code=409, detail=f"cannot continue: {why}")
    total = job.epochs + body.epochs
    if total > settings.max_epochs:
        raise SpecProblem([error(["epochs"], f"{job.epochs} + {body.epochs} = {total} epochs; this server allows "
                                             f"at most {settings.max_epochs}", "limit_exceeded")])
    check_job_slots(session, project, 1, settings)
    if not continuation.continue_job(session, job, {**job.spec, "epochs": total}):
        raise HTTPException(status_code=409, detail=f"cannot continue: job {job_id} changed meanwhile")
    session.commit()
    dispatcher.submit([(job.id, job.queue)])
    session.expire_all()
    return job_read(_job(session, job.id, project))


@router.post(
    "/{job_id}/clone",
    response_model=JobRead,
    status_code=201,
    responses={201: {"headers": LOCATION},
               200: {"model": JobRead, "description": "a job with this Idempotency-Key and body already exists"},
               404: {"description": "no such job"},
               409: {"description": "the Idempotency-Key was already used with a different request body, or the id "
                                    "is a prefix of several ids"},
               422: {"model": ErrorResponse, "description": "the patched spec is invalid; each error names its path"}},
)
def clone_job(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    project: ProjectDep,
    response: Response,
    patch: Annotated[dict[str, Any] | None, Body(
        description="a JSON merge patch (RFC 7386) of the job's spec: objects merge, null removes a field "
        "(none: the same spec)",
        examples=[{"name": "longer", "epochs": 50, "optimizer": {"learning_rate": 0.0005}}],
    )] = None,
    idempotency_key: IdempotencyKey = None,
) -> JobRead:
    """A new job: this job's spec (with its effective defaults) with ``patch`` applied, validated
    and submitted like ``POST /v1/jobs`` (Idempotency-Key included), with the job's labels, notes
    and priority. Nothing of the old job's
    training state is used; for weights, set ``init_from`` to a job id."""
    from api.routers.jobs import submit_one

    source = _job(session, job_id, project)
    patch = patch or {}
    # the source's labels and notes come along (the patch may change them, as any field)
    base = {**source.spec, **({"labels": dict(source.labels)} if source.labels else {}),
            **({"notes": source.notes} if source.notes else {})}
    spec, annotations = split_annotations(json_merge_patch.merge(base, patch))
    if isinstance(spec.get("data"), dict):
        spec["data"] = {k: v for k, v in spec["data"].items() if k != "path" or v is not None}
    digest = repo.request_hash({"clone_of": job_id, "patch": patch}) if idempotency_key else None
    return submit_one(session, settings, dispatcher, project, response, spec, annotations, idempotency_key, digest,
                      source.priority)
