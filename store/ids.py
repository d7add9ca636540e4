"""Time-ordered ids: 12 hex digits of milliseconds since the epoch, then 20 random hex digits,
so sorting by id sorts by creation time (to the millisecond) and ids make stable cursors."""

from __future__ import annotations

import secrets
import time


def new_id() -> str:
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"
