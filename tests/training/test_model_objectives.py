"""Losses, metrics, model layers and optimizers against hand formulas.

References: numpy transcriptions of the Keras 3 loss formulas (label smoothing
``y*(1-ls)+ls/K`` for categorical, ``y*(1-ls)+0.5*ls`` for binary, probabilities clipped to
``[1e-7, 1-1e-7]``), TF 'same' padding rules, Keras BatchNormalization / Dropout / LeakyReLU
semantics, Keras SGD's update rule, torch Adam/AdamW maths, and Keras gradient clipping
(``g * c / max(||g||, c)``) -- never values produced by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import training
from training.model import build_model
from training.objectives import build_objective, prepare_targets, strip_output_activation
from training.optim import build_optimizer, make_clipper
from training.shapes import count_parameters, infer_shapes
from training.spec import JobSpec

EPS = 1e-7


def job(layers, loss="mse", metrics=(), optimizer=None, dataset="digits", **data) -> JobSpec:
    d = {
        "data": {"dataset": dataset, **data},
        "model": {"layers": layers},
        "loss": loss,
        "metrics": list(metrics),
    }
    if optimizer is not None:
        d["optimizer"] = optimizer
    return JobSpec.model_validate(d)


def head(units, activation="linear"):
    return [{"type": "dense", "units": units, "activation": activation}]


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 4)) * 2.0
LABELS = np.array([0, 3, 1, 2, 3, 0])


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_sparse_ce_logits_with_label_smoothing(ls):
    spec = job(head(4), loss={"name": "sparse_categorical_crossentropy", "label_smoothing": ls})
    obj = build_objective(spec, 4)
    assert obj.outputs_are_logits
    y = torch.tensor(LABELS)
    got = float(obj.loss(t64(LOGITS), prepare_targets(spec, y, 4)))
    target = np.eye(4)[LABELS] * (1 - ls) + ls / 4
    want = -(target * np_log_softmax(LOGITS)).sum(-1).mean()
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_categorical_ce_with_smoothing(ls):
    spec = job(head(4), loss={"name": "categorical_crossentropy", "label_smoothing": ls})
    t = prepare_targets(spec, torch.tensor(LABELS), 4)
    target = np.eye(4)[LABELS] * (1 - ls) + ls / 4  # Keras: y*(1-ls) + ls/K
    np.testing.assert_allclose(t.numpy(), target, rtol=1e-6)
    got = float(build_objective(spec, 4).loss(t64(LOGITS), t.double()))
    want = -(target * np_log_softmax(LOGITS)).sum(-1).mean()
    assert got == pytest.approx(want, rel=1e-6)  # targets are prepared in float32


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_binary_ce_logits_with_smoothing(ls):
    spec = job(head(1), loss={"name": "binary_crossentropy", "label_smoothing": ls}, dataset="breast_cancer")
    y = np.array([0, 1, 1, 0, 1])
    z = np.array([-2.0, 0.5, 3.0, 1.0, -0.3])
    t = prepare_targets(spec, torch.tensor(y), 2)
    target = y * (1 - ls) + 0.5 * ls  # Keras
    np.testing.assert_allclose(t.numpy().ravel(), target, rtol=1e-6)
    assert tuple(t.shape) == (5, 1)
    got = float(build_objective(spec, 2).loss(t64(z[:, None]), t.double()))
    p = np_sigmoid(z)
    want = -(target * np.log(p) + (1 - target) * np.log(1 - p)).mean()
    assert got == pytest.approx(want, rel=1e-6)  # targets are prepared in float32


def test_categorical_probabilities_path_clips_like_keras():
    spec = job(head(3), loss={"name": "categorical_crossentropy", "from_logits": False})
    obj = build_objective(spec, 3)
    assert not obj.outputs_are_logits
    probs = np.array([[0.0, 0.3, 0.7], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    # unnormalised rows are renormalised first (Keras divides by the sum)
    probs[3] *= 2.0
    y = np.array([0, 2, 0, 1])
    t = prepare_targets(spec, torch.tensor(y), 3).double()
    p = probs / probs.sum(-1, keepdims=True)
    p = np.clip(p, EPS, 1 - EPS)
    want = -(np.eye(3)[y] * np.log(p)).sum(-1).mean()
    got = float(obj.loss(t64(probs), t))
    assert got == pytest.approx(want, rel=1e-9)
    # the clip matters: row 0 has p=0 on its label -> -log(1e-7)
    assert want > -math.log(1e-7) / 4


def test_sparse_probabilities_path_with_smoothing():
    spec = job(
        head(3),
        loss={"name": "sparse_categorical_crossentropy", "from_logits": False, "label_smoothing": 0.1},
    )
    probs = np.array([[0.0, 0.3, 0.7], [0.2, 0.2, 0.6]])
    y = np.array([0, 2])
    got = float(build_objective(spec, 3).loss(t64(probs), torch.tensor(y)))
    target = np.eye(3)[y] * 0.9 + 0.1 / 3
    want = -(target * np.log(np.clip(probs, EPS, 1 - EPS))).sum(-1).mean()
    assert got == pytest.approx(want, rel=1e-6)  # one-hot rows are float32


def test_binary_probabilities_path_clips_like_keras():
    spec = job(head(1), loss={"name": "binary_crossentropy", "from_logits": False}, dataset="breast_cancer")
    obj = build_objective(spec, 2)
    p = np.array([0.0, 1.0, 0.3, 0.9, 1.0])
    y = np.array([1, 0, 0, 1, 1])
    got = float(obj.loss(t64(p[:, None]), prepare_targets(spec, torch.tensor(y), 2).double()))
    pc = np.clip(p, EPS, 1 - EPS)
    want = -(y * np.log(pc) + (1 - y) * np.log(1 - pc)).mean()
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_huber_with_delta(delta):
    spec = job(head(2), loss={"name": "huber", "delta": delta}, dataset="diabetes")
    o = np.array([[0.1, 2.0], [-1.5, 0.3], [0.0, 0.0]])
    t = np.array([[0.0, 0.0], [0.0, 0.7], [0.2, -3.0]])
    e = np.abs(o - t)
    want = np.where(e <= delta, 0.5 * e**2, delta * (e - 0.5 * delta)).mean()
    got = float(build_objective(spec, None).loss(t64(o), t64(t)))
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name,fn", [("mse", lambda e: (e**2).mean()), ("mae", lambda e: np.abs(e).mean())])
def test_mse_mae(name, fn):
    spec = job(head(2), loss=name, dataset="diabetes")
    o = np.array([[0.1, 2.0], [-1.5, 0.3], [0.0, 0.0]])
    t = np.array([[0.0, 0.0], [0.0, 0.7], [0.2, -3.0]])
    assert float(build_objective(spec, None).loss(t64(o), t64(t))) == pytest.approx(fn(o - t), rel=1e-12)


# --------------------------------------------------------------------------- metrics


def test_accuracy_and_top_k_accuracy_sums():
    spec = job(
        head(4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", {"name": "top_k_accuracy", "k": 2}],
    )
    obj = build_objective(spec, 4)
    y = torch.tensor(LABELS)
    out = t64(LOGITS)
    order = np.argsort(-LOGITS, axis=1)
    assert float(obj.metrics["accuracy"](out, y, y)) == (order[:, 0] == LABELS).sum()
    top2 = sum(LABELS[i] in order[i, :2] for i in range(len(LABELS)))
    assert float(obj.metrics["top_k_accuracy"](out, y, y)) == top2
    assert top2 > (order[:, 0] == LABELS).sum()  # the example distinguishes the two


def test_binary_accuracy_threshold_on_logits():
    spec = job(head(1), loss="binary_crossentropy", metrics=["accuracy"], dataset="breast_cancer")
    obj = build_objective(spec, 2)
    z = t64([[-0.1], [0.2], [3.0], [-4.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert float(obj.metrics["accuracy"](z, y, y)) == 2  # logit > 0 means class 1


def test_rmse_mae_mse_metrics():
    spec = job(head(2), loss="mse", metrics=["rmse", "mae", "mse"], dataset="diabetes")
    obj = build_objective(spec, None)
    o = np.array([[0.1, 2.0], [-1.5, 0.3], [0.0, 0.0]])
    t = np.array([[0.0, 0.0], [0.0, 0.7], [0.2, -3.0]])
    n = len(o)
    sums = {k: float(fn(t64(o), None, t64(t))) for k, fn in obj.metrics.items()}
    rmse = obj.finalize["rmse"](sums["rmse"] / n)
    assert rmse == pytest.approx(math.sqrt(((o - t) ** 2).mean()), rel=1e-12)
    assert sums["mae"] / n == pytest.approx(np.abs(o - t).mean(), rel=1e-12)
    assert sums["mse"] / n == pytest.approx(((o - t) ** 2).mean(), rel=1e-12)


def _digits_run(last_activation, from_logits=None, epochs=2):
    loss = {"name": "sparse_categorical_crossentropy"}
    if from_logits is not None:
        loss["from_logits"] = from_logits
    return training.fit(
        {
            "seed": 11,
            "device": "cpu",
            "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 256, "standardize": True},
            "model": {
                "layers": [
                    {"type": "dense", "units": 16, "activation": "relu"},
                    {"type": "dense", "units": 10, "activation": last_activation},
                ]
            },
            "loss": loss,
            "metrics": ["accuracy"],
            "optimizer": {"name": "adam", "learning_rate": 0.01},
            "epochs": epochs,
        }
    )


def test_softmax_head_with_from_logits_unset_equals_logits_path():
    a = _digits_run("softmax")
    b = _digits_run("linear")
    for ha, hb in zip(a.history, b.history, strict=True):
        for k in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert ha[k] == pytest.approx(hb[k], abs=1e-6)
    # Keras' probability path (softmax output, from_logits false, clipping) agrees to float tolerance
    c = _digits_run("softmax", from_logits=False)
    for ha, hc in zip(a.history, c.history, strict=True):
        assert ha["loss"] == pytest.approx(hc["loss"], abs=1e-4)


def test_softmax_head_loss_value_on_model_outputs():
    spec = job(head(4, "softmax"), loss="sparse_categorical_crossentropy")
    assert strip_output_activation(spec)
    torch.manual_seed(0)
    built = build_model(spec, (64,), True)
    x = torch.randn(5, 64)
    z = built.module(x).detach().double().numpy()
    obj = build_objective(spec, 4)
    y = np.array([0, 1, 2, 3, 0])
    probs = np.exp(np_log_softmax(z))
    want = -np.log(np.clip(probs[np.arange(5), y], EPS, 1 - EPS)).mean()  # Keras on softmax outputs
    assert float(obj.loss(t64(z), torch.tensor(y))) == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------- model building


def image(layers):
    spec = job(layers, loss="mse", layout="image")
    return spec, build_model(spec, (1, 8, 8), False)


def test_conv2d_same_stride2_shape_and_tf_padding():
    layers = [
        {
            "type": "conv2d",
            "filters": 1,
            "kernel_size": 3,
            "strides": 2,
            "padding": "same",
            "kernel_initializer": "ones",
            "use_bias": False,
        },
        {"type": "conv2d", "filters": 2, "kernel_size": 2, "strides": 3, "padding": "same"},
    ]
    spec, built = image(layers)
    shapes = infer_shapes(spec.model, (1, 8, 8))
    assert shapes[1] == (1, math.ceil(8 / 2), math.ceil(8 / 2))
    assert shapes[2] == (2, math.ceil(4 / 3), math.ceil(4 / 3))
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    y = x
    out1 = None
    for name, mod in built.module.named_children():
        y = mod(y)
        if name == "0":
            out1 = y
    assert tuple(y.shape[1:]) == shapes[2]
    # TF 'same' for n=8, k=3, s=2: out 4, total pad 1, all of it after -> window i covers rows 2i..2i+2
    xn = x[0, 0].numpy()
    padded = np.zeros((9, 9))
    padded[:8, :8] = xn
    want = np.array(
        [[padded[2 * i : 2 * i + 3, 2 * j : 2 * j + 3].sum() for j in range(4)] for i in range(4)]
    )
    np.testing.assert_allclose(out1[0, 0].detach().numpy(), want, rtol=1e-6)
    assert want[0, 0] == xn[0:3, 0:3].sum()  # no padding before


def test_pooling_same_tf_semantics():
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    xn = x.numpy()
    _, mx = image([{"type": "max_pool2d", "pool_size": 3, "strides": 2, "padding": "same"}])
    _, av = image([{"type": "avg_pool2d", "pool_size": 3, "strides": 2, "padding": "same"}])
    got_max, got_avg = mx.module(x).numpy(), av.module(x).numpy()
    assert got_max.shape == got_avg.shape == (2, 1, 4, 4)
    for i in range(4):
        for j in range(4):
            win = xn[:, 0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]  # slicing drops the padded cells
            np.testing.assert_allclose(got_max[:, 0, i, j], win.max(axis=(1, 2)), rtol=1e-6)
            np.testing.assert_allclose(got_avg[:, 0, i, j], win.mean(axis=(1, 2)), rtol=1e-5)
    # the corner cell by hand: its window holds 2x2 real cells, the average counts only those 4
    corner = (xn[0, 0, 6, 6] + xn[0, 0, 6, 7] + xn[0, 0, 7, 6] + xn[0, 0, 7, 7]) / 4
    assert got_avg[0, 0, 3, 3] == pytest.approx(corner, rel=1e-5)


def test_batch_norm_keras_momentum_and_biased_variance():
    spec = job(
        [{"type": "batch_norm", "momentum": 0.9, "epsilon": 1e-3}] + head(3), loss="mse", dataset="diabetes"
    )
    built = build_model(spec, (5,), False)
    bn = built.module[0]
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float32) * 3 + 1
    xn = x.numpy().astype(np.float64)
    mean, var_b = xn.mean(0), xn.var(0)  # biased (ddof=0)
    bn.train()
    y = bn(x).detach().numpy()
    np.testing.assert_allclose(y, (xn - mean) / np.sqrt(var_b + 1e-3), rtol=1e-4, atol=1e-5)
    rm, rv = 0.0 * 0.9 + mean * 0.1, 1.0 * 0.9 + var_b * 0.1
    np.testing.assert_allclose(bn.running_mean.numpy(), rm, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), rv, rtol=1e-5)
    bn(x)  # a second step: moving = moving*m + batch*(1-m) again
    rm, rv = rm * 0.9 + mean * 0.1, rv * 0.9 + var_b * 0.1
    np.testing.assert_allclose(bn.running_var.numpy(), rv, rtol=1e-5)
    bn.eval()
    y = bn(x).detach().numpy()
    np.testing.assert_allclose(y, (xn - rm) / np.sqrt(rv + 1e-3), rtol=1e-4, atol=1e-5)


def test_dropout_inverted_scaling_and_eval_identity():
    spec = job([{"type": "dropout", "rate": 0.25}] + head(3), loss="mse", dataset="diabetes")
    built = build_model(spec, (4000,), False)
    drop = built.module[0]
    x = torch.full((1, 4000), 2.0)
    drop.train()
    y = drop(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / 0.75))
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    drop.eval()
    assert torch.equal(drop(x), x)


def test_leaky_relu_slope_is_keras3_default():
    spec = job([{"type": "activation", "activation": "leaky_relu"}] + head(3), loss="mse", dataset="diabetes")
    built = build_model(spec, (3,), False)
    y = built.module[0](torch.tensor([[-1.0, 0.0, 2.0]]))
    torch.testing.assert_close(y, torch.tensor([[-0.2, 0.0, 2.0]]))


def test_parameter_count_three_ways():
    layers = [
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": "same"},  # 1*4*9 + 4 = 40
        {"type": "batch_norm"},  # 4 + 4 = 8
        {"type": "max_pool2d"},  # -> 4x4x4
        {"type": "conv2d", "filters": 3, "kernel_size": 2, "use_bias": False},  # 4*3*4 = 48, -> 3x3x3
        {"type": "flatten"},  # 27
        {"type": "layer_norm"},  # 27 + 27 = 54
        {"type": "dense", "units": 10},  # 27*10 + 10 = 280
    ]
    spec, built = image(layers)
    hand = 40 + 8 + 48 + 54 + 280
    numel = sum(p.numel() for p in built.module.parameters() if p.requires_grad)
    assert built.parameter_count == count_parameters(spec.model, (1, 8, 8)) == numel == hand
    assert tuple(built.module(torch.zeros(2, 1, 8, 8)).shape) == (2, 10)


# --------------------------------------------------------------------------- optimizers


OPT_LRS = {
    "sgd": 0.05,
    "adam": 0.003,
    "adamw": 0.003,
    "nadam": 0.003,
    "radam": 0.003,
    "adamax": 0.005,
    "rmsprop": 0.002,
    "adagrad": 0.05,
}


@pytest.mark.parametrize("name", list(OPT_LRS))
def test_every_optimizer_trains_digits(name):
    r = training.fit(
        {
            "seed": 1,
            "device": "cpu",
            "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 128, "standardize": True},
            "model": {
                "layers": [
                    {"type": "dense", "units": 32, "activation": "relu"},
                    {"type": "dense", "units": 10},
                ]
            },
            "loss": "sparse_categorical_crossentropy",
            "metrics": ["accuracy"],
            "optimizer": {"name": name, "learning_rate": OPT_LRS[name]},
            "epochs": 3,
        }
    )
    losses = [h["loss"] for h in r.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] and r.history[-1]["val_loss"] < r.history[0]["val_loss"]


def _opt(d):
    return job(head(10), loss="sparse_categorical_crossentropy", optimizer=d).optimizer


GRADS = [np.array([0.5, -1.0, 2.0]), np.array([-0.3, 0.2, 0.1]), np.array([1.0, 1.0, -1.0])]
LRS = [0.1, 0.05, 0.2]


@pytest.mark.parametrize("nesterov", [False, True])
def test_keras_sgd_momentum_under_changing_lr(nesterov):
    m = 0.9
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    opt = build_optimizer([p], _opt({"name": "sgd", "momentum": m, "nesterov": nesterov}), LRS[0])
    w, v = np.array([1.0, 2.0, -1.0]), np.zeros(3)
    for g, lr in zip(GRADS, LRS, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = t64(g)
        opt.step()
        v = m * v - lr * g
        w = w + (m * v - lr * g if nesterov else v)
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-15)
    if not nesterov:  # and it differs from torch's SGD (velocity carries g, not lr*g) under a schedule
        q = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
        topt = torch.optim.SGD([q], lr=LRS[0], momentum=m)
        for g, lr in zip(GRADS, LRS, strict=True):
            topt.param_groups[0]["lr"] = lr
            q.grad = t64(g)
            topt.step()
        assert not np.allclose(q.detach().numpy(), w)


def _adam_hand(w, grads, lr, b1, b2, eps, coupled_wd=0.0, decoupled_wd=0.0):
    """torch Adam/AdamW maths written out."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g + coupled_wd * w
        w = w * (1 - lr * decoupled_wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh, vh = m / (1 - b1**t), v / (1 - b2**t)
        w = w - lr * mh / (np.sqrt(vh) + eps)
    return w


def _run_opt(spec_opt, grads, lr):
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    opt = build_optimizer([p], spec_opt, lr)
    for g in grads:
        p.grad = t64(g)
        opt.step()
    return p.detach().numpy()


def test_adam_weight_decay_is_coupled_under_torch_formulas():
    """torch's Adam (``formulas: "torch"``); Keras' (the default) is tested against Keras itself in
    test_optim_keras.py."""
    got = _run_opt(_opt({"name": "adam", "formulas": "torch", "epsilon": 1e-7, "weight_decay": 0.1, "learning_rate": 0.01}), GRADS, 0.01)
    w0 = np.array([1.0, 2.0, -1.0])
    want = _adam_hand(w0, GRADS, 0.01, 0.9, 0.999, 1e-7, coupled_wd=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # the same as a plain torch Adam (no wd) fed g + wd * w
    q = torch.nn.Parameter(t64(w0))
    ref = torch.optim.Adam([q], lr=0.01, eps=1e-7)
    for g in GRADS:
        q.grad = t64(g) + 0.1 * q.detach()
        ref.step()
    np.testing.assert_allclose(got, q.detach().numpy(), rtol=1e-12)
    assert not np.allclose(got, _adam_hand(w0, GRADS, 0.01, 0.9, 0.999, 1e-7, decoupled_wd=0.1))


def test_adamw_weight_decay_is_decoupled_under_torch_formulas():
    spec_opt = _opt({"name": "adamw", "formulas": "torch", "epsilon": 1e-7, "weight_decay": 0.1, "learning_rate": 0.01})
    got = _run_opt(spec_opt, GRADS, 0.01)
    w0 = np.array([1.0, 2.0, -1.0])
    np.testing.assert_allclose(
        got, _adam_hand(w0, GRADS, 0.01, 0.9, 0.999, 1e-7, decoupled_wd=0.1), rtol=1e-10
    )
    assert _opt({"name": "adamw"}).weight_decay == 0.004  # Keras AdamW default
    assert _opt({"name": "adamw", "formulas": "torch"}).weight_decay == 0.01  # torch's


def _clip(spec_opt, grads):
    params = [torch.nn.Parameter(torch.zeros(len(g), dtype=torch.float64)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = t64(g)
    clip = make_clipper(params, spec_opt)
    assert clip is not None
    clip()
    return [p.grad.numpy() for p in params]


CLIP_GRADS = [np.array([3.0, 4.0]), np.array([0.3, -0.4, 0.0]), np.array([-10.0])]  # norms 5, 0.5, 10


def test_clipnorm_per_tensor():
    c = 1.0
    got = _clip(_opt({"name": "sgd", "clipnorm": c}), CLIP_GRADS)
    for g_got, g in zip(got, CLIP_GRADS, strict=True):
        np.testing.assert_allclose(g_got, g * c / max(np.linalg.norm(g), c), rtol=1e-12)
    np.testing.assert_allclose(got[1], CLIP_GRADS[1])  # below the norm: untouched


def test_clipvalue():
    got = _clip(_opt({"name": "sgd", "clipvalue": 0.35}), CLIP_GRADS)
    for g_got, g in zip(got, CLIP_GRADS, strict=True):
        np.testing.assert_allclose(g_got, np.clip(g, -0.35, 0.35))


def test_global_clipnorm():
    c = 2.0
    got = _clip(_opt({"name": "adam", "global_clipnorm": c}), CLIP_GRADS)
    total = math.sqrt(sum((g**2).sum() for g in CLIP_GRADS))
    for g_got, g in zip(got, CLIP_GRADS, strict=True):
        np.testing.assert_allclose(g_got, g * c / max(total, c), rtol=1e-12)


def test_no_clipping_configured_gives_no_clipper():
    assert make_clipper([torch.nn.Parameter(torch.zeros(2))], _opt({"name": "sgd"})) is None
