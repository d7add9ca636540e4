"""ASHA with promotions (``early_termination.pause``): the decision rule, against hand-worked
rankings. The pruner is Optuna's successive halving, asked with bootstrap_count >=
reduction_factor - 1, so a trial goes on past a rung only once reduction_factor trials reached it
and it is in their best 1/reduction_factor; in the end game (nothing else can run) Optuna's own
rule lets the best one at a thinly populated rung go on."""

from __future__ import annotations

from typing import Any

from training.sweep_space import TrialRecord, make_pruner, pauses, should_prune

CONFIG: dict[str, Any] = {
    "method": "random", "seed": 0,
    "parameters": {"optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-4, "max": 0.1}},
    "objective": {"metric": "val_accuracy", "mode": "max"},
    "early_termination": {"type": "asha", "min_epochs": 1, "reduction_factor": 3, "max_epochs": 9, "pause": True},
}


def rec(number: int, values: dict[int, float], state: str = "running") -> TrialRecord:
    return TrialRecord(number=number, params={"optimizer.learning_rate": 0.01}, state=state,  # type: ignore[arg-type]
                       values=values, value=max(values.values()) if values else None)


def decide(trials: list[TrialRecord], number: int, epoch: int, **kw: Any) -> bool:
    return should_prune(CONFIG, trials, number, epoch, study_name="s", **kw)


def test_pause_is_asha_only_and_raises_the_bootstrap():
    assert pauses(CONFIG)
    assert not pauses({**CONFIG, "early_termination": {**CONFIG["early_termination"], "pause": False}})
    assert not pauses({**CONFIG, "early_termination": {"type": "median", "pause": True}})
    assert make_pruner(CONFIG)._bootstrap_count == 2
    assert make_pruner(CONFIG, endgame=True)._bootstrap_count == 0
    plain = {**CONFIG, "early_termination": {**CONFIG["early_termination"], "pause": False}}
    assert make_pruner(plain)._bootstrap_count == 0


def test_a_lone_trial_at_a_rung_pauses_instead_of_going_on():
    # Optuna's stop-based rule lets the first trial go on (the best so far); with pause it waits
    assert decide([rec(0, {1: 0.9})], 0, 1) is True
    plain = {**CONFIG, "early_termination": {**CONFIG["early_termination"], "pause": False}}
    assert should_prune(plain, [rec(0, {1: 0.9})], 0, 1, study_name="s") is False
    # two trials at rung 1: still fewer than reduction_factor, both wait
    assert decide([rec(0, {1: 0.5}), rec(1, {1: 0.9})], 1, 1) is True


def test_the_best_third_of_a_rung_is_promoted():
    three = [rec(0, {1: 0.5}), rec(1, {1: 0.9}), rec(2, {1: 0.7})]
    assert decide(three, 1, 1) is False  # the best of three goes on
    assert decide(three, 0, 1) is True and decide(three, 2, 1) is True
    six = three + [rec(3, {1: 0.8}), rec(4, {1: 0.2}), rec(5, {1: 0.95})]
    promoted = [n for n in range(6) if not decide(six, n, 1)]
    assert promoted == [1, 5]  # floor(6 / 3) = 2: the two best
    # at rung 3 the trial is compared with the others that reached epoch 3 (its own rung 1 passed)
    deeper = [rec(0, {1: 0.9, 2: 0.91, 3: 0.93}), rec(1, {1: 0.8, 2: 0.85, 3: 0.88}),
              rec(2, {1: 0.95, 2: 0.96, 3: 0.97}), rec(3, {1: 0.1})]
    assert decide(deeper, 2, 3) is False and decide(deeper, 0, 3) is True and decide(deeper, 1, 3) is True


def test_end_game_lets_the_best_of_a_thin_rung_go_on():
    two = [rec(0, {1: 0.9, 3: 0.93}), rec(1, {1: 0.8, 3: 0.91}), rec(2, {1: 0.1}, "pruned")]
    assert decide(two, 0, 3) is True and decide(two, 1, 3) is True  # two reached epoch 3: both wait
    assert decide(two, 0, 3, endgame=True) is False  # nothing else can run: the best goes on
    assert decide(two, 1, 3, endgame=True) is True


def test_a_nan_at_a_rung_ranks_last():
    """A diverged trial's NaN is the worst value at its rung (Optuna sorts the competing values,
    and a NaN would land anywhere in the sort)."""
    nan = float("nan")
    for order in ([rec(0, {1: nan}), rec(1, {1: 0.5}), rec(2, {1: 0.4})],
                  [rec(0, {1: 0.4}), rec(1, {1: 0.5}), rec(2, {1: nan})]):
        deciding = next(r.number for r in order if r.values[1] == 0.5)
        assert decide(order, deciding, 1) is False  # the best real value goes on
        other = next(r.number for r in order if r.values[1] == 0.4)
        assert decide(order, other, 1) is True
