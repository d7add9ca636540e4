from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.limits import MAX_QUERY_IDS
from api.listing import ID, STOP_REASON_FILTERS
from api.schemas.common import ErrorItem, JsonInt, MetricValue
from api.schemas.dashboards import Labels, Notes
from store.scheduling import PRIORITY_MAX, PRIORITY_MIN

JobStatus = Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]
#: why a job stopped (or paused): its epochs ran out, a callback or the engine stopped it, it was
#: cancelled, a sweep pruned or paused it, it failed (``error``), its worker was lost, or its
#: attempt stalled (an enum in OpenAPI; the same values as the list's ``stop_reason`` filter)
StopReason = Literal[STOP_REASON_FILTERS]  # type: ignore[valid-type]


class Progress(BaseModel):
    epoch: int = Field(description="epochs completed (1-based count)")
    epochs: int = Field(description="epochs asked for")


class Best(BaseModel):
    monitor: str | None
    value: MetricValue = Field(description='number, or "NaN"/"Infinity"/"-Infinity"')
    epoch: int | None


class JobSummary(BaseModel):
    id: str
    name: str
    status: JobStatus
    queue: str
    stop_reason: StopReason | None = None
    error: str | None = None
    progress: Progress
    best: Best | None = None
    attempts: int
    cancel_requested: bool
    worker: str | None = None
    steps: int | None = None
    run_seconds: float | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    updated_at: datetime
    sweep_id: str | None = Field(None, description="the sweep this job is a trial of")
    trial_number: int | None = Field(None, description="its 0-based trial number within the sweep")
    trial_params: dict[str, Any] | None = Field(None, description="the sweep parameters this trial was given")
    priority: int = Field(0, description="higher starts first among the queued jobs of its queue")
    labels: dict[str, str] = Field(default_factory=dict, description="the job's labels (set at create or by PATCH)")
    notes: str | None = Field(None, description="free text (set at create or by PATCH)")


class JobRead(JobSummary):
    queue_position: int | None = Field(
        None, description="while queued: 1 = the next job its queue's next free worker starts (fair share between "
        "projects, then priority, then age; an estimate once running jobs end: README \"Scheduler\"); null otherwise")
    estimated_start_at: datetime | None = Field(
        None, description="while queued: when the job may start, estimated from its queue position, the running "
        "jobs' progress and the queue's recent job lengths (README \"Scheduler\"); null otherwise")
    spec: dict[str, Any] = Field(description="the job spec with effective defaults")
    info: dict[str, Any] | None = Field(None, description="what the engine reported (device, parameters, ...)")


class JobList(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")


class JobQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[str, StringConstraints(pattern=ID.pattern)]] = Field(
        min_length=1, max_length=MAX_QUERY_IDS,
        description=f"job ids (32 hex digits), 1 to {MAX_QUERY_IDS:,}; repeats are answered once")


class JobQueryResult(BaseModel):
    jobs: list[JobSummary] = Field(description="the jobs found, in the order their ids were given")
    missing: list[str] = Field(description="ids that are not jobs of the caller's project")


class BatchCreate(BaseModel):
    # list[Any]: an item that is not an object gets its own "invalid" result (the others are stored)
    jobs: list[Any] = Field(min_length=1, max_length=1000, description="job specs (JSON objects)")
    priority: JsonInt = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="of every job of the batch")


class JobPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    priority: Annotated[JsonInt, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX,
                                        json_schema_extra={"minimum": PRIORITY_MIN, "maximum": PRIORITY_MAX})] | None = Field(None,
                                     description="higher starts first among the queued jobs of its queue; only while queued")
    labels: Labels | None = Field(None, description="replaces the job's labels (any time)")
    notes: Notes | None = Field(None, description='replaces the job\'s notes (any time; "" or null clears them)')


class BatchItem(BaseModel):
    index: int
    id: str | None = None
    status: Literal["created", "invalid", "not_enqueued"]
    errors: list[ErrorItem] | None = None


class BatchResult(BaseModel):
    created: int
    invalid: int
    results: list[BatchItem]


class MetricsRead(BaseModel):
    job_id: str
    epochs: list[dict[str, MetricValue]] = Field(
        description='one object per epoch: epoch, loss, val_loss, metrics, lr, seconds; non-finite values '
        'are the strings "NaN", "Infinity", "-Infinity"'
    )
    total: int = Field(description="epochs available after since_epoch, before downsampling")


class CheckpointRead(BaseModel):
    id: int
    epoch: int
    step: int
    monitor: str | None
    value: MetricValue
    size: int
    sha256: str
    is_best: bool
    stored: bool = Field(description="its bytes are kept (the best and the newest checkpoint are)")
    created_at: datetime


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointRead]
