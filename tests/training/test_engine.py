"""Engine behaviour through ``training.fit`` / ``training.lr_find``.

Reference values are independent of the engine: penalties and losses computed by hand (numpy)
from the data split of ``training.data.load``; callback decisions re-derived by applying the
Keras rules of ``shared/docs/semantics.md`` to the engine's own recorded history; resume compared
with an uninterrupted run; non-finite steps located with a hand-written torch loop.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from torch import nn

import training
from training import BaseReporter, TrainingError
from training.data import load

SOURCE_NOTE = json.loads((Path(__file__).resolve().parents[2] / "examples" / "source-note.json").read_text())


def base_spec(**over) -> dict:
    spec = {
        "seed": 3,
        "device": "cpu",
        "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 256, "standardize": True},
        "model": {
            "layers": [{"type": "dense", "units": 32, "activation": "relu"}, {"type": "dense", "units": 10}]
        },
        "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"],
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "epochs": 5,
    }
    spec.update(over)
    return spec


class Recorder(BaseReporter):
    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.checkpoints: list = []
        self.snapshots: list = []

    def on_epoch(self, metrics):
        self.epochs.append(metrics)

    def on_checkpoint(self, checkpoint):
        self.checkpoints.append(checkpoint)

    def on_snapshot(self, snapshot):
        self.snapshots.append(snapshot)


def split_of(spec):
    return load(SimpleNamespace(**spec["data"]), spec["seed"])


def log_softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def assert_weights_equal(a: dict, b: dict, atol: float = 0.0) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0, msg=k)


# --------------------------------------------------------------------------- regularization


def _penalty_spec(with_bias_reg: bool) -> dict:
    layer = {
        "type": "dense",
        "units": 10,
        "kernel_initializer": {"name": "constant", "value": 0.1},
        "bias_initializer": {"name": "constant", "value": 0.2},
        "kernel_regularizer": {"l1": 0.01, "l2": 0.02},
        "activity_regularizer": {"l1": 0.003, "l2": 0.001},
    }
    if with_bias_reg:
        layer["bias_regularizer"] = {"l2": 0.5}
    return base_spec(
        data={
            "dataset": "digits",
            "validation_split": 0.2,
            "batch_size": 100000,
            "shuffle": False,
            "standardize": True,
        },
        model={"layers": [layer]},
        optimizer={"name": "sgd", "learning_rate": 0.05},
        epochs=1,
    )


def _hand_loss(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, bias_reg: bool) -> float:
    x, w, b = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    out = x @ w.T + b
    data_loss = -log_softmax_np(out)[np.arange(len(y)), y].mean()
    kernel = 0.01 * np.abs(w).sum() + 0.02 * (w**2).sum()
    bias = 0.5 * (b**2).sum() if bias_reg else 0.0
    activity = (0.003 * np.abs(out).sum() + 0.001 * (out**2).sum()) / len(x)
    return data_loss + kernel + bias + activity


@pytest.mark.parametrize("bias_reg", [True, False])
def test_penalties_in_loss_and_val_loss(bias_reg):
    spec = _penalty_spec(bias_reg)
    sp = split_of(spec)
    # Epoch 1 is one full-batch step: its loss is the loss at the initial weights. With a constant
    # kernel every logit is equal, so the data part is ln(10) exactly.
    s = sp.x_train.astype(np.float64).sum(axis=1)
    out0 = 0.1 * s + 0.2  # each of the 10 units
    expected_loss = (
        math.log(10)
        + 0.01 * 640 * 0.1
        + 0.02 * 640 * 0.01  # kernel l1, l2: sum|W| = 64, sum W^2 = 6.4
        + (0.5 * 10 * 0.04 if bias_reg else 0.0)  # bias l2 only with bias_regularizer
        + (0.003 * 10 * np.abs(out0).sum() + 0.001 * 10 * (out0**2).sum()) / len(s)
    )
    r = training.fit(spec)
    h = r.history[0]
    assert r.steps == 1
    assert h["loss"] == pytest.approx(expected_loss, rel=1e-5)
    w, b = r.weights["0.weight"].numpy(), r.weights["0.bias"].numpy()
    expected_val = _hand_loss(sp.x_val, sp.y_val, w, b, bias_reg)
    assert h["val_loss"] == pytest.approx(expected_val, rel=1e-5)
    # the training step used the penalised gradient: the kernel moved away from the constant
    assert not np.allclose(w, 0.1)


# --------------------------------------------------------------------------- early stopping


def keras_early_stopping(values, patience, min_delta=0.0, baseline=None, start_from_epoch=0):
    """semantics.md, mode min: returns (stopped_epoch or None, best_epoch), 0-based."""
    best, best_epoch, wait = None, None, 0
    for epoch, current in enumerate(values):
        if epoch < start_from_epoch:
            continue
        wait += 1
        if best is None or current < best - min_delta:
            best, best_epoch = current, epoch
            if baseline is None or current < baseline - min_delta:
                wait = 0
            continue
        if wait >= patience and epoch > 0:
            return epoch, best_epoch
    return None, best_epoch


ES_CASES = [
    pytest.param(dict(patience=0), id="patience0"),
    pytest.param(dict(patience=2, min_delta=0.02), id="patience2-min_delta"),
    pytest.param(dict(patience=1, start_from_epoch=4), id="start_from_epoch"),
    pytest.param(dict(patience=3, baseline=0.001), id="baseline-not-beaten"),
]


@pytest.mark.parametrize("es", ES_CASES)
def test_early_stopping_matches_keras_rule_on_own_history(es):
    spec = base_spec(epochs=25, optimizer={"name": "adam", "learning_rate": 0.03})
    spec["callbacks"] = {
        "early_stopping": {"monitor": "val_loss", "restore_best_weights": True, **es},
        "model_checkpoint": {"monitor": "val_loss", "save_best_only": False},  # every epoch's weights
    }
    rec = Recorder()
    r = training.fit(spec, reporter=rec)
    vl = [h["val_loss"] for h in r.history]
    stop, best = keras_early_stopping(
        vl, es["patience"], es.get("min_delta", 0.0), es.get("baseline"), es.get("start_from_epoch", 0)
    )
    assert stop is not None, "test setup: this case is meant to stop early"
    assert r.stop_reason == "early_stopping"
    assert len(r.history) == stop + 1
    assert r.stopped_epoch == stop + 1  # 1-based
    # restore_best_weights restores the epoch that the rule (with min_delta) calls best
    by_epoch = {c.epoch: c for c in rec.checkpoints}
    assert sorted(by_epoch) == list(range(1, stop + 2))
    assert_weights_equal(r.weights, st_load(by_epoch[best + 1].data))
    if es.get("min_delta", 0.0) == 0 and es.get("start_from_epoch", 0) == 0:
        assert r.best_epoch == best + 1
        assert r.best_value == pytest.approx(vl[best], rel=1e-12)


def test_recorded_best_is_early_stoppings_best_with_min_delta():
    """semantics.md: early stopping records stopped_epoch, best_epoch and best with the job; with
    restore_best_weights those are the returned weights' epoch and value."""
    spec = base_spec(epochs=25, optimizer={"name": "adam", "learning_rate": 0.03})
    spec["data"]["batch_size"] = 128
    spec["callbacks"] = {
        "early_stopping": {
            "monitor": "val_loss",
            "patience": 2,
            "min_delta": 0.02,
            "restore_best_weights": True,
        }
    }
    r = training.fit(spec)
    vl = [h["val_loss"] for h in r.history]
    stop, best = keras_early_stopping(vl, 2, 0.02)
    assert stop is not None and best != vl.index(min(vl)), "test setup: min_delta must change the best epoch"
    assert r.stopped_epoch == stop + 1
    assert (r.best_epoch, r.best_value) == (best + 1, pytest.approx(vl[best], rel=1e-12))


