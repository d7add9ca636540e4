"""/v1/sweeps: hyperparameter searches whose trials are ordinary jobs.

A sweep is validated up front (every parameter path resolves in the base spec, every listed value
and both ends of every range give a valid trial spec, a grid's every combination too), stored with
its first trials in one transaction, and its trials' messages are sent after the commit. Workers
advance it as trials end (orchestration.sweeps.advance_sweep); this module never imports torch or worker/.
"""

from __future__ import annotations

import itertools
import math
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api import idempotency as idem
from api.annotations import annotate
from api.deps import DispatcherDep, ProjectDep, ReadSessionDep, SessionDep, SettingsDep
from api.errors import SpecProblem
from api.idempotency import REPLAY_RESPONSES, IdempotencyKey
from api.ids import AMBIGUOUS, resolve_id
from api.limits import check_job_slots
from api.predict import MODEL_REFS
from api.schemas.common import LOCATION, ErrorResponse, JsonInt
from api.schemas.sweeps import (
    MAX_TRIALS,
    SWEEP_EXAMPLE,
    ObjectiveRead,
    SweepCounts,
    SweepCreate,
    SweepList,
    SweepPatch,
    SweepRead,
    SweepStatus,
    SweepSummary,
    TrialRead,
    ValuesParameter,
)
from config.settings import Settings
from orchestration import sweeps as orchestration_sweeps
from orchestration.admission import check_job_spec, dataset_resolver, nul_errors, objective_problem
from orchestration.sweeps import advance_sweep
from store import repo, scheduling
from store import sweeps as store_sweeps
from store.db import session_scope
from store.floats import from_text
from store.models import Sweep
from store.repo import as_utc
from training import JobSpec, SpecError
from training.sweep_space import PathError, default_mode, grid_size, resolve, with_params

router = APIRouter(prefix="/sweeps", tags=["sweeps"])

#: A grid this small has every combination validated up front.
GRID_CHECK_LIMIT = 1024
#: Paths a sweep may not set (they are not hyperparameters, or are the server's).
FORBIDDEN_PATHS = ("version", "kind", "name", "data.path")
MAX_ERRORS = 50
#: Values over all parameters (each gives a trial spec that is validated up front).
MAX_TOTAL_VALUES = 2000


