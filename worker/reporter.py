"""The reporter the worker hands to ``training.fit``: batches metric writes, keeps a heartbeat,
stores checkpoints and resume snapshots, and answers ``should_stop`` from the database."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from typing import Any

from config.logs import in_current_context
from config.settings import Settings
from store import leases, repo
from store.artifact_store import Stored, checkpoint_key, get_store, snapshot_key
from store.db import session_scope
from store.floats import encode_float
from training import BaseReporter, Checkpoint, Snapshot


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


class DbReporter(BaseReporter):
    """Writes what the engine reports. Every ``flush_interval_s`` at most one transaction writes
    the buffered epochs, bumps the heartbeat and reads the cancel flag.

    With a ``lease_token`` (the claim's fencing token, :mod:`store.leases`) every write
    transaction starts with the fence: once another claim took the job, the next flush raises
    :class:`store.leases.LeaseLost` and writes nothing."""

    def __init__(self, job_id: str, settings: Settings, lease_token: int | None = None, stall_timeout_s: float = 0.0,
                 send: Any = None) -> None:
        self.job_id = job_id
        self.settings = settings
        self.lease_token = lease_token
        # the watchdog (in the heartbeat thread): no sign of training progress (a step polled, an
        # epoch end, a checkpoint, a snapshot) for this long after the engine started training (0:
        # never) ends the attempt as "stalled"; its message is sent with ``send`` (or relayed)
        self.stall_timeout_s = stall_timeout_s
        self.send = send
        self.last_progress: float | None = None  # set by on_start: loading data and building the model do not count
        self.stalled = False
        self.db_down_since: float | None = None
        self.unwritten_snapshot: Snapshot | None = None  # due, but its transaction failed
        self.heartbeat_every_s = min(HEARTBEAT_EVERY_S, settings.heartbeat_stale_s / 4)
        self.lease_lost = threading.Event()
        self._beating = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.buffer: list[dict[str, Any]] = []
        self.info: dict[str, Any] | None = None
        # a packed job's pack (worker/packs.py): merged into the info on_start writes, so the job
        # view keeps saying which pack the job runs in
        self.pack: dict[str, Any] | None = None
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
        self._staged: dict[str, Stored] = {}  # files already in the artifact store, by key (see _stage)
        self.last_built: float | None = None
        self.epochs_seen = 0
        # the state after the last epoch is kept, so the job can be continued with more epochs
        self.wants_final_snapshot = settings.keep_final_snapshot

    # -- the heartbeat thread
    def start_heartbeat(self) -> None:
        """Bump the job's heartbeat (fenced) every ``heartbeat_every_s`` from a daemon thread
        while the job runs: the lease says the process is alive, so loading a large dataset or
        one long step does not make the job look lost. If the fence fails the lease is gone: the
        training thread raises LeaseLost at its next poll."""
        if self.lease_token is None or self._beat_thread is not None:
            return
        self._beating.set()

        every = min(self.heartbeat_every_s, self.stall_timeout_s / 4) if self.stall_timeout_s else self.heartbeat_every_s

        def beat() -> None:
            while self._beating.is_set():
                try:
                    if self._stalled_for() is not None:
                        self._end_stalled()
                        return
                    with session_scope() as s:
                        leases.fence(s, self.job_id, self.lease_token)  # type: ignore[arg-type]
                except leases.LeaseLost:
                    self.lease_lost.set()
                    return
                except Exception as exc:  # noqa: BLE001 - transient: the training thread's writes retry
                    log.debug("job %s: heartbeat not written: %s", self.job_id, exc)
                if not self._beating.is_set():
                    return
                time.sleep(every)

        self._beat_thread = in_current_context(beat, name=f"trainyard-heartbeat-{self.job_id[:8]}", daemon=True)
        self._beat_thread.start()

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

    def stop_heartbeat(self) -> None:
        self._beating.clear()
        self._beat_thread = None

    # -- engine callbacks
    def on_start(self, info: dict[str, Any]) -> None:
        self.last_progress = time.monotonic()
        if self.pack is not None:
            info = {**info, "pack": {**info.get("pack", {}), **self.pack}}
        self.info = json_safe(info)
        self.flush()

    def on_epoch(self, metrics: dict[str, float]) -> None:
        self.last_progress = time.monotonic()
        self.buffer.append(dict(metrics))
        self.epochs_seen += 1
        if time.monotonic() - self.last_flush >= self.settings.flush_interval_s:
            self.flush()

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.last_progress = time.monotonic()
        # Buffered: written in the next flush's transaction (at most every flush interval, and
        # always at the end of the run), not one transaction per save.
        self.pending_checkpoints.append(checkpoint)
        if time.monotonic() - self.last_flush >= self.settings.flush_interval_s:
            self.flush()

    def wants_snapshot(self) -> bool:
        """Build a snapshot at most every SNAPSHOT_BUILD_EVERY_S of training (or every
        ``snapshot_interval_s`` if shorter; an epoch end always qualifies after that): a clean
        shutdown then redoes at most that much work."""
        every = min(SNAPSHOT_BUILD_EVERY_S, self.settings.snapshot_interval_s)
        return self.last_built is None or time.monotonic() - self.last_built >= every

    def on_snapshot(self, snapshot: Snapshot) -> None:
        self.last_progress = time.monotonic()
        now = time.monotonic()
        self.last_built = now
        if self.last_snapshot is not None and now - self.last_snapshot < self.settings.snapshot_interval_s:
            self.pending_snapshot = snapshot  # written only if the job must be resumed
            return
        self.last_snapshot = now
        self.pending_snapshot = None
        self.write_snapshot(snapshot)

    def write_pending_snapshot(self) -> None:
        """Write the newest snapshot not written yet (before handing the job back)."""
        if self.pending_snapshot is not None:
            self.unwritten_snapshot = self.pending_snapshot
            self.pending_snapshot = None
        self.flush(block=True)

    def on_final_snapshot(self, snapshot: Snapshot) -> None:
        """The state after the last epoch: written with the job's result (POST
        /v1/jobs/{id}/continue resumes from it)."""
        self.pending_snapshot = None
        self.unwritten_snapshot = snapshot

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

    def _stage(self, checkpoints: list[Checkpoint], snapshot: Snapshot | None) -> None:
        """Write the files of these checkpoints and snapshot to the artifact store before the
        transaction that records them opens: that transaction starts with the fence, which locks
        the job's row, and an upload inside it would hold the lock (and block the heartbeat and a
        cancel) for as long as the upload takes. A file written here and not recorded (the
        transaction failed) is written again by key, or removed with the job's folder."""
        store = get_store()
        items = [(checkpoint_key(self.job_id, c.sha256), c) for c in checkpoints]
        if snapshot is not None:
            items.append((snapshot_key(self.job_id, snapshot.sha256), snapshot))
        for key, item in items:
            if key not in self._staged:
                self._staged[key] = store.put(key, item.data, item.sha256)

    def stage_buffered(self, *extra: Checkpoint | None) -> None:
        """:meth:`_stage` what :meth:`write_buffered` will record (before its transaction), and the
        ``extra`` checkpoints the caller records in it (the last epoch's weights)."""
        self._stage([*self.pending_checkpoints, *(c for c in extra if c is not None)], self.unwritten_snapshot)

    def staged(self, checkpoint: Checkpoint) -> Stored | None:
        """The file of ``checkpoint`` if :meth:`_stage` wrote it."""
        return self._staged.get(checkpoint_key(self.job_id, checkpoint.sha256))

    def _write_items(self, s: Any, batch: list[dict[str, Any]], info: dict[str, Any] | None,
                     checkpoints: list[Checkpoint], snapshot: Snapshot | None) -> bool:
        for c in checkpoints:
            repo.add_checkpoint(
                s, self.job_id, epoch=c.epoch, step=c.step, monitor=c.monitor,
                value=c.value, data=c.data, sha256=c.sha256, is_best=c.is_best,
                stored=self.staged(c),
            )
        cancelled = repo.record_progress(s, self.job_id, batch, info=info)
        if snapshot is not None:
            repo.save_snapshot(
                s, self.job_id, epoch=snapshot.epoch, step=snapshot.step, data=snapshot.data, sha256=snapshot.sha256,
                stored=self._staged.get(snapshot_key(self.job_id, snapshot.sha256)),
            )
        return cancelled

    def write_buffered(self, s: Any) -> None:
        """Write everything buffered (epochs, checkpoints, info, the unwritten snapshot) in the
        caller's transaction, which it has fenced: the runner writes a job's last epochs together
        with its result. Nothing leaves the buffers until :meth:`buffered_written` (the caller's
        retry of a failed transaction writes them again)."""
        if not (self.buffer or self.info is not None or self.pending_checkpoints or self.unwritten_snapshot):
            return
        self._write_items(s, self.buffer, self.info, self.pending_checkpoints, self.unwritten_snapshot)

    def buffered_written(self) -> None:
        """The transaction of :meth:`write_buffered` committed."""
        self.buffer, self.info, self.pending_checkpoints, self.unwritten_snapshot = [], None, [], None
        self._staged.clear()

    def flush(self, *, block: bool = False, force: bool = False) -> None:
        """Write buffered epochs, checkpoints and the due snapshot + heartbeat (+ info once) in
        one transaction, and read the cancel flag; with nothing to write and a recent heartbeat,
        only the cancel flag (and the lease) is read. Raises LeaseLost if the job is no longer
        this attempt's. On a transient database error the batch is kept: with ``block`` the write
        is retried with backoff (up to WRITE_RETRY_DEADLINE_S), otherwise the next flush retries."""
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