def test_restore_best_weights_without_early_stop():
    spec = base_spec(epochs=8, optimizer={"name": "adam", "learning_rate": 0.05})
    spec["callbacks"] = {
        "early_stopping": {"monitor": "val_loss", "patience": 100, "restore_best_weights": True},
        "model_checkpoint": {"monitor": "val_loss", "save_best_only": True},
    }
    rec = Recorder()
    r = training.fit(spec, reporter=rec)
    assert r.stop_reason == "completed"
    vl = [h["val_loss"] for h in r.history]
    best = vl.index(min(vl))
    assert best != len(vl) - 1, "test setup: the best epoch should not be the last"
    assert rec.checkpoints[-1].epoch == best + 1
    assert_weights_equal(r.weights, st_load(rec.checkpoints[-1].data))
    assert r.best_epoch == best + 1


def test_no_restore_keeps_last_weights():
    spec = base_spec(epochs=4, optimizer={"name": "adam", "learning_rate": 0.08})
    spec["callbacks"] = {
        "early_stopping": {"monitor": "val_loss", "patience": 100, "restore_best_weights": False},
        "model_checkpoint": {"monitor": "val_loss", "save_best_only": False},
    }
    rec = Recorder()
    r = training.fit(spec, reporter=rec)
    assert rec.checkpoints[-1].epoch == 4
    assert_weights_equal(r.weights, st_load(rec.checkpoints[-1].data))


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "monitor,better", [("val_loss", lambda a, b: a < b), ("val_accuracy", lambda a, b: a > b)]
)
def test_save_best_only_saves_exactly_on_strict_improvement(monitor, better):
    spec = base_spec(epochs=12, optimizer={"name": "adam", "learning_rate": 0.05})
    spec["callbacks"] = {"model_checkpoint": {"monitor": monitor, "save_best_only": True, "mode": "auto"}}
    rec = Recorder()
    r = training.fit(spec, reporter=rec)
    values = [h[monitor] for h in r.history]
    expected = [e + 1 for e, v in enumerate(values) if all(better(v, p) for p in values[:e])]
    assert [c.epoch for c in rec.checkpoints] == expected
    assert [c.value for c in rec.checkpoints] == [values[e - 1] for e in expected]
    assert len(expected) < len(values), "test setup: some epoch should not improve"
    assert r.best_checkpoint == rec.checkpoints[-1].data
    assert r.best_epoch == expected[-1]


