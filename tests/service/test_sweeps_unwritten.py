"""A trial's pruning decision counts its epochs that its reporter has not written yet (the worker
decides before writing them: a pruned trial then writes them once, with its result)."""

from __future__ import annotations

from typing import Any

from .test_sweeps import base


def test_objective_values_of_reported_epochs() -> None:
    from store.sweeps import objective_values

    got = objective_values([{"epoch": 1, "val_accuracy": 0.5, "loss": 1.0}, {"epoch": 2, "loss": 0.9},
                            {"epoch": 3, "val_accuracy": float("nan")}], "val_accuracy")
    assert list(got) == [1, 3] and got[1] == 0.5 and got[3] != got[3]  # NaN kept, as stored values are


def test_prune_decision_uses_unwritten_epochs(inproc_env: dict[str, str]) -> None:
    import orchestration.sweeps as orchestration_sweeps
    from api.routers.sweeps import check_sweep
    from config.settings import get_settings
    from store import repo
    from store import sweeps as store_sweeps
    from store.db import session_scope
    from store.models import DEFAULT_PROJECT
    from worker.sweeps import prune_decision

    settings = get_settings()
    body: dict[str, Any] = {
        "name": "unwritten", "base": base(epochs=9), "method": "random", "seed": 2,
        "objective": {"metric": "val_accuracy", "mode": "max"},
        "parameters": {"model.layers[0].units": {"values": [8, 16]}}, "max_trials": 2, "max_concurrent": 2,
        # Optuna's stop-at-once rule: a lone trial that is the best so far goes on (with asha's
        # default pause it would wait for reduction_factor trials at the rung)
        "early_termination": {"type": "asha", "min_epochs": 1, "reduction_factor": 3, "pause": False},
    }
    with session_scope() as s:
        config = check_sweep(body, s, DEFAULT_PROJECT, settings)
        sweep = store_sweeps.create_sweep(
            s, project_id=DEFAULT_PROJECT, name="unwritten", method="random", config=config,
            objective_metric="val_accuracy", objective_mode="max", max_trials=2, max_concurrent=2,
        )
        sweep_id = sweep.id
        first, second = (job_id for job_id, _ in orchestration_sweeps.advance_sweep(s, sweep_id, settings))
    with session_scope() as s:  # trial 0 reached the first rung (epoch 1) with 0.9, written
        assert repo.claim_job(s, first, "test", 60.0) is not None
        repo.record_progress(s, first, [{"epoch": 1, "val_accuracy": 0.9, "loss": 0.3}])
        assert repo.claim_job(s, second, "test", 60.0) is not None

    # trial 1 ends epoch 1 and nothing of it is written yet
    assert prune_decision(sweep_id, second, 1) is False  # no value at the rung: nothing to decide on
    assert prune_decision(sweep_id, second, 1, [{"epoch": 1, "val_accuracy": 0.5}]) is True
    assert prune_decision(sweep_id, second, 1, [{"epoch": 1, "val_accuracy": 0.95}]) is False
    with session_scope() as s:  # written values and buffered ones together
        repo.record_progress(s, second, [{"epoch": 1, "val_accuracy": 0.95}])
    assert prune_decision(sweep_id, second, 3, [{"epoch": 2, "val_accuracy": 0.96},
                                                {"epoch": 3, "val_accuracy": 0.97}]) is False
    with session_scope() as s:
        store_sweeps.cancel_sweep(s, store_sweeps.get_sweep(s, sweep_id, lock=True))
    assert prune_decision(sweep_id, second, 1, [{"epoch": 1, "val_accuracy": 0.5}]) is False  # not running
