"""``Client``: the Trainyard HTTP API from Python (the CLI uses it too).

Metric values that are not finite arrive as the strings "NaN", "Infinity", "-Infinity";
``float()`` reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_retries import Retry, RetryTransport

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class TrainyardError(Exception):
    """An error answer from the API (an RFC 9457 problem): ``detail`` is its list of errors with
    their JSON paths when it has one (a 422), else its ``detail`` text."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"HTTP {status_code}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(f"{d.get('path') or '<root>'}: {d.get('msg')}" if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)


#: answers worth trying again (with backoff, honouring Retry-After)
RETRY_STATUSES = (429, 502, 503, 504)


def check(r: httpx.Response) -> httpx.Response:
    """``r``, or :class:`TrainyardError` for an error answer (its problem document's ``errors``
    when it lists any, else its ``detail``)."""
    if r.status_code >= 400:
        try:
            body = r.json()
            detail = body.get("errors") or body.get("detail", r.text)
        except (ValueError, AttributeError):
            detail = r.text
        raise TrainyardError(r.status_code, detail)
    return r


def _idempotency_key(given: str | None) -> str:
    return given or uuid.uuid4().hex


def _batches(specs: list[dict[str, Any]], batch_size: int, key: str | None) -> Iterator[tuple[int, list[dict[str, Any]], str]]:
    """(first index, specs, Idempotency-Key) of each request of submit_many."""
    if not 1 <= batch_size <= 1000:
        raise ValueError("batch_size must be between 1 and 1000")
    prefix = _idempotency_key(key)
    for n, start in enumerate(range(0, len(specs), batch_size)):
        yield start, specs[start:start + batch_size], f"{prefix}-{n}"


