"""Fused trials (issue 13): each trial of a pack equals its own solo ``training.fit`` run.

Every test trains a small pack with ``fit_fused`` and the same specs one by one with ``fit``
(the reference), in deterministic mode with dropout off, and compares per-epoch histories to
1e-5 relative, stop reasons, best epochs, final weights and best checkpoints.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import training
from training import engine, fused
from training.fused import fit_fused, why_not_fused
from training.reporting import BaseReporter
from training.spec import validate_spec
from training.state import weights_from_bytes

REL = 1e-5
EPOCHS = 5

BASE: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "deterministic": True,
    "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 128, "standardize": True},
    "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}, {"type": "dropout", "rate": 0.0},
                         {"type": "dense", "units": 10}]},
    "loss": "sparse_categorical_crossentropy",
    "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "learning_rate": 0.003},
    "epochs": EPOCHS,
}


def trial(seed: int, **changes: Any) -> dict[str, Any]:
    """BASE with ``seed`` and dotted-path changes (``optimizer.beta_1``, ``model.layers.0.units``)."""
    spec = copy.deepcopy(BASE)
    spec["seed"] = seed
    for path, value in changes.items():
        node: Any = spec
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return spec


def close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= REL * max(abs(a), abs(b))


def assert_same_run(fused: training.FitResult, solo: training.FitResult) -> None:
    assert fused.info["pack"]["fused"] is True
    assert len(fused.history) == len(solo.history)
    for e, (f, s) in enumerate(zip(fused.history, solo.history, strict=True)):
        keys = set(s) - {"seconds"}
        assert keys == set(f) - {"seconds"}
        for k in keys:
            assert close(f[k], s[k]), f"epoch {e + 1} {k}: fused {f[k]!r} vs solo {s[k]!r}"
    assert fused.stop_reason == solo.stop_reason
    assert (fused.best_epoch, fused.stopped_epoch, fused.epochs_run, fused.steps) == (
        solo.best_epoch, solo.stopped_epoch, solo.epochs_run, solo.steps)
    assert fused.best_value is None and solo.best_value is None or close(fused.best_value, solo.best_value)
    assert fused.weights.keys() == solo.weights.keys()
    for k in solo.weights:
        torch.testing.assert_close(fused.weights[k], solo.weights[k], rtol=1e-4, atol=1e-5, equal_nan=True)
    assert (fused.best_checkpoint is None) == (solo.best_checkpoint is None)
    if solo.best_checkpoint is not None:
        fw, sw = weights_from_bytes(fused.best_checkpoint), weights_from_bytes(solo.best_checkpoint)
        for k in sw:
            torch.testing.assert_close(fw[k], sw[k], rtol=1e-4, atol=1e-5, equal_nan=True)


def check_pack(specs: list[dict[str, Any]]) -> list[training.FitResult]:
    assert why_not_fused([validate_spec(s) for s in specs]) is None
    fused = fit_fused(specs)
    for spec, result in zip(specs, fused, strict=True):
        assert_same_run(result, training.fit(spec))
    return fused


# --------------------------------------------------------------------------- one test per knob

KNOBS: dict[str, list[dict[str, Any]]] = {
    # optimizers: each trial its own hyperparameters
    "adam_lr_betas_eps": [
        {"optimizer": {"name": "adam", "learning_rate": 0.001}},
        {"optimizer": {"name": "adam", "learning_rate": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5}},
    ],
    "sgd": [
        {"optimizer": {"name": "sgd", "learning_rate": 0.05}},
        {"optimizer": {"name": "sgd", "learning_rate": 0.2}},
    ],
    "sgd_momentum": [
        {"optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}},
        {"optimizer": {"name": "sgd", "learning_rate": 0.02, "momentum": 0.5}},
        {"optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.0}},
    ],
    "sgd_nesterov": [
        {"optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "nesterov": True}},
        {"optimizer": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.8, "nesterov": True}},
    ],
    "weight_decay": [
        {"optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 0.01}},
        {"optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 0.001}},
        {"optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}},
    ],
    "adam_weight_decay": [
        {"optimizer": {"name": "adam", "learning_rate": 0.003, "weight_decay": 0.01}},
        {"optimizer": {"name": "adam", "learning_rate": 0.003}},
    ],
    "adamw": [
        {"optimizer": {"name": "adamw", "learning_rate": 0.003, "weight_decay": 0.01}},
        {"optimizer": {"name": "adamw", "learning_rate": 0.01, "weight_decay": 0.004, "beta_2": 0.99}},
    ],
    "adam_torch_formulas": [
        {"optimizer": {"name": "adam", "formulas": "torch", "learning_rate": 0.003, "weight_decay": 0.01}},
        {"optimizer": {"name": "adam", "formulas": "torch", "learning_rate": 0.01, "eps": 1e-6}},
    ],
    "rmsprop": [
        {"optimizer": {"name": "rmsprop", "learning_rate": 0.001, "rho": 0.8}},
        {"optimizer": {"name": "rmsprop", "learning_rate": 0.003, "momentum": 0.5, "epsilon": 1e-5}},
    ],
    "adagrad": [
        {"optimizer": {"name": "adagrad", "learning_rate": 0.05, "initial_accumulator_value": 0.2}},
        {"optimizer": {"name": "adagrad", "learning_rate": 0.1, "weight_decay": 0.01}},
    ],
    "adamax": [
        {"optimizer": {"name": "adamax", "learning_rate": 0.003, "beta_1": 0.8}},
        {"optimizer": {"name": "adamax", "learning_rate": 0.01, "beta_2": 0.99}},
    ],
    "adam_amsgrad": [
        {"optimizer": {"name": "adam", "learning_rate": 0.003, "amsgrad": True}},
        {"optimizer": {"name": "adam", "learning_rate": 0.01, "amsgrad": True, "beta_2": 0.99, "weight_decay": 0.01}},
    ],
    "nadam": [
        {"optimizer": {"name": "nadam", "learning_rate": 0.002}},
        {"optimizer": {"name": "nadam", "learning_rate": 0.005, "beta_1": 0.8, "weight_decay": 0.004}},
    ],
    "rmsprop_centered": [
        {"optimizer": {"name": "rmsprop", "learning_rate": 0.001, "centered": True}},
        {"optimizer": {"name": "rmsprop", "learning_rate": 0.002, "centered": True, "momentum": 0.3, "rho": 0.8}},
    ],
    "clipnorm": [
        {"optimizer": {"name": "sgd", "learning_rate": 0.2, "clipnorm": 0.05}},
        {"optimizer": {"name": "sgd", "learning_rate": 0.1, "clipnorm": 1.0}},
    ],
    "global_clipnorm": [
        {"optimizer": {"name": "adam", "learning_rate": 0.01, "global_clipnorm": 0.1}},
        {"optimizer": {"name": "adam", "learning_rate": 0.003, "global_clipnorm": 2.0}},
    ],
    "clipvalue": [
        {"optimizer": {"name": "rmsprop", "learning_rate": 0.003, "clipvalue": 0.001}},
        {"optimizer": {"name": "rmsprop", "learning_rate": 0.001, "clipvalue": 0.5}},
    ],
    # torch formulas: each member's own torch.optim optimizer on its row
    "torch_sgd_nesterov": [
        {"optimizer": {"name": "sgd", "formulas": "torch", "learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}},
        {"optimizer": {"name": "sgd", "formulas": "torch", "learning_rate": 0.02, "momentum": 0.5, "nesterov": True}},
    ],
    "torch_adamw_amsgrad": [
        {"optimizer": {"name": "adamw", "formulas": "torch", "learning_rate": 0.003, "amsgrad": True, "weight_decay": 0.01}},
        {"optimizer": {"name": "adamw", "formulas": "torch", "learning_rate": 0.01, "amsgrad": True}},
    ],
    "torch_radam_clipnorm": [
        {"optimizer": {"name": "radam", "formulas": "torch", "learning_rate": 0.003, "clipnorm": 2.0}},
        {"optimizer": {"name": "radam", "formulas": "torch", "learning_rate": 0.01, "beta_1": 0.8, "clipnorm": 0.5}},
    ],
    "torch_nadam": [
        {"optimizer": {"name": "nadam", "formulas": "torch", "learning_rate": 0.003}},
        {"optimizer": {"name": "nadam", "formulas": "torch", "learning_rate": 0.01, "weight_decay": 0.01}},
    ],
    "torch_rmsprop_centered": [
        {"optimizer": {"name": "rmsprop", "formulas": "torch", "learning_rate": 0.001, "centered": True, "momentum": 0.5}},
        {"optimizer": {"name": "rmsprop", "formulas": "torch", "learning_rate": 0.003, "centered": True}},
    ],
    "torch_adagrad": [
        {"optimizer": {"name": "adagrad", "formulas": "torch", "learning_rate": 0.05, "initial_accumulator_value": 0.2}},
        {"optimizer": {"name": "adagrad", "formulas": "torch", "learning_rate": 0.1}},
    ],
    "torch_adamax": [
        {"optimizer": {"name": "adamax", "formulas": "torch", "learning_rate": 0.003}},
        {"optimizer": {"name": "adamax", "formulas": "torch", "learning_rate": 0.01, "beta_2": 0.99}},
    ],
    # schedules (per step), warm-up, restarts, plateau
    "schedules": [
        {"optimizer": {"name": "adam", "learning_rate": {"schedule": "exponential", "initial_learning_rate": 0.01,
                                                          "decay_steps": 7, "decay_rate": 0.5, "staircase": True}}},
        {"optimizer": {"name": "adam", "learning_rate": {"schedule": "cosine_restarts", "initial_learning_rate": 0.01,
                                                          "first_decay_steps": 6, "warmup_steps": 5}}},
        {"optimizer": {"name": "adam", "learning_rate": {"schedule": "step", "initial_learning_rate": 0.01,
                                                          "step_size": 2, "gamma": 0.3}}},
        {"optimizer": {"name": "adam", "learning_rate": 0.004}},
    ],
    "reduce_on_plateau": [
        {"optimizer": {"name": "sgd", "learning_rate": 0.5}, "callbacks": {"reduce_lr_on_plateau": {
            "monitor": "loss", "factor": 0.5, "patience": 0, "min_delta": 10.0}}},
        {"optimizer": {"name": "sgd", "learning_rate": 0.1}},
    ],
    # initializers (each trial its own)
    "initializers": [
        {"model": {"kernel_initializer": "he_normal"}},
        {"model": {"kernel_initializer": "lecun_normal"}},
        {"model": {"kernel_initializer": "orthogonal", "bias_initializer": {"name": "constant", "value": 0.1}}},
    ],
    # regularizers
    "kernel_l1_l2": [
        {"model.layers.0.kernel_regularizer": {"l2": 0.01}},
        {"model.layers.0.kernel_regularizer": {"l1": 0.001, "l2": 0.001}, "model.layers.2.kernel_regularizer": {"l1": 0.002}},
        {},
    ],
    "bias_and_activity": [
        {"model.layers.0.activity_regularizer": {"l1": 0.01}, "model.layers.0.bias_regularizer": {"l2": 0.1}},
        {"model.layers.2.activity_regularizer": {"l2": 0.001}},
        {},
    ],
    "label_smoothing": [
        {"loss": {"name": "sparse_categorical_crossentropy", "label_smoothing": 0.1}},
        {"loss": {"name": "sparse_categorical_crossentropy", "label_smoothing": 0.0}},
        {"loss": {"name": "sparse_categorical_crossentropy", "label_smoothing": 0.2}},
    ],
    "epochs_and_max_steps": [
        {"epochs": 2},
        {"max_steps": 17},
        {},
    ],
    # layers and losses of the hand-written backward (training.fused._Pack.backward) beyond
    # relu and sparse labels: tanh, sigmoid, a dense layer without bias, penalties on each;
    # one-hot targets smoothed per trial
    "tanh_sigmoid_no_bias": [
        {"model": {"layers": [
            {"type": "dense", "units": 16, "activation": "tanh", "kernel_regularizer": {"l1": 0.001}},
            {"type": "dense", "units": 12, "activation": "sigmoid", "use_bias": False, "kernel_regularizer": {"l2": 0.01}},
            {"type": "dense", "units": 10, "bias_regularizer": {"l1": 0.01, "l2": 0.01}}]}},
        {"model": {"layers": [
            {"type": "dense", "units": 16, "activation": "tanh"},
            {"type": "dense", "units": 12, "activation": "sigmoid", "use_bias": False},
            {"type": "dense", "units": 10}]}},
    ],
    "categorical_soft_targets": [
        {"loss": {"name": "categorical_crossentropy", "from_logits": True, "label_smoothing": 0.1}},
        {"loss": {"name": "categorical_crossentropy", "from_logits": True}},
    ],
}


def _apply(seed: int, change: dict[str, Any]) -> dict[str, Any]:
    spec = trial(seed)
    for key, value in change.items():
        if key.startswith("model.layers."):
            _, _, i, field = key.split(".")
            spec["model"]["layers"][int(i)][field] = value
        elif key == "model":
            spec["model"].update(value)
        else:
            spec[key] = value
    return spec


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_fused_trial_equals_its_solo_run(knob: str) -> None:
    specs = [_apply(seed, change) for seed, change in enumerate(KNOBS[knob], start=3)]
    check_pack(specs)


def _pack(specs: list[dict[str, Any]]) -> fused._Pack:
    members = [engine._Run(validate_spec(s), None, None) for s in specs]
    for m in members:
        m.start({})
    return fused._Pack(members, fused._fused_optimizer_for(members[0].optimizer))


#: packs whose training steps' gradients are computed by hand (``_Pack.backward``): KNOBS' and
#: dropout on (its scales are on the tape)
BY_HAND = ["adam_lr_betas_eps", "kernel_l1_l2", "tanh_sigmoid_no_bias", "categorical_soft_targets", "dropout"]


@pytest.mark.parametrize("knob", BY_HAND)
def test_a_packs_hand_written_gradients_are_autograds_bit_for_bit(knob: str) -> None:
    changes = KNOBS.get(knob) or [{"model.layers.1.rate": 0.3}, {"model.layers.1.rate": 0.1}]
    pack = _pack([_apply(seed, change) for seed, change in enumerate(changes, start=3)])
    assert pack.by_hand
    xb, tb = pack.x[:, :64], pack.t[:, :64]
    torch.manual_seed(11)  # the same dropout masks in both passes
    out, losses, by_hand = pack.train_pass(pack.params, xb, tb)
    got = by_hand()
    pack.by_hand = False
    torch.manual_seed(11)
    out_autograd, losses_autograd, by_autograd = pack.train_pass(pack.params, xb, tb)
    want = by_autograd()
    assert torch.equal(out, out_autograd) and torch.equal(losses, losses_autograd)
    assert len(got) == len(want) == len(pack.names)
    for name, g, w in zip(pack.names, got, want, strict=True):
        assert g.shape == w.shape, name
        assert torch.equal(g, w), f"{name}: largest difference {(g - w).abs().max().item()}"
        assert w.abs().sum() > 0, name  # a gradient that is there to compare


@pytest.mark.parametrize("change", [
    {"model.layers.0.activation": "gelu"},  # no hand-written backward for it
    {"model.layers.0.activity_regularizer": {"l1": 0.01}},  # a forward hook's penalty
    {"loss": {"name": "sparse_categorical_crossentropy", "label_smoothing": 0.1}},  # not F.cross_entropy
])
def test_a_pack_without_a_hand_written_backward_uses_autograd(change: dict[str, Any]) -> None:
    assert _pack([_apply(3, change), _apply(4, change)]).by_hand is False
    assert _pack([_apply(3, {}), _apply(4, {})]).by_hand is True


def test_same_seed_different_trials_keep_their_own_data_order() -> None:
    """Two trials with different seeds: different splits and orders, each as solo."""
    check_pack([trial(11), trial(12, optimizer__learning_rate=0.01)])


def test_members_of_the_same_data_and_seed_share_one_split_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three trials of seed 5 and one of seed 6: two loads, not four; each trial still equals its
    solo run (which loads its own)."""
    loads: list[int] = []
    real = engine.data_mod.load
    monkeypatch.setattr(engine.data_mod, "load", lambda data, seed: loads.append(seed) or real(data, seed))
    specs = [trial(5), trial(5, optimizer__learning_rate=0.01), trial(5, optimizer__beta_1=0.8), trial(6)]
    fused = fit_fused(specs)
    assert sorted(loads) == [5, 6]
    for spec, result in zip(specs, fused, strict=True):
        assert_same_run(result, training.fit(spec))


