"""/v1/datasets: upload array datasets (.npz with x/y, or .csv with a target column)."""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile

from api.deps import ProjectDep, ReadSessionDep, SessionDep, SettingsDep
from api.errors import SpecProblem, error
from api.schemas.common import ErrorResponse
from api.schemas.misc import DatasetList, DatasetRead
from api.views import dataset_read
from store import repo
from store.ids import new_id
from training.data import DataError, info_from_arrays, read_array_file

router = APIRouter(prefix="/datasets", tags=["datasets"])

CHUNK = 1 << 20
#: the longest file name kept (datasets.filename holds 300; most file systems allow 255 bytes)
MAX_FILENAME = 255


@router.post(
    "",
    response_model=DatasetRead,
    status_code=201,
    responses={400: {"model": ErrorResponse, "description": "the multipart body cannot be parsed"},
               413: {"model": ErrorResponse, "description": "file over the size limit"},
               422: {"model": ErrorResponse}},
)
def upload_dataset(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    project: ProjectDep,
    file: Annotated[UploadFile, File(description=".npz with arrays x and y, or .csv with a header row")],
    name: Annotated[str | None, Form(max_length=200, pattern=r"^[^\x00]*$")] = None,
    target: Annotated[str | None, Form(description="csv: target column name or 0-based index; default last")] = None,
) -> DatasetRead:
    """Store a dataset; name its ``id`` in a spec's ``data.dataset``. CSV files are converted
    to .npz once, with the target column resolved here."""
    limit = settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + 64 * 1024:
        raise HTTPException(status_code=413, detail=f"upload is larger than the limit of {limit} bytes")
    filename = os.path.basename((file.filename or "").replace("\x00", "")) or "upload"
    if len(filename) > MAX_FILENAME:
        raise SpecProblem([error(["file"], f"the file name is {len(filename)} characters long; at most {MAX_FILENAME} "
                                 "are allowed", "string_too_long")])
    ext = "." + filename.rsplit(".", 1)[1].lower() if "." in filename else ""  # ".csv" is a CSV file too
    if ext not in (".npz", ".csv"):
        raise SpecProblem([error(["file"], f"unsupported file type {ext or '(none)'!r}; allowed: .npz, .csv")])
    if ext == ".npz" and target is not None:
        raise SpecProblem([error(["target"], "target applies to .csv files only; an .npz names its arrays x and y")])
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with tempfile.NamedTemporaryFile(dir=settings.datasets_dir, suffix=ext, delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            while chunk := file.file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise HTTPException(status_code=413, detail=f"upload is larger than the limit of {limit} bytes")
                digest.update(chunk)
                tmp.write(chunk)
        except BaseException:
            tmp.close()
            tmp_path.unlink(missing_ok=True)
            raise
    quota = settings.max_project_dataset_bytes
    if quota > 0:
        used = repo.project_dataset_bytes(session, project)
        if used + size > quota:
            tmp_path.unlink(missing_ok=True)
            raise SpecProblem([error(["file"], f"the project's datasets take {used} bytes and this upload {size}; "
                                     f"a project may store at most {quota} (delete some with DELETE "
                                     "/v1/datasets/{id})", "limit_exceeded")])
    stored = ""
    try:
        # a column index is ASCII digits ("²" is a digit to str.isdigit, and int() refuses it)
        tgt: str | int | None = (int(target) if target is not None and re.fullmatch(r"[0-9]{1,9}", target.strip())
                                 else target)
        if ext == ".npz":
            _check_npz_size(tmp_path, filename, settings.max_dataset_bytes)
        try:
            x, y = read_array_file(str(tmp_path), tgt if ext == ".csv" else None, max_bytes=settings.max_dataset_bytes)
        except DataError as exc:
            field = "target" if exc.field == "target" else "file"
            raise SpecProblem([error([field], str(exc).replace(str(tmp_path), filename))]) from None
        except (ValueError, OSError, EOFError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, zlib.error) as exc:
            # Corrupt archives the engine's reader lets through: broken compressed data (zlib.error),
            # a member that is not an .npy array (numpy hands back bytes: AttributeError), ...
            what = "a valid .npz archive of numeric arrays 'x' and 'y'" if ext == ".npz" else "a valid CSV file"
            raise SpecProblem([error(["file"], f"{filename!r} is not {what}: {type(exc).__name__}: {exc}"
                                     .replace(str(tmp_path), filename))]) from None
        if x.nbytes + y.nbytes > settings.max_dataset_bytes:
            raise SpecProblem([error(["file"], f"{filename!r} holds {x.nbytes + y.nbytes} bytes of arrays; this server "
                                     f"allows at most {settings.max_dataset_bytes}", "limit_exceeded")])
        dataset_id = new_id()
        try:
            info = info_from_arrays(dataset_id, x, y)
        except DataError as exc:
            raise SpecProblem([error(["file"], str(exc).replace(str(tmp_path), filename))]) from None
        stored = f"{dataset_id}.npz"
        if info.task == "classification":
            y = np.asarray(y).reshape(-1).astype(np.int64)
        np.savez(settings.datasets_dir / stored, x=x, y=y)
    except BaseException:
        if stored:
            (settings.datasets_dir / stored).unlink(missing_ok=True)
        raise
    finally:
        tmp_path.unlink(missing_ok=True)
    # Commit before answering: the session dependency's own commit runs only after the response
    # is sent, so a failing commit would follow a 201 for a dataset that does not exist.
    try:
        ds = repo.create_dataset(
            session, id=dataset_id, name=name or filename[:200], filename=filename, format=ext[1:], file=stored,
            task=info.task, input_shape=list(info.input_shape), n_classes=info.n_classes,
            n_targets=info.n_targets, n_samples=info.n_samples, size=size, sha256=digest.hexdigest(),
            project_id=project,
        )
        session.commit()
    except BaseException:
        (settings.datasets_dir / stored).unlink(missing_ok=True)
        raise
    return dataset_read(ds)


def _check_npz_size(path: Path, filename: str, limit: int) -> None:
    """Refuse an archive whose members would expand beyond ``limit`` bytes, before numpy reads
    it: the sizes in the zip directory (which bound what zipfile will decompress) and the array
    sizes each ``.npy`` header declares (numpy allocates the declared shape before it reads a
    byte: an 80-byte member declaring (10**9, 4) asked for 8 TiB)."""
    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            total = sum(i.file_size for i in members)
            if total > limit:
                raise SpecProblem([error(["file"], f"{filename!r} expands to {total} bytes; this server allows at "
                                         f"most {limit}", "limit_exceeded")])
            for info in members:
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    try:
                        version = npy.read_magic(f)
                        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                        shape, _, dtype = reader(f, max_header_size=10_000)
                    except ValueError:
                        continue  # not an .npy header: the reader below says what is wrong
                    declared = math.prod(shape) * dtype.itemsize
                    if declared > min(limit, info.file_size):
                        member = info.filename.removesuffix(".npy")
                        raise SpecProblem([error(["file"], f"{filename!r}: array {member!r} declares shape "
                                                 f"{list(shape)} of {dtype} ({declared} bytes) but "
                                                 + (f"the member holds only {info.file_size} bytes"
                                                    if declared <= limit else f"this server allows at most {limit}"),
                                                 "limit_exceeded" if declared > limit else "value_error")])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error):
        return  # not a zip archive, or a corrupt one: the reader below says so


