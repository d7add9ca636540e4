"""The Python client: retries (connection errors, 429/502/503/504, Retry-After honoured) against a
real local HTTP server, POSTs retried only with an Idempotency-Key; submit_many and iter_jobs
against the live API and worker."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from client import Client, TrainyardError

from .helpers import free_port, note_spec


class Flaky:
    """A real HTTP server answering each request with the next of ``script`` ((status, headers))
    and then 200/201 with a JSON body; it records every request's method, path and headers."""

    def __init__(self, script: list[tuple[int, dict[str, str]]], port: int | None = None) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.port = port or free_port()
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                flaky.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                       "at": time.monotonic()})
                status, headers = flaky.script.pop(0) if flaky.script else (201 if self.command == "POST" else 200, {})
                body = json.dumps({"id": "j1", "jobs": [], "next_cursor": None} if status < 400 else
                                  {"type": "about:blank", "title": "x", "status": status, "detail": "try later",
                                   "errors": []}).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)

    def __enter__(self) -> Flaky:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_post_is_retried_with_one_idempotency_key_honouring_retry_after():
    with Flaky([(503, {"Retry-After": "1"}), (502, {}), (429, {"Retry-After": "2"})]) as srv:
        with Client(f"http://127.0.0.1:{srv.port}", backoff=0.1) as c:
            started = time.monotonic()
            assert c.submit({"name": "x"})["id"] == "j1"
    assert [r["method"] for r in srv.requests] == ["POST"] * 4
    keys = {r["headers"]["Idempotency-Key"] for r in srv.requests}
    assert len(keys) == 1 and len(keys.pop()) >= 16
    gaps = [b["at"] - a["at"] for a, b in zip(srv.requests, srv.requests[1:], strict=False)]
    assert gaps[0] >= 0.95 and gaps[2] >= 1.95, gaps  # Retry-After: 1, then 2
    assert time.monotonic() - started >= 3


def test_a_given_key_is_sent_and_retries_give_up_with_the_last_answer():
    with Flaky([(503, {})] * 10) as srv:
        with Client(f"http://127.0.0.1:{srv.port}", retries=2, backoff=0.05) as c:
            with pytest.raises(TrainyardError) as exc:
                c.submit_batch([{"name": "x"}], idempotency_key="mine")
    assert exc.value.status_code == 503 and len(srv.requests) == 3
    assert {r["headers"]["Idempotency-Key"] for r in srv.requests} == {"mine"}


def test_a_post_without_a_key_is_not_retried():
    with Flaky([(503, {})]) as srv:
        with Client(f"http://127.0.0.1:{srv.port}", backoff=0.05) as c:
            with pytest.raises(TrainyardError):
                c.continue_job("j1", 3)
    assert len(srv.requests) == 1 and "Idempotency-Key" not in srv.requests[0]["headers"]


def test_connection_refused_is_retried_until_the_server_is_up():
    port = free_port()
    servers: list[Flaky] = []
    timer = threading.Timer(1.0, lambda: servers.append(Flaky([], port=port).__enter__()))  # listens after 1 s
    timer.start()
    try:
        with Client(f"http://127.0.0.1:{port}", retries=8, backoff=0.2) as c:
            started = time.monotonic()
            assert c.jobs()["jobs"] == []
            assert time.monotonic() - started >= 0.5
    finally:
        timer.join()
        for srv in servers:
            srv.__exit__()
    assert len(servers[0].requests) == 1  # the refused tries never reached it


def _ended_first(exc: TrainyardError) -> None:
    """A cancel that came after the job ended (a 2-epoch job may finish first): a 409 saying so."""
    assert exc.status_code == 409 and "already ended" in str(exc), exc


