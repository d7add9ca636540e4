"""Sweeps: their rows, their trials (jobs with ``sweep_id``), and advancing a sweep.

The database is the truth: a sweep's Optuna study is rebuilt from these rows whenever a decision
is needed (``training.sweep_space``). :func:`advance_sweep` runs under a row lock on the sweep
(``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's writing transactions are BEGIN IMMEDIATE), so
trials that end at the same time never create more than ``max_trials`` trials or more than
``max_concurrent`` unfinished ones. Functions take a session and never commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, defer

from config.settings import Settings
from store import repo, webhooks
from store.floats import decode_float, to_text
from store.ids import new_id
from store.models import TERMINAL_STATUSES, Job, JobMetric, Sweep
from training.sweep_space import TrialRecord, objective_value, pauses, should_prune, suggest, with_params

log = logging.getLogger("trainyard.sweeps")

SWEEP_TERMINAL = ("succeeded", "failed", "cancelled")
#: trial statuses that hold one of the sweep's ``max_concurrent`` slots (a paused trial does not)
ACTIVE = ("queued", "running")


# --------------------------------------------------------------------------- rows


def create_sweep(
    session: Session, *, project_id: str, name: str, method: str, config: dict[str, Any], objective_metric: str,
    objective_mode: str, max_trials: int, max_concurrent: int, priority: int = 0,
    labels: dict[str, str] | None = None, notes: str | None = None,
) -> Sweep:
    now = repo.utcnow()
    sweep = Sweep(
        id=new_id(), project_id=project_id, name=name, status="running", method=method, config=config,
        objective_metric=objective_metric, objective_mode=objective_mode, max_trials=max_trials,
        max_concurrent=max_concurrent, trials_created=0, created_at=now, updated_at=now, priority=priority,
        labels=dict(labels or {}), notes=notes,
    )
    session.add(sweep)
    session.flush()
    return sweep


def get_sweep(session: Session, sweep_id: str, project_id: str | None = None, *, lock: bool = False) -> Sweep | None:
    """The sweep (of ``project_id`` when given); ``lock`` takes its row lock for the rest of the
    transaction and reads it fresh."""
    q = select(Sweep).where(Sweep.id == sweep_id)
    if project_id is not None:
        q = q.where(Sweep.project_id == project_id)
    if lock:
        q = q.with_for_update().execution_options(populate_existing=True)
    return session.scalars(q).one_or_none()


def list_sweeps(
    session: Session, project_id: str, *, limit: int, cursor: str | None, status: Sequence[str] = ()
) -> list[Sweep]:
    """Newest first (ids are time-ordered); up to ``limit + 1`` rows (a next page exists if more)."""
    q = select(Sweep).options(defer(Sweep.config)).where(Sweep.project_id == project_id)
    if status:
        q = q.where(Sweep.status.in_(list(status)))
    if cursor:
        q = q.where(Sweep.id < cursor)
    return list(session.scalars(q.order_by(Sweep.id.desc()).limit(limit + 1)))


def trials(session: Session, sweep_id: str) -> list[Job]:
    """The sweep's trial jobs by trial number (without spec and info)."""
    q = (
        select(Job).options(defer(Job.spec), defer(Job.info))
        .where(Job.sweep_id == sweep_id).order_by(Job.trial_number)
        .execution_options(populate_existing=True)  # statuses changed by UPDATEs in this transaction
    )
    return list(session.scalars(q))


def objective_series(session: Session, sweep_id: str, metric: str) -> dict[str, dict[int, float]]:
    """job id -> {epoch: value of the objective metric} for every trial of the sweep (non-finite
    values as floats; epochs without the metric left out)."""
    q = (
        select(JobMetric.job_id, JobMetric.epoch, JobMetric.values)
        .join(Job, Job.id == JobMetric.job_id)
        .where(Job.sweep_id == sweep_id)
    )
    out: dict[str, dict[int, float]] = {}
    for job_id, epoch, values in session.execute(q):
        v = decode_float(values.get(metric))
        if v is not None:
            out.setdefault(job_id, {})[int(epoch)] = float(v)
    return out


def objective_values(epochs: Sequence[dict[str, Any]], metric: str) -> dict[int, float]:
    """{epoch: value of ``metric``} of metric dicts as the engine reports them (each has
    ``epoch``); epochs without a value of the metric are left out, as in :func:`objective_series`."""
    out: dict[int, float] = {}
    for m in epochs:
        v = decode_float(m.get(metric))
        if v is not None and "epoch" in m:
            out[int(m["epoch"])] = float(v)
    return out


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
    series = objective_series(session, sweep.id, sweep.objective_metric)
    out = []
    for job in trials(session, sweep.id):
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


