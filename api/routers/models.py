"""/v1/jobs/{id}: use what was trained: the last and any stored checkpoint, exports
(TorchScript, ONNX, Keras) and predictions.

Exports are produced by a worker (``trainyard.export``, sent by name: this process never imports
torch), stored as artifacts with their sha256, and served like checkpoints. Predictions run the
job's ONNX export with onnxruntime in this process (api.predict says why).
"""

from __future__ import annotations

import csv
import io
import os
import time
import zipfile
from datetime import timedelta
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api.deps import DispatcherDep, ProjectDep, ReadSessionDep
from api.dispatch import DispatchError
from api.errors import SpecProblem, error
from api.ids import AMBIGUOUS
from api.predict import MODEL_REFS, SESSIONS, ModelRef, predict
from api.routers.jobs import DOWNLOAD_RESPONSES, MAX_INT32, _full_id, serve_checkpoint
from api.schemas.common import ErrorResponse
from store import artifacts, repo
from store.db import session_scope
from store.models import TERMINAL_STATUSES, Artifact
from training.card import MAX_PREDICT_ROWS, InputError, coerce_inputs

router = APIRouter(prefix="/jobs", tags=["models"])

FORMATS = ("torchscript", "onnx", "keras")
EXTENSIONS = {"torchscript": "pt", "onnx": "onnx", "keras": "keras"}
MEDIA_TYPES = {"torchscript": "application/octet-stream", "onnx": "application/octet-stream", "keras": "application/zip"}
#: a pending export untouched this long lost its message (or its worker): it is sent again
RESEND_PENDING_AFTER_S = 30.0
#: a failed export is tried again on a request this long after it failed
RETRY_FAILED_AFTER_S = 60.0
POLL_S = 0.1
MAX_WAIT_S = 60.0

CheckpointQuery = Annotated[str, Query(
    pattern=r"^(best|last|[1-9][0-9]{0,8})$",
    description="which checkpoint: best (default), last (the last epoch's weights) or an epoch number",
)]
WaitQuery = Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the export before answering 202")]


class PendingRead(BaseModel):
    status: str = Field(description="pending: a worker is producing it; ask again (Retry-After)")
    format: str
    checkpoint_epoch: int
    checkpoint_sha256: str


class PredictRequest(BaseModel):
    inputs: list[Any] = Field(
        min_length=1, max_length=MAX_PREDICT_ROWS,
        description="a batch of raw inputs (as the dataset gives them, before standardization), each of "
                    "the model's input shape (or its values flat)",
    )


class PredictRead(BaseModel):
    job_id: str
    checkpoint_epoch: int
    checkpoint_sha256: str
    task: str
    outputs: str = Field(description="probabilities (classifier), scores (classifier without a probability head) or values")
    probabilities: list[list[Any]] | None = None
    labels: list[int] | None = None
    values: list[list[Any]] | None = None


def _no_checkpoint(session: Any, job_id: str, project: str, which: str) -> HTTPException:
    status = session.scalar(repo.select_job_status(job_id, project))
    if status is None:
        return HTTPException(status_code=404, detail=f"no job {job_id!r}")
    if which not in ("best", "last"):
        _, recorded = repo.checkpoint_at_epoch(session, job_id, int(which), project)
        if recorded:
            return HTTPException(status_code=410, detail=(
                f"the checkpoint of epoch {which} of job {job_id} was recorded but its weights were not kept: "
                "a job keeps the bytes of its best and its newest (last) checkpoint only"))
        return HTTPException(status_code=404, detail=f"job {job_id} has no checkpoint of epoch {which}")
    if status in TERMINAL_STATUSES:
        return HTTPException(status_code=404, detail=f"job {job_id} ended without a checkpoint ({status})")
    return HTTPException(status_code=404, detail=f"job {job_id} has no checkpoint yet")


CHECKPOINT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}},
          "description": "safetensors file (with its model card); its sha256 (hex) in X-Checkpoint-SHA256 and ETag"},
    **DOWNLOAD_RESPONSES,
    404: {"model": ErrorResponse, "description": "no such job, or no such checkpoint"},
    **AMBIGUOUS,
    500: {"model": ErrorResponse, "description": "the stored checkpoint is corrupt or missing from the artifact "
                                                 "store; never served"},
}


