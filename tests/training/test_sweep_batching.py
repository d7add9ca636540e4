"""Random search's trial k gets the same parameters however the sweep asked for its trials (one
call for several concurrent trials, or one call per trial as they end)."""

from __future__ import annotations

from typing import Any

from training.sweep_space import TrialRecord, suggest


def _config(method: str) -> dict[str, Any]:
    return {
        "method": method, "seed": 11,
        "parameters": {"lr": {"distribution": "log_uniform", "min": 1e-5, "max": 0.3},
                       "units": {"values": [8, 16, 32, 64, 128]}, "bs": {"values": [32, 64, 128]}},
        "objective": {"metric": "val_accuracy", "mode": "max"}, "early_termination": None,
    }


def test_random_draws_depend_on_trial_number_only() -> None:
    c = _config("random")
    batched = suggest(c, [], 2, study_name="a") + suggest(
        c, [TrialRecord(0, {}, "running"), TrialRecord(1, {}, "running")], 3, study_name="a"
    )
    one_by_one: list[dict[str, Any]] = []
    for _k in range(5):
        told = [TrialRecord(i, p, "complete", {1: 0.5}, 0.5) for i, p in enumerate(one_by_one)]
        one_by_one.append(suggest(c, told, 1, study_name="b")[0])
    assert batched == one_by_one
    assert len({str(p) for p in batched}) == 5  # and they are fresh draws


def test_tpe_batch_still_spreads_out() -> None:
    # TPE is not affected (its first draws are random startup draws from one sampler)
    c = _config("tpe")
    batch = suggest(c, [], 4, study_name="t")
    assert len({str(p) for p in batch}) == 4