# --------------------------------------------------------------------------- lives of members


def test_early_stopping_restore_best_and_checkpoints_per_member() -> None:
    es = {"monitor": "val_loss", "patience": 1, "min_delta": 0.05, "restore_best_weights": True}
    specs = [
        trial(1, epochs=8, callbacks={"early_stopping": es}),
        trial(2, epochs=8, optimizer={"name": "adam", "learning_rate": 0.03},
              callbacks={"early_stopping": dict(es, patience=0, min_delta=0.2)}),
        trial(3, epochs=8, callbacks={"model_checkpoint": {"monitor": "val_accuracy", "save_best_only": True}}),
        trial(4, epochs=8, callbacks={"model_checkpoint": {"monitor": "loss", "save_freq": 5}}),
    ]
    results = check_pack(specs)
    reasons = [r.stop_reason for r in results]
    assert "early_stopping" in reasons and "completed" in reasons  # members end at different epochs
    assert len({r.epochs_run for r in results}) > 1


class Recorder(BaseReporter):
    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.checkpoints: list[int] = []

    def on_epoch(self, metrics: dict[str, float]) -> None:
        self.epochs.append(metrics)

    def on_checkpoint(self, checkpoint: Any) -> None:
        self.checkpoints.append(checkpoint.epoch)


def test_reporters_and_stop_request_per_member() -> None:
    class Pruner(Recorder):
        def on_epoch(self, metrics: dict[str, float]) -> None:
            super().on_epoch(metrics)
            if metrics["epoch"] == 2:
                self.stop_request = "pruned"

    specs = [trial(5), trial(6, optimizer__learning_rate=0.01)]
    fused_reps = [Pruner(), Recorder()]
    fused = fit_fused(specs, fused_reps)
    solo_reps = [Pruner(), Recorder()]
    for spec, rep, f, fr in zip(specs, solo_reps, fused, fused_reps, strict=True):
        solo = training.fit(spec, rep)
        assert_same_run(f, solo)
        assert fr.checkpoints == rep.checkpoints
        assert [e["epoch"] for e in fr.epochs] == [e["epoch"] for e in rep.epochs]
    assert fused[0].stop_reason == "pruned" and fused[0].epochs_run == 2
    assert fused[1].stop_reason == "completed" and fused[1].epochs_run == EPOCHS


