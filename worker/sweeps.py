"""The worker's part in sweeps: pruning a running trial at its epochs.

* **Pruning** (:class:`TrialPruner`): at the epochs where the sweep's pruner can act (ASHA and
  Hyperband rungs; every epoch from ``min_epochs`` for the median rule) the trial's record
  (``worker.record.RunRecord``) asks :func:`prune_decision`, which rebuilds the sweep's Optuna
  study from the database plus the trial's own epochs not written yet, and asks Optuna's pruner;
  a trial that goes on then writes its epochs at once (trials beside it decide with its rung
  value). A "prune" sets the record's ``stop_request = "pruned"``: the engine ends the run after
  this epoch, and the job ends ``succeeded`` with stop reason ``pruned`` (its metrics, written with
  the result, and its best checkpoint are kept, as for an early stop); with ASHA's promotions
  the trial pauses instead (``"paused"``). The trials of a pack that end a decision epoch together
  are decided together (:func:`prune_decisions`, from ``worker.record.FlushGroup.decide``): one
  read, each ranked against all of them, and those that go on write their epochs in one
  transaction.
* **Advancing** (:func:`orchestration.sweeps.after_job`): when a trial job ends (whatever way), its
  worker advances the sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from orchestration import sweeps as orchestration_sweeps
from store import sweeps as store_sweeps
from store.db import session_scope
from training.reporting import PAUSED  # not training.engine: no torch before the claim's heartbeat
from training.sweep_space import is_decision_epoch, pauses, prune_many

log = logging.getLogger("trainyard.worker")


def prune_decision(sweep_id: str, job_id: str, epoch: int, unwritten: Sequence[dict[str, Any]] = ()) -> bool:
    """Whether the sweep's pruner stops trial ``job_id`` after ``epoch``, from the sweep's trials
    as stored plus ``unwritten``, this trial's epochs not written yet (its record's buffer).
    Reads only; no lock."""
    return job_id in prune_decisions(sweep_id, [(job_id, epoch, unwritten)])


def prune_decisions(sweep_id: str, asked: Sequence[tuple[str, int, Sequence[dict[str, Any]]]]) -> set[str]:
    """Which of the sweep's running trials ``asked`` (job id, the epoch it has just ended, its
    epochs not written yet) its pruner stops there, all asked in one read of the sweep's trials:
    each is ranked with the others' unwritten epochs as if written
    (``training.sweep_space.prune_many``: a pack's members at one rung are ranked together).
    Reads only; no lock."""
    with session_scope(write=False) as s:
        sweep, records, numbers, endgame = orchestration_sweeps.trial_records_for_decision(
            s, sweep_id, [job_id for job_id, _, _ in asked])
        if sweep is None or sweep.status != "running":
            return set()
        config, metric = sweep.config, sweep.objective_metric
    mine = {numbers[job_id]: store_sweeps.objective_values(unwritten, metric)
            for job_id, _, unwritten in asked if job_id in numbers and unwritten}
    records = [replace(r, values={**r.values, **mine[r.number]}) if r.number in mine else r for r in records]
    by_number = {numbers[job_id]: job_id for job_id, _, _ in asked if job_id in numbers}
    stopped = prune_many(config, records, {numbers[job_id]: epoch for job_id, epoch, _ in asked if job_id in numbers},
                         study_name=sweep_id, endgame=endgame)
    return {by_number[n] for n in stopped}


class TrialPruner:
    """The pruner of one sweep trial: at which epochs it decides, and what it decides there."""

    def __init__(self, job_id: str, *, sweep_id: str, config: dict[str, Any], epochs: int) -> None:
        self.job_id = job_id
        self.sweep_id = sweep_id
        self.config = config
        self.epochs = epochs
        self.pauses = pauses(config)

    def decides_at(self, epoch: int) -> bool:
        """Whether the sweep's pruner can act after ``epoch`` (a rung, or the median rule's epochs)."""
        return is_decision_epoch(self.config, epoch, self.epochs)

    def decide(self, epoch: int, unwritten: Sequence[dict[str, Any]]) -> str | None:
        """The stop request after ``epoch`` (``"paused"`` when ASHA may promote the trial later,
        ``"pruned"`` otherwise), or None when the trial goes on; ``unwritten``: its epochs not
        written yet. Reads only."""
        return self.request(prune_decision(self.sweep_id, self.job_id, epoch, unwritten))

    def request(self, stopped: bool) -> str | None:
        """The stop request of a decision: ``"paused"`` (ASHA with promotions) or ``"pruned"``
        when the pruner stops the trial, None when it goes on."""
        return (PAUSED if self.pauses else "pruned") if stopped else None


def trial_pruner(job_id: str, sweep_id: str | None, epochs: int,
                 configs: dict[str, dict[str, Any] | None] | None = None) -> TrialPruner | None:
    """The pruner of a job (``sweep_id`` and ``epochs`` as its claim read them) if it is a trial of
    a sweep with early termination, else None. Only a trial costs a query (its sweep's config),
    once per sweep for a pack's members (``configs``: the configs read so far, by sweep id)."""
    if not sweep_id:
        return None
    if configs is None or sweep_id not in configs:
        with session_scope(write=False) as s:
            sweep = store_sweeps.get_sweep(s, sweep_id)
            config = sweep.config if sweep is not None else None
        if configs is not None:
            configs[sweep_id] = config
    else:
        config = configs[sweep_id]
    if not (config or {}).get("early_termination"):
        return None
    return TrialPruner(job_id, sweep_id=sweep_id, config=config or {}, epochs=int(epochs))
