"""ASHA with promotions: the paused state never outlives its sweep (in-process, against the real
PostgreSQL database). A cancel that lands while a trial is pausing ends it cancelled, a sweep that
fails ends its paused trials, and the last trial left is not paused only to be promoted back."""

from __future__ import annotations

from typing import Any

from .test_sweeps import base


def _sweep(name: str, max_trials: int = 2, max_concurrent: int = 2) -> tuple[str, list[str]]:
    import orchestration.sweeps as orchestration_sweeps
    from api.routers.sweeps import check_sweep
    from config.settings import get_settings
    from store import sweeps as store_sweeps
    from store.db import session_scope
    from store.models import DEFAULT_PROJECT

    settings = get_settings()
    body: dict[str, Any] = {
        "name": name, "base": base(epochs=9), "method": "random", "seed": 2,
        "objective": {"metric": "val_accuracy", "mode": "max"},
        "parameters": {"model.layers[0].units": {"values": [8, 16]}},
        "max_trials": max_trials, "max_concurrent": max_concurrent,
        "early_termination": {"type": "asha", "min_epochs": 1, "reduction_factor": 3},
    }
    with session_scope() as s:
        config = check_sweep(body, s, DEFAULT_PROJECT, settings)
        assert config["early_termination"]["pause"] is True  # asha's default
        sweep = store_sweeps.create_sweep(
            s, project_id=DEFAULT_PROJECT, name=name, method="random", config=config,
            objective_metric="val_accuracy", objective_mode="max", max_trials=max_trials, max_concurrent=max_concurrent,
        )
        sid = sweep.id
        jobs = [j for j, _ in orchestration_sweeps.advance_sweep(s, sid, settings)]
    return sid, jobs


def test_a_cancel_during_the_pause_ends_the_trial_cancelled(inproc_env: dict[str, str]) -> None:
    """The sweep is cancelled (its running trial flagged) after the worker decided to pause the
    trial but before the pause committed: the pause is refused and the run ends cancelled."""
    from types import SimpleNamespace

    from config.settings import get_settings
    from store import repo
    from store import sweeps as store_sweeps
    from store.db import session_scope
    from store.models import Job
    from worker.record import RunRecord

    sid, (a, _b) = _sweep("cancel-race")
    with session_scope() as s:
        token = repo.claim_job(s, a, "w", 60.0).lease_token
    with session_scope() as s:
        ids = store_sweeps.cancel_sweep(s, store_sweeps.get_sweep(s, sid, lock=True))
    for j in ids:
        with session_scope() as s:
            repo.request_cancel(s, j)
    # a flush interval longer than this test: the epoch stays buffered until the pause's transaction
    record = RunRecord(a, get_settings().replace(flush_interval_s=3600.0), lease_token=token)
    record.on_epoch({"epoch": 1, "val_accuracy": 0.5, "loss": 1.0})
    result = SimpleNamespace(stop_reason="paused", steps=10, epochs_run=1, monitor=None, best_value=None,
                             best_epoch=None, best_checkpoint=None, best_checkpoint_sha256=None, weights=None,
                             last_checkpoint=None, seconds=0.1, info={}, stopped_epoch=1)
    assert record.finish(result) == "cancelled"
    with session_scope() as s:
        job = s.get(Job, a)
        assert (job.status, job.stop_reason) == ("cancelled", "cancelled")
        assert [m["epoch"] for m in repo.metrics(s, a)] == [1]  # its epoch is kept, once
        assert store_sweeps.get_sweep(s, sid).status == "cancelled"
        assert s.get(Job, _b).status == "cancelled"


def test_a_failed_sweep_ends_its_paused_trials(inproc_env: dict[str, str]) -> None:
    from store import repo
    from store import sweeps as store_sweeps
    from store.db import session_scope
    from store.models import Job

    sid, (a, b) = _sweep("error-paused")
    for j in (a, b):
        with session_scope() as s:
            repo.claim_job(s, j, "w", 60.0)
            repo.record_progress(s, j, [{"epoch": 1, "val_accuracy": 0.5}])
            assert repo.pause_job(s, j, steps=1, epochs_run=1)
    with session_scope() as s:  # advancing raised: worker.sweeps.advance records it
        store_sweeps.record_error(s, sid, "advancing the sweep failed: boom")
    with session_scope() as s:
        assert store_sweeps.get_sweep(s, sid).status == "failed"
        assert {(s.get(Job, j).status, s.get(Job, j).stop_reason) for j in (a, b)} == {("cancelled", "sweep_failed")}


def test_the_last_trial_left_is_not_paused_to_be_promoted_back(inproc_env: dict[str, str]) -> None:
    from store import repo
    from store.db import session_scope
    from worker.sweeps import prune_decision

    sid, (a,) = _sweep("endgame", max_trials=1, max_concurrent=1)
    with session_scope() as s:
        repo.claim_job(s, a, "w", 60.0)
    # alone at its rung, no trial left to come: Optuna's own rule lets the best go on
    assert prune_decision(sid, a, 1, [{"epoch": 1, "val_accuracy": 0.5}]) is False
    # with a second trial still to start, the same trial waits at the rung
    sid2, (c, _d) = _sweep("not-endgame", max_trials=3, max_concurrent=2)
    with session_scope() as s:
        repo.claim_job(s, c, "w", 60.0)
    assert prune_decision(sid2, c, 1, [{"epoch": 1, "val_accuracy": 0.5}]) is True


def test_a_sweep_has_moves_while_it_may_create_trials_or_has_a_pause_decided_elsewhere(inproc_env: dict[str, str]) -> None:
    """``store.sweeps.sweeps_with_moves`` (what a pack asks before advancing a sweep while its
    other trials train on): a sweep that may still create trials has moves; one that may not has
    moves only while it has a paused trial outside the trials just settled; an ended one has none."""
    from sqlalchemy import update

    from store import sweeps as store_sweeps
    from store.db import session_scope
    from store.models import Job, Sweep

    full, (a, b) = _sweep("moves-full", max_trials=2, max_concurrent=2)
    more, _ = _sweep("moves-more", max_trials=3, max_concurrent=2)
    with session_scope() as s:
        assert store_sweeps.sweeps_with_moves(s, [full, more], []) == {more}
        s.execute(update(Job).where(Job.id == a).values(status="paused"))
    with session_scope() as s:
        assert store_sweeps.sweeps_with_moves(s, [full, more], [a, b]) == {more}  # its pause settled
        assert store_sweeps.sweeps_with_moves(s, [full, more], [b]) == {full, more}  # paused elsewhere
        s.execute(update(Sweep).where(Sweep.id == more).values(status="cancelled"))
    with session_scope() as s:
        assert store_sweeps.sweeps_with_moves(s, [full, more], []) == {full}
