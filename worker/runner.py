"""Running one job, top to bottom: claim it (:func:`_claim`), open its record
(``worker.record.RunRecord``: buffering, lease fencing, snapshots, the final transaction), train
it (``training.fit``, reporting to the record), and record how it ended (``RunRecord.finish`` or
``RunRecord.fail``). Queued jobs of the claimed job's shape may train with it, fused
(``worker/packs.py``), each with its own record."""

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
from worker.datasets import resolve_dataset
from worker.record import SHUTDOWN, RunRecord

log = logging.getLogger("trainyard.worker")


#: Test-only fault injection, honoured only when the environment variable of this name is "1"
#: (set by the fault-tolerance tests, never by the service): a job named FAULT_KILL_NAME kills
#: its worker process (SIGKILL) right after each claim, like a job that crashes native code.
FAULT_ENV = "TRAINYARD_TEST_FAULTS"
FAULT_KILL_NAME = "test-fault-kill-worker"
#: ... and a job named FAULT_STALL_NAME hangs its training thread after its first epoch, on its
#: first attempt, for FAULT_STALL_S (like a step stuck in native code), then carries on.
FAULT_STALL_NAME = "test-fault-stall-worker"
FAULT_STALL_S = 10.0


def worker_name() -> str:
    """host:pid, plus /gpuN when the process is pinned to device(s) N (``trainyard worker --gpus``)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}:{os.getpid()}" + (f"/gpu{visible}" if visible else "")


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

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)  # TRAINYARD_TORCH_THREADS: solo and packed jobs alike
    from worker.packs import run_pack_if_any

    # queued jobs of the same shape may train with it, fused (worker/packs.py)
    packed = run_pack_if_any(job_id, settings, send, token, attempt, spec_dict, snapshot, sweep_id, epochs)
    if packed is not None:
        return packed
    record = RunRecord.open(job_id, settings, lease_token=token, attempt=attempt, spec=spec_dict, sweep_id=sweep_id,
                            epochs=epochs, send=send)
    if os.environ.get(FAULT_ENV) == "1" and spec_dict.get("name") == FAULT_STALL_NAME and attempt == 1:
        _hang_after_first_epoch(record)
    with record.heartbeat():
        try:
            return _train(job_id, settings, record, spec_dict, snapshot)
        except leases.LeaseLost:
            if record.stalled:
                log.warning("job %s: attempt %d stalled and was ended; its training thread came back and stopped",
                            job_id, attempt)
                return "stalled"
            log.warning("job %s: attempt %d lost its lease (another attempt owns the job); stopped, nothing recorded",
                        job_id, attempt)
            return "lease_lost"


def _train(job_id: str, settings: Settings, record: RunRecord, spec_dict: dict[str, Any], snapshot: Any) -> str:
    """Train the claimed job, reporting to its record, and record how it ended; its status. A
    LeaseLost propagates (nothing is written); other exceptions than the engine's own are re-raised
    after the job is recorded failed."""
    from training import SpecError, TrainingError

    try:
        resume_from = _verified_snapshot(job_id, snapshot) if snapshot is not None else None
        run_spec = resolve_dataset(spec_dict, settings)
        if run_spec.get("kind") == "lr_find":
            from training import lr_find

            return record.finish_lr_find(lr_find(run_spec, should_stop=record.should_stop,
                                                     one_thread_below=settings.torch_one_thread_below))
        from training import fit

        init = _init_weights(job_id, str(spec_dict["init_from"])) if spec_dict.get("init_from") and not resume_from else None
        result = fit(run_spec, reporter=record, should_stop=record.should_stop, resume_from=resume_from,
                     init_weights=init, one_thread_below=settings.torch_one_thread_below)
    except leases.LeaseLost:
        raise
    except (SpecError, TrainingError) as exc:
        record.fail(failure_reason(exc))
        return "failed"
    except (KeyboardInterrupt, SystemExit) as exc:
        record.fail(failure_reason(exc))
        raise
    except BaseException as exc:
        record.fail(failure_reason(exc))
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        raise
    return record.finish(result)


def failure_reason(exc: BaseException) -> str:
    """The error a run that raised ``exc`` is recorded failed with (``RunRecord.fail``): the
    engine's own errors (``SpecError``, ``TrainingError``) as they say, the worker's stop, or an
    internal error. The one home of this text: a solo run (:func:`_train`) and a pack's members
    (``worker/packs.py``: a snapshot that cannot be read or restored, a pack that fails) use it."""
    from training import SpecError, TrainingError

    if isinstance(exc, SpecError | TrainingError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return f"the worker was stopped while the job ran ({type(exc).__name__}); submit it again"
    return f"internal error: {type(exc).__name__}: {exc}"


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
        return job.lease_token, job.attempts, dict(job.spec), resume_snapshot(s, job), job.sweep_id, job.epochs, job.id


def resume_snapshot(s: Any, job: Any) -> Any:
    """The snapshot row a just-claimed attempt of ``job`` resumes from (detached from the session;
    its bytes: :func:`_verified_snapshot`), or None: a first attempt starts fresh, a later one (a
    requeued job, a promoted or continued one) resumes from the job's latest snapshot if it has
    one. The one home of this rule: a solo claim (:func:`_claim`) and a pack's members
    (``worker/packs.py``) both use it."""
    snapshot = repo.get_snapshot(s, job.id) if job.attempts > 1 else None
    if snapshot is not None:
        s.expunge(snapshot)
    return snapshot


def claim_by_priority(s: Any, message_job_id: str, settings: Settings) -> Any:
    """Claim the best queued job of the queue ``message_job_id``'s message came on
    (:func:`store.scheduling.claim_next`), or None when none is queued (the caller then tries the
    message's own job: the take-over of a lost one). The message's outbox rows are dropped by the
    caller (it arrived); those of the job taken stay, so its message, sent or still to be sent,
    starts the next job."""
    return scheduling.claim_next(s, message_job_id, worker_name(), settings.heartbeat_stale_s)


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


def _hang_after_first_epoch(record: RunRecord) -> None:
    import time

    on_epoch = record.on_epoch

    def hanging(metrics: dict[str, float]) -> None:
        on_epoch(metrics)
        if record.epochs_seen == 1:
            record.flush(force=True)  # epoch 1 is written: its event tells when the hang began
            time.sleep(FAULT_STALL_S)

    record.on_epoch = hanging  # type: ignore[method-assign]