@router.get("/{job_id}/checkpoints/last", response_class=Response, responses=CHECKPOINT_RESPONSES)
def last_checkpoint(job_id: str, session: ReadSessionDep, project: ProjectDep) -> Response:
    """The last epoch's weights (before early stopping restored the best ones) as a
    ``.safetensors`` file; while the job runs, its newest checkpoint."""
    job_id = _full_id(session, job_id, project)
    ck = repo.last_checkpoint(session, job_id, project)
    if ck is None:
        raise _no_checkpoint(session, job_id, project, "last")
    return serve_checkpoint(job_id, ck, "last")


@router.get(
    "/{job_id}/checkpoints/{epoch}", response_class=Response,
    responses={**CHECKPOINT_RESPONSES, 410: {"model": ErrorResponse, "description": "recorded, but its bytes were not kept"}},
)
def checkpoint_at_epoch(
    job_id: str, epoch: Annotated[int, Path(ge=1, le=MAX_INT32, description="1-based epoch")],
    session: ReadSessionDep, project: ProjectDep,
) -> Response:
    """The checkpoint taken at ``epoch`` (the newest, if several were), if its bytes are stored:
    a job keeps those of its best and its last checkpoint (410 for another recorded one)."""
    job_id = _full_id(session, job_id, project)
    ck, _ = repo.checkpoint_at_epoch(session, job_id, epoch, project)
    if ck is None:
        raise _no_checkpoint(session, job_id, project, str(epoch))
    return serve_checkpoint(job_id, ck, f"epoch-{epoch}")


# --------------------------------------------------------------------------- exports


def _artifact(session: Any, dispatcher: Any, job_id: str, project: str, which: str, fmt: str, wait: float) -> Artifact | JSONResponse:
    """The ready artifact of this export (without its bytes: :func:`store.artifacts.data_of`), or
    a 202 answer while a worker produces it (after waiting up to ``wait`` seconds). ``session``
    reads; a missing, stalled or failed export is (re)requested in a transaction of its own, and
    its task sent after that commits. ``job_id`` is a full id (see :func:`_full_id`)."""
    ref = artifacts.checkpoint_ref(session, job_id, which, project)
    if ref is None:
        raise _no_checkpoint(session, job_id, project, which)
    digest, epoch = ref
    row = artifacts.find(session, job_id, fmt, digest)
    if row is not None and row.status == "ready":
        return row  # the common case: two reads, no write
    session.rollback()
    with session_scope() as w:
        row, created = artifacts.request(w, job_id, fmt, digest, epoch)
        age = repo.utcnow() - repo.as_utc(row.updated_at)
        send = created or (
            (row.status == "pending" and age > timedelta(seconds=RESEND_PENDING_AFTER_S))
            or (row.status == "failed" and age > timedelta(seconds=RETRY_FAILED_AFTER_S))
        )
        if send and not created:
            artifacts.retry(w, row.id)
        artifact_id = row.id
        job = repo.get_job(w, job_id, project)
        queue = job.queue if job is not None else None
    if send and queue is not None:  # the row is committed before its message exists
        try:
            # the job's own queue: a worker that can run the job can export it
            dispatcher.send_export(artifact_id, queue)
        except DispatchError:
            pass  # stays pending: a request after RESEND_PENDING_AFTER_S sends it again
    deadline = time.monotonic() + wait
    while True:
        session.rollback()  # a new read transaction: it sees the worker's commit
        current = artifacts.find(session, job_id, fmt, digest)
        if current is None:  # the job was deleted meanwhile
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        if current.status == "ready":
            return current
        if current.status == "failed":
            raise HTTPException(status_code=500, detail=(
                f"exporting job {job_id} (epoch {epoch}) as {fmt} failed on the worker: {current.error}; "
                f"it is tried again on a request {RETRY_FAILED_AFTER_S:.0f} s after the failure"))
        if time.monotonic() >= deadline:
            body = PendingRead(status="pending", format=fmt, checkpoint_epoch=epoch, checkpoint_sha256=digest)
            return JSONResponse(body.model_dump(), status_code=202, headers={"Retry-After": "1"})
        time.sleep(POLL_S)