# --------------------------------------------------------------------------- trial specs


#: ``admit(base, params) -> TrialSpec-like`` (``spec``, ``queue``, ``errors``): how a sampled
#: trial spec is admitted, given by the decision layer (orchestration.admission.admit_trial_spec)
TrialAdmitter = Callable[[dict[str, Any], dict[str, Any]], Any]


# --------------------------------------------------------------------------- advancing


def _raw_trial_spec(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    try:
        return with_params(base, params)
    except ValueError:
        return dict(base)


def _summarize_errors(errors: list[dict[str, Any]]) -> str:
    return "invalid trial spec: " + "; ".join(f"{e.get('path') or '<root>'}: {e.get('msg')}" for e in errors)


def advance_sweep(session: Session, sweep_id: str, settings: Settings,
                  admitter: Callable[[Session, Sweep], TrialAdmitter]) -> list[tuple[str, str]]:
    """Bring a running sweep up to date under its row lock: record its best trial, create new
    trials (parameters from the sweep's Optuna sampler told every stored trial) while fewer than
    ``max_concurrent`` are unfinished and fewer than ``max_trials`` exist, and end the sweep
    (``succeeded``; ``failed`` if no trial succeeded) once every trial is finished and no more may
    be made. A sampled spec is admitted by ``admitter(session, sweep)``; one that is not becomes a
    failed trial (it counts toward ``max_trials``). Returns ``(job_id, queue)`` of the new trials: send them after the commit."""
    sweep = get_sweep(session, sweep_id, lock=True)
    if sweep is None or sweep.status != "running":
        return []
    config = sweep.config
    admit = admitter(session, sweep)
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
    Each goes back to ``queued`` with an outbox row; returns ``(job_id, queue)`` to send."""
    paused = [v for v in views if v.job.status == "paused"]
    if not paused:
        return []
    room = min(sweep.max_concurrent - sum(1 for v in views if v.job.status in ACTIVE),
               _project_room(session, sweep.project_id, settings))
    if room <= 0:
        return []
    from store import outbox

    records = [v.record() for v in views]
    out: list[tuple[str, str]] = []
    for v in sorted(paused, key=lambda v: (-(v.job.epoch or 0), v.job.trial_number or 0)):
        if len(out) >= room:
            break
        number, epoch = int(v.job.trial_number or 0), int(v.job.epoch or 0)
        if not _may_promote(sweep, records, number, epoch, endgame=endgame):
            continue  # surely not promotable: spare rebuilding the study to ask
        if should_prune(sweep.config, records, number, epoch, study_name=sweep.id, endgame=endgame):
            continue
        if repo.promote_job(session, v.job.id):
            outbox.add(session, [(v.job.id, v.job.queue)])
            out.append((v.job.id, v.job.queue))
            log.info("sweep %s: trial %d promoted after epoch %d", sweep.id, number, epoch)
    return out


def _may_promote(sweep: Sweep, records: list[TrialRecord], number: int, epoch: int, *, endgame: bool) -> bool:
    """A cheap necessary condition for Optuna to promote paused trial ``number`` at ``epoch``: it
    ranks in the best max(1 if ``endgame`` else 0, n // reduction_factor) of the n trials with a
    value at every rung up to ``epoch`` (the trials Optuna compares it with). Only trials that pass
    are asked about (each question rebuilds the sweep's study: ~1 ms a trial, and a sweep may hold
    dozens of paused trials)."""
    et = sweep.config.get("early_termination") or {}
    min_epochs, rf = int(et.get("min_epochs") or 1), int(et.get("reduction_factor") or 3)
    steps = []
    step = min_epochs
    while step <= epoch:
        steps.append(step)
        step *= rf
    me = next((r for r in records if r.number == number), None)
    if me is None or epoch not in me.values or not steps or steps[-1] != epoch:
        return True  # not a plain rung value: let Optuna decide
    value = me.values[epoch]
    at = [r.values[epoch] for r in records if all(s in r.values for s in steps)]
    k = max(len(at) // rf, 1 if endgame else 0)
    better = sum(1 for x in at if (x > value if sweep.objective_mode == "max" else x < value))
    return better < k


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
        for v in views:
            if v.job.status == "paused":
                repo.end_paused_job(session, v.job.id)
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
        webhooks.on_sweep_finished(session, sweep, now)


def cancel_sweep(session: Session, sweep: Sweep) -> list[str]:
    """End a running sweep as ``cancelled`` (call with its row lock): no new trials. Returns the
    ids of its unfinished trials, for the caller to cancel AFTER this transaction commits, one
    short transaction each (:func:`store.repo.request_cancel`: queued ones at once, running ones
    flagged for their workers). Cancelling them inside the sweep's lock, several job rows in one
    transaction, deadlocked against workers claiming or fencing those rows."""
    now = repo.utcnow()
    ids = list(session.scalars(
        select(Job.id).where(Job.sweep_id == sweep.id, Job.status.in_((*ACTIVE, "paused"))).order_by(Job.id)
    ))
    sweep.status = "cancelled"
    sweep.stop_reason = "cancelled"
    sweep.finished_at = now
    sweep.updated_at = now
    session.flush()
    webhooks.on_sweep_finished(session, sweep, now)
    return ids


def record_error(session: Session, sweep_id: str, error: str) -> None:
    """Note why advancing the sweep failed; a sweep left with no unfinished trial cannot recover by
    itself, so it ends ``failed``. (The next trial that ends tries to advance it again.)"""
    now = repo.utcnow()
    unfinished = session.scalar(
        select(func.count()).select_from(Job).where(Job.sweep_id == sweep_id, Job.status.in_(("queued", "running")))
    )
    values: dict[str, Any] = {"error": error[:10_000], "updated_at": now}
    if not unfinished:
        values.update(status="failed", stop_reason="error", finished_at=now)
    res = session.execute(
        update(Sweep).where(Sweep.id == sweep_id, Sweep.status == "running").values(**values)
        .execution_options(synchronize_session=False)
    )
    if not unfinished and res.rowcount == 1:  # type: ignore[attr-defined]
        ended = session.get(Sweep, sweep_id, populate_existing=True)
        if ended is not None:
            webhooks.on_sweep_finished(session, ended, now)
        # nothing will promote its paused trials any more: they end with it
        for job_id in session.scalars(select(Job.id).where(Job.sweep_id == sweep_id, Job.status == "paused")):
            repo.end_paused_job(session, job_id, "sweep_failed", status="cancelled")


def sweep_of_job(session: Session, job_id: str) -> tuple[str | None, str | None]:
    """(sweep_id, status) of a job (``(None, None)`` if it does not exist)."""
    row = session.execute(select(Job.sweep_id, Job.status).where(Job.id == job_id)).first()
    return (row[0], row[1]) if row else (None, None)


def trial_records_for_decision(
    session: Session, sweep_id: str, job_id: str | None = None
) -> tuple[Sweep | None, list[TrialRecord], int | None, bool]:
    """The sweep, its trials as Optuna records, the trial number of ``job_id`` (None if it is not
    a trial of the sweep; no lock: a decision only reads), and whether the sweep is in its end
    game for ``job_id``: no more trials may start and no other is queued or running, so pausing
    it would only have the sweep promote it straight back (``training.sweep_space.make_pruner``)."""
    sweep = get_sweep(session, sweep_id)
    if sweep is None:
        return None, [], None, False
    views = trial_views(session, sweep)
    number = next((v.job.trial_number for v in views if v.job.id == job_id), None)
    endgame = sweep.trials_created >= sweep.max_trials and not any(
        v.job.status in ACTIVE for v in views if v.job.id != job_id)
    return sweep, [v.record() for v in views], number, endgame


def stalled_sweep_ids(session: Session) -> list[str]:
    """Running sweeps with no queued or running trial: nothing will advance them (e.g. their last
    trial was failed by the reconciler after its worker was lost on every attempt)."""
    active = (
        select(Job.id).where(Job.sweep_id == Sweep.id, Job.status.in_(("queued", "running"))).exists()
    )
    return list(session.scalars(select(Sweep.id).where(Sweep.status == "running", ~active)))


def extend_sweep(session: Session, sweep: Sweep, max_trials: int) -> None:
    """Raise ``max_trials`` (call with the sweep's row lock, then :func:`advance_sweep`). A sweep
    that ended because its trials ran out (stop reason ``completed``) runs again; its sampler is
    rebuilt from every stored trial, as always, so the new trials use what the old ones found."""
    now = repo.utcnow()
    sweep.max_trials = max_trials
    config = dict(sweep.config)
    config["max_trials"] = max_trials
    sweep.config = config
    if sweep.status != "running":
        sweep.status, sweep.stop_reason, sweep.finished_at = "running", None, None
    sweep.updated_at = now
    session.flush()
