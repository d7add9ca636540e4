"""Schemathesis against the app's own OpenAPI document, on the real database and broker: every
operation, a fixed number of derandomized examples each (valid and invalid inputs), all of
Schemathesis' default checks (no server error, status codes / content types / headers / bodies as
documented, invalid input rejected, auth not ignored...). A failure prints a reproducing request.

Requests carry a key of a project without limits (so the 429 of the rate limit never masks
anything); negative cases without the Authorization header, and the ``ignored_auth`` check, prove
that leaving the key out is refused.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from .conftest import REDIS_URL, RUN_ID

#: examples per operation: fixed (and derandomized), so CI runs the same cases every time; about 40 s
#: here. TRAINYARD_SCHEMATHESIS_EXAMPLES=1000 hunts further.
EXAMPLES = int(os.environ.get("TRAINYARD_SCHEMATHESIS_EXAMPLES", "100"))


def _app() -> Any:
    """The app with keys required and no rate or job limits. Building it touches no database or
    broker (the engine is made on the first request, from the environment ``inproc_env`` sets), so
    it can be built when pytest collects this module: schemathesis' pytest integration needs the
    schema then (its lazy ``from_fixture`` loader does not run on pytest 9)."""
    from api.app import create_app
    from config.settings import Settings

    return create_app(Settings(
        database_url="(from TRAINYARD_DATABASE_URL, set by inproc_env)", broker_url=REDIS_URL,
        data_dir=Path(tempfile.mkdtemp(prefix="trainyard-schemathesis-")), queue_prefix=f"ty-{RUN_ID}-inproc-",
        auth="required", requests_per_minute=0, max_concurrent_jobs=0, gc_freeze=False,
    ))


# The document comes from the app object without running it: ``from_asgi`` would start the app's
# lifespan (its outbox relay thread) at collection, before ``inproc_env`` points it at the test
# database. Requests still go to the app in-process (schemathesis' ASGI transport).
APP = _app()


def _document() -> dict[str, Any]:
    """The app's document, with one size narrowed for generation only: a batch holds at most 3
    job specs here (the app allows 1000; generating up to 1000 specs from the job spec's schema
    takes many minutes per example, and says nothing more than 3 do)."""
    import copy

    doc = copy.deepcopy(APP.openapi())
    doc["components"]["schemas"]["BatchCreate"]["properties"]["jobs"]["maxItems"] = 3
    return doc


#: Operations whose bodies are typed with the job spec's JSON Schema (38 definitions, nested unions).
#: Schemathesis' coverage phase walks every keyword of a body schema (each bound, each branch of each
#: union) whatever ``max_examples`` says: for these bodies that is thousands of requests, minutes
#: each. They are fuzzed (a fifth of the examples, in a test of their own) and run their documented
#: examples; the coverage phase runs on every other operation.
SPEC_TYPED = ["create_job", "create_batch", "create_sweep"]


def _without_coverage() -> Any:
    from schemathesis.config import SchemathesisConfig

    return SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False}}})


#: GET /v1/events is an endless stream (a project's events, for as long as the client stays): a
#: request to it never completes, so it is left out here and tested with a real HTTP client in
#: test_dashboards_stream.py (and its 400 for a bad Last-Event-ID there too).
schema = schemathesis.openapi.from_dict(_document()).exclude(path="/v1/events")
schema.app = APP
spec_typed = schemathesis.openapi.from_dict(_document(), config=_without_coverage()).include(operation_id=SPEC_TYPED)
spec_typed.app = APP


@pytest.fixture(scope="module")
def api_key(inproc_env: dict[str, str]) -> Iterator[str]:
    from schemathesis.python.asgi import shutdown_lifespans

    from .test_auth import _unique, new_key

    yield new_key(_unique("schemathesis"))[0]
    shutdown_lifespans()  # stop the app's background threads while the test database still exists


#: Operations whose input has rules an OpenAPI schema cannot state (a job spec's cross-field
#: checks against its dataset, a schedule's, an uploaded file's contents): a schema-valid request
#: may be refused, with a 422 that names the JSON path at fault. For these, Schemathesis'
#: ``positive_data_acceptance`` is replaced by :func:`valid_or_explained`.
SEMANTIC_422 = {"POST /v1/jobs", "POST /v1/schedules/preview", "POST /v1/datasets", "POST /v1/sweeps",
                "POST /v1/jobs/{job_id}/predict", "POST /v1/jobs/{job_id}/predict/file",
                "POST /v1/jobs/validate", "POST /v1/jobs/{job_id}/clone",
                "GET /v1/jobs"}  # GET /v1/jobs: a cursor must come from the same order


def valid_or_explained(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schema-valid request is accepted, or refused with a 422 listing errors with a path and a
    message (a real validation answer, never a framework error or a 400)."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    if response.status_code == 422:
        errors = response.json()["errors"]
        assert isinstance(errors, list) and errors, response.text
        assert all(isinstance(e.get("path"), str) and e.get("msg") for e in errors), response.text
    else:
        assert response.status_code < 400 or response.status_code in (401, 404, 409, 429), response.text
    return None


#: Operations that take many items and answer each on its own (a batch of job specs): an item the
#: schema refuses gets its own "invalid" result while the valid ones are stored, so the request as
#: a whole is a 200. For these, ``negative_data_rejection`` is replaced by :func:`items_explained`.
PER_ITEM = {"POST /v1/jobs/batch"}


def items_explained(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every item of an accepted batch has its result: created with an id, or invalid with errors
    that have a path and a message."""
    if response.status_code != 200:
        return None
    body = response.json()
    assert len(body["results"]) == len(case.body["jobs"]) == body["created"] + body["invalid"], response.text
    for r in body["results"]:
        if r["status"] == "created":
            assert r["id"], response.text
        else:
            assert r["errors"] and all(isinstance(e["path"], str) and e["msg"] for e in r["errors"]), response.text
    return None


@schema.exclude(operation_id=SPEC_TYPED).parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case: Any, api_key: str) -> None:
    _call_and_validate(case, api_key)


@spec_typed.parametrize()
@settings(max_examples=max(1, EXAMPLES // 5), derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_spec_typed_operations_conform_to_the_document(case: Any, api_key: str) -> None:
    _call_and_validate(case, api_key)


def _call_and_validate(case: Any, api_key: str) -> None:
    # Generated cases carry a random bearer token: swap in a real key. A negative case may leave the
    # header out on purpose (it must then be refused), so a missing one stays missing.
    headers = {"Authorization": f"Bearer {api_key}"} if "Authorization" in (case.headers or {}) else None
    if case.operation.label in PER_ITEM:
        case.call_and_validate(headers=headers, excluded_checks=[negative_data_rejection],
                               additional_checks=[items_explained])
    elif case.operation.label in SEMANTIC_422:
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance],
                               additional_checks=[valid_or_explained])
    else:
        case.call_and_validate(headers=headers)
