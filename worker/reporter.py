"""The reporter the worker hands to ``training.fit``: batches metric writes, keeps a heartbeat,
stores checkpoints and resume snapshots, and answers ``should_stop`` from the database."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from store import repo
from store.db import session_scope
from store.floats import encode_float
from store.settings import Settings
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

#: The heartbeat is written at least this often while a job runs (with every metrics batch too).
HEARTBEAT_EVERY_S = 5.0
SNAPSHOT_BUILD_EVERY_S = 1.0


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
    the buffered epochs, bumps the heartbeat and reads the cancel flag."""

    def __init__(self, job_id: str, settings: Settings) -> None:
        self.job_id = job_id
        self.settings = settings
        self.buffer: list[dict[str, Any]] = []
        self.info: dict[str, Any] | None = None
        self.cancelled = False
        self.last_flush = time.monotonic()
        self.last_heartbeat = 0.0
        self.last_snapshot: float | None = None
        self.pending_snapshot: Snapshot | None = None
        self.pending_checkpoints: list[Checkpoint] = []
        self.last_built: float | None = None
        self.epochs_seen = 0

    # -- engine callbacks
    def on_start(self, info: dict[str, Any]) -> None:
        self.info = json_safe(info)
        self.flush()

    def on_epoch(self, metrics: dict[str, float]) -> None:
        self.buffer.append(dict(metrics))
        self.epochs_seen += 1
        if time.monotonic() - self.last_flush >= self.settings.flush_interval_s:
            self.flush()

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        # Buffered: written in the next flush's transaction (at most every flush interval, and
        # always at the end of the run), not one transaction per save.
        self.pending_checkpoints.append(checkpoint)
        if time.monotonic() - self.last_flush >= self.settings.flush_interval_s:
            self.flush()

    def wants_snapshot(self) -> bool:
        """Build a snapshot at most every SNAPSHOT_BUILD_EVERY_S of training (an epoch end
        always qualifies after that): a clean shutdown then redoes at most that much work."""
        return self.last_built is None or time.monotonic() - self.last_built >= SNAPSHOT_BUILD_EVERY_S

    def on_snapshot(self, snapshot: Snapshot) -> None:
        now = time.monotonic()
        self.last_built = now
        if self.last_snapshot is not None and now - self.last_snapshot < self.settings.snapshot_interval_s:
            self.pending_snapshot = snapshot  # written only if the job must be resumed
            return
        self.last_snapshot = now
        self.pending_snapshot = None
        self.write_snapshot(snapshot)

    def write_pending_snapshot(self) -> None:
        if self.pending_snapshot is not None:
            self.write_snapshot(self.pending_snapshot)
            self.pending_snapshot = None

    def write_snapshot(self, snapshot: Snapshot) -> None:
        with session_scope() as s:
            repo.save_snapshot(
                s, self.job_id, epoch=snapshot.epoch, step=snapshot.step, data=snapshot.data, sha256=snapshot.sha256
            )

    def should_stop(self) -> bool:
        """Polled by the engine (every ~0.2 s); touches the database at most every flush interval."""
        if SHUTDOWN.is_set():
            return True
        if not self.cancelled and time.monotonic() - self.last_flush >= self.settings.flush_interval_s:
            self.flush()
        return self.cancelled

    # -- writing
    def flush(self) -> None:
        """Write buffered epochs + heartbeat (+ info once) and read the cancel flag. With nothing
        to write and a recent heartbeat, only the cancel flag is read."""
        now = time.monotonic()
        if not self.buffer and not self.pending_checkpoints and self.info is None and now - self.last_heartbeat < HEARTBEAT_EVERY_S:
            with session_scope(write=False) as s:
                self.cancelled = repo.is_cancel_requested(s, self.job_id) or self.cancelled
            self.last_flush = time.monotonic()
            return
        self.last_heartbeat = now
        batch, self.buffer = self.buffer, []
        info, self.info = self.info, None
        checkpoints, self.pending_checkpoints = self.pending_checkpoints, []
        try:
            with session_scope() as s:
                for c in checkpoints:
                    repo.add_checkpoint(
                        s, self.job_id, epoch=c.epoch, step=c.step, monitor=c.monitor,
                        value=c.value, data=c.data, sha256=c.sha256, is_best=c.is_best,
                    )
                self.cancelled = repo.record_progress(s, self.job_id, batch, info=info) or self.cancelled
        except Exception:
            self.buffer = batch + self.buffer  # keep them for the next try
            self.pending_checkpoints = checkpoints + self.pending_checkpoints
            self.info = self.info or info
            raise
        finally:
            self.last_flush = time.monotonic()
