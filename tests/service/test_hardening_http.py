"""Issue 18, high 1: the request head is bounded in size (431) and in time (408), on a real
``trainyard api`` process (api/server.py), while other requests keep being served."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import cli
from .helpers import ROOT, free_port, long_spec, stop, wait_http

HEAD_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def guarded_api(service_env: dict[str, str], migrated: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``trainyard api`` with a short head deadline (the default is 10 s) and at most two open
    event streams per project (the default is 32)."""
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "api-guarded.log"
    env = {**service_env, "TRAINYARD_HEADER_TIMEOUT": str(HEAD_TIMEOUT_S), "TRAINYARD_MAX_EVENT_STREAMS": "2"}
    with log.open("wb") as f:
        proc = subprocess.Popen(cli("api", "--port", str(port)), env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc)
        yield url
    finally:
        stop(proc)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except TimeoutError:
        pass
    return out


def test_a_huge_header_is_a_431_and_does_not_stall_other_requests(guarded_api: str) -> None:
    big = b"x" * (20 * 2**20)  # 20 MB: took seconds of event-loop CPU before the cap
    latencies: list[float] = []
    statuses: set[int] = set()
    stop_flag = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=guarded_api, timeout=10) as c:
            while not stop_flag.is_set() or len(latencies) < 5:
                t0 = time.perf_counter()
                statuses.add(c.get("/v1/jobs").status_code)
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with socket.create_connection(("127.0.0.1", _port(guarded_api))) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            try:
                s.sendall(big)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed while we were still sending
            raw = _read_response(s, 5)
    finally:
        stop_flag.set()
        poller.join()
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:200]
    assert b"connection: close" in raw.lower()
    assert b'"detail"' in raw and b"32768 bytes" in raw
    assert statuses == {200}
    assert max(latencies) < 1.0, max(latencies)


def test_headers_just_under_the_cap_are_served_and_over_it_refused_even_in_one_read(guarded_api: str) -> None:
    r = httpx.get(f"{guarded_api}/healthz", headers={"X-Pad": "y" * 30_000})
    assert r.status_code == 200
    with socket.create_connection(("127.0.0.1", _port(guarded_api))) as s:  # 40 kB: one read, complete
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"y" * 40_000 + b"\r\n\r\n")
        raw = _read_response(s, 5)
    assert raw.startswith(b"HTTP/1.1 431 ") and raw.count(b"HTTP/1.1") == 1, raw[:300]


def test_half_sent_heads_are_closed_after_the_deadline(guarded_api: str) -> None:
    socks: list[socket.socket] = []
    try:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", _port(guarded_api)))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            socks.append(s)
        silent = socket.create_connection(("127.0.0.1", _port(guarded_api)))  # not one byte sent
        socks.append(silent)
        t0 = time.monotonic()
        answers = [_read_response(s, HEAD_TIMEOUT_S + 5) for s in socks]
        waited = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    for raw in answers[:-1]:
        assert raw.startswith(b"HTTP/1.1 408 "), raw[:200]
    assert answers[-1] == b""  # closed without an answer
    assert waited < HEAD_TIMEOUT_S + 4
    # and the server still answers
    assert httpx.get(f"{guarded_api}/healthz").status_code == 200


def test_a_kept_alive_connection_trickling_its_next_head_is_closed(guarded_api: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(guarded_api))) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        first = b""
        while not first.endswith(b'"ok"}'):  # the whole first answer, head and body
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        t0 = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        trickled: Any = None
        while time.monotonic() - t0 < HEAD_TIMEOUT_S + 4:
            try:
                s.sendall(b"X-A: b\r\n")  # a header line every 0.2 s, never the end of the head
            except (BrokenPipeError, ConnectionResetError):
                s.settimeout(1)  # closed after its answer: read what arrived
                trickled = s.recv(65536)
                break
            s.settimeout(0.2)
            try:
                trickled = s.recv(65536)
                break
            except TimeoutError:
                continue
        assert trickled is not None and trickled.startswith(b"HTTP/1.1 408 "), trickled
        assert time.monotonic() - t0 < HEAD_TIMEOUT_S + 3


def test_a_slow_body_after_a_complete_head_is_not_cut_by_the_head_deadline(guarded_api: str) -> None:
    # the head deadline ends with the head: a long-running response or upload is not affected
    body = b'{"learning_rate": 0.1, "steps": 3}'
    with socket.create_connection(("127.0.0.1", _port(guarded_api))) as s:
        s.sendall(b"POST /v1/schedules/preview HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
        time.sleep(HEAD_TIMEOUT_S + 0.5)
        s.sendall(body)
        raw = _read_response(s, 3)
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]


def test_open_event_streams_are_capped_per_project(guarded_api: str) -> None:
    with httpx.Client(base_url=guarded_api, timeout=30) as c:
        job = c.post("/v1/jobs", json=long_spec()).json()
        url = f"/v1/jobs/{job['id']}/events"
        try:
            with httpx.stream("GET", guarded_api + url, timeout=30) as one, \
                    httpx.stream("GET", guarded_api + url, timeout=30) as two:
                assert one.status_code == two.status_code == 200
                third = c.get(url)
                assert third.status_code == 429 and "Retry-After" in third.headers, third.text
                assert "2 open event streams" in third.json()["detail"]
            # both closed: the slots are free again (the server notices the disconnect)
            deadline = time.monotonic() + 10
            while True:
                with httpx.stream("GET", guarded_api + url, timeout=30) as again:
                    if again.status_code == 200:
                        break
                assert time.monotonic() < deadline, "the closed streams' slots were never freed"
                time.sleep(0.3)
        finally:
            c.post(f"/v1/jobs/{job['id']}/cancel")
