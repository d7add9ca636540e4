"""Error bodies: RFC 9457 problem details (``application/problem+json``), everywhere.

Every error answer is ``{"type", "title", "status", "detail", "errors"}``: ``detail`` is a
sentence for people; ``errors`` lists what was wrong where, as ``{"loc", "path", "msg", "type"}``
items (``path`` is the JSON path, e.g. ``model.layers[2].units``; empty for the whole body). A
422 always has at least one item; other statuses have an empty list. This module is the one home
of that shape: the exception handlers, the body-limit middleware and the OpenAPI document all
build it here.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from training.spec import json_path

log = logging.getLogger("trainyard.api")

PROBLEM_JSON = "application/problem+json"


class SpecProblem(Exception):
    """Raised by routes with spec-style error dicts; rendered as a 422."""

    def __init__(self, errors: list[dict[str, Any]], status_code: int = 422) -> None:
        self.errors = errors
        self.status_code = status_code


class SafeJSONResponse(JSONResponse):
    """JSON rendered as ASCII: any Python string can be written, a lone surrogate included (it is
    escaped as ``\\udc00``). An error handler that raised UnicodeEncodeError answered 500 and
    dropped the kept-alive connection."""

    def render(self, content: Any) -> bytes:
        import json

        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error(loc: list[Any], msg: str, type_: str = "value_error") -> dict[str, Any]:
    return {"loc": loc, "path": json_path(loc), "msg": msg, "type": type_}


def summarize(errors: list[dict[str, Any]], limit: int = 3) -> str:
    """One sentence for ``detail`` from error items: ``path: msg; ...``."""
    parts = [f"{e.get('path') or '<body>'}: {e.get('msg')}" for e in errors[:limit]]
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    noun = "error" if len(errors) == 1 else "errors"
    return f"{len(errors)} {noun} in the request: " + "; ".join(parts) + more


def problem(status: int, detail: str | None = None, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The problem-details body of an error answer."""
    errors = list(errors or [])
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    if detail is None:
        detail = summarize(errors) if errors else title
    return {"type": "about:blank", "title": title, "status": status, "detail": detail, "errors": errors}


def problem_bytes(status: int, detail: str | None = None, errors: list[dict[str, Any]] | None = None) -> bytes:
    return SafeJSONResponse(problem(status, detail, errors)).body


def problem_response(
    status: int, detail: str | None = None, errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return SafeJSONResponse(problem(status, detail, errors), status_code=status, headers=headers,
                            media_type=PROBLEM_JSON)


def _safe(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # noqa: PLR0124 - NaN
        return "NaN"
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


async def request_validation_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation errors in the same shape as spec errors; ``path`` drops the
    leading ``body``."""
    out = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            # FastAPI puts the character offset in loc (["body", 9]), which reads as an array index:
            # the error is about the whole body, and the position goes in the message.
            raw = list(e.get("loc", ()))
            pos = raw[1] if len(raw) > 1 and isinstance(raw[1], int) else None
            reason = (e.get("ctx") or {}).get("error")
            msg = "the request body is not valid JSON" + (f" (at character {pos}" if pos is not None else "")
            msg += (f": {reason})" if reason else ")") if pos is not None else (f": {reason}" if reason else "")
            out.append({"loc": ["body"], "path": "", "msg": msg, "type": "json_invalid"})
            continue
        loc = [_safe(p) for p in e.get("loc", ())]
        rel = loc[1:] if loc and loc[0] == "body" else loc
        out.append({"loc": loc, "path": json_path(rel), "msg": e.get("msg", ""), "type": e.get("type", "")})
    return problem_response(422, errors=out)


async def spec_problem_handler(_request: Request, exc: SpecProblem) -> JSONResponse:
    return problem_response(exc.status_code, errors=exc.errors)


async def http_exception_handler(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return problem_response(exc.status_code, detail, headers=dict(exc.headers or {}))


async def database_unavailable_handler(_request: Request, exc: Exception) -> JSONResponse:
    """A database that cannot be reached (SQLAlchemy's OperationalError / InterfaceError) is a
    503 with Retry-After, a problem document like every other error (it was a plain-text 500).
    The error's text (host, port, database) is logged, not sent."""
    log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return problem_response(503, "the database is unavailable; retry later", headers={"Retry-After": "5"})


async def unhandled_exception_handler(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(500, "internal server error; the server's log has the details")


def document_problems(openapi: dict[str, Any]) -> dict[str, Any]:
    """Make the OpenAPI document say what the handlers above send: every 4xx/5xx answer is
    ``application/problem+json`` with the :class:`api.schemas.common.Problem` schema (FastAPI's
    generated 422 schema and plain ``application/json`` error contents are replaced)."""
    ref = {"$ref": "#/components/schemas/Problem"}
    ours = {None, ref["$ref"], "#/components/schemas/HTTPValidationError"}
    for ops in openapi.get("paths", {}).values():
        for op in ops.values():
            for code, resp in (op.get("responses") or {}).items():
                if not (code.isdigit() and int(code) >= 400):
                    continue
                schemas = [c.get("schema", {}).get("$ref") for c in (resp.get("content") or {}).values()]
                if all(s in ours for s in schemas):  # not a route's own error body (/readyz's 503)
                    resp["content"] = {PROBLEM_JSON: {"schema": ref}}
    schemas = openapi.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError", "ErrorResponse"):
        schemas.pop(name, None)
    return openapi


async def artifact_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """A stored checkpoint, snapshot or export whose file is missing from the artifact store or
    is not the recorded bytes (store.artifact_store.ArtifactError): a 500 problem that says which
    and why; the bytes are never served."""
    log.error("artifact store: %s", exc)
    return problem_response(500, f"{exc}; refusing to serve it")
