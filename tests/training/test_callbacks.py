"""Exactness tests for training/callbacks.py.

Expected stop epochs are derived by hand from the early-stopping rule in shared/docs/semantics.md
(Keras 3 EarlyStopping), and checked against a tiny independent re-implementation of the Keras
rules (EarlyStopping, ModelCheckpoint(save_best_only), ReduceLROnPlateau) on random sequences.
"""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau

NAN = float("nan")
INF = float("inf")


# --------------------------------------------------------------------------- references


class RefEarlyStopping:
    """Keras 3 EarlyStopping.on_epoch_end, transcribed from semantics.md (no extras)."""

    def __init__(self, monitor="val_loss", min_delta=0.0, patience=0, mode="auto", baseline=None,
                 restore_best_weights=False, start_from_epoch=0):
        if mode == "auto":
            mode = "max" if ("acc" in monitor or "auc" in monitor) else "min"
        self.monitor, self.mode, self.min_delta = monitor, mode, abs(min_delta)
        self.patience, self.baseline = patience, baseline
        self.restore, self.start = restore_best_weights, start_from_epoch
        self.wait, self.best, self.best_epoch, self.stopped_epoch = 0, None, None, None
        self.have_weights = False

    def _improves(self, cur, ref):
        if ref is None:
            return True
        if self.mode == "min":
            return cur < ref - self.min_delta
        return cur > ref + self.min_delta

    def step(self, epoch, logs):
        """Returns (stop, hold_weights)."""
        cur = logs.get(self.monitor)
        if cur is None or epoch < self.start:
            return False, False
        hold = False
        if self.restore and not self.have_weights:
            hold, self.have_weights = True, True
        self.wait += 1
        if self._improves(cur, self.best):
            self.best, self.best_epoch = cur, epoch
            if self.restore:
                hold = True
            if self.baseline is None or self._improves(cur, self.baseline):
                self.wait = 0
            return False, hold
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            return True, hold
        return False, hold


def run_es(es, values, monitor="val_loss", first_epoch=0):
    """Feed values (None = monitor missing) until a stop; return the list of decisions."""
    out = []
    for i, v in enumerate(values):
        logs = {} if v is None else {monitor: v}
        d = es.on_epoch_end(first_epoch + i, logs)
        out.append((bool(d.stop), bool(d.hold_weights)))
        if d.stop:
            break
    return out


def run_ref(ref, values, monitor="val_loss"):
    out = []
    for i, v in enumerate(values):
        d = ref.step(i, {} if v is None else {monitor: v})
        out.append(d)
        if d[0]:
            break
    return out


def stop_epoch(values, **kw):
    es = EarlyStopping(**kw)
    decisions = run_es(es, values, kw.get("monitor", "val_loss"))
    return (len(decisions) - 1 if decisions and decisions[-1][0] else None), es


# --------------------------------------------------------------------------- EarlyStopping: hand cases


def test_patience_0_stops_at_first_non_improvement():
    epoch, es = stop_epoch([1.0, 0.9, 0.9, 0.5], patience=0)
    assert epoch == 2
    assert es.stopped_epoch == 2
    assert es.best == 0.9 and es.best_epoch == 1


def test_patience_0_never_stops_at_epoch_0():
    # Even a non-improving value at epoch 0 (best already known, e.g. from restored state) does not stop.
    es = EarlyStopping(patience=0)
    es.load_state_dict({**EarlyStopping(patience=0).state_dict(), "best": 0.5, "best_epoch": 0})
    d = es.on_epoch_end(0, {"val_loss": 1.0})
    assert not d.stop
    assert es.wait == 1
    d = es.on_epoch_end(1, {"val_loss": 1.0})
    assert d.stop and es.stopped_epoch == 1


def test_patience_0_first_epoch_is_always_an_improvement():
    es = EarlyStopping(patience=0)
    assert not es.on_epoch_end(0, {"val_loss": 123.0}).stop
    assert es.best == 123.0 and es.best_epoch == 0 and es.wait == 0


def test_patience_2_plateau():
    epoch, es = stop_epoch([1.0, 0.9, 0.9, 0.9, 0.8], patience=2)
    # e0 best 1.0 w0; e1 best 0.9 w0; e2 w1; e3 w2 >= 2 -> stop
    assert epoch == 3
    assert es.best == 0.9 and es.best_epoch == 1 and es.wait == 2