@router.get("", response_model=DatasetList)
def list_datasets(session: ReadSessionDep, project: ProjectDep) -> DatasetList:
    """The project's stored datasets, newest first."""
    return DatasetList(datasets=[dataset_read(d) for d in repo.list_datasets(session, project_id=project)])


@router.delete("/{dataset_id}", response_model=DatasetRead,
               responses={404: {"description": "no such dataset"},
                          409: {"description": "unfinished jobs or running sweeps use the dataset"}})
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep, project: ProjectDep) -> DatasetRead:
    """Delete a stored dataset and its file; answers what was deleted. Refused (409) while a
    queued, running or paused job, or a running sweep, of the project names it; finished jobs
    keep their results."""
    ds = repo.get_dataset(session, dataset_id, project)
    if ds is None:
        raise HTTPException(status_code=404, detail=f"no dataset {dataset_id!r}")
    users = repo.dataset_users(session, dataset_id, project)
    if users:
        raise HTTPException(status_code=409, detail=f"dataset {dataset_id} is used by unfinished jobs or running "
                                                    f"sweeps: {', '.join(users)}; cancel them first")
    gone = dataset_read(ds)
    repo.delete_dataset(session, dataset_id)
    session.commit()
    (settings.datasets_dir / ds.file).unlink(missing_ok=True)
    return gone
