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
* **Advancing** (:func:`orchestration.sweeps.after_job`): when a trial job ends (whatever way), its
  worker advances the sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from config.settings import Settings
from orchestration import sweeps as orchestration_sweeps
from store import sweeps as store_sweeps
from store.db import session_scope
from training.reporting import PAUSED  # not training.engine: no torch before the claim's heartbeat
from training.sweep_space import is_decision_epoch, pauses, should_prune
from worker.reporter import DbReporter, json_safe

log = logging.getLogger("trainyard.worker")

def prune_decision(sweep_id: str, job_id: str, epoch: int, unwritten: Sequence[dict[str, Any]] = ()) -> bool:
    """Whether the sweep's pruner stops trial ``job_id`` after ``epoch``, from the sweep's trials
    as stored plus ``unwritten``, this trial's epochs not written yet (its reporter's buffer).
    Reads only; no lock."""
    with session_scope(write=False) as s:
        sweep, records, number, endgame = orchestration_sweeps.trial_records_for_decision(s, sweep_id, job_id)
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