@router.get(
    "/{job_id}/export",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}, "application/zip": {}},
              "description": "the exported model; its sha256 (hex) in X-Artifact-SHA256 and ETag, the source "
                             "checkpoint's in X-Checkpoint-SHA256"},
        202: {"model": PendingRead, "description": "a worker is producing it: ask again after Retry-After seconds"},
        404: {"model": ErrorResponse, "description": "no such job, or no such checkpoint"},
        **AMBIGUOUS,
        410: {"model": ErrorResponse, "description": "that epoch's checkpoint bytes were not kept"},
        500: {"model": ErrorResponse, "description": "the export failed on the worker, or its stored bytes are corrupt"},
    },
)
def export_model(
    job_id: str,
    session: ReadSessionDep,
    dispatcher: DispatcherDep,
    project: ProjectDep,
    format: Annotated[Literal["torchscript", "onnx", "keras"], Query(description="torchscript, onnx or keras")],
    checkpoint: CheckpointQuery = "best",
    wait: WaitQuery = 10.0,
) -> Response:
    """The model of a checkpoint as a TorchScript (``.pt``), ONNX (``.onnx``) or Keras 3
    (``.keras``) file: raw inputs in (the training split's standardization is inside), class
    probabilities or values out. Produced once by a worker and kept; 202 while it is produced."""
    job_id = _full_id(session, job_id, project)
    got = _artifact(session, dispatcher, job_id, project, checkpoint, format, wait)
    if isinstance(got, JSONResponse):
        return got
    data = artifacts.data_of(session, got.id)  # verified: a missing or changed file is a 500 (api.errors)
    assert data is not None and got.sha256 is not None
    label = checkpoint if checkpoint in ("best", "last") else f"epoch-{checkpoint}"
    return Response(content=data, media_type=MEDIA_TYPES[format], headers={
        "X-Artifact-SHA256": got.sha256, "ETag": f'"{got.sha256}"',
        "X-Checkpoint-SHA256": got.checkpoint_sha256, "X-Checkpoint-Epoch": str(got.checkpoint_epoch),
        "Content-Disposition": f'attachment; filename="{job_id}-{label}.{EXTENSIONS[format]}"',
    })


# --------------------------------------------------------------------------- predictions


def _model_ref(session: Any, dispatcher: Any, job_id: str, project: str, which: str, wait: float) -> ModelRef | JSONResponse:
    """The job's ONNX model, its onnxruntime session loaded (api.predict.SESSIONS), or a 202.
    ``job_id`` is a full id."""
    got = _artifact(session, dispatcher, job_id, project, which, "onnx", wait)
    if isinstance(got, JSONResponse):
        return got
    digest = got.sha256
    assert digest is not None

    def load() -> bytes:  # on a cache miss only
        data = artifacts.data_of(session, got.id)  # verified against its sha256
        if data is None:
            raise HTTPException(status_code=500, detail=f"the onnx export of job {job_id} is not stored")
        return data

    SESSIONS.get(digest, load)
    ref = ModelRef(digest, got.card or {}, got.checkpoint_epoch, got.checkpoint_sha256)
    # a finished job's best and last checkpoints no longer change: later requests skip the database
    if session.scalar(repo.select_job_status(job_id, project)) in TERMINAL_STATUSES:
        MODEL_REFS.put((project, job_id, which), ref)
    return ref


def _resolve(request: Request, job_id: str, project: str, which: str, wait: float) -> ModelRef | JSONResponse:
    with session_scope(write=False) as session:
        job_id = _full_id(session, job_id, project)  # a prefix is resolved here, never cached
        return _model_ref(session, request.app.state.dispatcher, job_id, project, which, wait)


def _answer(ref: ModelRef, job_id: str, inputs: Any, where: tuple[str | int, ...]) -> Response:
    try:
        x = coerce_inputs(ref.card, inputs, where)
    except InputError as exc:
        raise SpecProblem([error(list(exc.path), str(exc))]) from None
    session = SESSIONS.get(ref.artifact_sha256, _gone)
    result = predict(session, ref.card, x)
    body = PredictRead(job_id=job_id, checkpoint_epoch=ref.checkpoint_epoch, checkpoint_sha256=ref.checkpoint_sha256, **result)
    return JSONResponse(body.model_dump(exclude_none=True))