def test_patience_2_improvement_resets_wait():
    epoch, _ = stop_epoch([1.0, 1.1, 0.9, 1.2, 1.3, 0.1], patience=2)
    # e1 w1; e2 improves -> w0; e3 w1; e4 w2 -> stop at 4 (never sees the 0.1)
    assert epoch == 4


def test_min_delta_small_improvement_does_not_reset_wait():
    epoch, es = stop_epoch([1.0, 0.95, 0.92, 0.5], patience=2, min_delta=0.1)
    # 0.95 and 0.92 are not < 1.0 - 0.1: wait 1, 2 -> stop at epoch 2
    assert epoch == 2
    assert es.best == 1.0 and es.best_epoch == 0
    # Same values without min_delta: every epoch improves.
    epoch0, es0 = stop_epoch([1.0, 0.95, 0.92, 0.5], patience=2)
    assert epoch0 is None and es0.best == 0.5


def test_min_delta_large_enough_improvement_counts():
    epoch, es = stop_epoch([1.0, 0.85, 0.8, 0.7, 0.69, 0.68], patience=2, min_delta=0.1)
    # e1: 0.85 < 0.9 improve (best .85); e2: .8 !< .75 w1; e3: .7 < .75 improve; e4 w1; e5 w2 stop
    assert epoch == 5
    assert es.best == 0.7 and es.best_epoch == 3


def test_negative_min_delta_is_taken_as_absolute():
    epoch, _ = stop_epoch([1.0, 0.95, 0.92, 0.5], patience=2, min_delta=-0.1)
    assert epoch == 2


def test_baseline_not_beaten_wait_keeps_counting():
    # baseline 0.5 never beaten: improvements update best but do not reset wait, and an improving
    # epoch returns before the stop check (Keras 3). The first non-improving epoch then stops.
    vals = [1.0, 0.9, 0.8, 0.7, 0.7]
    epoch, es = stop_epoch(vals, patience=2, baseline=0.5)
    assert epoch == 4
    assert es.best == 0.7 and es.best_epoch == 3
    assert es.wait == 5
    # Without the baseline the same run does not stop (wait would be 1).
    epoch0, es0 = stop_epoch(vals, patience=2)
    assert epoch0 is None and es0.wait == 1


def test_baseline_not_beaten_strictly_improving_never_stops():
    epoch, es = stop_epoch([1.0, 0.9, 0.8, 0.7, 0.6, 0.55], patience=1, baseline=0.5)
    assert epoch is None
    assert es.wait == 6


def test_baseline_not_beaten_patience_0():
    epoch, _ = stop_epoch([1.0, 1.0], patience=0, baseline=0.5)
    assert epoch == 1


def test_baseline_beaten_resets_wait():
    epoch, es = stop_epoch([0.6, 0.55, 0.3, 0.35, 0.36, 0.0], patience=2, baseline=0.5)
    # e0 w1 (improves, baseline not beaten); e1 w2 improves -> return; e2 beats both -> w0; e3 w1; e4 w2 stop
    assert epoch == 4
    assert es.best == 0.3 and es.best_epoch == 2


def test_baseline_uses_min_delta():
    # 0.45 is < 0.5 but not < 0.5 - 0.1: it does not beat the baseline.
    epoch, es = stop_epoch([0.45, 0.45], patience=1, baseline=0.5, min_delta=0.1)
    assert epoch == 1
    epoch, es = stop_epoch([0.35, 0.35], patience=2, baseline=0.5, min_delta=0.1)
    assert epoch is None and es.wait == 1


def test_baseline_mode_max():
    epoch, _ = stop_epoch([0.5, 0.6, 0.6], monitor="val_accuracy", patience=2, baseline=0.9)
    # e0 w1, e1 w2 (improving, below baseline), e2 w3 no improvement -> stop
    assert epoch == 2
    epoch, _ = stop_epoch([0.95, 0.96, 0.96], monitor="val_accuracy", patience=2, baseline=0.9)
    assert epoch is None


def test_start_from_epoch_ignores_early_epochs():
    vals = [0.1, 0.1, 0.1, 1.0, 1.0, 0.9]
    epoch, es = stop_epoch(vals, patience=1, start_from_epoch=3)
    # epochs 0..2 ignored entirely (their 0.1 is never the best); e3 best 1.0; e4 w1 -> stop
    assert epoch == 4
    assert es.best == 1.0 and es.best_epoch == 3


