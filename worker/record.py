"""The worker's record of one attempt at a job (:class:`RunRecord`): everything the attempt
writes, in one class, in the order a run writes it.

* **Claimed**: :meth:`RunRecord.open` builds the record of a claimed attempt (its lease token,
  attempt, stall timeout, and for a sweep trial its pruner, ``worker.sweeps.TrialPruner``);
  :meth:`RunRecord.heartbeat` keeps the lease from a thread while the attempt runs, and ends
  a stalled attempt.
* **Training**: the record is the run's ``training.Reporter``. It buffers the epochs, checkpoints
  and start info the engine reports and writes them at most every ``flush_interval_s`` in one
  transaction (:meth:`RunRecord.flush`), decides which resume snapshots are built and written,
  answers ``should_stop`` (cancel, preemption, shutdown, a lost lease), and asks a sweep trial's
  pruner at its decision epochs (``stop_request``).
* **Ended**: one transaction records how the attempt ended, with whatever is still buffered:
  :meth:`RunRecord.finish` (the result; or a requeue on shutdown or preemption; or a sweep
  trial's pause), :meth:`RunRecord.fail`, :meth:`RunRecord.finish_lr_find`.

With a ``lease_token`` (the claim's fencing token, :mod:`store.leases`) every write transaction
starts with the fence: once another claim took the job, the next write raises
:class:`store.leases.LeaseLost` and writes nothing. Files (checkpoints, snapshots) go to the
artifact store before the transaction that records them opens (:meth:`RunRecord._stage`).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from config.logs import in_current_context
from config.settings import Settings
from store import leases, repo
from store.artifact_store import Stored, checkpoint_key, get_store, snapshot_key
from store.db import session_scope
from store.floats import encode_float
from training import BaseReporter, Checkpoint, FitResult, Snapshot
from training.reporting import PAUSED  # not training.engine: no torch before the claim's heartbeat
from worker.sweeps import TrialPruner, trial_pruner


class SharedFlag:
    """A set-once flag in shared memory (a lock-free byte, inherited through fork): safe to set
    from a signal handler (no lock the interrupted code could hold) and visible to processes
    forked after it was created."""

    def __init__(self) -> None:
        try:
            self._value: Any = multiprocessing.get_context("fork").RawValue("b", 0)
        except ValueError:  # pragma: no cover - no fork (Windows): one process only
            self._value = multiprocessing.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def clear(self) -> None:
        self._value.value = 0

    def is_set(self) -> bool:
        return bool(self._value.value)


#: Set when the worker is shutting down: running jobs stop at the next poll and are requeued (to
#: resume from their latest snapshot) instead of finishing. Celery fires worker_shutting_down only
#: in its main process; the prefork pool's children are forked after ``worker_init`` imports this
#: module, so they share this flag and see the main process set it.
SHUTDOWN = SharedFlag()

#: The heartbeat is written at least this often while a job runs (with every metrics batch too),
#: and at least four times per heartbeat lease (``heartbeat_stale_s``) when that is shorter.
HEARTBEAT_EVERY_S = 5.0
SNAPSHOT_BUILD_EVERY_S = 1.0
#: Writes that must land (the last metrics, the result, a requeue) retry transient database errors
#: (connection lost, server restarting) with backoff for this long. Periodic flushes do not block
#: training: on such an error they keep their batch and try again at the next flush.
WRITE_RETRY_DEADLINE_S = 120.0

#: Stop reasons after which the job counts as failed (training blew up), not succeeded.
FAILED_STOP_REASONS = {
    "non_finite_loss": "training stopped: the loss became NaN or infinite",
    "diverged": "training stopped: the monitored value crossed the divergence threshold",
}

log = logging.getLogger("trainyard.worker")


def json_safe(value: Any) -> Any:
    """Make engine info JSON-storable (non-finite floats encoded, unknown objects as text)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return encode_float(value)
    return str(value)