def test_submit_many_in_batches_is_idempotent_and_iter_jobs_pages_lazily(client: Client):
    name = f"many-{uuid.uuid4().hex[:8]}"
    specs = [note_spec(2, name=name) for _ in range(5)] + [{"epochs": "bad"}]
    sent: list[str] = []
    client._http.event_hooks["request"].append(lambda req: sent.append(f"{req.method} {req.url.path}"))
    results = client.submit_many(specs, batch_size=2, idempotency_key=f"k-{name}")
    assert sent == ["POST /v1/jobs/batch"] * 3
    assert [r["index"] for r in results] == list(range(6))
    assert [r["status"] for r in results] == ["created"] * 5 + ["invalid"]
    assert "epochs" in [e["path"] for e in results[5]["errors"]]
    again = client.submit_many(specs, batch_size=2, idempotency_key=f"k-{name}")
    assert [r["id"] for r in again] == [r["id"] for r in results]  # a rerun made nothing new

    sent.clear()
    it = client.iter_jobs(name=name, page_size=2)
    first = [next(it), next(it)]
    assert sent == ["GET /v1/jobs"]  # one page so far
    rest = list(it)
    assert sent == ["GET /v1/jobs"] * 3
    ids = [j["id"] for j in first + rest]
    assert sorted(ids) == sorted(r["id"] for r in results[:5]) and len(set(ids)) == 5
    for job_id in ids:  # clean up: the worker may have trained some to their end already
        try:
            client.cancel(job_id)
        except TrainyardError as exc:
            _ended_first(exc)


def test_async_client_retries_and_submits_many(client: Client):
    import asyncio

    from client import AsyncClient

    async def flaky() -> list[dict[str, Any]]:
        with Flaky([(503, {"Retry-After": "1"})]) as srv:
            async with AsyncClient(f"http://127.0.0.1:{srv.port}", backoff=0.05) as c:
                assert (await c.submit({"name": "x"}))["id"] == "j1"
        return srv.requests

    requests = asyncio.run(flaky())
    assert len(requests) == 2 and len({r["headers"]["Idempotency-Key"] for r in requests}) == 1

    name = f"async-{uuid.uuid4().hex[:8]}"

    async def live() -> tuple[list[dict[str, Any]], list[str]]:
        async with AsyncClient(client.url) as c:
            made = await c.submit_many([note_spec(2, name=name)] * 3, batch_size=2)
            listed = [j["id"] async for j in c.iter_jobs(name=name, page_size=2)]
            for job_id in listed:
                try:
                    await c.cancel(job_id)
                except TrainyardError as exc:
                    _ended_first(exc)
            ended = await c.wait(listed, poll=0.2, timeout=120)  # one POST /v1/jobs/query per cycle
            assert list(ended) == listed and all(j["status"] in ("cancelled", "succeeded") for j in ended.values())
            return made, listed

    made, listed = asyncio.run(live())
    assert [r["status"] for r in made] == ["created"] * 3
    assert sorted(listed) == sorted(r["id"] for r in made)


def test_wait_waits_out_a_busy_or_absent_server_and_refuses_an_unknown_id():
    with Flaky([(503, {}), (429, {"Retry-After": "0"})]) as srv, \
            Client(f"http://127.0.0.1:{srv.port}", retries=0) as c:
        with pytest.raises(TrainyardError) as err:
            c.wait(["a" * 32], poll=0.05, timeout=30)
    assert err.value.status_code == 404 and "no job" in str(err.value)  # the third answer: no such job
    assert [(r["method"], r["path"]) for r in srv.requests] == [("POST", "/v1/jobs/query")] * 3


def test_the_job_query_is_a_read_retried_honouring_retry_after_without_a_key():
    with Flaky([(429, {"Retry-After": "1"}), (503, {})]) as srv, \
            Client(f"http://127.0.0.1:{srv.port}", backoff=0.05) as c:
        assert c.jobs_by_id(["a" * 32]) == []
    assert [r["path"] for r in srv.requests] == ["/v1/jobs/query"] * 3
    assert srv.requests[1]["at"] - srv.requests[0]["at"] >= 0.9  # Retry-After: 1 honoured
    assert not any("Idempotency-Key" in r["headers"] for r in srv.requests)