def test_start_from_epoch_first_counted_epoch_is_improvement():
    epoch, es = stop_epoch([5.0, 5.0, 5.0, 5.0], patience=0, start_from_epoch=2)
    assert epoch == 3
    assert es.best_epoch == 2


def test_missing_monitor_is_ignored():
    epoch, es = stop_epoch([1.0, None, None, None, 1.0], patience=1)
    assert epoch == 4
    assert es.best_epoch == 0


def test_mode_max_explicit():
    epoch, es = stop_epoch([0.5, 0.6, 0.6, 0.55], monitor="score", mode="max", patience=2)
    assert epoch == 3
    assert es.best == 0.6 and es.best_epoch == 1


@pytest.mark.parametrize("monitor", ["val_accuracy", "accuracy", "val_auc", "val_top_k_accuracy"])
def test_mode_auto_max_for_acc_and_auc(monitor):
    epoch, es = stop_epoch([0.5, 0.6, 0.6, 0.55], monitor=monitor, patience=2)
    assert epoch == 3
    assert es.best == 0.6


@pytest.mark.parametrize("monitor", ["val_loss", "loss", "val_mae"])
def test_mode_auto_min_otherwise(monitor):
    epoch, es = stop_epoch([0.5, 0.6, 0.6, 0.55], monitor=monitor, patience=2)
    # min: e0 best .5; e1 w1; e2 w2 -> stop at 2
    assert epoch == 2
    assert es.best == 0.5


def test_mode_max_with_min_delta():
    epoch, es = stop_epoch([0.5, 0.55, 0.65, 0.7], monitor="val_accuracy", patience=2, min_delta=0.1)
    # .55 !> .6 w1; .65 > .6 improve w0; .7 !> .75 w1
    assert epoch is None
    assert es.best == 0.65 and es.best_epoch == 2


def test_restore_best_weights_hold_decisions():
    es = EarlyStopping(patience=5, restore_best_weights=True)
    holds = [h for _, h in run_es(es, [1.0, 0.8, 0.9, 0.7, 0.75])]
    assert holds == [True, True, False, True, False]
    assert es.best_epoch == 3


def test_restore_best_weights_with_start_from_epoch():
    es = EarlyStopping(patience=5, restore_best_weights=True, start_from_epoch=2)
    holds = [h for _, h in run_es(es, [0.1, 0.1, 0.9, 0.7, 0.75, None, 0.6])]
    assert holds == [False, False, True, True, False, False, True]


def test_restore_best_weights_first_evaluated_epoch_holds_even_without_improvement():
    es = EarlyStopping(patience=5, restore_best_weights=True)
    es.load_state_dict({**es.state_dict(), "best": 0.1, "best_epoch": 0})
    d = es.on_epoch_end(3, {"val_loss": 1.0})
    assert d.hold_weights and not d.stop
    d = es.on_epoch_end(4, {"val_loss": 1.0})
    assert not d.hold_weights


def test_no_hold_without_restore_best_weights():
    es = EarlyStopping(patience=5)
    assert [h for _, h in run_es(es, [1.0, 0.8, 0.7])] == [False, False, False]


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_stops(bad):
    es = EarlyStopping(patience=10, stop_on_non_finite=True)
    decisions = run_es(es, [1.0, 0.9, bad, 0.1])
    assert len(decisions) == 3 and decisions[-1][0]
    assert es.stopped_epoch == 2
    assert es.reason == "non_finite_loss"
    assert es.best == 0.9


def test_non_finite_at_epoch_0_stops():
    es = EarlyStopping(patience=10)
    assert es.on_epoch_end(0, {"val_loss": NAN}).stop
    assert es.reason == "non_finite_loss" and es.stopped_epoch == 0


def test_nan_without_stop_on_non_finite_follows_keras():
    # Keras: NaN < best is False, so NaN is just a non-improving epoch.
    es = EarlyStopping(patience=3, stop_on_non_finite=False)
    decisions = run_es(es, [1.0, NAN, NAN, 0.5, NAN, NAN, NAN])
    assert [s for s, _ in decisions] == [False, False, False, False, False, False, True]
    assert es.stopped_epoch == 6
    assert es.best == 0.5 and es.best_epoch == 3
    assert es.reason not in ("non_finite_loss", "diverged")


