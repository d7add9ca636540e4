"""training.sweep_space: parameter paths, and Optuna's decisions over a study rebuilt from
stored trials (no database here)."""

from __future__ import annotations

from typing import Any

import pytest

from training.sweep_space import (
    PathError,
    TrialRecord,
    is_decision_epoch,
    objective_value,
    parse_path,
    resolve,
    should_prune,
    suggest,
    with_params,
)


def test_paths() -> None:
    assert parse_path("model.layers[0].kernel_initializer") == ["model", "layers", 0, "kernel_initializer"]
    for bad in ("a..b", "[0]", "a.", "a b", "a[x]", ""):
        with pytest.raises(PathError):
            parse_path(bad)
    spec = {"model": {"layers": [{"units": 3}]}, "optimizer": {"learning_rate": 0.1}}
    assert resolve(spec, "model.layers[0].units") == 3
    with pytest.raises(PathError, match=r"has 1 item\(s\)"):
        resolve(spec, "model.layers[2].units")
    with pytest.raises(PathError, match="no field 'lr'"):
        resolve(spec, "optimizer.lr")
    out = with_params(spec, {"model.layers[0].units": 8, "optimizer.learning_rate": {"schedule": "constant"}})
    assert out["model"]["layers"][0]["units"] == 8 and spec["model"]["layers"][0]["units"] == 3
    assert out["optimizer"]["learning_rate"] == {"schedule": "constant"}


def config(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "method": "random", "seed": 3,
        "parameters": {"lr": {"distribution": "log_uniform", "min": 1e-4, "max": 0.1},
                       "units": {"values": [8, 16]}, "sched": {"values": [{"schedule": "constant"}, [1, 2]]}},
        "objective": {"metric": "val_accuracy", "mode": "max"}, "early_termination": None,
    }
    c.update(over)
    return c


def test_suggest_is_reproducible_and_fresh() -> None:
    a = suggest(config(), [], 3, study_name="s")
    assert a == suggest(config(), [], 3, study_name="s")
    assert len({str(p) for p in a}) == 3
    assert all(p["sched"] in ({"schedule": "constant"}, [1, 2]) and p["units"] in (8, 16) for p in a)
    told = [TrialRecord(i, p, "complete", {1: 0.5}, 0.5) for i, p in enumerate(a)]
    assert suggest(config(), told, 1, study_name="s")[0] not in a


def test_grid_takes_each_point_once() -> None:
    c = config(method="grid", parameters={"a": {"values": [1, 2]}, "b": {"values": ["x", "y", "z"]}})
    first = suggest(c, [], 4, study_name="g")
    rest = suggest(c, [TrialRecord(i, p, "running") for i, p in enumerate(first)], 2, study_name="g")
    assert sorted((p["a"], p["b"]) for p in first + rest) == [(a, b) for a in (1, 2) for b in "xyz"]


def _trial(n: int, values: list[float], state: str = "complete") -> TrialRecord:
    vals = {i + 1: v for i, v in enumerate(values)}
    return TrialRecord(n, {"lr": 0.01, "units": 8, "sched": [1, 2]}, state,  # type: ignore[arg-type]
                       vals, objective_value(vals, "max") if state == "complete" else None)


def test_asha_prunes_at_rungs_only() -> None:
    c = config(early_termination={"type": "asha", "min_epochs": 1, "reduction_factor": 3})
    assert [e for e in range(1, 28) if is_decision_epoch(c, e, 27)] == [1, 3, 9]
    done = [_trial(0, [0.9] * 9), _trial(1, [0.8] * 9)]
    assert should_prune(c, [*done, _trial(2, [0.1], "running")], 2, 1, study_name="s")
    assert not should_prune(c, [*done, _trial(2, [0.95], "running")], 2, 1, study_name="s")


def test_median_and_hyperband() -> None:
    med = config(early_termination={"type": "median", "min_epochs": 2, "n_startup_trials": 2})
    assert [e for e in range(1, 6) if is_decision_epoch(med, e, 5)] == [2, 3, 4]
    done = [_trial(0, [0.5, 0.8, 0.9]), _trial(1, [0.6, 0.85, 0.9])]
    assert should_prune(med, [*done, _trial(2, [0.1, 0.2], "running")], 2, 2, study_name="s")
    assert not should_prune(med, [*done, _trial(2, [0.7, 0.9], "running")], 2, 2, study_name="s")
    assert not should_prune(med, [done[0], _trial(2, [0.1, 0.2], "running")], 2, 2, study_name="s")  # start-up
    hb = config(early_termination={"type": "hyperband", "min_epochs": 1, "reduction_factor": 3, "max_epochs": 9})
    trials = [_trial(i, [0.9 - 0.01 * i] * 9) for i in range(12)]
    decisions = [should_prune(hb, [*trials, _trial(12 + k, [0.01] * 3, "running")], 12 + k, 3, study_name="h")
                 for k in range(6)]
    assert any(decisions)  # a weak trial is stopped in the brackets that act at epoch 3
