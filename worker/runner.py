"""Running one job: claim it, train it, and always record how it ended."""

from __future__ import annotations

import logging
import os
import signal
import socket
import traceback
from typing import Any

from config import logs
from config.logs import job_context, set_attempt
from config.settings import Settings, get_settings
from store import leases, outbox, repo, scheduling
from store.db import session_scope
from worker.reporter import SHUTDOWN, WRITE_RETRY_DEADLINE_S, DbReporter, json_safe

log = logging.getLogger("trainyard.worker")

#: Stop reasons after which the job counts as failed (training blew up), not succeeded.
FAILED_STOP_REASONS = {
    "non_finite_loss": "training stopped: the loss became NaN or infinite",
    "diverged": "training stopped: the monitored value crossed the divergence threshold",
}


def worker_name() -> str:
    """host:pid, plus /gpuN when the process is pinned to device(s) N (``trainyard worker --gpus``)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}:{os.getpid()}" + (f"/gpu{visible}" if visible else "")


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


#: Test-only fault injection, honoured only when the environment variable of this name is "1"
#: (set by the fault-tolerance tests, never by the service): a job named FAULT_KILL_NAME kills
#: its worker process (SIGKILL) right after each claim, like a job that crashes native code.
FAULT_ENV = "TRAINYARD_TEST_FAULTS"
FAULT_KILL_NAME = "test-fault-kill-worker"
#: ... and a job named FAULT_STALL_NAME hangs its training thread after its first epoch, on its
#: first attempt, for FAULT_STALL_S (like a step stuck in native code), then carries on.
FAULT_STALL_NAME = "test-fault-stall-worker"
FAULT_STALL_S = 10.0


def _hang_after_first_epoch(reporter: DbReporter) -> None:
    import time

    on_epoch = reporter.on_epoch

    def hanging(metrics: dict[str, float]) -> None:
        on_epoch(metrics)
        if reporter.epochs_seen == 1:
            reporter.flush(force=True)  # epoch 1 is written: its event tells when the hang began
            time.sleep(FAULT_STALL_S)

    reporter.on_epoch = hanging  # type: ignore[method-assign]


def _claim(job_id: str, settings: Settings, by_priority: bool = False) -> tuple[int, int, dict[str, Any], Any, str | None, int, str] | None:
    """Claim the job and drop its outbox rows (its message arrived) in one transaction; the
    claim's (lease token, attempt, spec, snapshot or None, sweep id or None, epochs, job id).
    ``by_priority``: claim the best queued job of the message's queue instead (see
    :func:`claim_by_priority`)."""
    with session_scope() as s:
        # the claim first: its started_at is when the job starts (submit->running latency)
        job = claim_by_priority(s, job_id, settings) if by_priority else None
        if job is None:
            job = repo.claim_job(s, job_id, worker_name(), settings.heartbeat_stale_s)
        outbox.forget_jobs(s, [job_id])
        if job is None:
            return None
        attempt = job.attempts
        snapshot = repo.get_snapshot(s, job.id) if attempt > 1 else None
        if snapshot is not None:
            s.expunge(snapshot)
        return job.lease_token, attempt, dict(job.spec), snapshot, job.sweep_id, job.epochs, job.id


def claim_by_priority(s: Any, message_job_id: str, settings: Settings) -> Any:
    """Claim the best queued job of the queue ``message_job_id``'s message came on
    (:func:`store.scheduling.pick_next`), or None when none is queued (the caller then tries the
    message's own job: the take-over of a lost one). The message's outbox rows are dropped by the
    caller (it arrived); those of the job taken stay, so its message, sent or still to be sent,
    starts the next job."""
    best = scheduling.pick_next(s, message_job_id)
    if best is None:
        return None
    return repo.claim_job(s, best, worker_name(), settings.heartbeat_stale_s)


def _verified_snapshot(job_id: str, snapshot: Any) -> bytes:
    """The snapshot's bytes, read from the artifact store, if they are the recorded ones (size,
    sha256); a TrainingError otherwise (a missing file fails the resume with its reason, a
    corrupt one is never deserialized)."""
    from store.artifact_store import ArtifactError
    from training import TrainingError

    try:
        return repo.snapshot_bytes(snapshot)
    except ArtifactError as exc:
        raise TrainingError(f"cannot resume: {exc}; refusing to load it", "resume") from None


def _init_weights(job_id: str, source: str) -> bytes:
    """The best checkpoint of job ``source`` (of the same project), for ``init_from``; verified
    against its sha256 (a TrainingError if it is gone or corrupt)."""
    from store.artifact_store import ArtifactError, get_store
    from training import TrainingError

    with session_scope(write=False) as s:
        job = repo.get_job(s, job_id)
        ck = repo.best_checkpoint(s, source, job.project_id if job is not None else None)
        ref = (ck.uri, ck.sha256, ck.size, ck.epoch) if ck is not None and ck.uri is not None else None
    if ref is None:
        raise TrainingError(f"init_from: job {source} has no best checkpoint to start from", "resume")
    try:
        return get_store().read(ref[0], ref[1], ref[2], what=f"init_from: the best checkpoint of job {source} "
                                                            f"(epoch {ref[3]})")
    except ArtifactError as exc:
        raise TrainingError(str(exc), "resume") from None


def run_next_job(message_job_id: str, settings: Settings | None = None,
                 send: outbox.Send | None = None) -> tuple[str, str]:
    """What the Celery task runs: claim the best queued job of the message's queue (priority, then
    age; :mod:`store.scheduling`), which may be another job than the message's, and run it like
    :func:`run_job`. Returns (the id of the job handled, its outcome)."""
    ran = {"id": message_job_id}
    outcome = run_job(message_job_id, settings, send, _by_priority=ran)
    return ran["id"], outcome


def run_job(job_id: str, settings: Settings | None = None, send: outbox.Send | None = None,
            _by_priority: dict[str, str] | None = None) -> str:
    """Claim ``job_id`` (compare-and-set; safe if delivered twice), train it, record the result.
    Returns the job's final status, ``"skipped"`` if it was not claimable, ``"lease_lost"`` if
    another claim took the job over while it ran (nothing more is written), or ``"requeued"`` if
    this worker is shutting down or the database could not be reached to claim it (the task then
    hands the message back to the broker), or ``"stalled"`` if its training made no step for its
    stall timeout (the attempt was ended and the job requeued; ``send`` sends its message now,
    else the outbox relay does). Exceptions other than the engine's own are re-raised after the
    job is recorded as failed."""
    with job_context(job_id):
        outcome = _run_job(job_id, settings or get_settings(), send, _by_priority)
        log.info("job %s: %s", _by_priority["id"] if _by_priority else job_id, outcome)
        return outcome


def _run_job(job_id: str, settings: Settings, send: outbox.Send | None, _by_priority: dict[str, str] | None) -> str:
    if SHUTDOWN.is_set():  # a message that arrives while this worker shuts down goes back untouched
        log.info("job %s arrived while this worker shuts down; handed back to the broker", job_id)
        return "requeued"
    try:
        claimed = leases.retry_transient(lambda: _claim(job_id, settings, _by_priority is not None), deadline_s=30.0,
                                         what=f"claim {job_id}")
    except Exception as exc:
        if not leases.is_transient(exc):
            raise
        log.error("job %s: the database is unreachable; handing the message back (%s)", job_id, exc)
        return "requeued"
    if claimed is None:
        log.info("job %s is not claimable (already handled or cancelled); skipping", job_id)
        return "skipped"
    token, attempt, spec_dict, snapshot, sweep_id, epochs, claimed_id = claimed
    if _by_priority is not None and claimed_id != job_id:
        log.info("message of job %s: job %s comes first (priority, then age); running it", job_id, claimed_id)
        _by_priority["id"] = job_id = claimed_id
        logs.job_id.set(claimed_id)  # the lines from here on are about the job run
    set_attempt(attempt)  # every line from here on carries it
    log.info("job %s: claimed, attempt %d%s", job_id, attempt, " (resuming from its snapshot)" if snapshot is not None else "")
    if os.environ.get(FAULT_ENV) == "1" and spec_dict.get("name") == FAULT_KILL_NAME:
        os.kill(os.getpid(), signal.SIGKILL)

    from worker.packs import run_pack_if_any

    # queued jobs of the same shape may train with it, fused (worker/packs.py)
    packed = run_pack_if_any(job_id, settings, send, token, attempt, spec_dict, snapshot, sweep_id, epochs)
    if packed is not None:
        return packed
    from worker.sweeps import make_reporter

    # a sweep trial's reporter also asks its pruner (the claimed row says whether it is one)
    reporter = make_reporter(job_id, settings, sweep_id=sweep_id, epochs=epochs, lease_token=token,
                             stall_timeout_s=spec_dict.get("stall_timeout_s") or settings.stall_timeout_s, send=send)
    if os.environ.get(FAULT_ENV) == "1" and spec_dict.get("name") == FAULT_STALL_NAME and attempt == 1:
        _hang_after_first_epoch(reporter)
    reporter.start_heartbeat()
    try:
        return _run_claimed(job_id, settings, reporter, spec_dict, snapshot, attempt)
    except leases.LeaseLost:
        if reporter.stalled:
            log.warning("job %s: attempt %d stalled and was ended; its training thread came back and stopped",
                        job_id, attempt)
            return "stalled"
        log.warning("job %s: attempt %d lost its lease (another attempt owns the job); stopped, nothing recorded",
                    job_id, attempt)
        return "lease_lost"
    finally:
        reporter.stop_heartbeat()


def _run_claimed(job_id: str, settings: Settings, reporter: DbReporter, spec_dict: dict[str, Any], snapshot: Any,
                 attempt: int) -> str:
    try:
        from training import SpecError, TrainingError

        resume_from = _verified_snapshot(job_id, snapshot) if snapshot is not None else None
        run_spec = _resolve_dataset(spec_dict, settings)
        if run_spec.get("kind") == "lr_find":
            return _run_lr_find(job_id, run_spec, reporter)
        from training import fit

        init = _init_weights(job_id, str(spec_dict["init_from"])) if spec_dict.get("init_from") and not resume_from else None
        result = fit(run_spec, reporter=reporter, should_stop=reporter.should_stop, resume_from=resume_from,
                     init_weights=init)
    except leases.LeaseLost:
        raise
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
    except leases.LeaseLost:
        raise
    except BaseException as exc:
        # Whatever fails after training (the last metrics, the best checkpoint, the final row),
        # the job must not stay 'running' (the reaper would requeue it forever).
        try:
            _finish_failed(job_id, reporter, f"internal error while recording the result: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - re-raise the original error below
            log.exception("job %s: could not record the failure", job_id)
        log.error("job %s: recording its result failed:\n%s", job_id, traceback.format_exc())
        raise


def _write(reporter: DbReporter, fn: Any, what: str) -> Any:
    """Run ``fn(session)`` in a transaction that starts with the lease fence, retrying transient
    database errors with backoff (store.leases.retry_transient)."""

    def tx() -> Any:
        with session_scope() as s:
            if reporter.lease_token is not None:
                leases.fence(s, reporter.job_id, reporter.lease_token)
            return fn(s)

    return leases.retry_transient(tx, deadline_s=WRITE_RETRY_DEADLINE_S, what=f"job {reporter.job_id}: {what}")


def _record_result(job_id: str, reporter: DbReporter, result: Any, attempt: int) -> str:
    if result.stop_reason == "cancelled" and (SHUTDOWN.is_set() or reporter.preempted):
        # a worker shutdown, or a preemption (store.scheduling.request_preemptions): the job goes
        # back to the queue with its snapshot, and its message back to the broker
        reason = "worker shutdown" if SHUTDOWN.is_set() else "preempted"
        reporter.flush(block=True)  # also reads whether the user asked to cancel meanwhile
        if not reporter.cancelled:
            reporter.write_pending_snapshot()
            requeued = _write(reporter, lambda s: repo.requeue_job(s, job_id, reason, spare_attempt=reason == "preempted"),
                              "requeue")
            if requeued:
                log.info("job %s stopped for %s; requeued", job_id, reason)
                return "requeued"
    stop_reason = result.stop_reason
    if stop_reason == "paused":
        # a sweep trial paused at an ASHA rung: its last epochs, the snapshot of this epoch and
        # the paused state commit together; the sweep resumes it from there, or ends it
        def pause(s: Any) -> bool:
            if not repo.pause_job(s, job_id, steps=result.steps, epochs_run=result.epochs_run, run_seconds=result.seconds,
                                  best=(result.monitor, result.best_value, result.best_epoch) if result.monitor else None):
                return False  # cancelled meanwhile: it ends cancelled below, not paused
            reporter.write_buffered(s)
            s.flush()
            _store_best(s, job_id, result)  # what a pruned trial keeps, should it never resume
            return True

        reporter.stage_buffered()
        if _write(reporter, pause, "pause"):
            reporter.buffered_written()
            return "paused"
        stop_reason = "cancelled"
    status = "succeeded"
    error = None
    if stop_reason == "cancelled":
        status = "cancelled"
    elif stop_reason in FAILED_STOP_REASONS:
        status, error = "failed", FAILED_STOP_REASONS[stop_reason]

    def finish(s: Any) -> None:
        # the last epochs and checkpoints commit with the result: one transaction, not two
        reporter.write_buffered(s)
        s.flush()  # the best checkpoint may be among them
        _store_best(s, job_id, result)
        _store_last(s, job_id, result, reporter)
        repo.finish_job(
            s, job_id, status=status, stop_reason=stop_reason, error=error,
            best=(result.monitor, result.best_value, result.best_epoch) if result.monitor else None,
            steps=result.steps, epochs_run=result.epochs_run, run_seconds=result.seconds,
            # the engine's info repeats the spec (with a "find" rate replaced by the finder's
            # suggestion, which info.lr_find holds): the job already serves its spec once
            info=json_safe({**{k: v for k, v in (result.info or {}).items() if k != "spec"},
                            "stopped_epoch": result.stopped_epoch, "attempt": attempt}),
        )

    # the last files, before the transaction (see DbReporter._stage)
    reporter.stage_buffered(getattr(result, "last_checkpoint", None))
    _write(reporter, finish, "finish")
    reporter.buffered_written()
    return status


def _store_best(s: Any, job_id: str, result: Any) -> None:
    """Mark the engine's best checkpoint; store it (or the final weights) if no row has it."""
    if result.best_checkpoint_sha256 and repo.mark_best_checkpoint(
        s, job_id, result.best_checkpoint_sha256, result.best_checkpoint
    ):
        return
    data = result.best_checkpoint
    last = getattr(result, "last_checkpoint", None)
    if data is None and last is not None:
        data = last.data  # no checkpoint was saved: the final weights, with their card
    if data is None and result.weights:
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in result.weights.items()})
    if data is None:
        return
    repo.add_checkpoint(
        s, job_id, epoch=result.best_epoch or result.epochs_run, step=result.steps, monitor=result.monitor,
        value=result.best_value, data=data, sha256=repo.sha256_hex(data), is_best=True,
    )


