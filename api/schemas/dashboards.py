"""Schemas of the dashboards' API: labels and notes, bulk metrics, the dry run."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from api.schemas.common import MetricValue


def _not_a_boolean(value: Any) -> Any:
    # JSON Schema's integer takes 5 and 5.0 but never true/false; pydantic would read true as 1
    if isinstance(value, bool):
        raise ValueError("expected an integer, not a boolean")
    return value


#: an integer as JSON Schema means it (5.0 is one, true is not)
WholeNumber = Annotated[int, BeforeValidator(_not_a_boolean)]

MAX_LABELS = 50
#: a label key: letters, digits and ``._-/``, starting with a letter or digit (like Kubernetes')
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_LABELS, json_schema_extra={"additionalProperties": False}, description=(
    f"string -> string, at most {MAX_LABELS}; keys: 1-63 letters, digits or ._-/ starting with a "
    "letter or digit; values: up to 200 characters"))]
Notes = Annotated[str, StringConstraints(max_length=10_000, pattern=r"^[^\x00]*$")]


class Annotations(BaseModel):
    """``labels`` and ``notes`` as given at create (beside a job spec's own fields) or by PATCH."""

    model_config = ConfigDict(extra="forbid")
    labels: Labels | None = Field(None, description="replaces the labels when given")
    notes: Notes | None = Field(None, description="replaces the notes when given (\"\" clears them)")


class BulkJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern="^[0-9a-f]{32}$")
    since_epoch: Annotated[WholeNumber, Field(ge=0, le=2**31 - 1, json_schema_extra={"minimum": 0, "maximum": 2**31 - 1})] = Field(0, description="only epochs after this one")


MetricKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:/-]{1,100}$")]


class BulkMetricsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    jobs: list[BulkJob] = Field(min_length=1, max_length=1000, description="up to 1,000 jobs, each with its own since_epoch")
    keys: list[MetricKey] | None = Field(
        None, max_length=40, description="only these metrics, up to 40 (epoch is always included); default: all")
    max_points: Annotated[WholeNumber, Field(ge=1, le=100_000, json_schema_extra={"minimum": 1, "maximum": 100_000})] | None = Field(None,
                                   description="downsample each curve evenly (keeps the first and last)")


class BulkCurve(BaseModel):
    epochs: list[dict[str, MetricValue]]
    total: int = Field(description="epochs after since_epoch, before downsampling")


class BulkMetrics(BaseModel):
    jobs: dict[str, BulkCurve] = Field(description="by job id")
    missing: list[str] = Field(description="ids that are not jobs of the caller's project")


class DryRun(BaseModel):
    spec: dict[str, Any] = Field(description="the normalized spec (effective defaults filled in)")
    queue: str = Field(description="the queue the job would go to")
    parameters: int | None = Field(None, description="trainable parameters (null when the input shape is unknown)")
    steps_per_epoch: int | None = Field(None, description="optimizer steps per epoch (null when unknown)")
    labels: dict[str, str] = Field(default_factory=dict)
    notes: str | None = None