def test_non_finite_member_stops_alone() -> None:
    specs = [
        trial(7, optimizer={"name": "sgd", "learning_rate": 1e4}),  # diverges within the first epochs
        trial(8, optimizer={"name": "sgd", "learning_rate": 0.1}),
    ]
    results = check_pack(specs)
    assert results[0].stop_reason == "non_finite_loss"
    assert results[1].stop_reason == "completed" and results[1].epochs_run == EPOCHS


def cancel_after(n: int) -> Callable[[], bool]:
    """A ``should_stop`` that cancels at its (n+1)th poll."""
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > n

    return should_stop


class Gone(Exception):
    """Stands for the worker's LeaseLost: the caller no longer owns this member's job."""


def gone_after(n: int) -> Callable[[], bool]:
    """A ``should_stop`` that raises :class:`Gone` at its (n+1)th poll."""
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        if calls["n"] > n:
            raise Gone("lease 1 of job b is no longer held")
        return False

    return should_stop


def test_cancel_of_one_member_leaves_the_others_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "POLL_SECONDS", 0.0)  # poll at every step: a cancel lands on a known step
    specs = [trial(9), trial(10, optimizer__learning_rate=0.01), trial(11, optimizer__beta_1=0.8)]
    fused = fit_fused(specs, should_stops=[None, cancel_after(20), None])
    solo = [training.fit(specs[0]), training.fit(specs[1], should_stop=cancel_after(20)), training.fit(specs[2])]
    for f, s in zip(fused, solo, strict=True):
        assert_same_run(f, s)
    assert fused[1].stop_reason == "cancelled" and fused[1].steps == 21  # polled after each update: the 21st poll cancels
    assert fused[0].epochs_run == fused[2].epochs_run == EPOCHS


