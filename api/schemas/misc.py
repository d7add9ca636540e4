from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class SchedulePreviewRequest(BaseModel):
    learning_rate: Any = Field(
        description="a number or a schedule object as in a job spec (validated as the engine does)",
        json_schema_extra={"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "object"}]},
    )
    steps: int = Field(ge=1, le=200_000)
    steps_per_epoch: int | None = Field(None, ge=1, description="needed by schedules counted in epochs")


class SchedulePreview(BaseModel):
    lr: list[float]


class DatasetRead(BaseModel):
    id: str = Field(description="name it in a spec's data.dataset")
    name: str
    filename: str
    format: str
    task: str
    input_shape: list[int]
    n_classes: int | None
    n_targets: int | None
    n_samples: int
    size: int
    sha256: str
    created_at: datetime


class DatasetList(BaseModel):
    datasets: list[DatasetRead]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    database: str
    broker: str


class Catalog(BaseModel):
    optimizers: list[dict[str, Any]]
    schedules: list[dict[str, Any]]
    initializers: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    activations: list[str]
    losses: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    regularizers: dict[str, Any]
    callbacks: list[dict[str, Any]]
    datasets: list[dict[str, Any]]
    spec_schema: dict[str, Any] = Field(description="JSON Schema of a job spec")
