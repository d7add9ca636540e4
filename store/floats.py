"""NaN and infinity are values a metric can take. They are stored and served as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (what ``float()`` in Python and ``Number()`` in
JavaScript parse back); finite values stay JSON numbers."""

from __future__ import annotations

import math
from typing import Any

NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_float(value: Any) -> float | str | None:
    """A JSON-safe form of a number: finite floats as themselves, non-finite ones as strings."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def decode_float(value: Any) -> float | None:
    """Inverse of :func:`encode_float`."""
    if value is None:
        return None
    if isinstance(value, str):
        return NON_FINITE[value] if value in NON_FINITE else float(value)
    return float(value)


def encode_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Encode every numeric value of a metrics dict (ints such as ``epoch`` stay ints)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, int) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, float | int) or hasattr(v, "__float__"):
            out[k] = encode_float(v)
        else:
            out[k] = v
    return out


def to_text(value: Any) -> str | None:
    """A float as text for a string column (``repr`` round-trips exactly), non-finite as above."""
    enc = encode_float(value)
    return None if enc is None else (enc if isinstance(enc, str) else repr(enc))


def from_text(value: str | None) -> float | str | None:
    """Read a column written by :func:`to_text` back into its JSON-safe form."""
    if value is None:
        return None
    return value if value in NON_FINITE else float(value)


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (a sortable column's value)."""
    number = decode_float(value) if value is not None else None
    return number if number is not None and math.isfinite(number) else None
