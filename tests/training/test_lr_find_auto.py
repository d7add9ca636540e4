"""``"learning_rate": "find"``: the LR range test runs first and training uses its suggestion;
and a reporter's ``stop_request`` (how a sweep prunes a trial)."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest

from training import BaseReporter, SpecError, fit, lr_find, validate_spec
from training.engine import suggest_lr
from training.spec import LRFindSpec, parse_learning_rate

SPEC: dict[str, Any] = {
    "name": "find", "seed": 0, "device": "cpu",
    "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 64, "standardize": True},
    "model": {"layers": [{"type": "dense", "units": 64, "activation": "relu"}, {"type": "dense", "units": 10}]},
    "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "learning_rate": "find"}, "epochs": 10,
}


def spec(**over: Any) -> dict[str, Any]:
    s = copy.deepcopy(SPEC)
    s.update(over)
    return s


def check_range_test(found: dict[str, Any], opts: LRFindSpec) -> None:
    """The finder's record against its documented rule (engine.lr_find / suggest_lr docstrings),
    recomputed here from the recorded raw losses in a different form: the ramp is a geometric
    sequence; the curve is the bias-corrected exponential average, i.e. the average of the raw
    losses so far weighted beta**age; the run stops once that exceeds stop_factor times its best;
    the suggestion is the steepest descent of the curve against log10(lr) between the first 10 %
    of points and the curve's minimum, else (lr at the minimum) / 10."""
    lrs, raw, smooth = found["lrs"], found["raw_losses"], found["losses"]
    points = len(lrs)
    assert len(raw) == len(smooth) == points
    assert lrs == pytest.approx(list(np.geomspace(opts.min_lr, opts.max_lr, opts.steps)[:points]), rel=1e-12)
    if raw[-1] is None:  # a non-finite loss ends the run (recorded as null), and is its only one
        assert found["stopped_early"] and smooth[-1] is None
        raw, smooth = raw[:-1], smooth[:-1]
    n = len(raw)
    assert None not in raw and None not in smooth
    beta = opts.smoothing
    expected = []
    for i in range(n):
        weights = [beta ** (i - j) for j in range(i + 1)]
        expected.append(sum(w * v for w, v in zip(weights, raw[: i + 1], strict=True)) / sum(weights))
    assert smooth == pytest.approx(expected, rel=1e-9)
    # stopping: never above stop_factor x the best before the last point; at the last if stopped early
    assert all(smooth[i] <= opts.stop_factor * min(smooth[: i + 1]) for i in range(n - 1))
    if n == points and found["stopped_early"]:
        assert smooth[-1] > opts.stop_factor * min(smooth)
    elif n == points:
        assert n == opts.steps
    # the suggestion
    i_min = min(range(n), key=smooth.__getitem__)
    skip = max(1, points // 10)
    if i_min - skip < 3:
        assert found["rule"].startswith("loss minimum / 10")
        assert found["suggested_learning_rate"] == pytest.approx(lrs[i_min] / 10)
        return
    x = [math.log10(v) for v in lrs[: i_min + 1]]
    y = smooth[: i_min + 1]
    slope = [(y[1] - y[0]) / (x[1] - x[0])]
    slope += [(y[i + 1] - y[i - 1]) / (x[i + 1] - x[i - 1]) for i in range(1, i_min)]
    slope += [(y[i_min] - y[i_min - 1]) / (x[i_min] - x[i_min - 1])]
    steepest = min(slope[skip:])
    assert found["rule"].startswith("steepest descent of the smoothed loss")
    chosen = lrs.index(found["suggested_learning_rate"])
    assert skip <= chosen <= i_min and slope[chosen] == pytest.approx(steepest, rel=1e-9)


def test_suggestion_on_known_curves() -> None:
    """Curves whose answer is known in closed form, against log10(lr) on a grid of 0.1."""
    x = np.round(np.arange(-60, 1) / 10, 10)  # -6.0 ... 0.0
    lrs = list(10.0**x)
    # falls fastest at x = -3 (the centre of a tanh step), lowest at x = -1, rising after
    curve = 2 - np.tanh(2 * (x + 3)) + 5 * np.clip(x + 1, 0, None) ** 2
    assert int(np.argmin(curve)) == 50
    lr, rule = suggest_lr(lrs, list(curve))
    assert lr == pytest.approx(1e-3) and rule.startswith("steepest descent")
    # a steeper drop inside the first 10 % of the points (a start-up transient) is not chosen
    transient = curve + np.where(x < -5.5, 10 * (-5.5 - x), 0)
    assert suggest_lr(lrs, list(transient))[0] == pytest.approx(1e-3)
    # not finite after the minimum (the run diverged): the same
    diverged = list(curve[:55]) + [math.inf]
    assert suggest_lr(lrs[:56], diverged)[0] == pytest.approx(1e-3)
    # rising from the start: no descent to measure, so (lr at the minimum) / 10
    lr, rule = suggest_lr(lrs, list(1 + (x + 6) ** 2))
    assert lr == pytest.approx(1e-7) and rule.startswith("loss minimum / 10")
    assert suggest_lr(lrs[:4], [3.0, 2.0, 1.0, 0.5]) == (None, "too few points for a suggestion")
    assert suggest_lr(lrs[:6], [math.inf] * 6)[0] is None


def test_find_trains_an_mlp_on_digits_to_95_percent() -> None:
    result = fit(spec())
    found = result.info["lr_find"]
    lr = found["suggested_learning_rate"]
    assert lr is not None and 1e-4 < lr < 1.0
    check_range_test(found, LRFindSpec())
    assert found["rule"].startswith("steepest descent")  # the 100-step default reaches a minimum past 10 %
    assert all(h["lr"] == pytest.approx(lr) for h in result.history)
    assert max(h["val_accuracy"] for h in result.history) >= 0.95
    # the same as training with the suggested number (the finder is seeded like training)
    same = fit(spec(optimizer={"name": "adam", "learning_rate": lr}))
    assert [h["val_loss"] for h in same.history] == pytest.approx([h["val_loss"] for h in result.history])


def test_find_is_accepted_where_a_learning_rate_is_and_nowhere_else() -> None:
    assert validate_spec(spec()).optimizer.learning_rate == "find"
    assert validate_spec(spec(optimizer={"name": "sgd", "lr": "find"})).optimizer.learning_rate == "find"
    with_plateau = spec(callbacks={"reduce_lr_on_plateau": {"monitor": "val_loss"}})
    assert validate_spec(with_plateau).callbacks.reduce_lr_on_plateau is not None
    with pytest.raises(SpecError) as err:
        validate_spec(spec(optimizer={"name": "adam", "learning_rate": "fast"}))
    assert err.value.errors[0]["path"] == "optimizer.learning_rate"
    with pytest.raises(SpecError):
        parse_learning_rate("find")  # a schedule preview needs a real rate
    with pytest.raises(SpecError):
        validate_spec(spec(optimizer={"name": "adam", "learning_rate": {"schedule": "cosine", "initial_learning_rate": "find",
                                                                            "decay_steps": 10}}))


def test_lr_find_kind_with_find_in_the_spec() -> None:
    out = lr_find(spec(kind="lr_find", lr_find={"steps": 30}))
    assert len(out["lrs"]) >= 5 and out["suggested_learning_rate"]
    check_range_test(out, LRFindSpec(steps=30))


def test_stop_request_ends_the_run_after_that_epoch() -> None:
    class Pruner(BaseReporter):
        def on_epoch(self, metrics: dict[str, float]) -> None:
            if metrics["epoch"] == 2:
                self.stop_request = "pruned"

    result = fit(spec(optimizer={"name": "adam", "learning_rate": 0.01}, epochs=6), reporter=Pruner())
    assert result.stop_reason == "pruned" and result.epochs_run == 2 and result.stopped_epoch == 2


def test_a_resumed_find_run_keeps_the_rate_it_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import Snapshot, engine

    class Keep(BaseReporter):
        snapshots: list[Snapshot] = []

        def on_snapshot(self, snapshot: Snapshot) -> None:
            self.snapshots.append(snapshot)

    rep = Keep()
    full = fit(spec(epochs=4), reporter=rep, snapshot_every=1)
    # the snapshot carries the finder's output: resuming does not run the finder again
    monkeypatch.setattr(engine, "lr_find", lambda *a, **k: pytest.fail("the finder ran again"))
    again = fit(spec(epochs=4), resume_from=rep.snapshots[1].data)
    assert again.info["lr_find"] == full.info["lr_find"]
    assert [h["val_loss"] for h in again.history] == pytest.approx([h["val_loss"] for h in full.history])
