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


def _scenario(seed: int) -> tuple[dict[str, Any], list[TrialRecord], dict[int, int]]:
    """A random sweep's trials: paused ones (stopped exactly at a rung), finished ones (complete,
    pruned, failed) and running ones, with distinct finite values; returns its config, the trials
    and the paused ones (number -> epoch)."""
    import random

    r = random.Random(seed)
    min_epochs, rf = r.choice((1, 2)), r.choice((2, 3))
    mode = r.choice(("min", "max"))
    rungs = [min_epochs * rf**k for k in range(3)]
    et = {"type": "asha", "min_epochs": min_epochs, "reduction_factor": rf, "max_epochs": rungs[-1] + 1,
          "pause": True}
    config = {**CONFIG, "objective": {"metric": "val_accuracy", "mode": mode}, "early_termination": et}
    trials, paused = [], {}
    for n in range(r.randint(1, 14)):
        state = r.choice(("paused", "paused", "complete", "pruned", "fail", "running"))
        last = r.choice(rungs) if state == "paused" else r.randint(1, rungs[-1] + 1)
        values = {e: r.random() for e in range(1, last + 1)}
        best = (max if mode == "max" else min)(values.values())
        trials.append(TrialRecord(number=n, params={"optimizer.learning_rate": 0.01},
                                  state="running" if state == "paused" else state,  # type: ignore[arg-type]
                                  values=values, value=best if state != "fail" else None))
        if state == "paused":
            paused[n] = last
    return config, trials, paused


def _optuna_promotes(config: dict[str, Any], trials: list[TrialRecord], number: int, epoch: int,
                     endgame: bool) -> bool:
    """Optuna's own answer, from a live study: every other trial reports its values epoch by epoch
    (the pruner asked after each, so it records the rung values itself) and ends as it did; then
    the paused trial reports its values, and is promoted if the pruner does not stop it at its rung."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    et = config["early_termination"]
    rf = et["reduction_factor"]
    pruner = optuna.pruners.SuccessiveHalvingPruner(
        min_resource=et["min_epochs"], reduction_factor=rf, min_early_stopping_rate=0,
        bootstrap_count=0 if endgame else rf - 1)
    study = optuna.create_study(direction="maximize" if config["objective"]["mode"] == "max" else "minimize",
                                pruner=pruner)

    def report(t: Any, values: dict[int, float]) -> bool:
        stop = False
        for e in sorted(values):
            t.report(values[e], e)
            stop = t.should_prune()
        return stop

    for rec_ in trials:
        if rec_.number == number:
            continue
        t = study.ask()
        report(t, rec_.values)
        if rec_.state == "complete":
            study.tell(t, rec_.value)
        elif rec_.state != "running":
            study.tell(t, state=getattr(optuna.trial.TrialState, rec_.state.upper()))
    me = next(r for r in trials if r.number == number)
    return not report(study.ask(), {e: v for e, v in me.values.items() if e <= epoch})


def test_promotions_are_optunas_decisions_on_the_same_values():
    """``promotions`` (one study, Optuna's pruner asked about each paused trial) promotes exactly
    the paused trials that a live Optuna study's successive halving lets go on, and agrees with
    asking ``should_prune`` about each trial on its own."""
    from training.sweep_space import promotions

    asked = promoted = 0
    for seed in range(60):
        config, trials, paused = _scenario(seed)
        for endgame in (False, True):
            got = promotions(config, trials, paused, study_name="s", endgame=endgame)
            live = {n for n, e in paused.items() if _optuna_promotes(config, trials, n, e, endgame)}
            one_by_one = {n for n, e in paused.items()
                          if not should_prune(config, trials, n, e, study_name="s", endgame=endgame)}
            assert got == live == one_by_one, (seed, endgame, paused)
            asked += len(paused)
            promoted += len(got)
    assert 0 < promoted < asked  # the scenarios hold both outcomes


def test_a_packs_rung_is_ranked_together():
    """Trials of a pack that reach a rung at the same epoch end are asked about together
    (``prune_many``): each is ranked against all of them, so the best 1/reduction_factor go on at
    once and the rest pause; and each answer is Optuna's live answer for that trial with the
    others' values reported."""
    from training.sweep_space import prune_many

    values = [0.31, 0.9, 0.55, 0.72, 0.12, 0.95, 0.6, 0.44, 0.81]
    trials = [rec(n, {1: v}) for n, v in enumerate(values)]
    stopped = prune_many(CONFIG, trials, {n: 1 for n in range(9)}, study_name="s")
    assert sorted(set(range(9)) - stopped) == [1, 5, 8]  # floor(9 / 3) = 3: the three best
    for n in range(9):
        assert (n in stopped) == (not _optuna_promotes(CONFIG, trials, n, 1, False))
    # asked one at a time as the trials arrive (async ASHA), the first ones wait for company
    assert decide(trials[:1], 0, 1) and decide(trials[:2], 1, 1)
    # a trial's values after the epoch it is asked about are left out
    later = [rec(0, {1: 0.1, 2: 0.99, 3: 0.99})] + trials[1:]
    assert 0 in prune_many(CONFIG, later, {n: 1 for n in range(9)}, study_name="s")


def test_prune_many_is_should_prune_of_each():
    """Asked together, every trial gets the answer it gets asked alone (same stored values), for
    each pruner: ASHA (one study), Hyperband and the median rule (a study per question)."""
    from training.sweep_space import prune_many

    hb = {**CONFIG, "early_termination": {"type": "hyperband", "min_epochs": 1, "max_epochs": 9, "reduction_factor": 3}}
    med = {**CONFIG, "early_termination": {"type": "median", "min_epochs": 1, "n_startup_trials": 2}}
    for seed in range(30):
        config, trials, paused = _scenario(seed)
        for cfg in (config, hb, med):
            asked = {t.number: max(t.values) for t in trials if t.state == "running" and t.values}
            for endgame in (False, True):
                one_by_one = {n for n, e in asked.items() if should_prune(cfg, trials, n, e, study_name="s", endgame=endgame)}
                assert prune_many(cfg, trials, asked, study_name="s", endgame=endgame) == one_by_one
