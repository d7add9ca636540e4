"""One logging configuration for the API and the workers.

Lines go to stderr, as plain text (``TRAINYARD_LOG_FORMAT=text``, the default: for a terminal) or
as one JSON object per line (``json``: for a log collector). Every line carries what is known of
its context: the request id in the API (``X-Request-ID``, see :mod:`api.request_ids`), the job id
and attempt in a worker (set by :func:`job_context` around a run). Context lives in context
variables, so it follows a request through ``await`` and never leaks to another one; a thread
started inside a context sees it if started through :func:`in_current_context`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from config.settings import Settings

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trainyard_request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trainyard_job_id", default=None)
attempt: contextvars.ContextVar[int | None] = contextvars.ContextVar("trainyard_attempt", default=None)

#: the context fields, in the order they are shown
CONTEXT = (("request_id", request_id), ("job_id", job_id), ("attempt", attempt))
#: loggers of the servers we run, whose own handlers are replaced by ours (one format for all)
FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.redirected")
#: the API's access log (one line per request) when TRAINYARD_ACCESS_LOG is on
ACCESS_LOGGER = "trainyard.access"
_HANDLER_NAME = "trainyard"


class ContextFilter(logging.Filter):
    """Copies the context variables onto each record (``record.request_id`` ...; None if unset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT:
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class TextFormatter(logging.Formatter):
    """``2026-12-04 17:01:02,345 INFO trainyard.worker [job=… attempt=2] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        shown = [f"{name.split('_')[0] if name != 'request_id' else 'req'}={value}"
                 for name, _ in CONTEXT if (value := getattr(record, name, None)) is not None]
        record.context = f" [{' '.join(shown)}]" if shown else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, the context fields that
    are set, ``process`` (api or worker) and ``exc`` (the traceback) when there is one."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(), "process": self.process,
        }
        for name, _ in CONTEXT:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(settings: Settings, process: str, level: str | int | None = None) -> None:
    """Send every logger's records to one stderr handler in the configured format (replacing the
    handler this function installed before, so calling it again is harmless). The servers' own
    loggers (uvicorn, celery) lose their handlers and propagate to it; uvicorn's access log is
    off (ours, ``trainyard.access``, is on only with ``TRAINYARD_ACCESS_LOG``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter(process) if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if level is not None else settings.log_level)
    for name in FOREIGN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)  # warnings (e.g. Celery's) become lines of the same format
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger(ACCESS_LOGGER).disabled = not settings.access_log


@contextmanager
def job_context(job: str, attempt_no: int | None = None) -> Iterator[None]:
    """Every line logged inside carries ``job_id`` (and ``attempt``, once known)."""
    tokens = [(job_id, job_id.set(job)), (attempt, attempt.set(attempt_no))]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def set_attempt(attempt_no: int) -> None:
    """The attempt of the job in context, once its claim says which it is."""
    attempt.set(attempt_no)


def in_current_context(target: Callable[[], Any], **thread_kwargs: Any) -> threading.Thread:
    """A thread that runs ``target`` in a copy of the caller's context (its lines carry the
    caller's job id and attempt)."""
    ctx = contextvars.copy_context()
    return threading.Thread(target=ctx.run, args=(target,), **thread_kwargs)