def test_a_member_stopped_at_its_epochs_last_step_as_solo(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel polled right after an epoch's last update: solo records that epoch (it is a whole
    one), and so does the pack. The pack's last member lost at that step leaves it (the pack has
    nobody left to validate) without recording that epoch."""
    monkeypatch.setattr(engine, "POLL_SECONDS", 0.0)
    specs = [trial(16, epochs=1), trial(17, optimizer__learning_rate=0.01)]
    fused = fit_fused(specs, should_stops=[None, cancel_after(23)])  # the 24th poll: after epoch 2's last step
    solo = [training.fit(specs[0]), training.fit(specs[1], should_stop=cancel_after(23))]
    for f, s in zip(fused, solo, strict=True):
        assert_same_run(f, s)
    assert fused[1].stop_reason == "cancelled" and (fused[1].steps, fused[1].epochs_run) == (24, 2)
    reps = [Recorder(), Recorder()]
    lost = fit_fused(specs, reps, [None, gone_after(23)], isolate=(Gone,))
    assert lost[1].stop_reason == "lost" and (lost[1].steps, lost[1].epochs_run) == (24, 1)
    assert [e["epoch"] for e in reps[1].epochs] == [1]
    assert_same_run(lost[0], solo[0])


def test_a_member_whose_reporter_or_poll_raises_an_isolated_exception_leaves_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "POLL_SECONDS", 0.0)

    class GoneAtEpoch2(Recorder):
        def on_epoch(self, metrics: dict[str, float]) -> None:
            super().on_epoch(metrics)
            if metrics["epoch"] == 2:
                raise Gone("lease 1 of job a is no longer held")

    specs = [trial(12), trial(13, optimizer__learning_rate=0.01), trial(14, optimizer__beta_1=0.8), trial(15)]
    reps = [Recorder(), GoneAtEpoch2(), Recorder(), Recorder()]
    fused = fit_fused(specs, reps, [None, None, gone_after(30), None], isolate=(Gone,))
    for k in (0, 3):  # the others go on, as their solo runs
        assert_same_run(fused[k], training.fit(specs[k]))
        assert [e["epoch"] for e in reps[k].epochs] == list(range(1, EPOCHS + 1))
    assert fused[1].stop_reason == fused[2].stop_reason == "lost"
    assert fused[1].info["pack"]["lost"] == "Gone: lease 1 of job a is no longer held"
    assert [e["epoch"] for e in reps[1].epochs] == [1, 2] and fused[1].epochs_run == 2  # nothing after it
    assert fused[2].steps == 31 and [e["epoch"] for e in reps[2].epochs] == [1, 2]  # polled after each update (12 an epoch)
    with pytest.raises(Gone):  # not isolated: the whole call ends, as a solo fit would
        fit_fused(specs[:2], [Recorder(), GoneAtEpoch2()])


# --------------------------------------------------------------------------- what is not fused


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model": {"layers": [{"type": "dense", "units": 32, "activation": "relu"}, {"type": "dense", "units": 10}]}}, "differs"),
        ({"data": dict(BASE["data"], batch_size=64)}, "differs"),
        ({"optimizer": {"name": "sgd", "learning_rate": 0.1}}, "differs"),
        ({"optimizer": {"name": "adam", "learning_rate": 0.01, "clipnorm": 1.0}}, "clipping kind"),
        ({"optimizer": {"name": "adam", "learning_rate": 0.01, "amsgrad": True}}, "amsgrad"),
        ({"optimizer": {"name": "adam", "formulas": "torch", "learning_rate": 0.01}}, "formulas"),
    ],
)
def test_what_cannot_be_fused_says_why(change: dict[str, Any], reason: str) -> None:
    other = trial(2)
    other.update(change)
    why = why_not_fused([validate_spec(trial(1)), validate_spec(other)])
    assert why is not None and reason in why


def test_unsupported_pack_falls_back_to_solo_runs() -> None:
    # bf16 is not fused: the pack falls back, saying why
    specs = [trial(1, epochs=2, precision="bf16"), trial(2, epochs=2, precision="bf16", optimizer__learning_rate=0.01)]
    results = fit_fused(specs)
    for spec, r in zip(specs, results, strict=True):
        assert r.info["pack"]["fused"] is False and r.info["pack"]["fallback"]
        solo = training.fit(spec)
        assert [h["loss"] for h in r.history] == [h["loss"] for h in solo.history]
    with pytest.raises(ValueError, match="cannot be fused"):
        fit_fused(specs, fallback=False)


# --------------------------------------------------------------------------- snapshots of members


class Snapshots(BaseReporter):
    def __init__(self) -> None:
        self.snapshots: dict[int, bytes] = {}

    def on_snapshot(self, snapshot: Any) -> None:
        self.snapshots[snapshot.epoch] = snapshot.data


@pytest.mark.parametrize("optimizer", [
    {"name": "nadam", "learning_rate": 0.003, "clipnorm": 0.5},  # Keras formulas: the pack's stacked state
    {"name": "sgd", "formulas": "torch", "learning_rate": 0.05, "momentum": 0.9},  # torch: the member's own
])
def test_a_member_resumes_alone_from_its_snapshot_as_its_solo_run(optimizer: dict[str, Any]) -> None:
    """A member's snapshot holds its weights, optimizer state and data order: resumed alone (as a
    requeued job is), it goes on exactly as its solo run."""
    specs = [trial(21, optimizer=optimizer), trial(22, optimizer=dict(optimizer, learning_rate=0.01))]
    reps = [Snapshots(), Snapshots()]
    fit_fused(specs, reps)
    for spec, rep in zip(specs, reps, strict=True):
        assert sorted(rep.snapshots) == list(range(1, EPOCHS))  # every epoch but the last
        solo = training.fit(spec)
        resumed = training.fit(spec, resume_from=rep.snapshots[2])
        for e, (r, s) in enumerate(zip(resumed.history, solo.history, strict=True)):
            for k in set(s) - {"seconds"}:
                assert close(r[k], s[k]), f"epoch {e + 1} {k}: resumed {r[k]!r} vs solo {s[k]!r}"
        for k in solo.weights:
            torch.testing.assert_close(resumed.weights[k], solo.weights[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- members resumed in a pack

RESUME_EPOCHS = 6

#: every optimizer family, Keras formulas (the pack's stacked state) and torch formulas (each
#: member's own torch.optim optimizer); per member: its own rate, and one member with momentum
#: or initial accumulator of its own (a fill value per row next to restored rows)
RESUME_OPTIMIZERS: dict[str, list[dict[str, Any]]] = {
    "adam": [{"name": "adam", "learning_rate": 0.003}, {"name": "adam", "learning_rate": 0.01, "beta_1": 0.8},
             {"name": "adam", "learning_rate": 0.002, "weight_decay": 0.01}],
    "adam_amsgrad": [{"name": "adam", "learning_rate": 0.003, "amsgrad": True},
                     {"name": "adam", "learning_rate": 0.01, "amsgrad": True, "beta_2": 0.99}, {"name": "adam", "learning_rate": 0.005, "amsgrad": True}],
    "adamw": [{"name": "adamw", "learning_rate": 0.003, "weight_decay": 0.01}, {"name": "adamw", "learning_rate": 0.01},
              {"name": "adamw", "learning_rate": 0.005, "weight_decay": 0.004}],
    "sgd_momentum_clipnorm": [{"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "clipnorm": 1.0},
                              {"name": "sgd", "learning_rate": 0.1, "clipnorm": 2.0},
                              {"name": "sgd", "learning_rate": 0.02, "momentum": 0.5, "clipnorm": 0.5}],
    "sgd_nesterov": [{"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
                     {"name": "sgd", "learning_rate": 0.02, "momentum": 0.8, "nesterov": True},
                     {"name": "sgd", "learning_rate": 0.03, "momentum": 0.7, "nesterov": True}],
    "nadam": [{"name": "nadam", "learning_rate": 0.002}, {"name": "nadam", "learning_rate": 0.005, "beta_1": 0.8},
              {"name": "nadam", "learning_rate": 0.003, "weight_decay": 0.004}],
    "rmsprop_centered": [{"name": "rmsprop", "learning_rate": 0.001, "centered": True},
                         {"name": "rmsprop", "learning_rate": 0.002, "centered": True, "momentum": 0.3},
                         {"name": "rmsprop", "learning_rate": 0.003, "centered": True, "rho": 0.8}],
    "rmsprop": [{"name": "rmsprop", "learning_rate": 0.001, "rho": 0.8}, {"name": "rmsprop", "learning_rate": 0.003},
                {"name": "rmsprop", "learning_rate": 0.002, "momentum": 0.5}],
    "adagrad": [{"name": "adagrad", "learning_rate": 0.05, "initial_accumulator_value": 0.2},
                {"name": "adagrad", "learning_rate": 0.1}, {"name": "adagrad", "learning_rate": 0.07, "initial_accumulator_value": 0.5}],
    "adamax": [{"name": "adamax", "learning_rate": 0.003}, {"name": "adamax", "learning_rate": 0.01, "beta_2": 0.99},
               {"name": "adamax", "learning_rate": 0.005, "beta_1": 0.8}],
    "torch_adamw_amsgrad": [{"name": "adamw", "formulas": "torch", "learning_rate": 0.003, "amsgrad": True},
                            {"name": "adamw", "formulas": "torch", "learning_rate": 0.01, "amsgrad": True, "weight_decay": 0.001},
                            {"name": "adamw", "formulas": "torch", "learning_rate": 0.005, "amsgrad": True}],
    "torch_sgd_nesterov": [{"name": "sgd", "formulas": "torch", "learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
                           {"name": "sgd", "formulas": "torch", "learning_rate": 0.02, "momentum": 0.5, "nesterov": True},
                           {"name": "sgd", "formulas": "torch", "learning_rate": 0.03, "momentum": 0.7, "nesterov": True}],
    "torch_radam": [{"name": "radam", "formulas": "torch", "learning_rate": 0.003, "clipnorm": 2.0},
                    {"name": "radam", "formulas": "torch", "learning_rate": 0.01, "beta_1": 0.8, "clipnorm": 1.0},
                    {"name": "radam", "formulas": "torch", "learning_rate": 0.005, "clipnorm": 0.5}],
    "torch_nadam": [{"name": "nadam", "formulas": "torch", "learning_rate": 0.003},
                    {"name": "nadam", "formulas": "torch", "learning_rate": 0.01, "weight_decay": 0.01},
                    {"name": "nadam", "formulas": "torch", "learning_rate": 0.005}],
    "torch_rmsprop": [{"name": "rmsprop", "formulas": "torch", "learning_rate": 0.001, "centered": True, "momentum": 0.5},
                      {"name": "rmsprop", "formulas": "torch", "learning_rate": 0.003, "centered": True},
                      {"name": "rmsprop", "formulas": "torch", "learning_rate": 0.002, "centered": True}],
    "torch_adagrad": [{"name": "adagrad", "formulas": "torch", "learning_rate": 0.05, "initial_accumulator_value": 0.2},
                      {"name": "adagrad", "formulas": "torch", "learning_rate": 0.1},
                      {"name": "adagrad", "formulas": "torch", "learning_rate": 0.07}],
    "torch_adamax": [{"name": "adamax", "formulas": "torch", "learning_rate": 0.003},
                     {"name": "adamax", "formulas": "torch", "learning_rate": 0.01, "beta_2": 0.99},
                     {"name": "adamax", "formulas": "torch", "learning_rate": 0.005}],
}

#: per member: early stopping (restoring the best weights) and a per-step schedule (member 1: a
#: constant rate and a plateau callback instead); member 2 checkpoints every 5 steps
SCHEDULES: list[dict[str, Any]] = [
    {"schedule": "exponential", "decay_steps": 7, "decay_rate": 0.7},
    {},
    {"schedule": "step", "step_size": 2, "gamma": 0.5},
]


def _resume_trial(k: int, optimizer: dict[str, Any]) -> dict[str, Any]:
    lr = optimizer["learning_rate"]
    rate = lr if k == 1 else {**SCHEDULES[k], "initial_learning_rate": lr}
    spec = trial(40 + k, optimizer={**optimizer, "learning_rate": rate})
    spec["epochs"] = RESUME_EPOCHS
    spec["callbacks"] = {"early_stopping": {"monitor": "val_loss", "patience": 1, "min_delta": 0.1, "restore_best_weights": True}}
    if k == 1:  # a constant rate that its plateau callback lowers (Keras: not with a schedule)
        spec["callbacks"]["reduce_lr_on_plateau"] = {"monitor": "loss", "factor": 0.5, "patience": 0, "min_delta": 0.05}
    if k == 2:
        spec["callbacks"]["model_checkpoint"] = {"monitor": "accuracy", "mode": "max", "save_freq": 5}
    return spec


def _snapshot_at(spec: dict[str, Any], epoch: int) -> bytes:
    """The snapshot of ``spec``'s solo run after ``epoch`` epochs (or its last one before it stopped)."""
    rep = Snapshots()
    training.fit(spec, rep)
    assert rep.snapshots, "the solo run took no snapshot"
    return rep.snapshots[min(epoch, max(rep.snapshots))]


