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
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
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
#: ids per multi-id read (``POST /v1/jobs/query``: the API takes up to 10,000 in one body)
MULTI_ID = 10_000


def metrics_frame(curves: dict[str, list[dict[str, Any]]]) -> Any:
    """``{job_id: [epoch dicts]}`` as one pandas DataFrame (a row per job and epoch)."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("a DataFrame needs pandas: pip install 'trainyard[pandas]'") from None
    rows = [{"job_id": j, **{k: float(v) if isinstance(v, str) else v for k, v in e.items()}}
            for j, epochs in curves.items() for e in epochs]
    return pd.DataFrame(rows)


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


#: the list filters of GET /v1/jobs that the clients pass on (None or empty: not given)
JOB_FILTERS = ("status", "name", "name_prefix", "label", "stop_reason", "id", "sweep_id", "created_after",
               "created_before", "updated_after", "order_by", "order")


def _jobs_params(limit: int, cursor: str | None, **filters: Any) -> dict[str, Any]:
    unknown = set(filters) - set(JOB_FILTERS)
    if unknown:
        raise TypeError(f"unknown job list filter(s): {', '.join(sorted(unknown))}; known: {', '.join(JOB_FILTERS)}")
    params: dict[str, Any] = {"limit": limit}
    for k, v in (*filters.items(), ("cursor", cursor)):
        if v:
            params[k] = v.isoformat() if hasattr(v, "isoformat") else v
    return params


def _retry(retries: int, backoff: float, methods: tuple[str, ...]) -> Retry:
    return Retry(total=retries, backoff_factor=backoff, status_forcelist=RETRY_STATUSES, allowed_methods=methods,
                 respect_retry_after_header=True, max_backoff_wait=120.0)


def _transient(exc: Exception) -> None:
    """None (nothing learned this cycle) for a dropped connection or a 429/502/503/504 that
    outlasted the retries; any other error is raised."""
    if isinstance(exc, TrainyardError) and exc.status_code not in RETRY_STATUSES:
        raise exc
    return None


class _Following:
    """The bookkeeping of ``wait(ids)``, for both clients: the jobs still to ask about, the latest
    summary of each, the deadline."""

    def __init__(self, ids: Iterable[str], timeout: float | None) -> None:
        self.order = list(dict.fromkeys(ids))
        self.latest: dict[str, dict[str, Any]] = {}
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def pending(self) -> list[str]:
        return [j for j in self.order if self.latest.get(j, {}).get("status") not in TERMINAL]

    def take(self, got: list[dict[str, Any]] | None,
             on_update: Callable[[dict[str, dict[str, Any]]], None] | None) -> bool:
        """Record a cycle's answer (None: the server was away); whether every job has ended.
        Raises for an id that is not a job of the project, and past the deadline."""
        if got is not None:
            by_id = {j["id"]: j for j in got}
            missing = [j for j in self.pending() if j not in by_id and j not in self.latest]
            if missing:
                raise TrainyardError(404, f"no job {missing[0]!r} in this project")
            self.latest.update(by_id)
        if on_update is not None:
            on_update(self.latest)
        if got is not None and not self.pending():
            self.latest = {j: self.latest[j] for j in self.order}
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(f"{len(self.pending())} of {len(self.order)} job(s) still unfinished after "
                               f"{self.timeout} s")
        return False


class Client:
    """Talks to one Trainyard server (``url`` or ``$TRAINYARD_URL`` or http://127.0.0.1:8000),
    sending ``api_key`` (or ``$TRAINYARD_API_KEY``) as ``Authorization: Bearer <key>``.

    Connection errors, timeouts and 429/502/503/504 answers are retried up to ``retries`` times
    with exponential backoff (``backoff`` s, doubling), waiting what ``Retry-After`` says when it
    is given (httpx-retries). GET and DELETE are always retried; a POST only when it carries an
    Idempotency-Key, which the methods that create things send (one they generate, unless given
    one): a retried submission then answers what the first one made, never a second job.

    ``typed=True``: jobs, job lists, batch results and sweeps come back as the pydantic models of
    :mod:`client.models` (generated from the API's own OpenAPI document: ``JobRead``,
    ``JobSummary``, ``JobList``, ``BatchItem``, ``SweepRead``), validated; otherwise as dicts."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, retries: int = 5, backoff: float = 0.5,
                 typed: bool = False):
        self.typed = typed
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

    def _as(self, model: str, data: Any) -> Any:
        """``data`` as the :mod:`client.models` class ``model`` (the API's schema of that answer)
        when the client is ``typed``, else as it came (dicts)."""
        if not self.typed:
            return data
        from client import models

        return getattr(models, model).model_validate(data)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._check(self._http.request(method, path, **kw)).json()

    # -- jobs
    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None,
               priority: int | None = None) -> dict[str, Any]:
        """Submit one job spec; returns the job (the existing one for a repeated key). ``priority``:
        higher starts first among the queued jobs of its queue (default 0)."""
        params = {"priority": priority} if priority is not None else None
        return self._as("JobRead", self._post("/v1/jobs", json=spec, idempotency_key=idempotency_key, params=params))

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
        return [self._as("BatchItem", item) for item in out]

    def continue_job(self, job_id: str, epochs: int) -> dict[str, Any]:
        """Train a job that ran all its epochs for ``epochs`` more (POST /v1/jobs/{id}/continue)."""
        return self._as("JobRead", self._json("POST", f"/v1/jobs/{job_id}/continue", json={"epochs": epochs}))

    def clone(self, job_id: str, patch: dict[str, Any] | None = None, *,
              idempotency_key: str | None = None) -> dict[str, Any]:
        """A new job from this one's spec with a JSON merge patch (RFC 7386) applied."""
        return self._as("JobRead", self._post(f"/v1/jobs/{job_id}/clone", json=patch or {}, idempotency_key=idempotency_key))

    def iter_jobs(self, *, page_size: int = 100, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every job matching ``filters`` (those of :meth:`jobs`), newest first, fetched a page at
        a time as the iteration reaches it."""
        cursor = None
        while True:
            page = self.jobs(limit=page_size, cursor=cursor, **filters)
            yield from page.jobs if self.typed else page["jobs"]
            cursor = page.next_cursor if self.typed else page.get("next_cursor")
            if not cursor:
                return

    def jobs(self, *, limit: int = 50, cursor: str | None = None, **filters: Any) -> dict[str, Any]:
        """One page of the job list: ``{"jobs", "next_cursor"}``; ``filters`` are the list's
        (:data:`JOB_FILTERS`: ``status``, ``name``, ``name_prefix``, ``label`` ("key=value"),
        ``stop_reason``, ``id``, ``sweep_id``, ``created_after``..., ``order_by``, ``order``)."""
        params = _jobs_params(limit, cursor, **filters)
        return self._as("JobList", self._json("GET", "/v1/jobs", params=params))

    def job(self, job_id: str) -> Any:
        """The job (``JobRead``)."""
        return self._as("JobRead", self._json("GET", f"/v1/jobs/{job_id}"))

    def metrics(self, job_id: str | Iterable[str], *, since_epoch: int = 0, max_points: int | None = None,
                keys: list[str] | None = None, frame: bool = False) -> Any:
        """One job's epochs (a list of dicts), or for several ids those of each, through the bulk
        endpoint (:meth:`metrics_of`: ``{id: epochs}``, or a DataFrame with ``frame=True``)."""
        if not isinstance(job_id, str):
            return self.metrics_of(job_id, keys=keys, max_points=max_points, frame=frame)
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
        return self._sse(f"/v1/jobs/{job_id}/events", last_event_id)

    def project_events(self, *, last_event_id: int | None = None) -> Iterator[dict[str, Any]]:
        """Server-Sent Events of every job of the project (``GET /v1/events``), from now or after
        ``last_event_id``: dicts with ``id``, ``event`` ("job" or "sweep") and ``data``. Endless:
        stop iterating to close it."""
        return self._sse("/v1/events", last_event_id)

    def _sse(self, path: str, last_event_id: int | None) -> Iterator[dict[str, Any]]:
        """A Server-Sent Events stream read with httpx-sse: dicts with ``id`` (an int), ``event``
        and ``data`` (parsed JSON)."""
        from httpx_sse import connect_sse

        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        with connect_sse(self._http, "GET", path, headers=headers, timeout=httpx.Timeout(30, read=None)) as source:
            self._check_stream(source.response)
            for sse in source.iter_sse():
                if sse.data:
                    yield {"id": int(sse.id) if sse.id else None, "event": sse.event, "data": json.loads(sse.data)}

    def _check_stream(self, r: httpx.Response) -> None:
        if r.status_code >= 400:
            r.read()
            self._check(r)

    def jobs_by_id(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """The jobs ``ids`` (summaries, as listed), with one ``POST /v1/jobs/query`` per 10,000
        ids; ids that are not jobs of the project are left out. (A read: retried like a GET.)"""
        ids = list(dict.fromkeys(ids))
        out: list[dict[str, Any]] = []
        for start in range(0, len(ids), MULTI_ID):
            out += self._json("POST", "/v1/jobs/query", json={"ids": ids[start:start + MULTI_ID]},
                              extensions={"retry": self._retry_post})["jobs"]
        return out

    def wait(self, ids: str | Iterable[str], *, poll: float = 1.0, timeout: float | None = None,
             on_update: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> Any:
        """Wait until the job ``ids`` (one id, or any number of them) end; returns the ended job's
        whole view (for one id, as :meth:`job`) or ``{id: job summary}`` in the order given. Each cycle asks only for the jobs still
        unfinished, in one ``POST /v1/jobs/query`` (up to 10,000 of them; never one per job); ``on_update`` is
        called with every job's latest summary after each cycle. A dropped connection or a 429,
        502, 503 or 504 that outlasts the client's retries is waited out (until ``timeout``)."""
        if isinstance(ids, str):  # one job: its whole view once it has ended, as job() gives it
            self.wait([ids], poll=poll, timeout=timeout, on_update=on_update)
            return self.job(ids)
        follow = _Following(ids, timeout)
        while True:
            pending = follow.pending()
            try:
                got: list[dict[str, Any]] | None = self.jobs_by_id(pending) if pending else []
            except (httpx.TransportError, TrainyardError) as exc:
                got = _transient(exc)
            if follow.take(got, on_update):
                return {j: self._as("JobSummary", job) for j, job in follow.latest.items()}
            time.sleep(poll)

    def metrics_of(self, ids: Iterable[str], *, keys: list[str] | None = None,
                   max_points: int | None = None, frame: bool = False) -> Any:
        """The metrics of many jobs through ``POST /v1/metrics/bulk`` (1,000 jobs a request):
        ``{job_id: [epoch dicts]}``, or with ``frame=True`` one pandas DataFrame with a ``job_id``
        column and a row per job and epoch (``pip install trainyard[pandas]``); non-finite values
        ("NaN", "Infinity") become floats there."""
        ids = list(dict.fromkeys(ids))
        out: dict[str, list[dict[str, Any]]] = {}
        for start in range(0, len(ids), 1000):
            body: dict[str, Any] = {"jobs": [{"id": j} for j in ids[start:start + 1000]]}
            if keys:
                body["keys"] = keys
            if max_points:
                body["max_points"] = max_points
            got = self._json("POST", "/v1/metrics/bulk", json=body)
            if got.get("missing"):
                raise TrainyardError(404, f"no job {got['missing'][0]!r} in this project")
            out.update({j: got["jobs"][j]["epochs"] for j in ids[start:start + 1000] if j in got["jobs"]})
        if not frame:
            return out
        return metrics_frame(out)

    # -- sweeps
    def create_sweep(self, sweep: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Start a sweep (see POST /v1/sweeps); returns it with its first trials."""
        return self._as("SweepRead", self._post("/v1/sweeps", json=sweep, idempotency_key=idempotency_key))

    def extend_sweep(self, sweep_id: str, max_trials: int) -> dict[str, Any]:
        """Raise a sweep's ``max_trials`` (it runs again if its trials had run out)."""
        return self._as("SweepRead", self._json("POST", f"/v1/sweeps/{sweep_id}/extend", json={"max_trials": max_trials}))

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
        return self._as("SweepRead", self._json("GET", f"/v1/sweeps/{sweep_id}"))

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

    async def jobs(self, *, limit: int = 50, cursor: str | None = None, **filters: Any) -> dict[str, Any]:
        """As :meth:`Client.jobs`."""
        params = _jobs_params(limit, cursor, **filters)
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

    async def jobs_by_id(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """As :meth:`Client.jobs_by_id`."""
        ids = list(dict.fromkeys(ids))
        out: list[dict[str, Any]] = []
        for start in range(0, len(ids), MULTI_ID):
            out += (await self._json("POST", "/v1/jobs/query", json={"ids": ids[start:start + MULTI_ID]},
                                     extensions={"retry": self._retry_post}))["jobs"]
        return out

    async def wait(self, ids: str | Iterable[str], *, poll: float = 1.0, timeout: float | None = None,
                   on_update: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> Any:
        """As :meth:`Client.wait`: one ``POST /v1/jobs/query`` per cycle (per 10,000 unfinished jobs)."""
        import asyncio

        if isinstance(ids, str):  # one job: its whole view once it has ended, as job() gives it
            await self.wait([ids], poll=poll, timeout=timeout, on_update=on_update)
            return await self.job(ids)
        follow = _Following(ids, timeout)
        while True:
            pending = follow.pending()
            try:
                got: list[dict[str, Any]] | None = await self.jobs_by_id(pending) if pending else []
            except (httpx.TransportError, TrainyardError) as exc:
                got = _transient(exc)
            if follow.take(got, on_update):
                return follow.latest
            await asyncio.sleep(poll)
