"""The engine's work at the end of each epoch, as a list of callbacks with one interface.

``_Run._end_epoch`` builds the epoch's logs (training metrics, validation, ``lr``, ``seconds``)
and hands them to each callback of ``_Run.epoch_end`` in order. The list is built once per run
from the spec (:func:`epoch_end_callbacks`); the order is the Keras order of the same callbacks:

1. :class:`Plateau` - ``ReduceLROnPlateau`` (the callback or the ``reduce_on_plateau`` schedule),
2. :class:`EarlyStop` - ``EarlyStopping`` (holds the best weights, sets the stop reason),
3. :class:`EpochCheckpoint` - ``ModelCheckpoint`` with ``save_freq="epoch"``,
4. :class:`Record` - the epoch joins the history and is reported (``Reporter.on_epoch``),
5. :class:`StopRequest` - the reporter's ``stop_request`` (a sweep's pruner: ``pruned``,
   ``paused``) ends the run after this epoch,
6. :class:`SnapshotPolicy` - a resume snapshot for the reporter (always when pausing; else when
   due and the reporter ``wants_snapshot``), and the final one after the last epoch if the
   reporter ``wants_final_snapshot``.

Callbacks 1-3 see ``run.epoch`` as the epoch's 0-based index (``index``), 5-6 as the number of
completed epochs (``Record`` counts it). Each reads and writes only the run's public state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from training.callbacks import EarlyStopping, ReduceLROnPlateau
from training.reporting import PAUSED, Snapshot
from training.state import sha256

if TYPE_CHECKING:
    from training.engine import _Run


class EpochEnd(Protocol):
    """One piece of the work at an epoch's end. ``index``: the epoch's 0-based number; ``logs``:
    its metrics (``epoch`` 1-based), which a callback may read but not change."""

    def on_epoch_end(self, run: _Run, index: int, logs: dict[str, float]) -> None: ...


class Plateau:
    """Lower the learning rate when the monitored metric stops improving."""

    def __init__(self, plateau: ReduceLROnPlateau) -> None:
        self.plateau = plateau

    def on_epoch_end(self, run: _Run, index: int, logs: dict[str, float]) -> None:
        current = run._current_lr(run.step)
        new = self.plateau.on_epoch_end(logs, current)
        if new != current:
            run.plateau_lr = new


class EarlyStop:
    """Keep the best weights so far (``restore_best_weights``) and stop when patience runs out."""

    def __init__(self, early: EarlyStopping) -> None:
        self.early = early

    def on_epoch_end(self, run: _Run, index: int, logs: dict[str, float]) -> None:
        decision = self.early.on_epoch_end(index, logs)
        if decision.hold_weights:
            run.es_best = run._weights()
        if decision.stop and run.stop_reason is None:
            run.stop_reason = self.early.reason


class EpochCheckpoint:
    """Save a checkpoint at the epoch's end when the run's ``ModelCheckpoint`` says so."""

    def on_epoch_end(self, run: _Run, index: int, logs: dict[str, float]) -> None:
        if run.checkpoint.should_save(logs, index):
            run._save_checkpoint(logs.get(run.checkpoint.monitor))


class Record:
    """The epoch is done: into the history, counted, reported."""

    def on_epoch_end(self, run: _Run, index: int, logs: dict[str, float]) -> None:
        run.history.append(logs)
        run.epoch += 1
        run.reporter.on_epoch(dict(logs))


class StopRequest:
    """End the run after this epoch with the reporter's ``stop_request`` as its stop reason."""

    def on_epoch_end(self, run: _Run, index: int, logs: dict[str, float]) -> None:
        request = run.reporter.stop_request
        if request and run.stop_reason is None:
            run.stop_reason = str(request)


class SnapshotPolicy:
    """Hand the reporter a resume snapshot: always for a run paused at this epoch (it may be resumed
    from here), else when one is due (``snapshot_every``) and the reporter wants it; never for a
    run that is stopping. After the last epoch of a run that ran them all, the final snapshot
    (``on_final_snapshot``: what continuing the job with more epochs resumes from) if the reporter
    ``wants_final_snapshot``."""

    def on_epoch_end(self, run: _Run, index: int, logs: dict[str, float]) -> None:
        paused = run.stop_reason == PAUSED and run.reporter.stop_request == PAUSED
        wanted = paused or (run.stop_reason is None and run.snapshot_due() and run.reporter.wants_snapshot())
        if wanted and run.epoch < run.spec.epochs:
            data = run.snapshot()
            run.reporter.on_snapshot(Snapshot(run.epoch, run.step, data, sha256(data)))
        elif run.epoch == run.spec.epochs and run.stop_reason is None and run.reporter.wants_final_snapshot:
            data = run.snapshot()
            run.reporter.on_final_snapshot(Snapshot(run.epoch, run.step, data, sha256(data)))


def epoch_end_callbacks(run: _Run) -> list[EpochEnd]:
    """The run's epoch-end callbacks, in order (see the module's docstring)."""
    out: list[EpochEnd] = []
    if run.plateau is not None:
        out.append(Plateau(run.plateau))
    if run.early is not None:
        out.append(EarlyStop(run.early))
    if run.save_freq == "epoch":
        out.append(EpochCheckpoint())
    out += [Record(), StopRequest()]
    if run.has_reporter:
        out.append(SnapshotPolicy())
    return out
