"""The request-id layer (api/request_ids.py) on its own: the ids it makes, the caller's it keeps,
and that making one costs no system call (os.urandom released the GIL on the event loop's thread
once per request, which stopped concurrent polls from sharing their queries: BENCHMARKS.md,
"Service", issue 10)."""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from api import request_ids
from api.request_ids import RequestIds


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _echoed(headers: list[tuple[bytes, bytes]] | None = None) -> str:
    """The X-Request-ID the layer answers a GET with."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/jobs/x", "headers": headers or []}
    asyncio.run(RequestIds(_app)(scope, None, send))
    [value] = [v for k, v in sent[0]["headers"] if k == b"x-request-id"]
    assert sent[0]["headers"][0] == (b"content-type", b"text/plain")  # the app's own headers stay
    return value.decode()


def test_new_ids_are_32_hex_digits_and_distinct():
    ids = [_echoed() for _ in range(2000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_the_callers_sane_id_is_kept_and_an_odd_one_replaced():
    assert _echoed([(b"x-request-id", b"my-request-1")]) == "my-request-1"
    made = _echoed([(b"x-request-id", b"not a token; ok?")])
    assert re.fullmatch(r"[0-9a-f]{32}", made)


def test_a_new_id_makes_no_system_call(monkeypatch):
    def urandom(n: int) -> bytes:
        raise AssertionError("os.urandom on a request's path (it releases the GIL: see the module docstring)")

    monkeypatch.setattr(os, "urandom", urandom)
    assert len({_echoed() for _ in range(100)}) == 100


def test_a_forked_process_makes_other_ids_than_its_parent():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids
        try:
            os.write(write, ",".join(request_ids.new_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode().split(",")
    os.close(read)
    os.waitpid(pid, 0)
    parent = [request_ids.new_id() for _ in range(5)]
    assert len(child) == 5 and not set(child) & set(parent)