def test_save_freq_in_steps():
    spec = base_spec(epochs=3)
    spec["data"]["batch_size"] = 64  # 1438 training rows / 64 -> 23 steps per epoch, 69 in all
    spec["callbacks"] = {"model_checkpoint": {"monitor": "loss", "save_freq": 23}}
    rec = Recorder()
    r = training.fit(spec, reporter=rec)
    assert r.steps == 69
    assert [c.step for c in rec.checkpoints] == [23, 46, 69]
    # the last one is taken after the very last update: the final weights
    assert_weights_equal(r.weights, st_load(rec.checkpoints[-1].data))

    spec["callbacks"] = {"model_checkpoint": {"monitor": "loss", "save_freq": 10}}
    rec = Recorder()
    training.fit(spec, reporter=rec)
    assert [c.step for c in rec.checkpoints] == list(range(10, 70, 10))
    assert [c.epoch for c in rec.checkpoints] == [(s - 1) // 23 + 1 for s in range(10, 70, 10)]


# --------------------------------------------------------------------------- resume


def _example_like() -> dict:
    """The source note's spec, shortened: faster schedule, 12 epochs, patience 3."""
    spec = copy.deepcopy(SOURCE_NOTE)
    spec.update(name="resume-adam", device="cpu", epochs=12)
    spec["optimizer"]["learning_rate"].update(initial_learning_rate=0.05, first_decay_steps=40, warmup_steps=30)
    spec["callbacks"] = {
        "early_stopping": {"monitor": "val_loss", "patience": 3, "restore_best_weights": True},
        "model_checkpoint": {"monitor": "val_loss", "save_best_only": True},
    }
    return spec


def _sgd_bn() -> dict:
    return {
        "name": "resume-sgd-bn",
        "seed": 5,
        "device": "cpu",
        "data": {
            "dataset": "digits",
            "validation_split": 0.2,
            "batch_size": 100,
            "shuffle": True,
            "standardize": True,
        },
        "model": {
            "layers": [
                {"type": "dense", "units": 32},
                {"type": "batch_norm", "momentum": 0.9},
                {"type": "activation", "activation": "relu"},
                {"type": "dropout", "rate": 0.2},
                {"type": "dense", "units": 10},
            ]
        },
        "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"],
        "optimizer": {
            "name": "sgd",
            "momentum": 0.9,
            "nesterov": True,
            "learning_rate": {
                "schedule": "step",
                "initial_learning_rate": 0.05,
                "step_size": 2,
                "gamma": 0.5,
            },
        },
        "epochs": 6,
        "callbacks": {
            "early_stopping": {"monitor": "val_loss", "patience": 10, "restore_best_weights": True}
        },
    }