def _store_last(s: Any, job_id: str, result: Any, reporter: DbReporter) -> None:
    """Keep the last epoch's weights (before early stopping restored the best) as the job's
    newest checkpoint, so they can be downloaded as well as the best (its file was written before
    this transaction: ``reporter.stage_buffered``)."""
    last = getattr(result, "last_checkpoint", None)
    if last is not None:
        repo.add_last_checkpoint(s, job_id, epoch=last.epoch, step=last.step, monitor=last.monitor,
                                 value=last.value, data=last.data, sha256=last.sha256, stored=reporter.staged(last))


def _run_lr_find(job_id: str, spec: dict[str, Any], reporter: DbReporter) -> str:
    from training import lr_find

    out = lr_find(spec, should_stop=reporter.should_stop)
    status = "cancelled" if reporter.cancelled else "succeeded"
    _write(reporter, lambda s: repo.finish_job(
        s, job_id, status=status, stop_reason="cancelled" if reporter.cancelled else "completed",
        info=json_safe({"lr_find": out}),
    ), "finish")
    return status


def _finish_failed(job_id: str, reporter: DbReporter, error: str) -> None:
    try:
        reporter.flush(block=True)
    except leases.LeaseLost:
        raise
    except Exception:  # noqa: BLE001 - recording the failure matters more than the last metrics
        log.exception("could not write the last metrics of job %s", job_id)
    _write(reporter, lambda s: repo.finish_job(s, job_id, status="failed", stop_reason="error", error=error[:10_000]),
           "record the failure")