def test_divergence_threshold_min():
    es = EarlyStopping(patience=10, divergence_threshold=10.0)
    decisions = run_es(es, [1.0, 5.0, 11.0, 0.1])
    assert len(decisions) == 3 and decisions[-1][0]
    assert es.stopped_epoch == 2 and es.reason == "diverged"


def test_divergence_threshold_max():
    es = EarlyStopping(monitor="val_accuracy", patience=10, divergence_threshold=0.1)
    decisions = run_es(es, [0.5, 0.3, 0.05], monitor="val_accuracy")
    assert len(decisions) == 3 and decisions[-1][0]
    assert es.stopped_epoch == 2 and es.reason == "diverged"


def test_early_stopping_reason_on_patience():
    _, es = stop_epoch([1.0, 1.0], patience=1)
    assert es.stopped_epoch == 1
    assert es.reason not in (None, "non_finite_loss", "diverged")


def test_no_stop_records_nothing():
    epoch, es = stop_epoch([3.0, 2.0, 1.0], patience=1)
    assert epoch is None and es.stopped_epoch is None and es.reason is None


def test_state_dict_round_trip_mid_run():
    kw = dict(patience=3, min_delta=0.01, baseline=0.9, restore_best_weights=True, start_from_epoch=1)
    vals = [2.0, 1.0, 0.95, 0.95, 0.8, 0.85, 0.85, 0.84, 0.9, 0.9, 0.9]
    full = EarlyStopping(**kw)
    ref = run_es(full, vals)
    for split in range(1, len(ref)):
        a = EarlyStopping(**kw)
        first = run_es(a, vals[:split])
        b = EarlyStopping(**kw)
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        second = run_es(b, vals[split:], first_epoch=split)
        assert first + second == ref, split
        for attr in ("best", "best_epoch", "stopped_epoch", "wait", "reason"):
            assert getattr(b, attr) == getattr(full, attr), (split, attr)


# --------------------------------------------------------------------------- EarlyStopping vs reference

values_st = st.lists(
    st.one_of(st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 1.0]), st.none()), min_size=1, max_size=25
)


@settings(max_examples=400, deadline=None)
@given(
    values=values_st,
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.05, 0.1, 0.3]),
    baseline=st.one_of(st.none(), st.sampled_from([0.0, 0.2, 0.5])),
    mode=st.sampled_from(["min", "max"]),
    restore=st.booleans(),
    start=st.integers(0, 3),
)
def test_early_stopping_matches_keras_reference(values, patience, min_delta, baseline, mode, restore, start):
    kw = dict(patience=patience, min_delta=min_delta, baseline=baseline, mode=mode,
              restore_best_weights=restore, start_from_epoch=start)
    es = EarlyStopping(**kw, stop_on_non_finite=False)
    ref = RefEarlyStopping(**kw)
    assert run_es(es, values) == run_ref(ref, values)
    assert es.best == ref.best
    assert es.best_epoch == ref.best_epoch
    assert es.stopped_epoch == ref.stopped_epoch
    assert es.wait == ref.wait


@settings(max_examples=200, deadline=None)
@given(values=values_st, patience=st.integers(0, 4), baseline=st.one_of(st.none(), st.just(0.2)),
       split=st.integers(0, 25))
