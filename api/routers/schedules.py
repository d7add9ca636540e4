"""/v1/schedules: preview a learning-rate schedule without training."""

from __future__ import annotations

from fastapi import APIRouter

from api.errors import SpecProblem, error
from api.schemas.common import ErrorResponse
from api.schemas.misc import SchedulePreview, SchedulePreviewRequest
from training import SpecError, preview_schedule
from training.schedules import ScheduleError

router = APIRouter(prefix="/schedules", tags=["schedules"])


@router.post("/preview", response_model=SchedulePreview, responses={422: {"model": ErrorResponse}})
def preview(body: SchedulePreviewRequest) -> SchedulePreview:
    """The learning rate of steps 0..steps-1 (warm-up included) for a number or a schedule."""
    try:
        lr = preview_schedule(body.learning_rate, body.steps, steps_per_epoch=body.steps_per_epoch)
    except SpecError as exc:
        raise SpecProblem(exc.errors) from None
    except ScheduleError as exc:
        raise SpecProblem([error(["learning_rate"], str(exc), "schedule_error")]) from None
    return SchedulePreview(lr=lr)
