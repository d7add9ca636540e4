"""Labels and notes: read beside a job spec's own fields at create, and checked once for every
route that takes them (POST /v1/jobs, the dry run, PATCH)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from api.errors import SpecProblem, error
from api.schemas.dashboards import Annotations

FIELDS = ("labels", "notes")


def check_annotations(raw: dict[str, Any], prefix: tuple[Any, ...] = ()) -> Annotations:
    """The labels and notes of ``raw`` (its other keys ignored); a 422 naming the JSON path of
    each problem otherwise."""
    try:
        return Annotations.model_validate({k: raw[k] for k in FIELDS if k in raw})
    except ValidationError as exc:
        raise SpecProblem([_problem(prefix, e) for e in exc.errors()]) from None


def _problem(prefix: tuple[Any, ...], e: Any) -> dict[str, Any]:
    loc = list(e["loc"])
    if loc and loc[-1] == "[key]":  # pydantic's marker for a bad key: the path names the key itself
        return error([*prefix, *loc[:-1]], f"label key {loc[-2]!r} must be 1-63 letters, digits or ._-/ starting "
                     "with a letter or digit", "label_key")
    return error([*prefix, *loc], e["msg"], e["type"])


def split_annotations(body: Any) -> tuple[Any, Annotations]:
    """A job body without its ``labels`` and ``notes`` (which are not part of the training spec),
    and those two, checked."""
    if not isinstance(body, dict) or not any(k in body for k in FIELDS):
        return body, Annotations()
    return {k: v for k, v in body.items() if k not in FIELDS}, check_annotations(body)


def annotate(session: Any, model: Any, object_id: str, project: str, body: Any) -> None:
    """Apply the ``labels`` and ``notes`` a PATCH body gave (a pydantic model; fields it left out
    stay as they are). One home for the rule, shared by the job and sweep routes."""
    from store import repo

    given = body.model_fields_set
    if "labels" in given or "notes" in given:
        repo.annotate(session, model, object_id, project,
                      labels=(body.labels or {}) if "labels" in given else None,
                      notes=body.notes or None, set_notes="notes" in given)