@pytest.mark.parametrize("family", sorted(RESUME_OPTIMIZERS))
def test_members_resumed_in_a_pack_equal_their_solo_resumes(family: str) -> None:
    """A pack of a fresh member and two members resumed from snapshots of different epochs (1 and
    3): each member's per-epoch metrics, stop, best epoch, weights and best checkpoint equal its
    solo ``fit(resume_from=the same snapshot)`` (the fresh one: its solo ``fit``), with a
    schedule, early stopping, a plateau and a step checkpoint; every optimizer family."""
    specs = [_resume_trial(k, opt) for k, opt in enumerate(RESUME_OPTIMIZERS[family])]
    snaps: list[bytes | None] = [None, _snapshot_at(specs[1], 1), _snapshot_at(specs[2], 3)]
    assert why_not_fused([validate_spec(s) for s in specs]) is None
    fused = fit_fused(specs, resume_from=snaps)
    for spec, snap, result in zip(specs, snaps, fused, strict=True):
        solo = training.fit(spec, resume_from=snap)
        assert_same_run(result, solo)
    assert [r.epochs_run - len(r.history) for r in fused] == [0, 0, 0]  # the restored history is the run's own


class Epochs(Snapshots):
    """The epochs a member reports (what the worker's record writes) and its start info."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []
        self.started: dict[str, Any] = {}

    def on_start(self, info: dict[str, Any]) -> None:
        self.started = dict(info)

    def on_epoch(self, metrics: dict[str, float]) -> None:
        self.epochs.append(int(metrics["epoch"]))


def test_a_resumed_pack_reports_each_members_epochs_from_its_own_and_snapshots_as_solo() -> None:
    """Reporters of resumed members: ``resumed_from_epoch`` is the snapshot's epoch, the epochs
    reported are those after it (none twice), and a member whose snapshot holds all its epochs
    (continued to as many epochs as it had) trains none, as solo; the snapshots a resumed member
    takes in the pack equal those its solo resume takes (resuming from either gives the same run)."""
    specs = [trial(50, epochs=5), trial(51, epochs=5), trial(52, epochs=2), trial(53, epochs=5)]
    longer = dict(specs[2], epochs=5)
    snaps: list[bytes | None] = [None, _snapshot_at(specs[1], 2), _snapshot_at(longer, 2), _snapshot_at(specs[3], 4)]
    reps = [Epochs() for _ in specs]
    fused = fit_fused(specs, reps, resume_from=snaps)
    assert [r.started["resumed_from_epoch"] for r in reps] == [0, 2, 2, 4]
    assert [r.epochs for r in reps] == [[1, 2, 3, 4, 5], [3, 4, 5], [], [5]]
    assert [r.epochs_run for r in fused] == [5, 5, 2, 5]
    for spec, snap, result in zip(specs, snaps, fused, strict=True):
        assert_same_run(result, training.fit(spec, resume_from=snap))
    # member 1's snapshot of epoch 3, taken in the pack, resumes (alone) as its solo run goes on
    solo = training.fit(specs[1])
    again = training.fit(specs[1], resume_from=reps[1].snapshots[3])
    for a, b in zip(again.history, solo.history, strict=True):
        assert all(close(a[k], b[k]) for k in set(b) - {"seconds"})


class Started(Snapshots):
    """Whether the engine started the member (``on_start``) and the epochs it reported."""

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, Any] | None = None
        self.epochs: list[int] = []

    def on_start(self, info: dict[str, Any]) -> None:
        self.started = dict(info)

    def on_epoch(self, metrics: dict[str, float]) -> None:
        self.epochs.append(int(metrics["epoch"]))


def test_a_member_whose_snapshot_cannot_be_restored_ends_alone_as_its_solo_resume_and_the_others_train() -> None:
    """A pack of four: a fresh member, one resumed from its own snapshot of epoch 2, one given a
    snapshot of another spec (member 0's), one given bytes that are no snapshot. The two bad ones
    train none and end alone: their results say ``RESUME_FAILED`` and hold the very exception
    (type and message) their solo ``fit(resume_from=...)`` raises, reported at once through
    ``on_resume_error``, and their reporters never start (as solo). The other two train as one
    pack and equal their solo runs; member indices (``on_epoch_logs``, ``info["pack"]``) stay the
    caller's."""
    from training.fused import RESUME_FAILED

    specs = [trial(60, epochs=4), trial(61, epochs=4, optimizer__learning_rate=0.01), trial(62, epochs=4),
             trial(63, epochs=4)]
    snaps: list[bytes | None] = [None, _snapshot_at(specs[1], 2), _snapshot_at(specs[0], 2), b"not a snapshot"]
    reps = [Started() for _ in specs]
    errors: list[tuple[int, BaseException]] = []
    ended: list[int] = []
    fused = fit_fused(specs, reps, resume_from=snaps, on_resume_error=lambda k, exc: errors.append((k, exc)),
                      on_epoch_logs=lambda logs: ended.extend(k for k, _ in logs))
    assert [k for k, _ in errors] == [2, 3]
    for k in (2, 3):
        result = fused[k]
        assert result.stop_reason == RESUME_FAILED and result.history == [] and result.epochs_run == 0
        assert result.error is dict(errors)[k]
        with pytest.raises(Exception) as solo:  # noqa: PT011 - whatever the solo resume raises, the same
            training.fit(specs[k], resume_from=snaps[k])
        assert type(result.error) is type(solo.value) and str(result.error) == str(solo.value), (result.error, solo.value)
        assert isinstance(result.error, training.TrainingError) and "cannot resume" in str(result.error)
        assert reps[k].started is None and reps[k].epochs == []
        assert result.info["pack"]["index"] == k
    assert "different job spec" in str(fused[2].error) and "corrupt" in str(fused[3].error)
    for k in (0, 1):
        assert_same_run(fused[k], training.fit(specs[k], resume_from=snaps[k]))
        assert fused[k].info["pack"]["index"] == k and reps[k].started is not None
        assert reps[k].started["pack"]["index"] == k and reps[k].started["resumed_from_epoch"] == 2 * k
    assert reps[0].epochs == [1, 2, 3, 4] and reps[1].epochs == [3, 4]
    assert set(ended) == {0, 1}

    # none left to train: every member ends alone, nothing trains
    alone = fit_fused(specs[2:], resume_from=snaps[2:])
    assert [r.stop_reason for r in alone] == [RESUME_FAILED] * 2
    assert [str(r.error) for r in alone] == [str(fused[2].error), str(fused[3].error)]
