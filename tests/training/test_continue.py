"""Continuing a run that ended after all its epochs: the engine hands the reporter the state after
the last epoch (when asked), and a run of the same spec with more epochs resumes from it to the
numbers of an uninterrupted run of the total. Other spec changes are still refused."""

from __future__ import annotations

import copy

import pytest
from safetensors.torch import load as st_load
from test_engine import assert_weights_equal, base_spec  # pytest puts this directory on sys.path

import training
from training import BaseReporter, TrainingError


class Final(BaseReporter):
    wants_final_snapshot = True

    def __init__(self) -> None:
        self.final = None
        self.epochs: list[dict] = []

    def on_epoch(self, metrics):
        self.epochs.append(metrics)

    def on_final_snapshot(self, snapshot):
        self.final = snapshot


def _spec(epochs: int) -> dict:
    spec = base_spec(epochs=epochs, optimizer={"name": "adam", "learning_rate": {
        "schedule": "exponential", "initial_learning_rate": 0.01, "decay_steps": 10, "decay_rate": 0.9}})
    spec["model"]["layers"].insert(1, {"type": "dropout", "rate": 0.3})
    spec["callbacks"] = {"model_checkpoint": {"monitor": "val_loss", "save_best_only": True}}
    return spec


def test_more_epochs_from_the_final_snapshot_equal_an_uninterrupted_run():
    first = Final()
    training.fit(_spec(3), reporter=first)
    assert first.final is not None and first.final.epoch == 3
    full = training.fit(_spec(5))
    rec = Final()
    more = training.fit(_spec(5), reporter=rec, resume_from=first.final.data)
    assert [m["epoch"] for m in rec.epochs] == [4, 5]
    for a, b in zip(full.history, more.history, strict=True):
        for key in a:
            if key != "seconds":
                assert b[key] == pytest.approx(a[key], abs=1e-6, rel=0), (a["epoch"], key)
    assert_weights_equal(more.weights, full.weights, atol=1e-6)
    assert more.best_epoch == full.best_epoch
    assert_weights_equal(st_load(more.best_checkpoint), st_load(full.best_checkpoint), atol=1e-6)


def test_no_final_snapshot_unless_asked_and_other_changes_refused():
    class Plain(Final):
        wants_final_snapshot = False

    plain = Plain()
    training.fit(_spec(2), reporter=plain)
    assert plain.final is None
    first = Final()
    training.fit(_spec(3), reporter=first)
    other = copy.deepcopy(_spec(5))
    other["seed"] = 4
    with pytest.raises(TrainingError) as e:
        training.fit(other, resume_from=first.final.data)
    assert e.value.kind == "resume"
    with pytest.raises(TrainingError):  # fewer epochs than the snapshot has run
        training.fit(_spec(2), resume_from=first.final.data)


def test_init_weights_start_from_another_runs_checkpoint():
    first = training.fit(_spec(3))
    warm = base_spec(epochs=1, optimizer={"name": "sgd", "learning_rate": 1e-12}, init_from="a" * 32)
    warm["model"]["layers"].insert(1, {"type": "dropout", "rate": 0.3})
    started = training.fit(warm, init_weights=first.best_checkpoint)
    assert_weights_equal(started.weights, st_load(first.best_checkpoint), atol=1e-6)
    cold = training.fit({k: v for k, v in warm.items() if k != "init_from"})
    assert started.history[0]["val_loss"] < cold.history[0]["val_loss"]  # it did not start from scratch
    with pytest.raises(TrainingError) as e:  # named, but no weights given
        training.fit(warm)
    assert "init_from" in str(e.value)
    other = base_spec(epochs=1, init_from="a" * 32)
    other["model"]["layers"][0]["units"] = 16
    with pytest.raises(TrainingError) as e:  # another model
        training.fit(other, init_weights=first.best_checkpoint)
    assert "do not fit this model" in str(e.value)
