"""The ``trainyard.export`` task: turn a job's checkpoint into an exported model (TorchScript,
ONNX or Keras) and store it as the artifact row the API created (store.artifacts).

Safe to run twice: a ready artifact is left alone, and the bytes of one checkpoint export to the
same model whichever run stores them."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

from config.settings import Settings
from store import artifacts, repo
from store.artifact_store import get_store
from store.db import session_scope
from store.models import Checkpoint, Job

log = logging.getLogger("trainyard.worker")


def run_export(artifact_id: int, settings: Settings) -> str:
    """Produce artifact ``artifact_id``; returns its status (``ready``/``failed``, or ``gone``
    when the row no longer exists)."""
    with session_scope(write=False) as s:
        row = artifacts.get(s, artifact_id)
        if row is None:
            return "gone"
        if row.status == "ready":
            return "ready"
        fmt, job_id, digest = row.format, row.job_id, row.checkpoint_sha256
        ck = s.execute(
            select(Checkpoint.uri, Checkpoint.size, Checkpoint.epoch)
            .where(Checkpoint.job_id == job_id, Checkpoint.sha256 == digest, repo.STORED).limit(1)
        ).first()
        job = s.get(Job, job_id)
        spec = dict(job.spec) if job is not None else None
    try:
        if ck is None:
            raise RuntimeError("the checkpoint's file is no longer stored (only the best and the last are kept)")
        data = get_store().read(ck.uri, digest, ck.size, what=f"the checkpoint of epoch {ck.epoch} of job {job_id}")
        output, card = _export(data, spec, fmt, settings)
    except Exception as exc:  # noqa: BLE001 - recorded on the row: the API reports it
        log.warning("export %s (%s of job %s) failed: %s", artifact_id, fmt, job_id, exc)
        with session_scope() as s:
            artifacts.fail(s, artifact_id, f"{type(exc).__name__}: {exc}")
        return "failed"
    with session_scope() as s:
        artifacts.complete(s, artifact_id, output, card)
    return "ready"


def _export(data: bytes, spec: dict[str, Any] | None, fmt: str, settings: Settings) -> tuple[bytes, dict[str, Any]]:
    from training.card import card_of
    from training.export import export
    from training.inference import load_model
    from worker.datasets import resolve_dataset

    # the spec is read only for a checkpoint without a model card (written before cards existed)
    fallback = None
    if card_of(data) is None and spec is not None:
        fallback = resolve_dataset(spec, settings)
    model = load_model(data, spec=fallback)
    return export(model, fmt), model.card