def _gone() -> bytes:
    # the session was evicted between resolving and answering (MAX_SESSIONS other models in between)
    raise HTTPException(status_code=503, detail="the model was unloaded meanwhile; send the request again",
                        headers={"Retry-After": "0"})


PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": PredictRead},
    202: {"model": PendingRead, "description": "the model is being exported: ask again after Retry-After seconds"},
    404: {"model": ErrorResponse, "description": "no such job, or no such checkpoint"},
    **AMBIGUOUS,
    410: {"model": ErrorResponse, "description": "that epoch's checkpoint bytes were not kept"},
    422: {"model": ErrorResponse, "description": "inputs the model cannot take; each error names where"},
    500: {"model": ErrorResponse, "description": "the export failed on the worker"},
}


@router.post("/{job_id}/predict", response_model=PredictRead, responses=PREDICT_RESPONSES)
async def predict_json(
    job_id: str, body: PredictRequest, request: Request, project: ProjectDep,
    checkpoint: CheckpointQuery = "best", wait: WaitQuery = 10.0,
) -> Response:
    """Predictions for a batch of raw inputs, with the training split's standardization applied:
    class probabilities and labels for a classifier, values for a regression model. Runs the
    job's ONNX export (produced by a worker on first use) in the API process."""
    # ``async``: for a finished job whose model is loaded this is all in-memory work (tens of
    # microseconds); the database and any wait for an export run in the thread pool
    ref = MODEL_REFS.get((project, job_id, checkpoint))
    if ref is None or not SESSIONS.holds(ref.artifact_sha256):
        got = await run_in_threadpool(_resolve, request, job_id, project, checkpoint, wait)
        if isinstance(got, JSONResponse):
            return got
        ref = got
    return _answer(ref, job_id, body.inputs, ("inputs",))


def _read_upload(file: UploadFile, limit: int) -> Any:
    name = os.path.basename(file.filename or "")
    ext = os.path.splitext(name)[1].lower()
    if ext not in (".npz", ".csv"):
        raise SpecProblem([error(["file"], f"unsupported file type {ext or '(none)'!r}; allowed: .npz (array x), .csv (numbers, optional header row)")])
    raw = file.file.read(limit + 1)
    if len(raw) > limit:
        raise HTTPException(status_code=413, detail=f"upload is larger than the limit of {limit} bytes")
    if ext == ".npz":
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                keys = list(npz.keys())
                key = "x" if "x" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise SpecProblem([error(["file"], f"the .npz has arrays {keys}: name the inputs 'x'")])
                return npz[key]
        except SpecProblem:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise SpecProblem([error(["file"], f"not a readable .npz file: {exc}")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SpecProblem([error(["file"], "the .csv is not UTF-8 text")]) from None
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if rows and not all(_is_number(c) for c in rows[0]):
        rows = rows[1:]  # a header row
    out: list[list[float]] = []
    for i, r in enumerate(rows):
        for j, c in enumerate(r):
            if not _is_number(c):
                raise SpecProblem([error(["file", "row", i, "column", j], f"expected a number, got {c[:40]!r}")])
        out.append([float(c) for c in r])
    if not out:
        raise SpecProblem([error(["file"], "the .csv has no rows of numbers")])
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@router.post("/{job_id}/predict/file", response_model=PredictRead, responses={
    **PREDICT_RESPONSES, 400: {"model": ErrorResponse, "description": "the multipart body cannot be parsed"},
    413: {"model": ErrorResponse, "description": "file over the size limit"}})
def predict_file(
    job_id: str, request: Request, session: ReadSessionDep, dispatcher: DispatcherDep, project: ProjectDep,
    file: Annotated[UploadFile, File(description=".npz with an array x (n, *input_shape), or .csv with one input per row")],
    checkpoint: CheckpointQuery = "best", wait: WaitQuery = 10.0,
) -> Response:
    """Predictions for the inputs of an uploaded file (see ``POST /jobs/{id}/predict``)."""
    job_id = _full_id(session, job_id, project)
    got = _model_ref(session, dispatcher, job_id, project, checkpoint, wait)
    if isinstance(got, JSONResponse):
        return got
    # the upload is read once the job and its model are known
    return _answer(got, job_id, _read_upload(file, request.app.state.settings.max_upload_bytes), ("file",))
