"""Running one job: claim it, train it, and always record how it ended."""

from __future__ import annotations

import logging
import os
import socket
import traceback
from typing import Any

from store import repo
from store.db import session_scope
from store.settings import Settings, get_settings
from worker.reporter import SHUTDOWN, DbReporter, json_safe

log = logging.getLogger("trainyard.worker")

#: Stop reasons after which the job counts as failed (training blew up), not succeeded.
FAILED_STOP_REASONS = {
    "non_finite_loss": "training stopped: the loss became NaN or infinite",
    "diverged": "training stopped: the monitored value crossed the divergence threshold",
}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _resolve_dataset(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A stored dataset id in data.dataset gets data.path set to the stored file."""
    from training.data import BUILTIN_DATASETS

    data = dict(spec.get("data") or {})
    name = data.get("dataset")
    if name in BUILTIN_DATASETS:
        data["path"] = None
        return {**spec, "data": data}
    with session_scope(write=False) as s:
        ds = repo.get_dataset(s, str(name))
        stored = ds.file if ds is not None else None
    if stored is None:
        from training import SpecError

        raise SpecError([{"loc": ["data", "dataset"], "path": "data.dataset", "msg": f"stored dataset {name!r} no longer exists", "type": "value_error"}])
    data["path"] = str(settings.datasets_dir / stored)
    return {**spec, "data": data}


def run_job(job_id: str, settings: Settings | None = None) -> str:
    """Claim ``job_id`` (compare-and-set; safe if delivered twice), train it, record the result.
    Returns the job's final status, ``"skipped"`` if it was not claimable, or ``"requeued"`` if
    this worker is shutting down (the task then hands the message back to the broker). Exceptions other
    than the engine's own are re-raised after the job is recorded as failed."""
    settings = settings or get_settings()
    if SHUTDOWN.is_set():  # a message that arrives while this worker shuts down goes back untouched
        return "requeued"
    with session_scope() as s:
        job = repo.claim_job(s, job_id, worker_name(), settings.heartbeat_stale_s)
        if job is None:
            log.info("job %s is not claimable (already handled or cancelled); skipping", job_id)
            return "skipped"
        spec_dict = dict(job.spec)
        attempt = job.attempts
        snapshot = repo.get_snapshot(s, job_id) if attempt > 1 else None
        resume_from = snapshot.data if snapshot is not None else None

    reporter = DbReporter(job_id, settings)
    try:
        from training import SpecError, TrainingError

        run_spec = _resolve_dataset(spec_dict, settings)
        if run_spec.get("kind") == "lr_find":
            return _run_lr_find(job_id, run_spec, reporter)
        from training import fit

        result = fit(run_spec, reporter=reporter, should_stop=reporter.should_stop, resume_from=resume_from)
    except (SpecError, TrainingError) as exc:
        _finish_failed(job_id, reporter, str(exc))
        return "failed"
    except (KeyboardInterrupt, SystemExit) as exc:
        _finish_failed(job_id, reporter, f"the worker was stopped while the job ran ({type(exc).__name__}); submit it again")
        raise
    except BaseException as exc:
        _finish_failed(job_id, reporter, f"internal error: {type(exc).__name__}: {exc}")
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        raise

    try:
        return _record_result(job_id, reporter, result, attempt)
    except BaseException as exc:
        # Whatever fails after training (the last metrics, the best checkpoint, the final row),
        # the job must not stay 'running' (the reaper would requeue it forever).
        try:
            _finish_failed(job_id, reporter, f"internal error while recording the result: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - re-raise the original error below
            log.exception("job %s: could not record the failure", job_id)
        log.error("job %s: recording its result failed:\n%s", job_id, traceback.format_exc())
        raise


def _record_result(job_id: str, reporter: DbReporter, result: Any, attempt: int) -> str:
    reporter.flush()
    if result.stop_reason == "cancelled" and SHUTDOWN.is_set() and not reporter.cancelled:
        reporter.write_pending_snapshot()
        with session_scope() as s:
            requeued = repo.requeue_job(s, job_id, "worker shutdown")
        if requeued:
            log.info("job %s stopped for worker shutdown; requeued", job_id)
            return "requeued"
    status = "succeeded"
    error = None
    if result.stop_reason == "cancelled":
        status = "cancelled"
    elif result.stop_reason in FAILED_STOP_REASONS:
        status, error = "failed", FAILED_STOP_REASONS[result.stop_reason]
    with session_scope() as s:
        _store_best(s, job_id, result)
        repo.finish_job(
            s, job_id, status=status, stop_reason=result.stop_reason, error=error,
            best=(result.monitor, result.best_value, result.best_epoch) if result.monitor else None,
            steps=result.steps, epochs_run=result.epochs_run, run_seconds=result.seconds,
            info=json_safe({**(result.info or {}), "stopped_epoch": result.stopped_epoch, "attempt": attempt}),
        )
    return status


def _store_best(s: Any, job_id: str, result: Any) -> None:
    """Mark the engine's best checkpoint; store it (or the final weights) if no row has it."""
    if result.best_checkpoint_sha256 and repo.mark_best_checkpoint(
        s, job_id, result.best_checkpoint_sha256, result.best_checkpoint
    ):
        return
    data = result.best_checkpoint
    if data is None and result.weights:
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in result.weights.items()})
    if data is None:
        return
    repo.add_checkpoint(
        s, job_id, epoch=result.best_epoch or result.epochs_run, step=result.steps, monitor=result.monitor,
        value=result.best_value, data=data, sha256=repo.sha256_hex(data), is_best=True,
    )


def _run_lr_find(job_id: str, spec: dict[str, Any], reporter: DbReporter) -> str:
    from training import lr_find

    out = lr_find(spec, should_stop=reporter.should_stop)
    status = "cancelled" if reporter.cancelled else "succeeded"
    with session_scope() as s:
        repo.finish_job(
            s, job_id, status=status, stop_reason="cancelled" if reporter.cancelled else "completed",
            info=json_safe({"lr_find": out}),
        )
    return status


def _finish_failed(job_id: str, reporter: DbReporter, error: str) -> None:
    try:
        reporter.flush()
    except Exception:  # noqa: BLE001 - recording the failure matters more than the last metrics
        log.exception("could not write the last metrics of job %s", job_id)
    with session_scope() as s:
        repo.finish_job(s, job_id, status="failed", stop_reason="error", error=error[:10_000])