def _plateau() -> dict:
    s = base_spec(epochs=8, optimizer={"name": "adam", "learning_rate": 0.05})
    s["callbacks"] = {
        "reduce_lr_on_plateau": {"monitor": "val_loss", "patience": 1, "factor": 0.5, "min_delta": 0.0}
    }
    return s


def _strip_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.parametrize(
    "make_spec,k",
    [(_example_like, 3), (_sgd_bn, 2), (_plateau, 4)],
    ids=["adam-dropout-schedule-es", "sgd-momentum-bn", "plateau"],
)
def test_resume_equals_uninterrupted(make_spec, k):
    spec = make_spec()
    rec = Recorder()
    full = training.fit(spec, reporter=rec)
    snap = next(s for s in rec.snapshots if s.epoch == k)
    assert snap.step == k * full.info["steps_per_epoch"]

    # disturb every global RNG: resume must restore them, not rely on re-seeding
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    torch.rand(17)

    rec2 = Recorder()
    resumed = training.fit(spec, reporter=rec2, resume_from=snap.data)
    assert [m["epoch"] for m in rec2.epochs] == list(range(k + 1, len(full.history) + 1))
    a, b = _strip_seconds(full.history), _strip_seconds(resumed.history)
    assert len(a) == len(b)
    for ha, hb in zip(a, b, strict=True):
        assert ha.keys() == hb.keys()
        for key in ha:
            assert hb[key] == pytest.approx(ha[key], abs=1e-6, rel=0), (ha["epoch"], key)
    assert_weights_equal(resumed.weights, full.weights, atol=1e-6)
    assert (resumed.stop_reason, resumed.best_epoch, resumed.stopped_epoch, resumed.steps) == (
        full.stop_reason,
        full.best_epoch,
        full.stopped_epoch,
        full.steps,
    )
    assert_weights_equal(st_load(resumed.best_checkpoint), st_load(full.best_checkpoint), atol=1e-6)


def test_resume_refuses_another_specs_snapshot():
    spec = base_spec(epochs=2)
    rec = Recorder()
    training.fit(spec, reporter=rec)
    other = copy.deepcopy(spec)
    other["optimizer"]["learning_rate"] = 0.02
    with pytest.raises(TrainingError) as e:
        training.fit(other, resume_from=rec.snapshots[0].data)
    assert e.value.kind == "resume"
    assert "spec" in str(e.value)


