"""Request and response models of /v1/sweeps."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from api.schemas.common import JsonInt, MetricValue
from api.schemas.dashboards import Labels, Notes
from api.schemas.jobs import JobStatus, StopReason
from store.scheduling import PRIORITY_MAX, PRIORITY_MIN

SweepStatus = Literal["running", "succeeded", "failed", "cancelled"]

MAX_TRIALS = 1000
MAX_CONCURRENT = 100
MAX_PARAMETERS = 32
MAX_VALUES = 1000


class _Strict(BaseModel):
    # strict, as job specs are: JSON types only (no "5" for 5), so the published schema is exact
    model_config = ConfigDict(extra="forbid", strict=True)


class ValuesParameter(_Strict):
    """Try each of these values (any JSON: numbers, names, objects such as a schedule)."""

    values: list[Any] = Field(min_length=1, max_length=MAX_VALUES)


class RangeParameter(_Strict):
    """Draw from a range: ``uniform`` and ``log_uniform`` (floats; log needs min > 0),
    ``int_uniform`` (integers, both ends included)."""

    distribution: Literal["uniform", "log_uniform", "int_uniform"]
    min: float = Field(allow_inf_nan=False)
    max: float = Field(allow_inf_nan=False)

    @model_validator(mode="after")
    def _ends(self) -> RangeParameter:
        if self.distribution == "int_uniform":
            if self.min != int(self.min) or self.max != int(self.max):
                raise ValueError("int_uniform needs integer min and max")
        if self.distribution == "log_uniform" and self.min <= 0:
            raise ValueError("log_uniform needs min > 0")
        if self.max <= self.min:
            raise ValueError("max must be greater than min")
        return self


def _parameter_kind(v: Any) -> str:
    return "values" if isinstance(v, dict) and "values" in v else "range"


Parameter = Annotated[
    Annotated[ValuesParameter, Tag("values")] | Annotated[RangeParameter, Tag("range")],
    Discriminator(_parameter_kind),
]


class Objective(_Strict):
    metric: str = Field(min_length=1, max_length=100, description="a metric every trial reports, e.g. val_accuracy")
    mode: Literal["min", "max"] | None = Field(None, description="default: max for accuracy-like metrics, else min")


class EarlyTermination(_Strict):
    """Stop weak trials early, in epochs: ``asha`` (asynchronous successive halving), ``hyperband``
    (several ASHA brackets), ``median`` (stop a trial whose best value so far is worse than the
    median of finished trials at the same epoch). A stopped trial ends ``succeeded`` with stop
    reason ``pruned``; with ``pause`` (asha), weak trials are paused and may be resumed."""

    type: Literal["asha", "hyperband", "median"]
    min_epochs: int = Field(1, ge=1, le=100_000, description="no trial is stopped before this many epochs")
    reduction_factor: int = Field(3, ge=2, le=100, description="asha/hyperband: keep the best 1/reduction_factor at each rung")
    max_epochs: int | None = Field(None, ge=1, le=100_000, description="hyperband's max resource; default: the trials' epochs")
    bootstrap_count: int = Field(0, ge=0, le=1000, description="asha/hyperband: trials needed at a rung before it promotes")
    n_startup_trials: int = Field(5, ge=0, le=1000, description="median: finished trials needed before it stops any")
    pause: bool | None = Field(
        None,
        description="asha (default true): ASHA with promotions (Li et al.; Determined's default). A trial that reaches a rung before "
                    "reduction_factor trials have, or outside the best 1/reduction_factor there, is paused (status "
                    "'paused', its training state snapshotted) instead of stopped, and resumed from that snapshot when "
                    "it ranks in the best 1/reduction_factor; paused trials never promoted end 'pruned'. false: Optuna's "
                    "rule, final at once, where a trial that is the best so far at a rung always goes on",
    )


class SweepCreate(_Strict):
    name: str = Field("sweep", min_length=1, max_length=200)
    base: dict[str, Any] = Field(description="a job spec; every trial is this spec with the parameters set")
    method: Literal["grid", "random", "tpe"] = Field(description="Optuna's GridSampler, RandomSampler or TPESampler")
    parameters: dict[str, Parameter] = Field(
        min_length=1, max_length=MAX_PARAMETERS,
        description='spec paths such as "optimizer.learning_rate" or "model.layers[0].units"',
    )
    objective: Objective
    max_trials: int | None = Field(None, ge=1, le=MAX_TRIALS, description="default: the grid's size (grid), else 10")
    max_concurrent: int = Field(4, ge=1, le=MAX_CONCURRENT, description="trials queued or running at once")
    early_termination: EarlyTermination | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="the sampler's seed (default: random, then stored)")
    n_startup_trials: int | None = Field(None, ge=1, le=1000, description="tpe: random trials before TPE models (default 10)")
    priority: JsonInt = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX,
                          description="of every trial: higher starts first among queued jobs of its queue")
    labels: Labels | None = Field(None, description="the sweep's labels (string -> string)")
    notes: Notes | None = Field(None, description="free text")


SWEEP_EXAMPLE: dict[str, Any] = {
    "name": "digits-lr",
    "base": {
        "data": {"dataset": "digits", "validation_split": 0.2},
        "model": {"layers": [{"type": "dense", "units": 64, "activation": "relu"}, {"type": "dense", "units": 10}]},
        "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"],
        "optimizer": {"name": "adam", "learning_rate": 0.001},
        "epochs": 27,
    },
    "method": "tpe",
    "parameters": {
        "optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-4, "max": 0.1},
        "optimizer.beta_1": {"values": [0.85, 0.89, 0.9]},
        "model.layers[0].kernel_initializer": {"values": ["glorot_normal", "he_normal"]},
    },
    "objective": {"metric": "val_accuracy", "mode": "max"},
    "max_trials": 30,
    "max_concurrent": 4,
    "early_termination": {"type": "asha", "min_epochs": 3, "reduction_factor": 3},
}


class SweepPatch(_Strict):
    priority: Annotated[JsonInt, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX,
                                        json_schema_extra={"minimum": PRIORITY_MIN, "maximum": PRIORITY_MAX})] | None = Field(None,
                                     description="of its queued trials and of the trials it creates from now on; "
                                                 "only while it runs")
    labels: Labels | None = Field(None, description="replaces the sweep's labels (any time)")
    notes: Notes | None = Field(None, description='replaces the sweep\'s notes (any time; "" or null clears them)')


class TrialRead(BaseModel):
    job_id: str
    number: int = Field(description="0-based, in creation order")
    params: dict[str, Any]
    status: JobStatus
    stop_reason: StopReason | None = Field(None, description='"pruned" when early termination stopped it')
    value: MetricValue = Field(None, description="the objective: its best value over the trial's epochs")
    epochs_run: int
    epochs: int = Field(description="the trial's epoch budget")
    error: str | None = None


class SweepCounts(BaseModel):
    queued: int = 0
    running: int = 0
    paused: int = Field(0, description="asha with pause: trials waiting at a rung for a promotion")
    succeeded: int = Field(0, description="completed or early-stopped, and pruned ones")
    pruned: int = 0
    failed: int = 0
    cancelled: int = 0
    total: int = 0


class ObjectiveRead(BaseModel):
    metric: str
    mode: Literal["min", "max"]


class SweepSummary(BaseModel):
    id: str
    name: str
    status: SweepStatus
    method: str
    objective: ObjectiveRead
    max_trials: int
    max_concurrent: int
    trials_created: int
    priority: int = Field(0, description="of its trials: higher starts first among queued jobs of a queue")
    best_job_id: str | None = None
    best_value: MetricValue = None
    stop_reason: Literal["completed", "cancelled", "error"] | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    notes: str | None = None


class SweepRead(SweepSummary):
    config: dict[str, Any] = Field(description="the validated request: base spec (effective), parameters, seed, ...")
    counts: SweepCounts
    best_trial: TrialRead | None = None
    leaderboard: list[TrialRead] = Field(description="trials that ended normally (or are paused), best objective first")
    trials: list[TrialRead] = Field(description="every trial, by number")


class SweepList(BaseModel):
    sweeps: list[SweepSummary]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")
