"""``"learning_rate": "find"``: the LR range test runs first and training uses its suggestion;
and a reporter's ``stop_request`` (how a sweep prunes a trial)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from training import BaseReporter, SpecError, fit, lr_find, validate_spec
from training.spec import parse_learning_rate

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


def test_find_trains_an_mlp_on_digits_to_95_percent() -> None:
    result = fit(spec())
    found = result.info["lr_find"]
    lr = found["suggested_learning_rate"]
    assert lr is not None and 1e-4 < lr < 1.0
    assert found["rule"] and len(found["lrs"]) == len(found["losses"])
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
    assert len(out["lrs"]) >= 5 and out["suggested_learning_rate"] and out["rule"]


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