def _jobs_params(limit: int, cursor: str | None, status: list[str] | None = None, name: str | None = None,
                 sweep_id: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    for k, v in (("status", status), ("name", name), ("sweep_id", sweep_id), ("cursor", cursor)):
        if v:
            params[k] = v
    return params


def _retry(retries: int, backoff: float, methods: tuple[str, ...]) -> Retry:
    return Retry(total=retries, backoff_factor=backoff, status_forcelist=RETRY_STATUSES, allowed_methods=methods,
                 respect_retry_after_header=True, max_backoff_wait=120.0)


class Client:
    """Talks to one Trainyard server (``url`` or ``$TRAINYARD_URL`` or http://127.0.0.1:8000),
    sending ``api_key`` (or ``$TRAINYARD_API_KEY``) as ``Authorization: Bearer <key>``.

    Connection errors, timeouts and 429/502/503/504 answers are retried up to ``retries`` times
    with exponential backoff (``backoff`` s, doubling), waiting what ``Retry-After`` says when it
    is given (httpx-retries). GET and DELETE are always retried; a POST only when it carries an
    Idempotency-Key, which the methods that create things send (one they generate, unless given
    one): a retried submission then answers what the first one made, never a second job."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, retries: int = 5, backoff: float = 0.5):
        self.url = (url or os.environ.get("TRAINYARD_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("TRAINYARD_API_KEY") or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._retry = _retry(retries, backoff, ("GET", "HEAD", "OPTIONS", "DELETE"))
        #: the retry policy of a POST with an Idempotency-Key (``request.extensions["retry"]``)
        self._retry_post = _retry(retries, backoff, ("POST",))
        wrapped = RetryTransport(transport=transport or httpx.HTTPTransport(), retry=self._retry)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=wrapped, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _post(self, path: str, *, json: Any = None, idempotency_key: str | None = None,
              params: dict[str, Any] | None = None) -> Any:
        """A POST that creates something: sent with an Idempotency-Key (``idempotency_key``, or a
        new one), so that it is safe to retry."""
        key = _idempotency_key(idempotency_key)
        r = self._http.post(path, json=json, params=params, headers={"Idempotency-Key": key},
                            extensions={"retry": self._retry_post})
        return self._check(r).json()

    def _check(self, r: httpx.Response) -> httpx.Response:
        return check(r)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._check(self._http.request(method, path, **kw)).json()

    # -- jobs
    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None,
               priority: int | None = None) -> dict[str, Any]:
        """Submit one job spec; returns the job (the existing one for a repeated key). ``priority``:
        higher starts first among the queued jobs of its queue (default 0)."""
        params = {"priority": priority} if priority is not None else None
        return self._post("/v1/jobs", json=spec, idempotency_key=idempotency_key, params=params)  # type: ignore[no-any-return]

    def set_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        """Change a queued job's priority (409 once it started)."""
        return self._json("PATCH", f"/v1/jobs/{job_id}", json={"priority": priority})  # type: ignore[no-any-return]

    def submit_batch(self, specs: list[dict[str, Any]], *, idempotency_key: str | None = None,
                     priority: int | None = None) -> dict[str, Any]:
        """Submit up to 1000 specs; a result (id or errors) per item."""
        body: dict[str, Any] = {"jobs": specs}
        if priority is not None:
            body["priority"] = priority
        return self._post("/v1/jobs/batch", json=body, idempotency_key=idempotency_key)  # type: ignore[no-any-return]

    def submit_many(self, specs: Iterable[dict[str, Any]], *, batch_size: int = 500,
                    idempotency_key: str | None = None, priority: int | None = None) -> list[dict[str, Any]]:
        """Submit any number of specs, ``batch_size`` (at most 1000) per request; returns one
        result per spec, in order (``index`` counts over all of them). Batch n is sent with the
        key ``<idempotency_key>-<n>`` (default: a new one), so a script rerun with the same key
        after a crash resubmits nothing that was already made."""
        out: list[dict[str, Any]] = []
        for start, chunk, key in _batches(list(specs), batch_size, idempotency_key):
            res = self.submit_batch(chunk, idempotency_key=key, priority=priority)
            out += [{**item, "index": start + item["index"]} for item in res["results"]]
        return out

    def continue_job(self, job_id: str, epochs: int) -> dict[str, Any]:
        """Train a job that ran all its epochs for ``epochs`` more (POST /v1/jobs/{id}/continue)."""
        return self._json("POST", f"/v1/jobs/{job_id}/continue", json={"epochs": epochs})  # type: ignore[no-any-return]

    def clone(self, job_id: str, patch: dict[str, Any] | None = None, *,
              idempotency_key: str | None = None) -> dict[str, Any]:
        """A new job from this one's spec with a JSON merge patch (RFC 7386) applied."""
        return self._post(f"/v1/jobs/{job_id}/clone", json=patch or {}, idempotency_key=idempotency_key)  # type: ignore[no-any-return]

    def iter_jobs(self, *, page_size: int = 100, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every job matching ``filters`` (those of :meth:`jobs`), newest first, fetched a page at
        a time as the iteration reaches it."""
        cursor = None
        while True:
            page = self.jobs(limit=page_size, cursor=cursor, **filters)
            yield from page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def jobs(self, *, status: list[str] | None = None, name: str | None = None, limit: int = 50,
             cursor: str | None = None, sweep_id: str | None = None) -> dict[str, Any]:
        params = _jobs_params(limit, cursor, status=status, name=name, sweep_id=sweep_id)
        return self._json("GET", "/v1/jobs", params=params)  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def metrics(self, job_id: str, *, since_epoch: int = 0, max_points: int | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"since_epoch": since_epoch}
        if max_points:
            params["max_points"] = max_points
        return self._json("GET", f"/v1/jobs/{job_id}/metrics", params=params)["epochs"]  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{job_id}/checkpoints")["checkpoints"]  # type: ignore[no-any-return]

    def best_checkpoint(self, job_id: str) -> tuple[bytes, str]:
        """The best weights (safetensors bytes) and their sha256, verified."""
        return self.checkpoint(job_id, "best")

    def delete(self, job_id: str) -> None:
        """Delete a job that ended, with its checkpoints and their files (409 while it runs)."""
        self._check(self._http.delete(f"/v1/jobs/{job_id}"))

    def download_best(self, job_id: str, path: str | Path) -> str:
        """Write the best checkpoint to ``path``; returns its sha256."""
        data, digest = self.best_checkpoint(job_id)
        Path(path).write_bytes(data)
        return digest

    @staticmethod
    def _verified(r: httpx.Response, header: str) -> tuple[bytes, str]:
        """The body and its sha256, checked against ``header`` (sent by the API, also when it
        redirected the download to the artifact store's presigned URL)."""
        digest = hashlib.sha256(r.content).hexdigest()
        expected = next((h.headers[header] for h in (r, *r.history) if header in h.headers), None)
        if expected and expected != digest:
            raise TrainyardError(502, f"digest mismatch: header {expected}, body {digest}")
        return r.content, digest

    def checkpoint(self, job_id: str, which: str | int = "best") -> tuple[bytes, str]:
        """A checkpoint's safetensors bytes and their sha256, verified: ``"best"``, ``"last"`` (the
        last epoch's weights) or an epoch number (if its bytes are kept)."""
        # an S3 artifact store answers with a redirect to a presigned URL (the API key is not sent there)
        r = self._http.get(f"/v1/jobs/{job_id}/checkpoints/{which}", follow_redirects=True)
        return self._verified(self._check(r), "X-Checkpoint-SHA256")

    def export(self, job_id: str, format: str, *, checkpoint: str | int = "best", timeout: float = 300.0) -> tuple[bytes, str]:
        """A checkpoint exported as ``torchscript``, ``onnx`` or ``keras`` (bytes and their sha256,
        verified), waiting while a worker produces it."""
        deadline = time.monotonic() + timeout
        while True:
            r = self._check(self._http.get(f"/v1/jobs/{job_id}/export",
                                           params={"format": format, "checkpoint": str(checkpoint), "wait": 10}))
            if r.status_code == 200:
                return self._verified(r, "X-Artifact-SHA256")
            if time.monotonic() >= deadline:
                raise TrainyardError(504, f"the {format} export of job {job_id} was not ready within {timeout} s")
            time.sleep(float(r.headers.get("Retry-After", "1")))

    def download_export(self, job_id: str, format: str, path: str | Path, *, checkpoint: str | int = "best") -> str:
        """Write an export to ``path``; returns its sha256."""
        data, digest = self.export(job_id, format, checkpoint=checkpoint)
        Path(path).write_bytes(data)
        return digest

    def predict(self, job_id: str, inputs: Any, *, checkpoint: str | int = "best", timeout: float = 300.0) -> dict[str, Any]:
        """Predictions for a batch of raw inputs (nested lists, or anything with ``tolist()``):
        ``probabilities`` and ``labels`` for a classifier, ``values`` for a regression model."""
        body = {"inputs": inputs.tolist() if hasattr(inputs, "tolist") else inputs}
        deadline = time.monotonic() + timeout
        while True:
            r = self._check(self._http.post(f"/v1/jobs/{job_id}/predict", json=body,
                                            params={"checkpoint": str(checkpoint), "wait": 10}))
            if r.status_code == 200:
                return r.json()  # type: ignore[no-any-return]
            if time.monotonic() >= deadline:
                raise TrainyardError(504, f"the model of job {job_id} was not ready within {timeout} s")
            time.sleep(float(r.headers.get("Retry-After", "1")))

    def events(self, job_id: str, *, last_event_id: int | None = None) -> Iterator[dict[str, Any]]:
        """Server-Sent Events of a job: dicts with ``id``, ``event`` ("state"/"epoch") and
        ``data``; ends after the terminal state."""
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(30, read=None)) as r:
            self._check_stream(r)
            ev: dict[str, Any] = {}
            for line in r.iter_lines():
                if not line:
                    if "data" in ev:
                        ev["data"] = json.loads(ev["data"])
                        ev["id"] = int(ev["id"]) if "id" in ev else None
                        yield ev
                    ev = {}
                    continue
                if line.startswith(":"):
                    continue
                key, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if key == "data" and "data" in ev:
                    ev["data"] += "\n" + value
                else:
                    ev[key] = value

    def _check_stream(self, r: httpx.Response) -> None:
        if r.status_code >= 400:
            r.read()
            self._check(r)

    def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None) -> dict[str, Any]:
        """Poll until the job reaches a terminal state; returns it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    # -- sweeps
    def create_sweep(self, sweep: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Start a sweep (see POST /v1/sweeps); returns it with its first trials."""
        return self._post("/v1/sweeps", json=sweep, idempotency_key=idempotency_key)  # type: ignore[no-any-return]

    def extend_sweep(self, sweep_id: str, max_trials: int) -> dict[str, Any]:
        """Raise a sweep's ``max_trials`` (it runs again if its trials had run out)."""
        return self._json("POST", f"/v1/sweeps/{sweep_id}/extend", json={"max_trials": max_trials})  # type: ignore[no-any-return]

    # -- webhooks
    def create_webhook(self, url: str, events: list[str], *, secret: str | None = None,
                       description: str | None = None) -> dict[str, Any]:
        """Subscribe ``url`` to events (verify deliveries with :func:`client.webhooks.verify`);
        the answer holds the signing secret, shown only once."""
        body = {"url": url, "events": events, **({"secret": secret} if secret else {}),
                **({"description": description} if description else {})}
        return self._json("POST", "/v1/webhooks", json=body)  # type: ignore[no-any-return]

    def webhooks(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/webhooks")["webhooks"]  # type: ignore[no-any-return]

    def delete_webhook(self, webhook_id: str) -> None:
        self._check(self._http.delete(f"/v1/webhooks/{webhook_id}"))

    def webhook_deliveries(self, webhook_id: str, *, status: list[str] | None = None,
                           limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        return self._json("GET", f"/v1/webhooks/{webhook_id}/deliveries", params=params)["deliveries"]  # type: ignore[no-any-return]

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        """A sweep with its trials, ``best_trial`` and ``leaderboard``."""
        return self._json("GET", f"/v1/sweeps/{sweep_id}")  # type: ignore[no-any-return]

    def sweeps(self, *, status: list[str] | None = None, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return self._json("GET", "/v1/sweeps", params=params)  # type: ignore[no-any-return]

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/sweeps/{sweep_id}/cancel")  # type: ignore[no-any-return]

    def wait_sweep(self, sweep_id: str, *, poll: float = 1.0, timeout: float | None = None) -> dict[str, Any]:
        """Poll until the sweep ends (succeeded, failed or cancelled); returns it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sweep = self.sweep(sweep_id)
            if sweep["status"] != "running":
                return sweep
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"sweep {sweep_id} still running after {timeout} s")
            time.sleep(poll)

    # -- the rest
    def preview_schedule(self, learning_rate: Any, steps: int, steps_per_epoch: int | None = None) -> list[float]:
        body = {"learning_rate": learning_rate, "steps": steps, "steps_per_epoch": steps_per_epoch}
        return self._json("POST", "/v1/schedules/preview", json=body)["lr"]  # type: ignore[no-any-return]

    def catalog(self) -> dict[str, Any]:
        return self._json("GET", "/v1/catalog")  # type: ignore[no-any-return]

    def upload_dataset(self, path: str | Path, *, name: str | None = None, target: str | None = None) -> dict[str, Any]:
        p = Path(path)
        data = {k: v for k, v in (("name", name), ("target", target)) if v is not None}
        with p.open("rb") as f:
            return self._json("POST", "/v1/datasets", files={"file": (p.name, f)}, data=data)  # type: ignore[no-any-return]

    def datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/datasets")["datasets"]  # type: ignore[no-any-return]

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")  # type: ignore[no-any-return]

    def ready(self) -> dict[str, Any]:
        return self._json("GET", "/readyz")  # type: ignore[no-any-return]


class AsyncClient:
    """The asyncio twin of :class:`Client` for scripts that follow many things at once: the same
    retries and Idempotency-Keys, the methods a batch script needs."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None, retries: int = 5, backoff: float = 0.5):
        self.url = (url or os.environ.get("TRAINYARD_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("TRAINYARD_API_KEY") or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._retry_post = _retry(retries, backoff, ("POST",))
        wrapped = RetryTransport(transport=transport or httpx.AsyncHTTPTransport(),
                                 retry=_retry(retries, backoff, ("GET", "HEAD", "OPTIONS", "DELETE")))
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=wrapped, headers=headers)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        return check(await self._http.request(method, path, **kw)).json()

    async def _post(self, path: str, *, json: Any = None, idempotency_key: str | None = None) -> Any:
        r = await self._http.post(path, json=json, headers={"Idempotency-Key": _idempotency_key(idempotency_key)},
                                  extensions={"retry": self._retry_post})
        return check(r).json()

    async def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        return await self._post("/v1/jobs", json=spec, idempotency_key=idempotency_key)  # type: ignore[no-any-return]

    async def submit_batch(self, specs: list[dict[str, Any]], *, idempotency_key: str | None = None) -> dict[str, Any]:
        return await self._post("/v1/jobs/batch", json={"jobs": specs}, idempotency_key=idempotency_key)  # type: ignore[no-any-return]

    async def submit_many(self, specs: Iterable[dict[str, Any]], *, batch_size: int = 500,
                          idempotency_key: str | None = None) -> list[dict[str, Any]]:
        """As :meth:`Client.submit_many`."""
        out: list[dict[str, Any]] = []
        for start, chunk, key in _batches(list(specs), batch_size, idempotency_key):
            res = await self.submit_batch(chunk, idempotency_key=key)
            out += [{**item, "index": start + item["index"]} for item in res["results"]]
        return out

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    async def jobs(self, *, status: list[str] | None = None, name: str | None = None, limit: int = 50,
                   cursor: str | None = None, sweep_id: str | None = None) -> dict[str, Any]:
        params = _jobs_params(limit, cursor, status=status, name=name, sweep_id=sweep_id)
        return await self._json("GET", "/v1/jobs", params=params)  # type: ignore[no-any-return]

    async def iter_jobs(self, *, page_size: int = 100, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        cursor = None
        while True:
            page = await self.jobs(limit=page_size, cursor=cursor, **filters)
            for job in page["jobs"]:
                yield job
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    async def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None) -> dict[str, Any]:
        """Poll until the job reaches a terminal state; returns it."""
        import asyncio

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            await asyncio.sleep(poll)
