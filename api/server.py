"""The HTTP server of ``trainyard api`` and ``trainyard serve``: uvicorn with a bounded request head.

``python -m api.server --host H --port P [--workers N] [--log-level L] [--no-access-log]`` runs
``api.app:create_app`` under uvicorn with :class:`GuardedHttpToolsProtocol`, uvicorn's own
httptools protocol plus the two limits uvicorn does not have (uvicorn#157: neither
``--timeout-request-start`` nor a header size limit was ever added; ``h11_max_incomplete_event_size``
only applies to the h11 protocol, and there answers 400, not 431):

* **a cap on the request head** (request line + headers, ``TRAINYARD_MAX_HEADER_BYTES``,
  default 32 KiB): a head that grows past it is answered ``431 Request Header Fields Too Large``
  and the connection is closed. Without it a 50 MB header took seconds of CPU in the event loop
  (httptools joins a header value chunk by chunk: quadratic), stalling every other request.
* **a deadline for the request head** (``TRAINYARD_HEADER_TIMEOUT``, default 10 s), from the
  connection's start, or from the first byte of the next request on a kept-alive connection,
  until the head is complete: past it the server answers ``408 Request Timeout`` (nothing if no
  byte came) and closes. Without it a connection that sends half a header stays open forever
  (slowloris). An idle kept-alive connection is closed by uvicorn's own ``timeout_keep_alive``.

Both live here, in the protocol, because nothing later can see them: an ASGI middleware only runs
once the whole head has been parsed. The body has its own limit (``api.limits.BodyLimitMiddleware``).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from config.settings import get_settings


def _response(status: int, reason: str, detail: str) -> bytes:
    from api.errors import PROBLEM_JSON, problem_bytes

    body = problem_bytes(status, detail)
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: {PROBLEM_JSON}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode("ascii") + body


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a refused head."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size cap and a deadline on each request head."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.max_head_bytes = settings.max_header_bytes
        self.head_timeout_s = settings.header_timeout_s
        self._in_head = True  # awaiting (the rest of) a request line and headers
        self._head_bytes = 0
        self._head_begun = False  # the parser has seen the first byte of this head
        self._refused = False  # a 431/408 went out; the connection is closing
        self._head_timer: asyncio.TimerHandle | None = None

    # a head starts at the connection and at the first byte of each further request
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:
            self._start_head()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        # a head that arrived in one read is only seen here, whole: measure what it parsed to
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head_bytes:
            self._refuse(431, "Request Header Fields Too Large",
                         f"the request line and headers are larger than the limit of {self.max_head_bytes} bytes")
            raise _HeadRefused  # stops the parser (uvicorn's data_received catches it as a parser error)
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # after a 431/408 the connection is closing: nothing more to say
            super().send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        counting = self._in_head
        super().data_received(data)
        # Checked after the parser has seen the chunk: a chunk that completes the head (and may
        # carry a body) reset the count; one that leaves it incomplete was all head.
        if counting and self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request line and headers are larger than the limit of {self.max_head_bytes} bytes")

    def _start_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._head_begun = False
        self._cancel_head_timer()
        if self.head_timeout_s > 0:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes or self._head_begun:
            self._refuse(408, "Request Timeout",
                         f"the request line and headers did not arrive within {self.head_timeout_s:g} s")
        else:
            self.transport.close()

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        self.logger.warning("refused a request head: %s", detail)
        self._refused = True
        self._in_head = False
        self._cancel_head_timer()
        self.transport.write(_response(status, reason, detail))
        self.transport.close()


def main(argv: list[str] | None = None) -> None:
    """Run the API under uvicorn with the limits above (``trainyard api`` and ``serve`` call this)."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m api.server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false")
    args = parser.parse_args(argv)
    settings = get_settings()
    uvicorn.run(
        "api.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
        log_level=args.log_level, access_log=args.access_log,
        http=GuardedHttpToolsProtocol,
        # the same cap for uvicorn's h11 protocol, should anything select it
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )


if __name__ == "__main__":
    main()
