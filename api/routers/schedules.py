"""/v1/schedules: preview a learning-rate schedule without training."""

from __future__ import annotations

import json
import math
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from api.errors import SpecProblem, error
from api.schemas.common import ErrorResponse
from api.schemas.misc import SchedulePreview, SchedulePreviewRequest
from training import SpecError, preview_schedule
from training.schedules import ScheduleError
from training.spec import parse_learning_rate

router = APIRouter(prefix="/schedules", tags=["schedules"])

#: A preview is CPU work (up to 200,000 steps): it runs on a worker thread, one at a time per API
#: process (a thread holding the GIL slows the event loop; several would stall it), for at most
#: PREVIEW_TIME_LIMIT_S; a request that waits PREVIEW_WAIT_S for its turn gets a 503.
PREVIEW_TIME_LIMIT_S = 5.0
PREVIEW_WAIT_S = 10.0
_PREVIEW_SLOTS: dict[int, anyio.CapacityLimiter] = {}


def _preview_limiter() -> anyio.CapacityLimiter:
    """One limiter per event loop (a limiter belongs to the loop it is first used on)."""
    import asyncio

    key = id(asyncio.get_running_loop())
    if key not in _PREVIEW_SLOTS:
        _PREVIEW_SLOTS.clear()
        _PREVIEW_SLOTS[key] = anyio.CapacityLimiter(1)
    return _PREVIEW_SLOTS[key]


def _prefixed(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spec errors with their location under ``learning_rate`` (as in a job spec's optimizer)."""
    out = []
    for e in errors:
        loc = list(e.get("loc") or [])
        if not loc or loc[0] != "learning_rate":
            loc = ["learning_rate", *loc]
        out.append(error(loc, str(e.get("msg", "")), str(e.get("type", "value_error"))))
    return out


def _check_learning_rate(value: Any) -> Any:
    """The engine's own validation (training.spec.parse_learning_rate), plus what a preview
    cannot answer: a boolean is not a rate, and a rate must be finite (JSON has no NaN)."""
    if isinstance(value, bool):
        raise SpecProblem([error(["learning_rate"], "a learning rate must be a number or a schedule object, "
                                 "not a boolean", "float_type")])
    if isinstance(value, int | float) and not math.isfinite(value):
        raise SpecProblem([error(["learning_rate"], "a learning rate must be a finite number", "finite_number")])
    try:
        return parse_learning_rate(value)
    except SpecError as exc:
        raise SpecProblem(_prefixed(exc.errors)) from None


def _compute(body: SchedulePreviewRequest) -> bytes:
    """The preview's JSON body (built on the worker thread too: 200,000 floats take a while)."""
    try:
        lr = preview_schedule(body.learning_rate, body.steps, steps_per_epoch=body.steps_per_epoch,
                              time_limit_s=PREVIEW_TIME_LIMIT_S)
    except SpecError as exc:
        raise SpecProblem(_prefixed(exc.errors)) from None
    except ScheduleError as exc:
        loc = ["learning_rate", *([exc.field] if exc.field else [])]
        raise SpecProblem([error(loc, str(exc), "schedule_error")]) from None
    if not all(math.isfinite(v) for v in lr):
        raise SpecProblem([error(["learning_rate"], "this schedule gives non-finite learning rates", "finite_number")])
    return json.dumps({"lr": lr}).encode()


@router.post("/preview", response_model=SchedulePreview,
             responses={422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def preview(body: SchedulePreviewRequest) -> Response:
    """The learning rate of steps 0..steps-1 (warm-up included) for a number or a schedule."""
    _check_learning_rate(body.learning_rate)
    limiter = _preview_limiter()
    with anyio.move_on_after(PREVIEW_WAIT_S) as waiting:
        await limiter.acquire()
    if waiting.cancelled_caught:
        raise HTTPException(503, f"too many schedule previews in progress; this one waited {PREVIEW_WAIT_S:g} s "
                                 "for its turn", headers={"Retry-After": "5"})
    try:
        content = await anyio.to_thread.run_sync(_compute, body)
    finally:
        limiter.release()
    return Response(content, media_type="application/json")
