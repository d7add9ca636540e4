"""Sweep decisions: which trials a sweep starts (its Optuna sampler), which paused trials go on
(Optuna's successive halving), when it ends and with which best trial; and advancing sweeps.

The database is the truth: a sweep's Optuna study is rebuilt from its rows (``store.sweeps``)
whenever a decision is needed (``training.sweep_space``). :func:`advance_sweep` runs under a row
lock on the sweep (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's writing transactions are BEGIN
IMMEDIATE), so trials that end at the same time never create more than ``max_trials`` trials or
more than ``max_concurrent`` unfinished ones.

When a trial job ends (whatever way), the worker that ran it advances its sweep
(:func:`after_job`), commits, then sends the new trials' messages. If advancing fails, the error is
recorded on the sweep. The sweep keeper (:mod:`orchestration.services.sweep_keeper`) advances
sweeps whose last trial ended without a worker to do it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.orm import Session

from config.settings import Settings
from orchestration.admission import admit_trial_spec, dataset_resolver
from store import outbox, repo
from store import sweeps as store_sweeps
from store.db import session_scope
from store.floats import to_text
from store.models import TERMINAL_STATUSES, Job, Sweep
from store.outbox import Send
from store.sweeps import ACTIVE
from training.sweep_space import TrialRecord, objective_value, pauses, promotions, suggest, with_params

log = logging.getLogger("trainyard.sweeps")


# --------------------------------------------------------------------------- trials as decided on


def trial_state(job: Job, value: float | None) -> str:
    """The Optuna state of a trial job: queued/running -> running; succeeded with stop reason
    ``pruned`` -> pruned; succeeded -> complete (fail if its objective never had a finite value);
    failed or cancelled -> fail. A paused trial (ASHA with promotions) is running for Optuna: it may
    yet go on."""
    if job.status in ("queued", "running", "paused"):
        return "running"
    if job.status == "succeeded":
        if job.stop_reason == "pruned":
            return "pruned"
        return "complete" if value is not None else "fail"
    return "fail"


@dataclass(frozen=True)
class TrialView:
    """A trial job with its objective values, as the API and the advancing logic see it."""

    job: Job
    values: dict[int, float]
    value: float | None
    state: str

    def record(self) -> TrialRecord:
        return TrialRecord(
            number=int(self.job.trial_number or 0), params=dict(self.job.trial_params or {}),
            state=self.state,  # type: ignore[arg-type]
            values=self.values, value=self.value,
        )


def trial_views(session: Session, sweep: Sweep) -> list[TrialView]:
    """Every trial of ``sweep`` with its objective series, value and state, by trial number."""
    series = store_sweeps.objective_series(session, sweep.id, sweep.objective_metric)
    out = []
    for job in store_sweeps.trials(session, sweep.id):
        values = series.get(job.id, {})
        value = objective_value(values, sweep.objective_mode)
        out.append(TrialView(job=job, values=values, value=value, state=trial_state(job, value)))
    return out


def leaderboard(views: Sequence[TrialView], mode: str) -> list[TrialView]:
    """Trials that ended normally (completed, early-stopped or pruned) or are paused, with an
    objective value, best first (ties: lower trial number first)."""
    ranked = [v for v in views if v.value is not None and v.job.status in ("succeeded", "paused")]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(ranked, key=lambda v: (sign * (v.value or 0.0), v.job.trial_number or 0))


# --------------------------------------------------------------------------- advancing


def _raw_trial_spec(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    try:
        return with_params(base, params)
    except ValueError:
        return dict(base)


def _summarize_errors(errors: list[dict[str, Any]]) -> str:
    return "invalid trial spec: " + "; ".join(f"{e.get('path') or '<root>'}: {e.get('msg')}" for e in errors)


def advance_sweep(session: Session, sweep_id: str, settings: Settings) -> list[tuple[str, str]]:
    """Bring a running sweep up to date under its row lock: record its best trial, create new
    trials (parameters from the sweep's Optuna sampler told every stored trial) while fewer than
    ``max_concurrent`` are unfinished and fewer than ``max_trials`` exist, and end the sweep
    (``succeeded``; ``failed`` if no trial succeeded) once every trial is finished and no more may
    be made. A sampled spec is admitted like any job (:func:`orchestration.admission.admit_trial_spec`,
    the sweep's project's datasets); one that is not becomes a failed trial (it counts toward
    ``max_trials``). Returns ``(job_id, queue)`` of the new trials: send them after the commit."""
    sweep = store_sweeps.get_sweep(session, sweep_id, lock=True)
    if sweep is None or sweep.status != "running":
        return []
    config = sweep.config
    admit = partial(admit_trial_spec, metric=sweep.objective_metric,
                    resolver=dataset_resolver(session, sweep.project_id), settings=settings)
    created: list[tuple[str, str]] = []
    views = trial_views(session, sweep)
    if pauses(config):
        # ASHA prefers promoting a paused trial to starting a new one
        promoted = _promote(session, sweep, views, settings)
        if promoted:
            created += promoted
            views = trial_views(session, sweep)
    while True:
        unfinished = sum(1 for v in views if v.job.status in ACTIVE)
        room = min(sweep.max_concurrent - unfinished, sweep.max_trials - sweep.trials_created,
                   _project_room(session, sweep.project_id, settings))
        if room <= 0:
            break
        start = sweep.trials_created
        proposals = suggest(config, [v.record() for v in views], room, study_name=sweep.id)
        invalid_made = False
        new_jobs: list[Job] = []
        for i, params in enumerate(proposals):
            number = start + i
            ts = admit(config["base"], params)
            spec = {**(ts.spec or _raw_trial_spec(config["base"], params)), "name": f"{sweep.name[:180]}-{number}"}
            queue = ts.queue or settings.queue_for_device(str(config["base"].get("device", "auto")))
            job = repo.create_jobs(
                session, [(spec, queue, None)], project_id=sweep.project_id, sweep_id=sweep.id,
                trials=[(number, params)], priority=sweep.priority,
            )[0]
            if ts.errors:
                repo.fail_unstarted_job(session, job.id, _summarize_errors(ts.errors)[:10_000])
                invalid_made = True
            else:
                created.append((job.id, queue))
                new_jobs.append(job)
        sweep.trials_created = start + len(proposals)
        session.flush()
        if not invalid_made:
            # the new trials are queued, without metrics: no need to read every trial again
            views = views + [TrialView(job=j, values={}, value=None, state="running") for j in new_jobs]
            break
        views = trial_views(session, sweep)
    if pauses(config) and sweep.trials_created >= sweep.max_trials and not any(v.job.status in ACTIVE for v in views):
        views = _end_game(session, sweep, views, created, settings)
    _update_best_and_finish(session, sweep, views)
    return created


def _project_room(session: Session, project_id: str, settings: Settings) -> int:
    """How many more jobs the sweep's project may have queued or running (its concurrent-jobs
    limit counts trials like any job; locks the project's row, as a submission does)."""
    active, limit = repo.project_job_slots(session, project_id, settings.max_concurrent_jobs)
    return 1 << 30 if limit <= 0 else limit - active


def _promote(session: Session, sweep: Sweep, views: list[TrialView], settings: Settings, *,
             endgame: bool = False) -> list[tuple[str, str]]:
    """Resume the paused trials that Optuna's successive halving now promotes (in the best
    1/reduction_factor of the trials that reached their rung; see
    ``training.sweep_space.make_pruner``), deepest rung first, while the sweep has free slots.
    Optuna's pruner is asked about every paused trial at once (``training.sweep_space.promotions``).
    Each goes back to ``queued`` with an outbox row; returns ``(job_id, queue)`` to send."""
    paused = [v for v in views if v.job.status == "paused"]
    if not paused:
        return []
    room = min(sweep.max_concurrent - sum(1 for v in views if v.job.status in ACTIVE),
               _project_room(session, sweep.project_id, settings))
    if room <= 0:
        return []
    go_on = promotions(sweep.config, [v.record() for v in views],
                       {int(v.job.trial_number or 0): int(v.job.epoch or 0) for v in paused},
                       study_name=sweep.id, endgame=endgame)
    out: list[tuple[str, str]] = []
    for v in sorted(paused, key=lambda v: (-(v.job.epoch or 0), v.job.trial_number or 0)):
        if len(out) >= room:
            break
        if int(v.job.trial_number or 0) not in go_on:
            continue
        if repo.promote_job(session, v.job.id):
            outbox.add(session, [(v.job.id, v.job.queue)])
            out.append((v.job.id, v.job.queue))
            log.info("sweep %s: trial %d promoted after epoch %d", sweep.id, v.job.trial_number, v.job.epoch)
    return out


def _end_game(session: Session, sweep: Sweep, views: list[TrialView], created: list[tuple[str, str]],
              settings: Settings) -> list[TrialView]:
    """No trial is queued or running and no new one may start: promote by Optuna's own rule (the
    best trial at a rung that fewer than reduction_factor trials reached goes on); if none goes on,
    the trials still paused end ``pruned``. While the project has no free job slot nothing is
    decided (the sweep keeper advances the sweep again). Returns the trial views as they are now."""
    if _project_room(session, sweep.project_id, settings) <= 0:
        return views
    promoted = _promote(session, sweep, views, settings, endgame=True)
    if promoted:
        created += promoted
    else:
        repo.end_paused_jobs(session, [v.job.id for v in views if v.job.status == "paused"])
    session.flush()
    return trial_views(session, sweep)


def _update_best_and_finish(session: Session, sweep: Sweep, views: list[TrialView]) -> None:
    now = repo.utcnow()
    ranked = leaderboard(views, sweep.objective_mode)
    if ranked:
        sweep.best_job_id = ranked[0].job.id
        sweep.best_value = to_text(ranked[0].value)
    done = sweep.trials_created >= sweep.max_trials and all(v.job.status in TERMINAL_STATUSES for v in views)
    if done:
        sweep.status = "succeeded" if ranked else "failed"
        sweep.stop_reason = "completed"
        if not ranked:
            sweep.error = sweep.error or "no trial succeeded with a finite objective value; see the trials' errors"
        sweep.finished_at = now
    sweep.updated_at = now
    session.flush()
    if done:
        store_sweeps.sweep_ended(session, sweep, now)


def trial_records_for_decision(
    session: Session, sweep_id: str, job_ids: Sequence[str] = ()
) -> tuple[Sweep | None, list[TrialRecord], dict[str, int], bool]:
    """The sweep, its trials as Optuna records, the trial numbers of those of ``job_ids`` that are
    its trials (by job id; no lock: a decision only reads), and whether the sweep is in its end
    game for them: no more trials may start and no other trial is queued or running, so pausing
    them would only have the sweep promote one straight back
    (``training.sweep_space.make_pruner``)."""
    sweep = store_sweeps.get_sweep(session, sweep_id)
    if sweep is None:
        return None, [], {}, False
    views = trial_views(session, sweep)
    asked = set(job_ids)
    numbers = {v.job.id: int(v.job.trial_number or 0) for v in views if v.job.id in asked}
    endgame = sweep.trials_created >= sweep.max_trials and not any(
        v.job.status in ACTIVE for v in views if v.job.id not in asked)
    return sweep, [v.record() for v in views], numbers, endgame


def advance(sweep_id: str, settings: Settings, send: Send) -> list[tuple[str, str]]:
    """Advance the sweep in one transaction, then send the new trials' messages. A failure is
    recorded on the sweep (which ends ``failed`` if no trial is left to retry it)."""
    try:
        with session_scope() as s:
            jobs = advance_sweep(s, sweep_id, settings)
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
    after_jobs([job_id], settings, send)


def after_jobs(job_ids: list[str], settings: Settings, send: Send, *, settled: Sequence[str] | None = None) -> None:
    """:func:`after_job` of several jobs (a pack's members): one read of their sweeps, and each
    sweep with an ended trial among them advanced once (an advance reads all its trials under
    the sweep's lock, so one sees every trial that ended before it). ``settled`` (while other
    trials of the sweep still run, so it cannot end): trials whose pause was just decided with
    all the sweep knows; a sweep is then advanced only if that could create or promote a trial
    (``store.sweeps.sweeps_with_moves``). Never raises."""
    if not job_ids:
        return
    try:
        with session_scope(write=False) as s:
            of = store_sweeps.sweeps_of_jobs(s, job_ids)
            ended = list(dict.fromkeys(
                sweep_id for sweep_id, status in of if sweep_id and (status in TERMINAL_STATUSES or status == "paused")))
            if settled is not None and ended:
                moves = store_sweeps.sweeps_with_moves(s, ended, list(settled))
                ended = [i for i in ended if i in moves]
    except Exception:  # noqa: BLE001
        log.exception("jobs %s: could not look up their sweeps", ", ".join(job_ids))
        return
    for sweep_id in ended:
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