def test_resume_refuses_corrupt_bytes():
    spec = base_spec(epochs=2)
    rec = Recorder()
    r = training.fit(spec, reporter=rec)
    good = rec.snapshots[0].data
    n = struct.unpack("<Q", good[:8])[0]
    header = bytearray(good)
    header[8 + n // 2] = ord("\x00")  # breaks the JSON header
    bad_inputs = {
        "empty": b"",
        "garbage": b"this is not a snapshot at all, not even close",
        "truncated": good[: len(good) // 2],
        "header": bytes(header),
        "huge_length": (2**40).to_bytes(8, "little") + good[8:],
        "a_checkpoint_not_a_snapshot": r.best_checkpoint,
    }
    for name, data in bad_inputs.items():
        with pytest.raises(TrainingError) as e:
            training.fit(spec, resume_from=data)
        assert e.value.kind == "resume", name


# --------------------------------------------------------------------------- faults


def _first_non_finite_step(spec) -> int:
    """Hand loop (engine protocol, glorot_uniform/zeros, plain SGD, no shuffle): the number of
    updates applied before the first non-finite batch loss."""
    sp = split_of(spec)
    torch.manual_seed(spec["seed"])
    layers, prev = [], 64
    for _i, layer in enumerate(spec["model"]["layers"]):
        lin = nn.Linear(prev, layer["units"])
        lim = math.sqrt(6 / (prev + layer["units"]))
        with torch.no_grad():
            nn.init.uniform_(lin.weight, -lim, lim)
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if layer.get("activation") == "relu":
            layers.append(nn.ReLU())
        prev = layer["units"]
    model = nn.Sequential(*layers)
    x, y = torch.from_numpy(sp.x_train), torch.from_numpy(sp.y_train)
    bs, lr = spec["data"]["batch_size"], spec["optimizer"]["learning_rate"]
    step = 0
    for _ in range(spec["epochs"]):
        for b in range(math.ceil(len(x) / bs)):
            loss = F.cross_entropy(model(x[b * bs : (b + 1) * bs]), y[b * bs : (b + 1) * bs])
            if not math.isfinite(loss.item()):
                return step
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
            step += 1
    raise AssertionError("test setup: the hand loop never produced a non-finite loss")


def test_non_finite_loss_stops_within_one_step():
    spec = base_spec(epochs=3, optimizer={"name": "sgd", "learning_rate": 1e10})
    spec["data"]["shuffle"] = False
    k = _first_non_finite_step(spec)
    r = training.fit(spec)
    assert r.stop_reason == "non_finite_loss"
    assert k <= r.steps <= k + 1
    assert len(r.history) == k // r.info["steps_per_epoch"] + 1
    last = r.history[-1]["loss"]
    assert isinstance(last, float) and not math.isfinite(last)


def test_non_finite_keeps_best_checkpoint_from_earlier_epochs():
    # lr 0.01 for epochs 1-2, then 0.01 * 1e12 = 1e10 (the spec's bound) from epoch 3: finite,
    # finite, blow-up. Four epochs, so the schedule never goes past the bound.
    spec = base_spec(
        epochs=4,
        optimizer={
            "name": "sgd",
            "learning_rate": {
                "schedule": "step",
                "initial_learning_rate": 0.01,
                "step_size": 2,
                "gamma": 1e12,
            },
        },
    )
    spec["callbacks"] = {"model_checkpoint": {"monitor": "val_loss", "save_best_only": True}}
    rec = Recorder()
    r = training.fit(spec, reporter=rec)
    assert r.stop_reason == "non_finite_loss"
    assert len(r.history) == 3 and r.steps < 3 * r.info["steps_per_epoch"]
    assert all(math.isfinite(h["val_loss"]) for h in r.history[:2])
    assert not math.isfinite(r.history[-1]["loss"])
    assert r.best_checkpoint is not None
    assert r.best_checkpoint == rec.checkpoints[-1].data
    assert rec.checkpoints[-1].epoch <= 2 and r.best_epoch == rec.checkpoints[-1].epoch
    w = st_load(r.best_checkpoint)
    assert all(torch.isfinite(t).all() for t in w.values())


def test_max_steps():
    spec = base_spec(epochs=10, max_steps=15)
    r = training.fit(spec)
    assert r.stop_reason == "max_steps"
    assert r.steps == 15
    assert r.info["steps_per_epoch"] == 6  # ceil(1438 / 256)
    assert len(r.history) == 3  # the run ends 3 steps into epoch 3


def test_should_stop_ends_the_run_right_after_the_poll_that_says_stop(monkeypatch):
    """Polled after every step (POLL_SECONDS 0): the run stops after exactly the steps done when
    should_stop first returned True, records no partial epoch, and never polls again. (How fast
    a cancel lands in wall time is measured by bench/cancel.py, not asserted here.)"""
    from training import engine

    monkeypatch.setattr(engine, "POLL_SECONDS", 0.0)
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 15

    r = training.fit(base_spec(epochs=100), should_stop=should_stop)
    assert r.stop_reason == "cancelled"
    assert calls == 15 and r.steps == 15
    assert r.info["steps_per_epoch"] == 6 and len(r.history) == 2  # 15 steps = 2 whole epochs + 3


def test_should_stop_at_the_default_poll_interval_stops_before_another_step():
    """At the default POLL_SECONDS: no optimizer step runs after the poll that said stop."""
    steps_done = 0
    steps_at_stop: list[int] = []
    calls = 0

    def count(*_):
        nonlocal steps_done
        steps_done += 1

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            steps_at_stop.append(steps_done)
        return calls >= 3

    spec = base_spec(
        epochs=100000,
        model={"layers": [{"type": "dense", "units": 256, "activation": "relu"}, {"type": "dense", "units": 10}]},
    )
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(count)
    try:
        r = training.fit(spec, should_stop=should_stop)
    finally:
        handle.remove()
    assert r.stop_reason == "cancelled" and calls == 3
    assert r.steps == steps_done == steps_at_stop[0] > 0
    assert len(r.history) == r.steps // r.info["steps_per_epoch"]  # whole epochs only


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (tests the CPU-only error)")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_cpu_machine_is_an_actionable_error(device):
    with pytest.raises(TrainingError) as e:
        training.fit(base_spec(device=device, epochs=1))
    assert e.value.kind == "device"
    msg = str(e.value)
    assert "CUDA" in msg or "cuda" in msg
    assert "'cpu'" in msg or "'auto'" in msg


@pytest.mark.parametrize("device", [
    "cpu",
    # "auto" means cpu only where there is no GPU
    pytest.param("auto", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                  reason="needs a machine without CUDA (tests the CPU-only error)")),
])
def test_fp16_on_cpu_is_an_error(device):
    with pytest.raises(TrainingError) as e:
        training.fit(base_spec(device=device, precision="fp16", epochs=1))
    assert "fp16" in str(e.value) and ("bf16" in str(e.value) or "fp32" in str(e.value))


# --------------------------------------------------------------------------- lr_find


def _lr_find_spec() -> dict:
    spec = base_spec(
        kind="lr_find",
        model={
            "layers": [{"type": "dense", "units": 64, "activation": "relu"}, {"type": "dense", "units": 10}]
        },
        optimizer={"name": "adam"},
    )
    spec["data"]["batch_size"] = 64
    return spec


def test_fit_refuses_lr_find_kind():
    with pytest.raises(TrainingError):
        training.fit(_lr_find_spec())


def test_lr_find_ramp_smoothing_stop_and_suggestion():
    spec = _lr_find_spec()
    res = training.lr_find(spec)  # defaults: 1e-7 .. 10 over 100 steps
    lrs, raw, smooth = res["lrs"], res["raw_losses"], res["losses"]
    n = len(lrs)
    assert 5 <= n <= 100
    for i, lr in enumerate(lrs):
        assert lr == pytest.approx(1e-7 * (10 / 1e-7) ** (i / 99), rel=1e-12)
    # exponentially smoothed loss (beta 0.98) with bias correction, from the raw losses
    avg, ref = 0.0, []
    for i, v in enumerate(raw):
        if v is None or not math.isfinite(v):
            ref.append(None)
            break
        avg = 0.98 * avg + 0.02 * v
        ref.append(avg / (1 - 0.98 ** (i + 1)))
    assert len(smooth) == len(ref) == n
    for got, want in zip(smooth, ref, strict=True):
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-9)

    # stop rule: the first point whose smoothed loss exceeds 4x the best so far (or is not finite)
    def exceeds(i):
        return ref[i] is None or (i > 0 and ref[i] > 4 * min(v for v in ref[: i + 1] if v is not None))

    assert res["stopped_early"] is True and n < 100, "lr up to 10 should blow Adam up on digits"
    assert exceeds(n - 1)
    assert not any(exceeds(i) for i in range(n - 1))

    suggestion = res["suggested_learning_rate"]
    assert suggestion is not None and suggestion in lrs
    train = base_spec(epochs=30, model=spec["model"], optimizer={"name": "adam", "learning_rate": suggestion})
    train["data"]["batch_size"] = 128
    r = training.fit(train)
    assert r.history[-1]["val_accuracy"] >= 0.95, (suggestion, r.history[-1])


