"""The worker's part in sweeps: pruning a running trial at its epochs, and advancing the sweep
when a trial ends.

* **Pruning** (:class:`TrialReporter`): at the epochs where the sweep's pruner can act (ASHA and
  Hyperband rungs; every epoch from ``min_epochs`` for the median rule) the reporter asks
  :func:`prune_decision`, which rebuilds the sweep's Optuna study from the database plus the
  trial's own epochs not written yet, and asks Optuna's pruner; a trial that goes on then writes
  its epochs at once (trials beside it decide with its rung value). A "prune" sets
  ``stop_request = "pruned"``: the engine ends the run after this epoch, and the job ends
  ``succeeded`` with stop reason ``pruned`` (its metrics, written with the result, and its best
  checkpoint are kept, as for an early stop).
* **Advancing** (:func:`after_job`): when a trial job ends (whatever way), its worker advances the
  sweep under the sweep's row lock (``store.sweeps.advance_sweep``), commits, then sends the new
  trials' messages by task name. If advancing fails, the error is recorded on the sweep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from config.settings import Settings
from store import sweeps as store_sweeps
from store.db import session_scope
from store.models import TERMINAL_STATUSES
from training.engine import PAUSED
from training.sweep_space import is_decision_epoch, pauses, should_prune
from worker.reporter import DbReporter, json_safe

log = logging.getLogger("trainyard.worker")

Send = Callable[[Sequence[tuple[str, str]]], None]


def prune_decision(sweep_id: str, job_id: str, epoch: int, unwritten: Sequence[dict[str, Any]] = ()) -> bool:
    """Whether the sweep's pruner stops trial ``job_id`` after ``epoch``, from the sweep's trials
    as stored plus ``unwritten``, this trial's epochs not written yet (its reporter's buffer).
    Reads only; no lock."""
    with session_scope(write=False) as s:
        sweep, records, number, endgame = store_sweeps.trial_records_for_decision(s, sweep_id, job_id)
        if sweep is None or number is None or sweep.status != "running":
            return False
        config, metric = sweep.config, sweep.objective_metric
    if unwritten:
        mine = store_sweeps.objective_values(unwritten, metric)
        records = [replace(r, values={**r.values, **mine}) if r.number == number else r for r in records]
    return should_prune(config, records, number, epoch, study_name=sweep_id, endgame=endgame)


class TrialReporter(DbReporter):
    """A :class:`DbReporter` for a sweep's trial: asks the sweep's pruner at decision epochs.

    The decision is made from the stored trials plus this trial's buffered epochs, before they are
    written: a pruned trial ends at once and its last epochs are written with its result (one
    transaction fewer per pruned trial); a trial that goes on writes them right after the decision,
    so the decisions of trials running beside it see its value at this rung."""

    def __init__(self, job_id: str, settings: Settings, *, sweep_id: str, config: dict[str, Any], epochs: int,
                 **kwargs: Any) -> None:
        super().__init__(job_id, settings, **kwargs)
        self.sweep_id = sweep_id
        self.config = config
        self.epochs = epochs
        self.stop_request: str | None = None
        self.pauses = pauses(config)

    def on_epoch(self, metrics: dict[str, float]) -> None:
        super().on_epoch(metrics)
        epoch = int(metrics["epoch"])
        if self.stop_request is not None or not is_decision_epoch(self.config, epoch, self.epochs):
            return
        try:
            if prune_decision(self.sweep_id, self.job_id, epoch, list(self.buffer)):
                # ASHA with promotions pauses the trial (the engine hands over a snapshot of this
                # epoch; the sweep may resume it from there), plain pruning stops it for good
                self.stop_request = PAUSED if self.pauses else "pruned"
                log.info("trial %s of sweep %s %s after epoch %d", self.job_id, self.sweep_id, self.stop_request, epoch)
                return  # the engine stops after this epoch; the runner writes the buffer with the result
        except Exception:  # noqa: BLE001 - a failed decision must not fail the trial: it trains on
            log.exception("trial %s: the pruning decision at epoch %d failed; the trial continues", self.job_id, epoch)
        self.flush()

    def on_start(self, info: dict[str, Any]) -> None:
        # A trial's start info (device, parameter count) waits for its first epoch's write instead
        # of costing a transaction of its own: trials are short, and a sweep runs many
        # (bench/sweeps.py: per-trial overhead is what ASHA's short trials pay most for).
        self.info = json_safe(info)

    def on_snapshot(self, snapshot: Any) -> None:
        if self.stop_request == PAUSED:
            # written with the paused state, in the runner's last transaction
            self.unwritten_snapshot = snapshot
            return
        super().on_snapshot(snapshot)


def make_reporter(
    job_id: str, settings: Settings, *, sweep_id: str | None, epochs: int, **kwargs: Any
) -> DbReporter:
    """The reporter of a job (``sweep_id`` and ``epochs`` as its claim read them): a
    :class:`TrialReporter` for a trial of a sweep with early termination, else a plain
    :class:`DbReporter`. Only a trial costs a query (its sweep's config)."""
    config = None
    if sweep_id:
        with session_scope(write=False) as s:
            sweep = store_sweeps.get_sweep(s, sweep_id)
            config = sweep.config if sweep is not None else None
    if not sweep_id or not (config or {}).get("early_termination"):
        return DbReporter(job_id, settings, **kwargs)
    return TrialReporter(job_id, settings, sweep_id=sweep_id, config=config or {}, epochs=int(epochs), **kwargs)


def advance(sweep_id: str, settings: Settings, send: Send) -> list[tuple[str, str]]:
    """Advance the sweep in one transaction, then send the new trials' messages. A failure is
    recorded on the sweep (which ends ``failed`` if no trial is left to retry it)."""
    try:
        with session_scope() as s:
            jobs = store_sweeps.advance_sweep(s, sweep_id, settings)
    except Exception as exc:  # noqa: BLE001 - recorded on the sweep; the worker carries on
        log.exception("sweep %s: advancing failed", sweep_id)
        try:
            with session_scope() as s:
                store_sweeps.record_error(s, sweep_id, f"advancing the sweep failed: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001
            log.exception("sweep %s: could not record the error", sweep_id)
        return []
    if jobs:
        try:
            send(jobs)
        except Exception:  # noqa: BLE001 - the trials' outbox rows were committed; the relay sends them
            log.exception("sweep %s: sending %d new trial(s) failed; the outbox relay retries", sweep_id, len(jobs))
    return jobs


def after_job(job_id: str, settings: Settings, send: Send) -> None:
    """Called after the worker handled ``job_id``: if it is a trial of a sweep and has ended,
    advance the sweep. Never raises."""
    try:
        with session_scope(write=False) as s:
            sweep_id, status = store_sweeps.sweep_of_job(s, job_id)
    except Exception:  # noqa: BLE001
        log.exception("job %s: could not look up its sweep", job_id)
        return
    if sweep_id and (status in TERMINAL_STATUSES or status == PAUSED):
        advance(sweep_id, settings, send)


def advance_stalled(settings: Settings, send: Send) -> list[str]:
    """Advance every running sweep that has no unfinished trial (so none would advance it when it
    ends). Returns their ids."""
    with session_scope(write=False) as s:
        ids = store_sweeps.stalled_sweep_ids(s)
    for sweep_id in ids:
        log.warning("sweep %s has no unfinished trial; advancing it", sweep_id)
        advance(sweep_id, settings, send)
    return ids


#: How often each worker looks for stalled sweeps.
KEEPER_EVERY_S = 30.0


def start_sweep_keeper(settings: Settings, send: Send, every_s: float = KEEPER_EVERY_S) -> threading.Thread:
    """A daemon thread running :func:`advance_stalled` every ``every_s`` seconds: a sweep never
    hangs, even when its last trial ended without a worker to advance it."""

    def loop() -> None:
        while True:
            time.sleep(every_s)
            try:
                advance_stalled(settings, send)
            except Exception as exc:  # noqa: BLE001 - keep going after a database hiccup
                log.warning("could not check for stalled sweeps: %s: %s", type(exc).__name__, exc)

    thread = threading.Thread(target=loop, name="trainyard-sweep-keeper", daemon=True)
    thread.start()
    return thread