def test_early_stopping_state_round_trip_random(values, patience, baseline, split):
    kw = dict(patience=patience, baseline=baseline, restore_best_weights=True)
    full = EarlyStopping(**kw)
    ref = run_es(full, values)
    split = min(split, len(ref))
    a = EarlyStopping(**kw)
    first = run_es(a, values[:split])
    if first and first[-1][0]:
        return
    b = EarlyStopping(**kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert first + run_es(b, values[split:], first_epoch=split) == ref
    assert (b.best, b.best_epoch, b.stopped_epoch, b.wait) == (full.best, full.best_epoch, full.stopped_epoch, full.wait)


# --------------------------------------------------------------------------- ModelCheckpoint


def saves(mc, values, monitor="val_loss"):
    return [mc.should_save({} if v is None else {monitor: v}, i) for i, v in enumerate(values)]


def test_checkpoint_save_best_only_strict_improvement():
    mc = ModelCheckpoint(save_best_only=True)
    assert saves(mc, [1.0, 1.0, 0.9, 0.95, 0.9, 0.8]) == [True, False, True, False, False, True]
    assert mc.best == 0.8 and mc.best_epoch == 5


def test_checkpoint_initial_value_threshold():
    mc = ModelCheckpoint(save_best_only=True, initial_value_threshold=0.85)
    assert saves(mc, [1.0, 1.0, 0.9, 0.85, 0.9, 0.8, 0.82]) == [False, False, False, False, False, True, False]
    assert mc.best == 0.8 and mc.best_epoch == 5


def test_checkpoint_initial_value_threshold_mode_max():
    mc = ModelCheckpoint(monitor="val_accuracy", save_best_only=True, initial_value_threshold=0.7)
    assert saves(mc, [0.5, 0.7, 0.71], "val_accuracy") == [False, False, True]


@pytest.mark.parametrize("mode", ["max", "auto"])
def test_checkpoint_mode_max(mode):
    mc = ModelCheckpoint(monitor="val_accuracy", mode=mode, save_best_only=True)
    assert saves(mc, [0.5, 0.7, 0.6, 0.7, 0.71], "val_accuracy") == [True, True, False, False, True]
    assert mc.best == 0.71 and mc.best_epoch == 4


def test_checkpoint_explicit_min_on_accuracy_name():
    mc = ModelCheckpoint(monitor="val_accuracy", mode="min", save_best_only=True)
    assert saves(mc, [0.5, 0.7, 0.4], "val_accuracy") == [True, False, True]


def test_checkpoint_nan_never_saved():
    mc = ModelCheckpoint(save_best_only=True)
    assert saves(mc, [NAN, 1.0, NAN, 0.5, NAN]) == [False, True, False, True, False]
    assert mc.best == 0.5 and mc.best_epoch == 3


def test_checkpoint_without_save_best_only_saves_every_epoch():
    mc = ModelCheckpoint(save_best_only=False)
    assert saves(mc, [1.0, 2.0, 3.0]) == [True, True, True]


def test_checkpoint_state_round_trip():
    a = ModelCheckpoint(save_best_only=True)
    saves(a, [1.0, 0.7, 0.9])
    b = ModelCheckpoint(save_best_only=True)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.best == 0.7 and b.best_epoch == 1
    assert [b.should_save({"val_loss": v}, e) for e, v in ((3, 0.8), (4, 0.7), (5, 0.6))] == [False, False, True]


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, NAN]), min_size=1, max_size=20),
       mode=st.sampled_from(["min", "max"]),
       threshold=st.one_of(st.none(), st.sampled_from([0.1, 0.5])))
def test_checkpoint_matches_reference(values, mode, threshold):
    mc = ModelCheckpoint(mode=mode, save_best_only=True, initial_value_threshold=threshold)
    best, expected = threshold, []
    for v in values:
        better = math.isfinite(v) and (best is None or (v < best if mode == "min" else v > best))
        if better:
            best = v
        expected.append(better)
    assert saves(mc, values) == expected
    assert mc.best == best


# --------------------------------------------------------------------------- ReduceLROnPlateau


class RefReduceLROnPlateau:
    """Keras 3 ReduceLROnPlateau.on_epoch_end, transcribed."""

    def __init__(self, mode="min", factor=0.1, patience=10, min_delta=1e-4, cooldown=0, min_lr=0.0):
        self.mode, self.factor, self.patience = mode, factor, patience
        self.min_delta, self.cooldown, self.min_lr = min_delta, cooldown, min_lr
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = self.cooldown_counter = 0

    def step(self, cur, lr):
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        better = cur < self.best - self.min_delta if self.mode == "min" else cur > self.best + self.min_delta
        if better:
            self.best, self.wait = cur, 0
        elif not self.cooldown_counter > 0:
            self.wait += 1
            if self.wait >= self.patience and lr > self.min_lr:
                lr = max(lr * self.factor, self.min_lr)
                self.cooldown_counter, self.wait = self.cooldown, 0
        return lr


def lrs(rp, values, lr, monitor="val_loss"):
    out = []
    for v in values:
        lr = rp.on_epoch_end({} if v is None else {monitor: v}, lr)
        out.append(lr)
    return out


