from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorItem(BaseModel):
    loc: list[Any] = Field(description="location as a list of keys and indexes")
    path: str = Field(description="the same location as a JSON path, e.g. model.layers[2].units")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: list[ErrorItem] | str


#: A metric value: a JSON number, or "NaN" / "Infinity" / "-Infinity" for non-finite values.
MetricValue = float | int | str | None
