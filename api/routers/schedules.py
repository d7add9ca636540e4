"""/v1/schedules: preview a learning-rate schedule without training."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter

from api.errors import SpecProblem, error
from api.schemas.common import ErrorResponse
from api.schemas.misc import SchedulePreview, SchedulePreviewRequest
from training import SpecError, preview_schedule
from training.schedules import ScheduleError
from training.spec import parse_learning_rate

router = APIRouter(prefix="/schedules", tags=["schedules"])


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


@router.post("/preview", response_model=SchedulePreview, responses={422: {"model": ErrorResponse}})
def preview(body: SchedulePreviewRequest) -> SchedulePreview:
    """The learning rate of steps 0..steps-1 (warm-up included) for a number or a schedule."""
    _check_learning_rate(body.learning_rate)
    try:
        lr = preview_schedule(body.learning_rate, body.steps, steps_per_epoch=body.steps_per_epoch)
    except SpecError as exc:
        raise SpecProblem(_prefixed(exc.errors)) from None
    except ScheduleError as exc:
        raise SpecProblem([error(["learning_rate"], str(exc), "schedule_error")]) from None
    if not all(math.isfinite(v) for v in lr):
        raise SpecProblem([error(["learning_rate"], "this schedule gives non-finite learning rates", "finite_number")])
    return SchedulePreview(lr=lr)