def test_plateau_factor_after_patience():
    rp = ReduceLROnPlateau(factor=0.5, patience=2, min_delta=0.0)
    out = lrs(rp, [1.0] * 6, 0.1)
    assert out == [pytest.approx(v, rel=1e-12) for v in (0.1, 0.1, 0.05, 0.05, 0.025, 0.025)]


def test_plateau_min_delta():
    rp = ReduceLROnPlateau(factor=0.5, patience=2, min_delta=0.01)
    out = lrs(rp, [1.0, 0.995, 0.992, 0.5, 0.495, 0.491], 0.1)
    # 0.995, 0.992 not < 0.99 -> reduce at e2; 0.5 improves; 0.495, 0.491 not < 0.49 -> reduce at e5
    assert out == [pytest.approx(v, rel=1e-12) for v in (0.1, 0.1, 0.05, 0.05, 0.05, 0.025)]


def test_plateau_keras_default_min_delta_is_1e_4():
    rp = ReduceLROnPlateau(factor=0.5, patience=1)
    out = lrs(rp, [1.0, 1.0 - 5e-5, 1.0 - 2e-4], 0.1)
    assert out == [pytest.approx(v, rel=1e-12) for v in (0.1, 0.05, 0.05)]


def test_plateau_cooldown():
    rp = ReduceLROnPlateau(factor=0.5, patience=1, min_delta=0.0, cooldown=2)
    out = lrs(rp, [1.0] * 7, 0.1)
    # e1 reduce (cc=2); e2 cc->1; e3 cc->0 then wait 1 -> reduce (cc=2); e4 cc->1; e5 cc->0 -> reduce; e6 cc->1
    assert out == [pytest.approx(v, rel=1e-12) for v in (0.1, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125)]


def test_plateau_min_lr_floor():
    rp = ReduceLROnPlateau(factor=0.1, patience=1, min_delta=0.0, min_lr=0.005)
    out = lrs(rp, [1.0] * 5, 0.1)
    assert out == [pytest.approx(v, rel=1e-12) for v in (0.1, 0.01, 0.005, 0.005, 0.005)]


def test_plateau_mode_max_auto():
    rp = ReduceLROnPlateau(monitor="val_accuracy", factor=0.5, patience=1, min_delta=0.0)
    out = lrs(rp, [0.5, 0.6, 0.55, 0.7, 0.7], 0.1, "val_accuracy")
    assert out == [pytest.approx(v, rel=1e-12) for v in (0.1, 0.1, 0.05, 0.05, 0.025)]


def test_plateau_missing_monitor_keeps_lr():
    rp = ReduceLROnPlateau(factor=0.5, patience=1, min_delta=0.0)
    assert lrs(rp, [1.0, None, None, 1.0], 0.1) == [0.1, 0.1, 0.1, pytest.approx(0.05, rel=1e-12)]


def test_plateau_state_round_trip():
    kw = dict(factor=0.5, patience=2, min_delta=0.0, cooldown=1)
    vals = [1.0, 1.0, 1.0, 0.9, 0.95, 0.95, 0.95, 0.95]
    full = lrs(ReduceLROnPlateau(**kw), vals, 0.1)
    for split in range(1, len(vals)):
        a = ReduceLROnPlateau(**kw)
        first = lrs(a, vals[:split], 0.1)
        b = ReduceLROnPlateau(**kw)
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        assert first + lrs(b, vals[split:], first[-1]) == full, split


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]), min_size=1, max_size=25),
       mode=st.sampled_from(["min", "max"]), patience=st.integers(0, 3), cooldown=st.integers(0, 2),
       min_delta=st.sampled_from([0.0, 1e-4, 0.15]), min_lr=st.sampled_from([0.0, 1e-3]))
def test_plateau_matches_reference(values, mode, patience, cooldown, min_delta, min_lr):
    kw = dict(mode=mode, factor=0.5, patience=patience, min_delta=min_delta, cooldown=cooldown, min_lr=min_lr)
    rp, ref = ReduceLROnPlateau(**kw), RefReduceLROnPlateau(**kw)
    lr, expected = 0.1, []
    for v in values:
        lr = ref.step(v, lr)
        expected.append(lr)
    assert lrs(rp, values, 0.1) == expected