def _path(loc: list[Any]) -> str:
    """JSON path of a sweep request location; a parameter's name (itself a path) is quoted:
    ``parameters["optimizer.learning_rate"].min``."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 1 and loc[0] == "parameters":
            out += f'["{part}"]'
        else:
            out += ("." if out else "") + str(part)
    return out


def _err(loc: list[Any], msg: str, type_: str = "value_error") -> dict[str, Any]:
    return {"loc": loc, "path": _path(loc), "msg": msg, "type": type_}


def _untag(loc: list[Any], body: dict[str, Any]) -> list[Any]:
    """Drop the union tag pydantic leaves at the end of a whole-parameter error."""
    if len(loc) == 3 and loc[0] == "parameters" and loc[2] == "range":
        param = (body.get("parameters") or {}).get(loc[1])
        if not (isinstance(param, dict) and "range" in param):
            return loc[:2]
    return loc


def _spec_errors_text(errors: list[dict[str, Any]], limit: int = 3) -> str:
    text = "; ".join(f"{e.get('path') or '<root>'}: {e.get('msg')}" for e in errors[:limit])
    return text + (f" (and {len(errors) - limit} more)" if len(errors) > limit else "")


def check_sweep(body: Any, session: Any, project: str, settings: Settings) -> dict[str, Any]:
    """Validate a sweep request; return its stored config or raise SpecProblem listing every
    problem with its JSON path (a parameter is named as ``parameters["path"]``)."""
    from training.spec import _format_errors

    if not isinstance(body, dict):
        raise SpecProblem([_err([], f"a sweep must be a JSON object, got {type(body).__name__}", "dict_type")])
    nul = nul_errors(body)
    if nul:
        raise SpecProblem([_err(e["loc"], e["msg"], e["type"]) for e in nul])
    try:
        req = SweepCreate.model_validate(body)
    except ValidationError as exc:
        raise SpecProblem([_err(_untag(e["loc"], body), e["msg"], e["type"]) for e in _format_errors(exc, body)]) from None

    resolver = dataset_resolver(session, project)
    try:
        valid_base = check_job_spec(req.base, resolver, settings)
    except SpecError as exc:
        raise SpecProblem([_err(["base", *e["loc"]], e["msg"], e["type"]) for e in exc.errors]) from None
    base = valid_base.spec
    base_spec = JobSpec.model_validate(base)
    errors: list[dict[str, Any]] = []
    if base_spec.kind != "train":
        errors.append(_err(["base", "kind"], "a sweep's trials train: the base spec's kind must be 'train'"))
    metric = req.objective.metric
    mode = req.objective.mode or default_mode(metric)
    problem = objective_problem(base_spec, metric)
    if problem:
        errors.append(_err(["objective", "metric"], problem))

    def trial_problem(params: dict[str, Any]) -> str | None:
        """Why the trial spec with these parameters is invalid: checked like a submitted job
        (the service's limits included), and it must report the objective."""
        try:
            valid = check_job_spec(with_params(base, params), resolver, settings)
        except SpecError as exc:
            return _spec_errors_text(exc.errors)
        except PathError as exc:
            return str(exc)
        return objective_problem(JobSpec.model_validate(valid.spec), metric)

    n_values = sum(len(p.values) for p in req.parameters.values() if isinstance(p, ValuesParameter))
    if n_values > MAX_TOTAL_VALUES:
        raise SpecProblem([_err(["parameters"], f"{n_values} values in all; at most {MAX_TOTAL_VALUES} (each is validated)")])
    parameters: dict[str, dict[str, Any]] = {}
    for path, param in req.parameters.items():
        where: list[Any] = ["parameters", path]
        if path in FORBIDDEN_PATHS:
            errors.append(_err(where, f"{path} cannot be swept; allowed are the spec's hyperparameters"))
            continue
        try:
            resolve(base, path)
        except PathError as exc:
            errors.append(_err(where, f"does not resolve in the base spec (with its defaults): {exc}", "path_error"))
            continue
        dumped = param.model_dump(exclude_none=True)
        if "values" in dumped:
            for i, value in enumerate(dumped["values"]):
                why = trial_problem({path: value})
                if why:
                    errors.append(_err([*where, "values", i], f"{value!r} gives an invalid trial spec: {why}"))
        else:
            if dumped["distribution"] == "int_uniform":
                dumped["min"], dumped["max"] = int(dumped["min"]), int(dumped["max"])
            for end in ("min", "max"):
                why = trial_problem({path: dumped[end]})
                if why:
                    errors.append(_err([*where, end], f"{dumped[end]!r} gives an invalid trial spec: {why}"))
            if req.method == "grid":
                errors.append(_err(where, "grid search needs a list of values ({\"values\": [...]}) for every parameter"))
        parameters[path] = dumped
    if errors:
        raise SpecProblem(errors[:MAX_ERRORS])

    config: dict[str, Any] = {"base": base, "method": req.method, "parameters": parameters}
    max_trials = req.max_trials
    if req.method == "grid":
        size = grid_size(config)
        if max_trials is None:
            max_trials = min(size, 1000)
        if max_trials > size:
            errors.append(_err(["max_trials"], f"the grid has {size} point(s); max_trials must be at most {size}"))
        if size <= GRID_CHECK_LIMIT:
            names = list(parameters)
            for combo in itertools.product(*(parameters[n]["values"] for n in names)):
                params = dict(zip(names, combo, strict=True))
                why = trial_problem(params)
                if why:
                    errors.append(_err(["parameters"], f"the combination {params} gives an invalid trial spec: {why}"))
                    if len(errors) >= 5:
                        break
    elif max_trials is None:
        max_trials = 10
    if req.n_startup_trials is not None and req.method != "tpe":
        errors.append(_err(["n_startup_trials"], "n_startup_trials applies to method 'tpe' only"))

    et = req.early_termination.model_dump() if req.early_termination else None
    if et is not None:
        budget = _epoch_budget(base, parameters)
        et["max_epochs"] = et["max_epochs"] or budget
        if et["min_epochs"] >= et["max_epochs"]:
            errors.append(_err(
                ["early_termination", "min_epochs"],
                f"must be less than the trials' epochs ({et['max_epochs']}), or no trial could be stopped early",
            ))
        if et["pause"] and et["type"] != "asha":
            errors.append(_err(["early_termination", "pause"], "pause applies to type 'asha' only"))
        et["pause"] = et["type"] == "asha" if et["pause"] is None else et["pause"]
        if et["type"] == "hyperband" and et["max_epochs"] < et["min_epochs"] * et["reduction_factor"]:
            errors.append(_err(
                ["early_termination", "max_epochs"],
                "hyperband needs max_epochs >= min_epochs * reduction_factor (else it has a single rung; use asha)",
            ))
    if errors:
        raise SpecProblem(errors[:MAX_ERRORS])
    assert max_trials is not None
    config.update(
        name=req.name, objective={"metric": metric, "mode": mode}, max_trials=max_trials,
        max_concurrent=req.max_concurrent, early_termination=et,
        seed=req.seed if req.seed is not None else secrets.randbelow(2**32),
        n_startup_trials=req.n_startup_trials, priority=req.priority,
    )
    if req.labels is not None or req.notes is not None:
        config.update(labels=req.labels or {}, notes=req.notes)
    return config


def _epoch_budget(base: dict[str, Any], parameters: dict[str, dict[str, Any]]) -> int:
    """The most epochs a trial may run: the base's, or the largest a swept ``epochs`` can take."""
    p = parameters.get("epochs")
    if p is None:
        return int(base.get("epochs") or 1)
    if "values" in p:
        return max(int(v) for v in p["values"] if isinstance(v, int | float))
    return int(math.floor(p["max"]))


def _send(dispatcher: Any, jobs: list[tuple[str, str]]) -> None:
    """Send committed trials' messages (as POST /v1/jobs does). Their outbox rows were committed
    with them, so if the broker refuses, the outbox relay sends them later (they stay queued)."""
    if jobs:
        dispatcher.submit(jobs)


def _trial_read(v: orchestration_sweeps.TrialView) -> TrialRead:
    j = v.job
    return TrialRead(
        job_id=j.id, number=int(j.trial_number or 0), params=dict(j.trial_params or {}), status=j.status,  # type: ignore[arg-type]
        stop_reason=j.stop_reason, value=v.value, epochs_run=j.epoch, epochs=j.epochs, error=j.error,
    )


def _summary_fields(s: Sweep) -> dict[str, Any]:
    return dict(
        id=s.id, name=s.name, status=s.status, method=s.method,
        objective=ObjectiveRead(metric=s.objective_metric, mode=s.objective_mode),  # type: ignore[arg-type]
        max_trials=s.max_trials, max_concurrent=s.max_concurrent, trials_created=s.trials_created,
        priority=s.priority, best_job_id=s.best_job_id, best_value=from_text(s.best_value), stop_reason=s.stop_reason, error=s.error,
        created_at=as_utc(s.created_at), updated_at=as_utc(s.updated_at), finished_at=as_utc(s.finished_at),
        labels=s.labels or {}, notes=s.notes,
    )


def sweep_read(session: Any, sweep: Sweep) -> SweepRead:
    views = orchestration_sweeps.trial_views(session, sweep)
    counts = SweepCounts(total=len(views))
    for v in views:
        setattr(counts, v.job.status, getattr(counts, v.job.status) + 1)
        if v.job.stop_reason == "pruned":
            counts.pruned += 1
    board = orchestration_sweeps.leaderboard(views, sweep.objective_mode)
    board_read = [_trial_read(v) for v in board]
    fields = _summary_fields(sweep)
    if board_read:  # live, so it agrees with best_trial even between two advances of the sweep
        fields.update(best_job_id=board_read[0].job_id, best_value=board_read[0].value)
    return SweepRead(
        **fields, config=sweep.config, counts=counts,
        best_trial=board_read[0] if board_read else None, leaderboard=board_read,
        trials=[_trial_read(v) for v in views],
    )


def _not_found(sweep_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no sweep {sweep_id!r}")


@router.post(
    "",
    response_model=SweepRead,
    status_code=201,
    responses={201: {"headers": LOCATION},
               200: {"model": SweepRead, "description": "a sweep with this Idempotency-Key and body already exists"},
               **REPLAY_RESPONSES,
               422: {"model": ErrorResponse, "description": "invalid sweep; each error names its JSON path"},
               429: {"model": ErrorResponse, "description": "the project's concurrent-jobs limit is reached"}},
)
def create_sweep(
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    project: ProjectDep,
    response: Response,
    body: Annotated[dict[str, Any], Body(examples=[SWEEP_EXAMPLE])],
    idempotency_key: IdempotencyKey = None,
) -> SweepRead:
    """Validate and store a sweep, create its first trials (up to ``max_concurrent``) and enqueue
    them. Trials are jobs (``GET /v1/jobs?sweep_id=``); workers create the next ones as trials end.
    With an Idempotency-Key, a retry with the same body creates nothing and returns the sweep the
    first request made (200); another body is a 409."""
    digest = idem.body_hash(body) if idempotency_key else None

    def replay(first: dict[str, Any]) -> SweepRead:
        response.status_code = 200
        existing = store_sweeps.get_sweep(session, first["sweep_id"], project)
        if existing is None:  # the sweep was deleted since
            raise _not_found(first["sweep_id"])
        return sweep_read(session, existing)

    if idempotency_key and digest:
        first = idem.find(session, project, "sweeps", idempotency_key, digest)
        if first is not None:
            return replay(first)
    config = check_sweep(body, session, project, settings)
    # its trials count toward the project's concurrent-jobs limit: 429 when not even one fits
    check_job_slots(session, project, 1, settings)
    sweep = store_sweeps.create_sweep(
        session, project_id=project, name=config["name"], method=config["method"], config=config,
        objective_metric=config["objective"]["metric"], objective_mode=config["objective"]["mode"],
        max_trials=config["max_trials"], max_concurrent=config["max_concurrent"],
        priority=config.get("priority", 0), labels=config.get("labels") or {}, notes=config.get("notes"),
    )
    jobs = advance_sweep(session, sweep.id, settings)
    # the answer is read in the writing transaction, before its commit: read after it, in a new
    # transaction of this writing session (BEGIN IMMEDIATE on SQLite), it held the write lock
    # while the workers that got the trials' messages waited for it to claim them (SQLite's
    # busy handler then sleeps in steps: ~50 ms of a packed ASHA sweep's ~0.8 s)
    created = sweep_read(session, sweep)
    replayed = idem.commit_once(session, project, "sweeps", idempotency_key, digest, {"sweep_id": sweep.id}, replay)
    if replayed is not None:
        return replayed
    _send(dispatcher, jobs)
    response.headers["Location"] = f"/v1/sweeps/{sweep.id}"
    return created


@router.get("", response_model=SweepList)
def list_sweeps(
    session: ReadSessionDep,
    project: ProjectDep,
    status: Annotated[list[SweepStatus] | None, Query(description="repeat to give several")] = None,
    cursor: Annotated[str | None, Query(pattern="^[0-9a-f]{32}$", description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> SweepList:
    """Sweeps, newest first, with cursor pagination."""
    rows = store_sweeps.list_sweeps(session, project, limit=limit, cursor=cursor, status=status or ())
    page = rows[:limit]
    return SweepList(
        sweeps=[SweepSummary(**_summary_fields(s)) for s in page],
        next_cursor=page[-1].id if len(rows) > limit else None,
    )


@router.get("/{sweep_id}", response_model=SweepRead, responses={404: {"description": "no such sweep"}, **AMBIGUOUS})
def get_sweep(sweep_id: str, session: ReadSessionDep, project: ProjectDep) -> SweepRead:
    """Status, counts, every trial (parameters, status, stop reason, objective, epochs run), the
    best trial and the leaderboard (best objective first)."""
    sweep = store_sweeps.get_sweep(session, resolve_id(session, Sweep, sweep_id, project, "sweep"), project)
    if sweep is None:
        raise _not_found(sweep_id)
    return sweep_read(session, sweep)


@router.patch(
    "/{sweep_id}",
    response_model=SweepRead,
    responses={404: {"description": "no such sweep"}, 409: {"description": "the sweep already ended"},
               422: {"model": ErrorResponse, "description": "invalid body; each error names its JSON path"}},
)
def patch_sweep(sweep_id: str, session: SessionDep, project: ProjectDep, body: SweepPatch | None = None) -> SweepRead:
    """Change a running sweep's ``priority`` (its queued trials and the trials it creates from now
    on; an ended sweep is a 409), and/or its ``labels`` and ``notes`` (any time)."""
    body = body or SweepPatch()  # no body: nothing to change (the sweep's existence is still checked)
    sweep_id = resolve_id(session, Sweep, sweep_id, project, "sweep")
    sweep = store_sweeps.get_sweep(session, sweep_id, project, lock=True)
    if sweep is None:
        raise _not_found(sweep_id)
    if body.priority is not None:
        if sweep.status != "running":
            raise HTTPException(status_code=409, detail=f"sweep {sweep_id} already ended: {sweep.status}")
        scheduling.set_sweep_priority(session, sweep, body.priority)
    annotate(session, Sweep, sweep_id, project, body)
    session.commit()
    session.expire_all()
    return sweep_read(session, sweep)


@router.delete(
    "/{sweep_id}",
    status_code=204,
    response_class=Response,
    responses={404: {"description": "no such sweep"},
               409: {"description": "the sweep is running (cancel it first) or some of its trials have not ended "
                                    "yet, or the id is a prefix of several ids"}},
)
def delete_sweep(sweep_id: str, session: SessionDep, project: ProjectDep) -> Response:
    """Delete an ended sweep with its trials: their rows, checkpoints and exports, and their
    files in the artifact store. A running sweep is a 409 (cancel it first), and so is one whose
    trials are still stopping."""
    sweep_id = resolve_id(session, Sweep, sweep_id, project, "sweep")
    sweep = store_sweeps.get_sweep(session, sweep_id, project, lock=True)
    if sweep is None:
        raise _not_found(sweep_id)
    if sweep.status == "running":
        raise HTTPException(status_code=409, detail=f"sweep {sweep_id} is running: cancel it first")
    trials, left = repo.delete_sweep(session, sweep_id)
    if left:
        session.rollback()
        raise HTTPException(status_code=409, detail=f"{left} trial(s) of sweep {sweep_id} have not ended yet; "
                                                    "retry once they stop")
    session.commit()
    MODEL_REFS.forget_jobs(trials)
    return Response(status_code=204)


class ExtendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_trials: JsonInt = Field(ge=1, le=MAX_TRIALS, description="the new total of trials (more than now)")


@router.post(
    "/{sweep_id}/extend",
    response_model=SweepRead,
    responses={404: {"description": "no such sweep"},
               409: {"description": "the sweep was cancelled or failed, or max_trials is not more than now, or "
                                    "the id is a prefix of several ids"},
               422: {"model": ErrorResponse, "description": "max_trials is out of range (a grid's size at most)"}},
)
def extend_sweep(sweep_id: str, session: SessionDep, settings: SettingsDep, dispatcher: DispatcherDep,
                 project: ProjectDep, body: ExtendRequest | None = None) -> SweepRead:
    """Raise ``max_trials``: the sweep creates the extra trials (running again if it had ended
    because its trials ran out), its sampler told every trial so far, finished or not."""
    sweep_id = resolve_id(session, Sweep, sweep_id, project, "sweep")
    sweep = store_sweeps.get_sweep(session, sweep_id, project, lock=True)
    if sweep is None:
        raise _not_found(sweep_id)
    if body is None:  # (an unknown id is a 404 before the body is looked at)
        raise SpecProblem([_err(["max_trials"], "required: the new total of trials, e.g. {\"max_trials\": 40}",
                                "missing")])
    if sweep.status == "cancelled" or (sweep.status == "failed" and sweep.stop_reason != "completed"):
        raise HTTPException(status_code=409, detail=f"sweep {sweep_id} ended {sweep.status}; it cannot be extended")
    if body.max_trials <= sweep.max_trials:
        raise HTTPException(status_code=409, detail=f"sweep {sweep_id} already has max_trials {sweep.max_trials}; "
                                                    "ask for more")
    if sweep.method == "grid":
        size = grid_size(sweep.config)
        if body.max_trials > size:
            raise SpecProblem([_err(["max_trials"], f"the grid has {size} point(s); max_trials must be at most {size}")])
    store_sweeps.extend_sweep(session, sweep, body.max_trials)
    jobs = advance_sweep(session, sweep.id, settings)
    session.commit()
    _send(dispatcher, jobs)
    session.expire_all()
    return sweep_read(session, sweep)


@router.post(
    "/{sweep_id}/cancel",
    response_model=SweepRead,
    responses={404: {"description": "no such sweep"},
               409: {"description": "the sweep already ended, or the id is a prefix of several ids (listed)"}},
)
def cancel_sweep(sweep_id: str, session: SessionDep, project: ProjectDep) -> SweepRead:
    """Stop a sweep: no new trials; queued trials are cancelled at once, running ones within about
    a second of training. The sweep ends ``cancelled``."""
    sweep_id = resolve_id(session, Sweep, sweep_id, project, "sweep")
    sweep = store_sweeps.get_sweep(session, sweep_id, project, lock=True)
    if sweep is None:
        raise _not_found(sweep_id)
    if sweep.status != "running":
        raise HTTPException(status_code=409, detail=f"sweep {sweep_id} already ended: {sweep.status}")
    trials = store_sweeps.cancel_sweep(session, sweep)
    session.commit()
    for job_id in trials:  # each in its own transaction (see store.sweeps.cancel_sweep)
        with session_scope() as s:
            repo.request_cancel(s, job_id)
    session.expire_all()
    return sweep_read(session, sweep)
