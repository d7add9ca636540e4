"""Request and response models of /v1/webhooks."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from store.webhooks import EVENT_PATTERN, EVENTS, normalize_events

#: an event name or a metric threshold (checked by store.webhooks.parse_event, whose message says
#: what is allowed; the document gives the pattern)
EventName = Annotated[str, WithJsonSchema({"type": "string", "pattern": EVENT_PATTERN})]

DeliveryStatus = Literal["pending", "delivered", "failed"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=2000, pattern=r"^https?://[^\s\x00]+$",
                     description="where events are POSTed (http or https)")
    events: list[EventName] = Field(
        min_length=1, max_length=50,
        description=f"any of {', '.join(EVENTS)}, and metric thresholds such as 'val_accuracy >= 0.98' "
        "(delivered as metric.threshold, once per job: the first epoch that meets it)",
    )
    secret: str | None = Field(
        None, min_length=16, max_length=200, pattern=r"^[^\x00]*$",
        description="signs every delivery (HMAC-SHA256); default: generated, and returned once, in this answer",
    )
    description: str | None = Field(None, max_length=500, pattern=r"^[^\x00]*$")

    @field_validator("events")
    @classmethod
    def _events(cls, v: list[str]) -> list[str]:
        return normalize_events(v)


class WebhookRead(BaseModel):
    id: str
    url: str
    events: list[str]
    description: str | None = None
    created_at: datetime


class WebhookCreated(WebhookRead):
    secret: str = Field(description="the signing secret; shown only here")


class WebhookList(BaseModel):
    webhooks: list[WebhookRead]


class DeliveryRead(BaseModel):
    event_id: str = Field(description="the event's id: the same on every try (de-duplicate by it)")
    event: str
    job_id: str | None = None
    sweep_id: str | None = None
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None = Field(None, description="the receiver's HTTP status on the last try")
    last_error: str | None = None
    created_at: datetime
    next_attempt_at: datetime | None = Field(None, description="when it is tried again (pending only)")
    delivered_at: datetime | None = None
    data: dict[str, Any]


class DeliveryList(BaseModel):
    deliveries: list[DeliveryRead]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")