def test_out_of_memory_becomes_an_actionable_message():
    """A torch OOM inside training is reported with the device and what to change."""
    from training.engine import _actionable_errors
    from training.spec import validate_spec

    spec = validate_spec(_example_like())
    with pytest.raises(TrainingError) as info:
        with _actionable_errors(spec, torch.device("cpu")):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert info.value.kind == "oom"
    assert "batch_size" in str(info.value) and "64" in str(info.value)


def test_generic_torch_shape_error_becomes_a_training_error():
    from training.engine import _actionable_errors
    from training.spec import validate_spec

    spec = validate_spec(_example_like())
    with pytest.raises(TrainingError) as info:
        with _actionable_errors(spec, torch.device("cpu")):
            torch.zeros(3, 4) @ torch.zeros(5, 6)
    assert "cannot process" in str(info.value)


class Saved(BaseReporter):
    """Keeps every checkpoint the run reports."""

    def __init__(self):
        self.saved = []

    def on_checkpoint(self, c):
        self.saved.append(c)


def test_best_checkpoint_is_the_best_epoch_when_every_epoch_is_saved():
    """save_best_only false: every epoch is reported, but the result's best checkpoint holds the
    weights of the epoch with the best monitored value, not the last saved one."""
    spec = _example_like()
    spec["epochs"] = 8
    # the rate grows 4x per epoch (23 steps): val_loss improves, then gets worse
    spec["optimizer"] = {"name": "sgd", "learning_rate": {"schedule": "exponential", "initial_learning_rate": 0.02,
                                                          "decay_steps": 23, "decay_rate": 4.0}}
    spec["callbacks"] = {"model_checkpoint": {"monitor": "val_loss", "save_best_only": False}}

    rep = Saved()
    res = training.fit(spec, reporter=rep)
    assert len(rep.saved) == len(res.history)
    vals = [h["val_loss"] if math.isfinite(h["val_loss"]) else math.inf for h in res.history]
    best_epoch = 1 + min(range(len(vals)), key=lambda i: vals[i])
    assert best_epoch < len(vals), f"setup: the last epoch should not be the best here, val_loss {vals}"
    chosen = [c for c in rep.saved if c.sha256 == res.best_checkpoint_sha256]
    assert len(chosen) == 1 and chosen[0].epoch == best_epoch
    # without a reporter the same best is serialized at the end
    res2 = training.fit(spec)
    assert res2.best_checkpoint_sha256 == res.best_checkpoint_sha256


