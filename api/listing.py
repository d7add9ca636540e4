"""The job list's query parameters that need more than a type: ``label=key=value`` filters and
the opaque keyset cursors of its sort orders."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from api.errors import SpecProblem, error
from orchestration.recovery import LOST_STOP_REASON, STALLED_STOP_REASON
from training.reporting import STOP_REASONS

#: every stop reason a job can have, which ``stop_reason`` filters may name: the engine's reasons
#: and the service's own ("sweep_failed": a paused trial ended with its failed sweep)
STOP_REASON_FILTERS = (*STOP_REASONS, "paused", "error", LOST_STOP_REASON, STALLED_STOP_REASON, "sweep_failed")

#: ``key=value``: the pattern of a ``label`` query parameter (documented, and split by it)
LABEL_FILTER = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._/-]{0,62})=([^\x00]{0,200})$")
ID = re.compile(r"^[0-9a-f]{32}$")


def parse_label_filters(values: list[str] | None) -> list[tuple[str, str]]:
    """``["team=vision", "stage=prod"]`` -> pairs; a 422 at ``query.label[i]`` for a malformed one."""
    out: list[tuple[str, str]] = []
    for i, raw in enumerate(values or ()):
        m = LABEL_FILTER.match(raw)
        if m is None:
            raise SpecProblem([error(["query", "label", i], f"label filter {raw!r} must be key=value (a label key "
                                     "is 1-63 letters, digits or ._-/ starting with a letter or digit)", "label_filter")])
        out.append((m.group(1), m.group(2)))
    return out


def encode_cursor(value: Any, order_by: str) -> str:
    """The opaque next_cursor of a page: the last row's id for ``created`` (as before sort orders
    existed), else its (sort value, id), base64url JSON."""
    if order_by == "created":
        return str(value)
    return base64.urlsafe_b64encode(json.dumps([order_by, *value]).encode()).decode().rstrip("=")


def decode_cursor(raw: str | None, order_by: str) -> Any:
    """The keyset position of ``raw`` for ``order_by`` (422 at ``query.cursor`` if it is not a
    next_cursor of this order)."""
    if not raw:
        return None
    if order_by == "created":
        if ID.match(raw):
            return raw
    else:
        try:
            kind, value, last_id = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
            if kind == order_by and isinstance(last_id, str) and ID.match(last_id) and (
                    value is None or isinstance(value, int | float | str)):
                return (value, last_id)
        except (ValueError, TypeError):
            pass
    raise SpecProblem([error(["query", "cursor"], f"cursor is not a next_cursor of a list ordered by {order_by!r}",
                             "cursor")])
