"""Error bodies: 422s name JSON paths, as ``{"detail": [{"loc", "path", "msg", "type"}]}``."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from training.spec import json_path


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
    return SafeJSONResponse({"detail": out}, status_code=422)


async def spec_problem_handler(_request: Request, exc: SpecProblem) -> JSONResponse:
    return SafeJSONResponse({"detail": exc.errors}, status_code=exc.status_code)


async def database_unavailable_handler(_request: Request, exc: Exception) -> JSONResponse:
    """A database that cannot be reached (SQLAlchemy's OperationalError / InterfaceError) is a
    503 with Retry-After, in JSON like every other error (it was a plain-text 500). The error's
    text (host, port, database) is logged, not sent."""
    import logging

    logging.getLogger("trainyard.api").warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return SafeJSONResponse({"detail": "the database is unavailable; retry later"}, status_code=503,
                            headers={"Retry-After": "5"})


async def artifact_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """A stored checkpoint, snapshot or export whose file is missing from the artifact store or
    is not the recorded bytes (store.artifact_store.ArtifactError): a 500 that says which and
    why; the bytes are never served."""
    import logging

    logging.getLogger("trainyard.api").error("artifact store: %s", exc)
    return SafeJSONResponse({"detail": f"{exc}; refusing to serve it"}, status_code=500)