def test_a_checkpoints_metadata_is_the_sorted_json_of_its_meta_and_card():
    """A run encodes its model card once for all its checkpoints: each checkpoint's metadata is
    still exactly ``json.dumps(meta | {"card": card}, sort_keys=True)`` (the same bytes, so the
    same sha256, as encoding it whole)."""
    from training.state import CHECKPOINT_FORMAT, sorted_json

    spec = _example_like()
    spec["epochs"] = 2
    spec["callbacks"] = {"model_checkpoint": {"monitor": "val_loss", "save_best_only": False}}

    rep = Saved()
    training.fit(spec, reporter=rep)
    assert len(rep.saved) == 2
    for c in rep.saved:
        n = struct.unpack("<Q", c.data[:8])[0]  # safetensors: the header's length, then the header
        text = json.loads(c.data[8 : 8 + n])["__metadata__"]["trainyard"]
        meta = json.loads(text)
        assert meta["card"]["card_version"] and meta["epoch"] == c.epoch and meta["format"] == CHECKPOINT_FORMAT
        assert text == json.dumps(meta, sort_keys=True)
    body = {"b": [1.5, {"z": 1, "a": None}], "a": "x", "format": "f"}
    card = {"y": 2, "x": [0.1, 1e-7]}
    assert sorted_json(body, {"card": json.dumps(card, sort_keys=True)}) == json.dumps(body | {"card": card}, sort_keys=True)


