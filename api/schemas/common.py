from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, Strict


class ErrorItem(BaseModel):
    loc: list[Any] = Field(description="location as a list of keys and indexes")
    path: str = Field(description="the same location as a JSON path, e.g. model.layers[2].units")
    msg: str
    type: str


class Problem(BaseModel):
    """An error answer: RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field("about:blank", description="a URI reference naming the problem type")
    title: str = Field(description="the HTTP status phrase")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what went wrong, for people")
    errors: list[ErrorItem] = Field(
        default_factory=list, description="each problem with its location (a 422 lists at least one)"
    )


#: the name routers use in their ``responses`` (every error answer is a :class:`Problem`)
ErrorResponse = Problem


#: the documented ``Location`` header of a 201 (``responses={201: {"headers": LOCATION}}``)
LOCATION: dict[str, Any] = {"Location": {"description": "the URL of what was created", "schema": {"type": "string"}}}


#: A metric value: a JSON number, or "NaN" / "Infinity" / "-Infinity" for non-finite values.
MetricValue = float | int | str | None


def _iso_datetime(value: Any) -> Any:
    # pydantic also reads numbers ("0.5") as Unix times; the OpenAPI document promises RFC 3339
    if isinstance(value, str) and not re.match(r"^\d{4}-\d{2}-\d{2}", value.strip()):
        raise ValueError("expected an RFC 3339 date-time such as 2026-01-31T12:00:00Z")
    return value


#: A date-time query parameter: RFC 3339 text only (a naive one is UTC).
IsoDatetime = Annotated[datetime, BeforeValidator(_iso_datetime)]


def _json_int(value: Any) -> Any:
    # pydantic's lax int reads true/false and "5" as numbers; JSON Schema's integer is a number
    # (5 or 5.0), never a boolean or a string
    if isinstance(value, bool | str):
        raise ValueError("expected an integer")
    return value


#: An integer in a JSON body: a number with no fractional part (not a boolean, not a string).
JsonInt = Annotated[int, BeforeValidator(_json_int), Strict(False)]  # 5.0 too, in a strict model
