"""/v1/datasets: upload array datasets (.npz with x/y, or .csv with a target column)."""

from __future__ import annotations

import hashlib
import os
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
    ext = os.path.splitext(filename)[1].lower()
    if ext not in (".npz", ".csv"):
        raise SpecProblem([error(["file"], f"unsupported file type {ext or '(none)'!r}; allowed: .npz, .csv")])
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
    stored = ""
    try:
        tgt: str | int | None = int(target) if target is not None and target.strip().isdigit() else target
        if ext == ".npz":
            _check_npz_size(tmp_path, filename, settings.max_dataset_bytes)
        try:
            x, y = read_array_file(str(tmp_path), tgt if ext == ".csv" else None)
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
            session, id=dataset_id, name=name or filename, filename=filename, format=ext[1:], file=stored,
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
    it (the sizes come from the zip directory, which bounds what zipfile will decompress)."""
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip archive: the reader below says so
    if total > limit:
        raise SpecProblem([error(["file"], f"{filename!r} expands to {total} bytes; this server allows at most "
                                 f"{limit}", "limit_exceeded")])


@router.get("", response_model=DatasetList)
def list_datasets(session: ReadSessionDep, project: ProjectDep) -> DatasetList:
    """The project's stored datasets, newest first."""
    return DatasetList(datasets=[dataset_read(d) for d in repo.list_datasets(session, project_id=project)])