def test_checkpoint_and_snapshot_bytes_are_safetensors_torch_saves_bytes():
    """Checkpoints and snapshots are written through ``safetensors.numpy`` where numpy holds every
    dtype: the bytes are exactly ``safetensors.torch.save``'s, for every such dtype, and a tensor
    numpy cannot hold (bfloat16) goes through ``safetensors.torch``."""
    from safetensors.torch import save as torch_save

    from training.state import _NUMPY_DTYPES, st_save, weights_from_bytes

    g = torch.Generator().manual_seed(3)
    tensors = {f"t.{str(d).split('.')[-1]}": (torch.randn(3, 5, generator=g) * 50).to(d) for d in _NUMPY_DTYPES}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["rng"] = torch.get_rng_state()
    meta = {"trainyard": json.dumps({"b": 1, "a": [0.1]})}
    assert st_save(tensors, meta) == torch_save(tensors, metadata=meta)
    mixed = {**tensors, "half": torch.randn(4, generator=g).to(torch.bfloat16)}
    assert st_save(mixed, meta) == torch_save(mixed, metadata=meta)
    back = weights_from_bytes(st_save(mixed, meta))
    assert back.keys() == mixed.keys() and all(torch.equal(back[k], mixed[k]) for k in mixed)
    # a training run's checkpoint and snapshot, resumed from: see test_resume_equals_uninterrupted


@pytest.mark.parametrize("callbacks, monitor, pick", [
    # early stopping without a model_checkpoint: the best weights follow its monitor (README)
    ({"early_stopping": {"monitor": "val_accuracy", "patience": 100}}, "val_accuracy", max),
    ({}, "val_loss", min),  # no callbacks: val_loss
])
def test_without_model_checkpoint_the_best_weights_follow_the_documented_monitor(callbacks, monitor, pick):
    spec = base_spec(epochs=10, optimizer={"name": "adam", "learning_rate": 0.05}, callbacks=callbacks)
    rec = Recorder()
    r = training.fit(spec, reporter=rec)
    values = [h[monitor] for h in r.history]
    best = values.index(pick(values))  # the first epoch that reached the best value (strict improvements)
    assert r.monitor == monitor and r.best_epoch == best + 1 and r.best_value == values[best]
    assert rec.checkpoints and rec.checkpoints[-1].monitor == monitor and rec.checkpoints[-1].epoch == best + 1
    assert r.best_checkpoint == rec.checkpoints[-1].data


def test_seed_torch_seeds_as_torch_manual_seed():
    """The engine's seeding (``seed_torch``, which skips torch's lazy CUDA seeding on a machine
    without an accelerator) leaves the global generator exactly where ``torch.manual_seed`` does."""
    import torch

    from training.engine import seed_torch

    for seed in (0, 7, 2**31 + 5, 2**63 - 1):
        seed_torch(seed)
        ours = (torch.rand(5), torch.randn(3), torch.randperm(10))
        torch.manual_seed(seed)
        theirs = (torch.rand(5), torch.randn(3), torch.randperm(10))
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), seed
