"""What the engine tells its caller while it trains, and what it returns.

No torch here: the worker implements :class:`Reporter`; the API reads the same field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

#: The stop reason of a sweep trial paused at a rung (its snapshot handed over; the sweep resumes it).
PAUSED = "paused"
STOP_REASONS = ("completed", "early_stopping", "non_finite_loss", "diverged", "cancelled", "max_steps", "pruned", PAUSED)


@dataclass(frozen=True)
class Checkpoint:
    """Model weights (parameters and buffers) as safetensors bytes."""

    epoch: int  # 1-based epoch at whose end (or during which, for save_freq=N) it was taken
    step: int  # optimizer updates applied when it was taken
    monitor: str | None
    value: float | None
    data: bytes
    sha256: str
    is_best: bool = True  # the run's best so far (save_best_only false also reports non-best saves)


@dataclass(frozen=True)
class Snapshot:
    """The full training state at the end of an epoch: pass ``data`` as ``fit(resume_from=...)``."""

    epoch: int  # 1-based: the last completed epoch
    step: int
    data: bytes
    sha256: str


class Reporter(Protocol):
    """Receives progress from ``training.fit``: everything the engine reads of or tells its reporter
    (no attribute is probed). Subclass :class:`BaseReporter`, which implements all of it with
    defaults, and override what you need; a new hook is added here and there together. Calls
    happen on the training thread, between steps."""

    #: read after each ``on_epoch``: a stop reason (``"pruned"``, ``"paused"``) ends the run after
    #: that epoch (training.epoch_end.StopRequest)
    stop_request: str | None
    #: whether ``on_final_snapshot`` gets the state after the last epoch of a run that ran them all
    wants_final_snapshot: bool

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_epoch(self, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, checkpoint: Checkpoint) -> None: ...
    def on_snapshot(self, snapshot: Snapshot) -> None: ...
    def wants_snapshot(self) -> bool: ...
    def on_final_snapshot(self, snapshot: Snapshot) -> None: ...


class BaseReporter(Reporter):
    """The :class:`Reporter` interface with defaults: ignores everything, never stops the run,
    wants every snapshot. Subclass and override what you need."""

    #: Set (e.g. to ``"pruned"``) from ``on_epoch`` to end the run after that epoch with this stop
    #: reason; the run ends like an early stop (best weights restored, result recorded).
    stop_request: str | None = None
    #: Set to have ``on_final_snapshot`` called with the state after the last epoch of a run that
    #: ran all its epochs (what continuing the job with more epochs resumes from).
    wants_final_snapshot: bool = False

    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_epoch(self, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        pass

    def on_snapshot(self, snapshot: Snapshot) -> None:
        pass

    def on_final_snapshot(self, snapshot: Snapshot) -> None:
        pass

    def wants_snapshot(self) -> bool:
        """Asked at each epoch end before a snapshot is built (serializing costs ~1 ms for a
        small model): return False to skip this one."""
        return True


@dataclass
class FitResult:
    """What ``training.fit`` returns."""

    history: list[dict[str, float]]
    stop_reason: str
    best_epoch: int | None  # 1-based
    best_value: float | None
    monitor: str | None
    stopped_epoch: int | None  # 1-based epoch after which training stopped early, else None
    epochs_run: int
    steps: int
    weights: dict[str, Any]  # final name -> tensor (after restore_best_weights)
    best_checkpoint: bytes | None  # safetensors bytes of the best (or last saved) weights
    best_checkpoint_sha256: str | None = None
    #: the last epoch's weights (before ``restore_best_weights``), as a non-best Checkpoint
    last_checkpoint: Checkpoint | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # device, parameter count, effective spec
    #: only on a ``fit_fused`` member whose snapshot could not be restored (stop reason
    #: ``training.fused.RESUME_FAILED``; it trained none): what its solo ``fit(resume_from=...)`` raises
    error: BaseException | None = None
