"""``Client``: the Trainyard HTTP API from Python (the CLI uses it too).

Metric values that are not finite arrive as the strings "NaN", "Infinity", "-Infinity";
``float()`` reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class TrainyardError(Exception):
    """An error answer from the API; ``detail`` is its parsed ``detail`` (errors list or text)."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"HTTP {status_code}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(f"{d.get('path') or '<root>'}: {d.get('msg')}" if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)


class Client:
    """Talks to one Trainyard server (``url`` or ``$TRAINYARD_URL`` or http://127.0.0.1:8000),
    sending ``api_key`` (or ``$TRAINYARD_API_KEY``) as ``Authorization: Bearer <key>``."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = (url or os.environ.get("TRAINYARD_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("TRAINYARD_API_KEY") or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except (ValueError, AttributeError):
                detail = r.text
            raise TrainyardError(r.status_code, detail)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._check(self._http.request(method, path, **kw)).json()

    # -- jobs
    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None,
               priority: int | None = None) -> dict[str, Any]:
        """Submit one job spec; returns the job (the existing one for a repeated key). ``priority``:
        higher starts first among the queued jobs of its queue (default 0)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        params = {"priority": priority} if priority is not None else {}
        return self._json("POST", "/v1/jobs", json=spec, headers=headers, params=params)  # type: ignore[no-any-return]

    def set_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        """Change a queued job's priority (409 once it started)."""
        return self._json("PATCH", f"/v1/jobs/{job_id}", json={"priority": priority})  # type: ignore[no-any-return]

    def submit_batch(self, specs: list[dict[str, Any]], *, priority: int | None = None) -> dict[str, Any]:
        """Submit up to 1000 specs; a result (id or errors) per item."""
        body: dict[str, Any] = {"jobs": specs}
        if priority is not None:
            body["priority"] = priority
        return self._json("POST", "/v1/jobs/batch", json=body)  # type: ignore[no-any-return]

    def jobs(self, *, status: list[str] | None = None, name: str | None = None, limit: int = 50,
             cursor: str | None = None, sweep_id: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if sweep_id:
            params["sweep_id"] = sweep_id
        if status:
            params["status"] = status
        if name:
            params["name"] = name
        if cursor:
            params["cursor"] = cursor
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
    def create_sweep(self, sweep: dict[str, Any]) -> dict[str, Any]:
        """Start a sweep (see POST /v1/sweeps); returns it with its first trials."""
        return self._json("POST", "/v1/sweeps", json=sweep)  # type: ignore[no-any-return]

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