class RunRecord(BaseReporter):
    """The record of one attempt at a job: see the module's docstring. Every ``flush_interval_s`` at
    most one transaction writes the buffered epochs, bumps the heartbeat and reads the cancel flag."""

    def __init__(self, job_id: str, settings: Settings, *, lease_token: int | None = None, attempt: int = 1,
                 stall_timeout_s: float = 0.0, send: Any = None, pruner: TrialPruner | None = None) -> None:
        self.job_id = job_id
        self.settings = settings
        self.lease_token = lease_token
        self.attempt = attempt
        # a sweep trial's pruner, asked at its decision epochs (None: not a trial, or no early termination)
        self.pruner = pruner
        # the watchdog (in the heartbeat thread): no sign of training progress (a step polled, an
        # epoch end, a checkpoint, a snapshot) for this long after the engine started training (0:
        # never) ends the attempt as "stalled"; its message is sent with ``send`` (or relayed)
        self.stall_timeout_s = stall_timeout_s
        self.send = send
        self.last_progress: float | None = None  # set by on_start: loading data and building the model do not count
        self.stalled = False
        self.db_down_since: float | None = None
        self.unwritten_snapshot: Snapshot | None = None  # due (or a pause's, or the final one), not written yet
        self.heartbeat_every_s = min(HEARTBEAT_EVERY_S, settings.heartbeat_stale_s / 4)
        self.lease_lost = threading.Event()
        self._stop_beating = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.buffer: list[dict[str, Any]] = []
        self.info: dict[str, Any] | None = None
        # a packed job's pack (worker/packs.py): merged into the info on_start writes, so the job
        # view keeps saying which pack the job runs in
        self.pack: dict[str, Any] | None = None
        # a packed job's flush group (:class:`FlushGroup`): its periodic flushes write every member's
        # buffer in one transaction; None: the record flushes alone
        self.group: FlushGroup | None = None
        self.final_pending = False  # a final snapshot waits for the result's transaction
        # how the attempt ended is recorded (a pack member recorded as it left its pack): it leaves
        # the pack's group flushes and heartbeat
        self.ended = False
        self.cancelled = False
        # preemption (settings.preemption): the job was asked to make room; read every flush interval
        self.preempted = False
        self.last_preempt_check = time.monotonic()
        self.last_flush = time.monotonic()
        self.last_heartbeat = 0.0
        # The run's start counts as the last snapshot: the first one is written snapshot_interval_s
        # into the run, like every later one (a job shorter than that writes none: a lost
        # worker's job then restarts from its beginning, at most snapshot_interval_s of work)
        self.last_snapshot: float | None = time.monotonic()
        self.pending_snapshot: Snapshot | None = None
        self.pending_checkpoints: list[Checkpoint] = []
        # the job does not keep every checkpoint's file (its spec's keep_checkpoints is not "all"):
        # a flush writes no file for a checkpoint that the same flush supersedes (see _superseded)
        self.drop_superseded = False
        self._staged: dict[str, Stored] = {}  # files already in the artifact store, by key (see _stage)
        # when a snapshot was last built; on_start sets it to the training's start, which counts as
        # one: the first is built SNAPSHOT_BUILD_EVERY_S into the training, as every later one (a
        # job shorter than that builds none before its end: a clean shutdown redoes all of it,
        # less than that much work)
        self.last_built: float | None = None
        self.epochs_seen = 0
        self.stop_request: str | None = None  # set by a trial's pruner (PAUSED or "pruned")
        # a pack member's pruner decision, made with the pack's (FlushGroup.decide): (epoch, request)
        self.decided: tuple[int, str | None] | None = None
        # the state after the last epoch is kept, so the job can be continued with more epochs
        self.wants_final_snapshot = settings.keep_final_snapshot

    @classmethod
    def open(cls, job_id: str, settings: Settings, *, lease_token: int, attempt: int, spec: dict[str, Any],
             sweep_id: str | None, epochs: int, send: Any = None,
             sweep_configs: dict[str, dict[str, Any] | None] | None = None) -> RunRecord:
        """The record of a claimed attempt, from what its claim read (lease token, attempt, spec,
        sweep id, epochs): its stall timeout is the spec's, else the server's; a trial of a sweep
        with early termination gets its sweep's pruner (only a trial costs a query; a pack's
        members share one per sweep through ``sweep_configs``)."""
        record = cls(job_id, settings, lease_token=lease_token, attempt=attempt,
                     stall_timeout_s=spec.get("stall_timeout_s") or settings.stall_timeout_s, send=send,
                     pruner=trial_pruner(job_id, sweep_id, epochs, sweep_configs))
        record.drop_superseded = spec.get("keep_checkpoints") != "all"
        return record

    # -- the heartbeat thread
    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Bump the job's heartbeat (fenced) every ``heartbeat_every_s`` from a daemon thread
        while the block runs: the lease says the process is alive, so loading a large dataset or
        one long step does not make the job look lost. If the fence fails the lease is gone: the
        training thread raises LeaseLost at its next poll. The same thread ends a stalled attempt."""
        self._start_heartbeat()
        try:
            yield
        finally:
            self._stop_beating.set()
            self._beat_thread = None

    def _start_heartbeat(self) -> None:
        if self.lease_token is None or self._beat_thread is not None:
            return
        self._stop_beating.clear()

        every = self._beat_interval()

        def beat() -> None:
            # the claim has just written the heartbeat: the first beat is due one interval later;
            # the thread ends as soon as the attempt does
            while not self._stop_beating.wait(every):
                try:
                    if self._stalled():
                        return
                    with session_scope() as s:
                        leases.fence(s, self.job_id, self.lease_token)  # type: ignore[arg-type]
                except leases.LeaseLost:
                    self.lease_lost.set()
                    return
                except Exception as exc:  # noqa: BLE001 - transient: the training thread's writes retry
                    log.debug("job %s: heartbeat not written: %s", self.job_id, exc)

        self._beat_thread = in_current_context(beat, name=f"trainyard-heartbeat-{self.job_id[:8]}", daemon=True)
        self._beat_thread.start()

    def _beat_interval(self) -> float:
        """How often the heartbeat beats (and the stall watchdog looks)."""
        return min(self.heartbeat_every_s, self.stall_timeout_s / 4) if self.stall_timeout_s else self.heartbeat_every_s

    def _stalled(self) -> bool:
        """The heartbeat's watchdog: True when training has made no progress for the stall
        timeout; the attempt is then ended (:meth:`_end_stalled`) and its heartbeat stops."""
        if self._stalled_for() is None:
            return False
        self._end_stalled()
        return True

    def _stalled_for(self) -> float | None:
        if not self.stall_timeout_s or self.last_progress is None:
            return None
        idle = time.monotonic() - self.last_progress
        return idle if idle >= self.stall_timeout_s else None

    def _end_stalled(self) -> None:
        """The training thread made no step for stall_timeout_s: end this attempt ("stalled";
        requeued like a lost worker's job, or failed after max_attempts). If the training thread
        comes back, its next poll raises LeaseLost and it stops without writing."""
        idle = self._stalled_for() or self.stall_timeout_s
        from orchestration.recovery import end_stalled_attempt

        done = end_stalled_attempt(self.job_id, self.lease_token, idle, self.send)  # type: ignore[arg-type]
        if done is not None:
            self.stalled = True
            log.warning("job %s: training made no step for %.0f s (stall_timeout_s %g); attempt ended, %s",
                        self.job_id, idle, self.stall_timeout_s, done)
        self.lease_lost.set()

    # -- engine callbacks
    def on_start(self, info: dict[str, Any]) -> None:
        self.last_progress = self.last_built = time.monotonic()
        if self.pack is not None:
            info = {**info, "pack": {**info.get("pack", {}), **self.pack}}
        self.info = json_safe(info)
        if self.group is not None:
            if self is self.group.records[-1]:
                self.group.flush()  # the pack's last member started: every member's start info in one transaction
        elif self.pruner is None:
            self.flush()
        # A trial's start info (device, parameter count) waits for its first epoch's write instead
        # of costing a transaction of its own: trials are short, and a sweep runs many
        # (bench/sweeps.py: per-trial overhead is what ASHA's short trials pay most for).

    def on_epoch(self, metrics: dict[str, float]) -> None:
        self.last_progress = time.monotonic()
        self.buffer.append(dict(metrics))
        self.epochs_seen += 1
        if time.monotonic() - self.last_flush >= self.settings.flush_interval_s:
            self.flush()
        if self.pruner is not None and self.stop_request is None:
            self._ask_pruner(int(metrics["epoch"]))

    def _ask_pruner(self, epoch: int) -> None:
        """At a trial's decision epoch, ask its sweep's pruner, from the stored trials plus this
        trial's buffered epochs, before they are written: a stopped trial ends at once and its last
        epochs are written with its result (one transaction fewer per pruned trial); a trial that
        goes on writes them right after the decision, so the decisions of trials running beside it
        see its value at this rung."""
        assert self.pruner is not None
        if not self.pruner.decides_at(epoch):
            return
        decided, self.decided = self.decided, None
        try:
            if decided is not None and decided[0] == epoch:  # decided with its pack (FlushGroup.decide)
                request = decided[1]
            else:
                request = self.pruner.decide(epoch, list(self.buffer))
            if request is not None:
                # ASHA with promotions pauses the trial (the engine hands over a snapshot of this
                # epoch; the sweep may resume it from there), plain pruning stops it for good
                self.stop_request = request
                log.info("trial %s of sweep %s %s after epoch %d", self.job_id, self.pruner.sweep_id, request, epoch)
                return  # the engine stops after this epoch; finish() writes the buffer with the result
        except Exception:  # noqa: BLE001 - a failed decision must not fail the trial: it trains on
            log.exception("trial %s: the pruning decision at epoch %d failed; the trial continues", self.job_id, epoch)
        if decided is not None and self.group is not None:
            self.group.went_on(self)  # the pack's members that go on write their epochs together
            return
        self.flush()

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.last_progress = time.monotonic()
        # Buffered: written in the next flush's transaction (at most every flush interval, and
        # always at the end of the run), not one transaction per save.
        self.pending_checkpoints.append(checkpoint)
        if time.monotonic() - self.last_flush >= self.settings.flush_interval_s:
            self.flush()

    def wants_snapshot(self) -> bool:
        """Build a snapshot every SNAPSHOT_BUILD_EVERY_S of training (or every
        ``snapshot_interval_s`` if shorter; the first epoch end after that much training since the
        last one, or since the training started): a clean shutdown then redoes at most that much
        work, and a job shorter than that builds none before its end."""
        every = min(SNAPSHOT_BUILD_EVERY_S, self.settings.snapshot_interval_s)
        return self.last_built is None or time.monotonic() - self.last_built >= every

    def on_snapshot(self, snapshot: Snapshot) -> None:
        if self.stop_request == PAUSED:
            self.unwritten_snapshot = snapshot  # written with the paused state, in finish()'s transaction
            return
        self.last_progress = time.monotonic()
        now = time.monotonic()
        self.last_built = now
        if self.last_snapshot is not None and now - self.last_snapshot < self.settings.snapshot_interval_s:
            self.pending_snapshot = snapshot  # written only if the job must be resumed
            return
        self.last_snapshot = now
        self.pending_snapshot = None
        self.write_snapshot(snapshot)

    def on_final_snapshot(self, snapshot: Snapshot) -> None:
        """The state after the last epoch: written with the job's result (POST
        /v1/jobs/{id}/continue resumes from it)."""
        self.pending_snapshot = None
        self.unwritten_snapshot = snapshot
        self.final_pending = True

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Write ``snapshot`` in one transaction with the epochs buffered so far: a snapshot is
        never ahead of the stored metrics, so a resumed run neither loses nor repeats an epoch's
        metrics."""
        self.unwritten_snapshot = snapshot
        self.flush(force=True)

    def should_stop(self) -> bool:
        """Polled by the engine (every ~0.2 s); touches the database at most every flush interval."""
        self.last_progress = time.monotonic()  # polled between steps: training is moving
        if self.lease_lost.is_set():
            raise leases.LeaseLost(f"job {self.job_id}: lease {self.lease_token} is no longer held")
        if SHUTDOWN.is_set():
            return True
        if not self.cancelled and time.monotonic() - self.last_flush >= self.settings.flush_interval_s:
            self.flush()
        if self.settings.preemption and not self.preempted:
            self._read_preempt_flag()
        return self.cancelled or self.preempted

    def _read_preempt_flag(self) -> None:
        if time.monotonic() - self.last_preempt_check < self.settings.flush_interval_s:
            return
        self.last_preempt_check = time.monotonic()
        try:
            with session_scope(write=False) as s:
                self.preempted = repo.is_preempt_requested(s, self.job_id)
        except Exception as exc:
            if not leases.is_transient(exc):
                raise  # a transient error: the next poll reads it again

    # -- writing
    def _cancel_flag(self, s: Any, *, write: bool) -> bool:
        if self.lease_token is None:
            return repo.is_cancel_requested(s, self.job_id)
        if write:
            return leases.fence(s, self.job_id, self.lease_token)
        return leases.check(s, self.job_id, self.lease_token)

    def _database_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.db_down_since is None:
            self.db_down_since = now
        log.warning("job %s: database unavailable for %.1f s (%s); keeping %d epoch(s) to write later",
                    self.job_id, now - self.db_down_since, type(exc).__name__, len(self.buffer))

    def _superseded(self, checkpoints: list[Checkpoint]) -> set[int]:
        """Positions of ``checkpoints`` (one flush's, in order) whose files recording them would
        drop at once (``store.repo.add_checkpoints`` keeps the files of the last one and of the
        best only): none are written. Empty when the job keeps every file."""
        if not self.drop_superseded or len(checkpoints) < 2:
            return set()
        bests = [k for k, c in enumerate(checkpoints) if c.is_best]
        keep = {len(checkpoints) - 1, *bests[-1:]}
        return {k for k in range(len(checkpoints)) if k not in keep}

    def _stage(self, checkpoints: list[Checkpoint], snapshot: Snapshot | None, extra: tuple[Checkpoint, ...] = ()) -> None:
        """Write the files of these checkpoints and snapshot to the artifact store before the
        transaction that records them opens: that transaction starts with the fence, which locks
        the job's row, and an upload inside it would hold the lock (and block the heartbeat and a
        cancel) for as long as the upload takes. A file written here and not recorded (the
        transaction failed) is written again by key, or removed with the job's folder."""
        stage_files([(self, self._unstaged(checkpoints, snapshot, extra))])

    def _unstaged(self, checkpoints: list[Checkpoint], snapshot: Snapshot | None,
                  extra: tuple[Checkpoint, ...] = ()) -> dict[str, Checkpoint | Snapshot]:
        """The files :meth:`_stage` writes for these, by key: those not written yet."""
        skip = self._superseded(checkpoints)
        kept = [c for k, c in enumerate(checkpoints) if k not in skip] + list(extra)
        items: dict[str, Checkpoint | Snapshot] = {checkpoint_key(self.job_id, c.sha256): c for c in kept}
        if snapshot is not None:
            items[snapshot_key(self.job_id, snapshot.sha256)] = snapshot
        return {key: item for key, item in items.items() if key not in self._staged}

    def _buffered_unstaged(self, *extra: Checkpoint | None) -> dict[str, Checkpoint | Snapshot]:
        """The files of what :meth:`_write_buffered` will record, and of the ``extra`` checkpoints
        recorded in it too (the last epoch's weights), not written yet (:meth:`_unstaged`)."""
        return self._unstaged(self.pending_checkpoints, self.unwritten_snapshot, tuple(c for c in extra if c is not None))

    def _stage_buffered(self, *extra: Checkpoint | None) -> None:
        """:meth:`_stage` what :meth:`_write_buffered` will record (before its transaction), and the
        ``extra`` checkpoints recorded in it too (the last epoch's weights)."""
        stage_files([(self, self._buffered_unstaged(*extra))])

    def _staged_file(self, checkpoint: Checkpoint) -> Stored | None:
        """The file of ``checkpoint`` if :meth:`_stage` wrote it."""
        return self._staged.get(checkpoint_key(self.job_id, checkpoint.sha256))

    def _checkpoint_items(self, checkpoints: list[Checkpoint]) -> list[dict[str, Any]]:
        """What ``store.repo.add_checkpoints`` records of these checkpoints (one flush's)."""
        skip = self._superseded(checkpoints)
        return [dict(epoch=c.epoch, step=c.step, monitor=c.monitor, value=c.value, data=c.data, sha256=c.sha256,
                     is_best=c.is_best, stored=self._staged_file(c), superseded=k in skip)
                for k, c in enumerate(checkpoints)]

    def _write_items(self, s: Any, batch: list[dict[str, Any]], info: dict[str, Any] | None,
                     checkpoints: list[Checkpoint], snapshot: Snapshot | None) -> bool:
        return write_items(s, [(self, batch, info, checkpoints, snapshot)])[self.job_id]

    def _snapshot_item(self, snapshot: Snapshot) -> dict[str, Any]:
        """What ``store.repo.save_snapshot`` records of ``snapshot`` (its file staged: :meth:`_stage`)."""
        return dict(epoch=snapshot.epoch, step=snapshot.step, data=snapshot.data, sha256=snapshot.sha256,
                    stored=self._staged.get(snapshot_key(self.job_id, snapshot.sha256)))

    def _buffered(self) -> WriteItems:
        """What :meth:`_write_buffered` writes, for :func:`write_items`."""
        return self, self.buffer, self.info, self.pending_checkpoints, self.unwritten_snapshot

    def _write_buffered(self, s: Any) -> None:
        """Write everything buffered (epochs, checkpoints, info, the unwritten snapshot) in the
        fenced transaction ``s`` that ends the attempt: a job's last epochs commit together with
        its result. Nothing leaves the buffers until :meth:`_buffered_written` (a retry of a failed
        transaction writes them again)."""
        if not (self.buffer or self.info is not None or self.pending_checkpoints or self.unwritten_snapshot):
            return
        write_items(s, [self._buffered()])

    def _buffered_written(self) -> None:
        """The transaction of :meth:`_write_buffered` committed."""
        self.buffer, self.info, self.pending_checkpoints, self.unwritten_snapshot = [], None, [], None
        self._staged.clear()

    def flush(self, *, block: bool = False, force: bool = False) -> None:
        """Write buffered epochs, checkpoints and the due snapshot + heartbeat (+ info once) in
        one transaction, and read the cancel flag; with nothing to write and a recent heartbeat,
        only the cancel flag (and the lease) is read. Raises LeaseLost if the job is no longer
        this attempt's. On a transient database error the batch is kept: with ``block`` the write
        is retried with backoff (up to WRITE_RETRY_DEADLINE_S), otherwise the next flush retries."""
        if self.group is not None and not block and not force and self.groupable():
            self.group.flush()
            return
        now = time.monotonic()
        idle = not (self.buffer or self.pending_checkpoints or self.info is not None or self.unwritten_snapshot)
        if idle and not force and now - self.last_heartbeat < self.heartbeat_every_s:
            try:
                with session_scope(write=False) as s:
                    self.cancelled = self._cancel_flag(s, write=False) or self.cancelled
                self.db_down_since = None
            except leases.LeaseLost:
                raise
            except Exception as exc:
                if block or not leases.is_transient(exc):
                    raise
                self._database_down(exc)
            finally:
                self.last_flush = time.monotonic()
            return
        batch, self.buffer = self.buffer, []
        info, self.info = self.info, None
        checkpoints, self.pending_checkpoints = self.pending_checkpoints, []
        snapshot = self.unwritten_snapshot

        def write() -> bool:
            with session_scope() as s:
                cancelled = self._cancel_flag(s, write=True)
                return self._write_items(s, batch, info, checkpoints, snapshot) or cancelled

        try:
            self._stage(checkpoints, snapshot)
            if block:
                cancelled = leases.retry_transient(write, deadline_s=WRITE_RETRY_DEADLINE_S, what=f"job {self.job_id}")
            else:
                cancelled = write()
        except Exception as exc:
            self.buffer = batch + self.buffer  # keep them for the next try
            self.pending_checkpoints = checkpoints + self.pending_checkpoints
            self.info = self.info or info
            if isinstance(exc, leases.LeaseLost) or block or not leases.is_transient(exc):
                raise
            self._database_down(exc)
            return
        finally:
            self.last_flush = time.monotonic()
        self.last_heartbeat = now
        self.db_down_since = None
        self._staged.clear()
        if self.unwritten_snapshot is snapshot:
            self.unwritten_snapshot = None
        self.cancelled = cancelled or self.cancelled

    def groupable(self) -> bool:
        """Whether a periodic flush of this record may go with its pack's group flush: not when a
        snapshot waits (a due one retried, a pause's or the final one, written with the result),
        nor a trial's stop request (its last epochs commit with its pause or result), nor once its
        lease is lost."""
        return (self.lease_token is not None and not self.lease_lost.is_set() and not self.ended and self.stop_request is None
                and self.unwritten_snapshot is None and not self.final_pending)

    # -- the end of the attempt: one transaction, with whatever is still buffered
    def _transaction(self, fn: Callable[[Any], Any], what: str) -> Any:
        """Run ``fn(session)`` in a transaction that starts with the lease fence, retrying transient
        database errors with backoff (store.leases.retry_transient)."""

        def tx() -> Any:
            with session_scope() as s:
                if self.lease_token is not None:
                    leases.fence(s, self.job_id, self.lease_token)
                return fn(s)

        return leases.retry_transient(tx, deadline_s=WRITE_RETRY_DEADLINE_S, what=f"job {self.job_id}: {what}")

    def finish(self, result: FitResult) -> str:
        """Record how the run ended and return the job's status: ``requeued`` (a worker shutdown or a
        preemption: back to the queue with its newest snapshot), ``paused`` (a sweep trial paused
        at a rung), or the final status with the result. Raises LeaseLost if another attempt owns
        the job. Whatever else fails here (the last metrics, the best checkpoint, the final row),
        the job is recorded failed (it must not stay 'running': the reaper would requeue it
        forever) and the error is re-raised."""
        try:
            return self._finish(result)
        except leases.LeaseLost:
            raise
        except BaseException as exc:
            try:
                self.fail(f"internal error while recording the result: {type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - re-raise the original error below
                log.exception("job %s: could not record the failure", self.job_id)
            log.error("job %s: recording its result failed:\n%s", self.job_id, traceback.format_exc())
            raise

    def _finish(self, result: FitResult) -> str:
        if result.stop_reason == "cancelled" and (SHUTDOWN.is_set() or self.preempted) and self._requeue():
            return "requeued"
        stop_reason = result.stop_reason
        if stop_reason == PAUSED:
            if self._pause(result):
                return PAUSED
            stop_reason = "cancelled"  # cancelled meanwhile: it ends cancelled, not paused
        status, finish = self._final(result, stop_reason)
        self._stage_buffered(result.last_checkpoint)  # the last files, before the transaction (see _stage)
        self._transaction(finish, "finish")
        self._buffered_written()
        return status

    def ends_plainly(self, result: FitResult) -> bool:
        """Whether :meth:`finish` records ``result`` as the job's final status (not a requeue on
        shutdown or preemption, nor a sweep trial's pause): what a pack's members can record
        together (:meth:`FlushGroup.finish`)."""
        if result.stop_reason == PAUSED:
            return False
        return not (result.stop_reason == "cancelled" and (SHUTDOWN.is_set() or self.preempted))

    def _final(self, result: FitResult, stop_reason: str | None) -> tuple[str, Callable[..., None]]:
        """The final status of a run that ended with ``stop_reason``, and the body of the fenced
        transaction that records it with whatever is still buffered (the files staged first:
        ``self._stage_buffered(result.last_checkpoint)``). A pack's members record theirs together:
        :meth:`FlushGroup.finish`, through the same :func:`record_ends`."""
        status, end = self._end(result, stop_reason)

        def finish(s: Any) -> None:
            # the last epochs and checkpoints commit with the result: one transaction, not two
            self._write_buffered(s)
            record_ends(s, [(self, result, end)])

        return status, finish

    def _end(self, result: FitResult, stop_reason: str | None) -> tuple[str, dict[str, Any]]:
        """The final status of a run that ended with ``stop_reason``, and the keywords of
        ``store.repo.finish_job`` that record it."""
        status = "succeeded"
        error = None
        if stop_reason == "cancelled":
            status = "cancelled"
        elif stop_reason in FAILED_STOP_REASONS:
            status, error = "failed", FAILED_STOP_REASONS[stop_reason]

        return status, dict(
            status=status, stop_reason=stop_reason, error=error,
            best=(result.monitor, result.best_value, result.best_epoch) if result.monitor else None,
            steps=result.steps, epochs_run=result.epochs_run, run_seconds=result.seconds,
            # the engine's info repeats the spec (with a "find" rate replaced by the finder's
            # suggestion, which info.lr_find holds): the job already serves its spec once
            info=json_safe({**{k: v for k, v in (result.info or {}).items() if k != "spec"},
                            "stopped_epoch": result.stopped_epoch, "attempt": self.attempt}),
        )

    def _requeue(self) -> bool:
        """A worker shutdown, or a preemption (store.scheduling.request_preemptions): the job goes
        back to the queue with its newest snapshot (and its message back to the broker), unless the
        user asked to cancel it meanwhile. Whether it was requeued."""
        reason = "worker shutdown" if SHUTDOWN.is_set() else "preempted"
        self.flush(block=True)  # also reads whether the user asked to cancel meanwhile
        if self.cancelled:
            return False
        if self.pending_snapshot is not None:  # the newest snapshot not written yet
            self.unwritten_snapshot = self.pending_snapshot
            self.pending_snapshot = None
        self.flush(block=True)
        requeued = self._transaction(
            lambda s: repo.requeue_job(s, self.job_id, reason, spare_attempt=reason == "preempted"), "requeue")
        if requeued:
            log.info("job %s stopped for %s; requeued", self.job_id, reason)
        return bool(requeued)

    def _pause(self, result: FitResult) -> bool:
        """A sweep trial paused at an ASHA rung: its last epochs, the snapshot of this epoch and the
        paused state commit together; the sweep resumes it from there, or ends it. False if the
        job was cancelled meanwhile (nothing written)."""

        def pause(s: Any) -> bool:
            if not repo.pause_job(s, self.job_id, **self._pause_values(result)):
                return False
            self._write_buffered(s)
            s.flush()
            self._store_best(s, result)  # what a pruned trial keeps, should it never resume
            return True

        self._stage_buffered()
        if not self._transaction(pause, "pause"):
            return False
        self._buffered_written()
        return True

    @staticmethod
    def _pause_values(result: FitResult) -> dict[str, Any]:
        """The keywords of ``store.repo.pause_job`` for a run paused at a rung."""
        return dict(steps=result.steps, epochs_run=result.epochs_run, run_seconds=result.seconds,
                    best=(result.monitor, result.best_value, result.best_epoch) if result.monitor else None)

    def _store_best(self, s: Any, result: FitResult) -> None:
        """Mark the engine's best checkpoint; store it (or the final weights) if no row has it."""
        store_bests(s, [(self, result)])

    def _store_unmarked_best(self, s: Any, result: FitResult) -> None:
        """The engine's best when no checkpoint row has it: its bytes, else the final weights."""
        data = result.best_checkpoint
        last = result.last_checkpoint
        if data is None and last is not None:
            data = last.data  # no checkpoint was saved: the final weights, with their card
        if data is None and result.weights:
            from safetensors.torch import save

            data = save({k: v.detach().cpu().contiguous() for k, v in result.weights.items()})
        if data is None:
            return
        repo.add_checkpoint(
            s, self.job_id, epoch=result.best_epoch or result.epochs_run, step=result.steps, monitor=result.monitor,
            value=result.best_value, data=data, sha256=repo.sha256_hex(data), is_best=True,
        )

    def _last_item(self, last: Checkpoint) -> dict[str, Any]:
        """The last epoch's weights (before early stopping restored the best), as
        ``store.repo.add_last_checkpoint`` keeps them: the job's newest checkpoint, so they can be
        downloaded as well as the best (its file was written before the transaction:
        :meth:`_stage_buffered`)."""
        return dict(epoch=last.epoch, step=last.step, monitor=last.monitor, value=last.value, data=last.data,
                    sha256=last.sha256, stored=self._staged_file(last))

    def fail(self, error: str) -> None:
        """Record the attempt failed with ``error``, after writing what is buffered (if that fails,
        the failure is recorded anyway). Raises LeaseLost if another attempt owns the job."""
        try:
            self.flush(block=True)
        except leases.LeaseLost:
            raise
        except Exception:  # noqa: BLE001 - recording the failure matters more than the last metrics
            log.exception("could not write the last metrics of job %s", self.job_id)
        self._transaction(lambda s: repo.finish_job(s, self.job_id, status="failed", stop_reason="error",
                                                    error=error[:10_000]), "record the failure")

    def finish_lr_find(self, out: dict[str, Any]) -> str:
        """Record an ``lr_find`` job's curve and suggestion (``out``) with its status."""
        status = "cancelled" if self.cancelled else "succeeded"
        self._transaction(lambda s: repo.finish_job(
            s, self.job_id, status=status, stop_reason="cancelled" if self.cancelled else "completed",
            info=json_safe({"lr_find": out}),
        ), "finish")
        return status


#: what :func:`write_items` writes for one record: (record, epochs, info, checkpoints, snapshot)
WriteItems = tuple[RunRecord, list[dict[str, Any]], "dict[str, Any] | None", list[Checkpoint], "Snapshot | None"]


def write_items(s: Any, parts: list[WriteItems]) -> dict[str, bool]:
    """Write each record's epochs, info, checkpoints and snapshot in the transaction ``s``: one
    record's flush, or a pack's members' in the same few statements for all of them (their
    checkpoints in one ``add_checkpoints_many``, their epochs in one ``record_progress_many``).
    Each job's cancel flag."""
    if not parts:
        return {}
    repo.add_checkpoints_many(s, {r.job_id: r._checkpoint_items(checkpoints) for r, _, _, checkpoints, _ in parts})
    flags = repo.record_progress_many(s, [(r.job_id, batch, info) for r, batch, info, _, _ in parts])
    repo.save_snapshots(s, {r.job_id: r._snapshot_item(snapshot) for r, *_, snapshot in parts if snapshot is not None})
    return flags


def store_bests(s: Any, ended: list[tuple[RunRecord, FitResult]]) -> None:
    """Mark each run's best checkpoint (one ``mark_best_checkpoints`` for all of them); a run whose
    best no row has stores it (or its final weights) on its own."""
    marked = repo.mark_best_checkpoints(s, [(r.job_id, res.best_checkpoint_sha256, res.best_checkpoint)
                                            for r, res in ended if res.best_checkpoint_sha256])
    for r, res in ended:
        if not marked.get(r.job_id):
            r._store_unmarked_best(s, res)


def record_ends(s: Any, ends: list[tuple[RunRecord, FitResult, dict[str, Any]]]) -> None:
    """Record how each run ended (``(record, result, finish_job's keywords)``), its buffers
    already written in ``s``: the best checkpoint marked, the last epoch's weights kept, the final
    row, for one run (:meth:`RunRecord.finish`) or a pack's members together (:meth:`FlushGroup.finish`)."""
    s.flush()  # the best checkpoint may be among the rows just written
    store_bests(s, [(r, res) for r, res, _ in ends])
    repo.add_last_checkpoints(s, {r.job_id: r._last_item(res.last_checkpoint) for r, res, _ in ends
                                  if res.last_checkpoint is not None})
    repo.finish_jobs(s, {r.job_id: end for r, _, end in ends})


class FlushGroup:
    """The records of one pack (``worker/packs.py``): when one member's periodic flush is due, every
    member that can (:meth:`RunRecord.groupable`) writes its buffered epochs and checkpoints, bumps
    its heartbeat and reads its cancel flag in one transaction, instead of one transaction per
    member per flush interval (27 members: 54 SQLite commits a second). Each member's part starts
    with its own fence, as its own flush does: a member whose lease is gone writes nothing (its
    next poll raises LeaseLost, which the pack isolates) and the others' parts commit. What each
    job records is unchanged; only when its rows commit. Snapshots are never written here (a
    due snapshot is written by the member's own forced flush, as solo)."""

    def __init__(self, records: list[RunRecord]) -> None:
        self.records = records
        for r in records:
            r.group = self
        self.going_on: set[str] = set()  # members decided together that go on and have not said so yet

    def decide(self, ended: list[tuple[int, dict[str, Any]]]) -> None:
        """The pack's epoch end (``training.fused.fit_fused``'s ``on_epoch_logs``: ``(member index,
        its epoch's logs)``, before any member's epoch end runs): the members that are trials of
        one sweep and end one of its pruner's decision epochs are decided together, in one read
        of the sweep's trials (``worker.sweeps.prune_decisions``), each ranked against all of them
        (as solo trials, one after another, are ranked against those before them). Each member's
        own epoch end then takes its decision (:meth:`RunRecord._ask_pruner`), and the members
        that go on write their epochs in one transaction, after the last of them (trials elsewhere
        decide with their values at the rung). A member alone at its rung, or a failed read,
        decides on its own, as solo."""
        from worker.sweeps import prune_decisions

        self.going_on = set()
        asked: dict[str, list[tuple[RunRecord, int, dict[str, Any]]]] = {}
        for k, logs in ended:
            r = self.records[k]
            epoch = int(logs["epoch"])
            if r.pruner is not None and r.stop_request is None and r.pruner.decides_at(epoch):
                asked.setdefault(r.pruner.sweep_id, []).append((r, epoch, logs))
        for sweep_id, members in asked.items():
            if len(members) < 2:
                continue
            try:
                stopped = prune_decisions(sweep_id, [(r.job_id, epoch, [*r.buffer, logs]) for r, epoch, logs in members])
            except Exception:  # noqa: BLE001 - each member then decides on its own, as solo
                log.exception("pack of %s: the pruning decision of its trials at one rung failed; each decides alone",
                              self.records[0].job_id)
                continue
            for r, epoch, _ in members:
                assert r.pruner is not None
                r.decided = (epoch, r.pruner.request(r.job_id in stopped))
                if r.job_id not in stopped:
                    self.going_on.add(r.job_id)

    def went_on(self, record: RunRecord) -> None:
        """``record``'s trial goes on after a decision made with the pack's: once every member
        that goes on has said so, their epochs (the rung's values) are written together."""
        self.going_on.discard(record.job_id)
        if not self.going_on:
            self.flush()

    def flush(self) -> None:
        members = [r for r in self.records if r.groupable()]
        now = time.monotonic()
        taken = []
        for r in members:
            taken.append((r, r.buffer, r.info, r.pending_checkpoints))
            r.buffer, r.info, r.pending_checkpoints = [], None, []
        done: dict[int, bool] = {}

        def restore(r: RunRecord, batch: list[dict[str, Any]], info: dict[str, Any] | None,
                    checkpoints: list[Checkpoint]) -> None:
            r.buffer = batch + r.buffer
            r.pending_checkpoints = checkpoints + r.pending_checkpoints
            r.info = r.info or info

        try:
            stage_files([(r, r._unstaged(checkpoints, None)) for r, _, _, checkpoints in taken])
            with session_scope() as s:
                # the fences first, all in one statement: a member whose lease is gone writes nothing
                held = leases.fence_many(s, {r.job_id: r.lease_token for r, *_ in taken if r.lease_token is not None})
                parts: list[WriteItems] = []
                for k, (r, batch, info, checkpoints) in enumerate(taken):
                    if r.lease_token is None:
                        cancelled = r._cancel_flag(s, write=True)
                    elif r.job_id in held:
                        cancelled = held[r.job_id]
                    else:
                        r.lease_lost.set()  # its next poll raises LeaseLost: it leaves the pack
                        continue
                    if batch or info is not None or checkpoints:  # else the fence was all (as a solo idle flush)
                        parts.append((r, batch, info, checkpoints, None))
                    done[k] = cancelled
                # then every member's checkpoints and epochs in a few statements for all of them
                flags = write_items(s, parts)
                for k, (r, *_) in enumerate(taken):
                    if k in done:
                        done[k] = flags.get(r.job_id, False) or done[k]
        except Exception as exc:
            for r, batch, info, checkpoints in taken:
                restore(r, batch, info, checkpoints)
            for r in members:
                r.last_flush = time.monotonic()
            if not leases.is_transient(exc):
                raise
            for r in members:
                r._database_down(exc)
            return
        for k, (r, batch, info, checkpoints) in enumerate(taken):
            r.last_flush = time.monotonic()
            if k not in done:
                restore(r, batch, info, checkpoints)  # lease lost: nothing written; kept as its own flush keeps them
                continue
            r.last_heartbeat = now
            r.db_down_since = None
            r._staged.clear()
            r.cancelled = done[k] or r.cancelled

    def finish(self, results: list[tuple[RunRecord, FitResult]]) -> dict[str, str]:
        """Record how the pack's members' runs ended in one transaction, instead of one per
        member: each member's part starts with its own fence and is what its own
        :meth:`RunRecord.finish` writes (buffered epochs and checkpoints, the snapshot of a pause,
        best and last checkpoints, the final row, or the paused state of a trial stopped at a
        rung). Returns the status of each member recorded here, by job id (``"lease_lost"`` for a
        member whose fence failed: nothing written for it). Members not in the answer finish on
        their own (:meth:`RunRecord.finish`): those requeued (a shutdown, a preemption), a trial
        asked to cancel while it paused (it ends cancelled), and all of them if the shared
        transaction failed (it is rolled back whole; each member's own transaction then retries,
        or records its own failure, as a solo run's)."""
        ending = [(r, res) for r, res in results
                  if r.lease_token is not None and not r.lease_lost.is_set() and (r.ends_plainly(res) or res.stop_reason == PAUSED)]
        if len(ending) < 2:
            return {}
        parts = []
        out: dict[str, str] = {}
        try:
            files = []  # every member's files, written together before the transaction (see _stage)
            for r, res in ending:
                if res.stop_reason == PAUSED:
                    files.append((r, r._buffered_unstaged()))  # its epochs and its snapshot at the rung
                    parts.append((r, res, PAUSED, None))
                    continue
                status, end = r._end(res, res.stop_reason)
                files.append((r, r._buffered_unstaged(res.last_checkpoint)))
                parts.append((r, res, status, end))
            stage_files(files)
            with session_scope() as s:
                held = leases.fence_many(s, {r.job_id: r.lease_token for r, *_ in parts})  # type: ignore[misc]
                out.update({r.job_id: "lease_lost" for r, *_ in parts if r.job_id not in held})  # nothing written for it
                paused = set(repo.pause_jobs(s, {r.job_id: r._pause_values(res) for r, res, status, _ in parts
                                                 if status == PAUSED and r.job_id in held}))
                # a trial asked to cancel meanwhile is not paused: it finishes on its own (cancelled)
                mine = [p for p in parts if p[0].job_id in held and (p[2] != PAUSED or p[0].job_id in paused)]
                # what each member's own finish writes, in a few statements for all of them
                write_items(s, [r._buffered() for r, *_ in mine])
                s.flush()  # the best checkpoints may be among the rows just written
                store_bests(s, [(r, res) for r, res, status, _ in mine if status == PAUSED])  # what a pruned trial keeps
                ends = [(r, res, end) for r, res, status, end in mine if status != PAUSED]
                if ends:
                    record_ends(s, ends)
                out.update({r.job_id: status for r, _, status, _ in mine})
        except Exception as exc:  # noqa: BLE001 - rolled back: every member finishes on its own
            log.warning("pack of %s: the members' results could not be recorded together (%s: %s); "
                        "each is recorded on its own", self.records[0].job_id, type(exc).__name__, exc)
            return {}
        for r, _, status, _ in parts:
            if out.get(r.job_id) == status:
                r._buffered_written()
        return out


def stage_files(parts: list[tuple[RunRecord, dict[str, Checkpoint | Snapshot]]]) -> None:
    """Write the files of several records (each one's :meth:`RunRecord._unstaged`) to the artifact
    store in one :meth:`~store.artifact_store.ArtifactStore.put_many` (their fsyncs together: a
    pack's flush writes a file per member), and note each as staged on its record."""
    flat = [(r, key, item) for r, items in parts for key, item in items.items()]
    if not flat:
        return
    stored = get_store().put_many([(key, item.data, item.sha256) for _, key, item in flat])
    for (r, key, _), got in zip(flat, stored, strict=True):
        r._staged[key] = got


@contextmanager
def pack_heartbeat(records: list[RunRecord]) -> Iterator[None]:
    """:meth:`RunRecord.heartbeat` for every member of a pack, from one thread for the whole pack:
    each member's stall watchdog, then one fence of all their leases in one statement (a member
    whose lease is gone gets ``LeaseLost`` at its next poll, and its heartbeat stops, as its own
    thread's would; so does one whose job has ended). One thread, not one per member: starting
    32 threads beside a busy training thread cost ~25 ms a pack."""
    beating = [r for r in records if r.lease_token is not None]
    stop = threading.Event()

    def beat() -> None:
        live = list(beating)
        while live and not stop.wait(min(r._beat_interval() for r in live)):
            try:
                live = [r for r in live if not r.lease_lost.is_set() and not r.ended and not r._stalled()]
                if not live:
                    return
                with session_scope() as s:
                    held = leases.fence_many(s, {r.job_id: r.lease_token for r in live})  # type: ignore[misc]
                for r in live:
                    if r.job_id not in held:
                        r.lease_lost.set()
                live = [r for r in live if r.job_id in held]
            except Exception as exc:  # noqa: BLE001 - transient: the training thread's writes retry
                log.debug("pack of %s: heartbeat not written: %s", records[0].job_id, exc)

    if beating:
        in_current_context(beat, name=f"trainyard-heartbeat-pack-{records[0].job_id[:8]}", daemon=True).start()
    try:
        yield
    finally:
        stop.set()
