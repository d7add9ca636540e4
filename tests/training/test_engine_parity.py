"""Parity: the engine's per-epoch numbers equal a plain hand-written PyTorch loop, to 1e-5.

The reference loop below follows only the reproducibility protocol written in
``training/engine.py``'s docstring (split from ``training.data.load``; ``random``/``numpy``/
``torch`` seeded with the job seed; ``nn.Linear`` layers built in spec order, each initialized
kernel then bias with the Keras initializers written by hand with ``torch.nn.init``; a
``torch.Generator`` seeded with the seed for each epoch's ``randperm``), the formulas of
``shared/docs/semantics.md`` (penalties, schedules, warm-up) and Keras' SGD update rule. It uses
nothing from ``training`` except the data split.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import training
from training.data import load

TOL = 1e-5
TRUNC = 0.87962566103423978

EXAMPLE = json.loads((Path(__file__).resolve().parents[2] / "examples" / "source-note.json").read_text())


def test_example_is_the_source_notes_spec():
    """The committed example carries the source note's knobs (issue 2's example)."""
    assert EXAMPLE["optimizer"]["beta_1"] == 0.89
    lr = EXAMPLE["optimizer"]["learning_rate"]
    assert (lr["schedule"], lr["initial_learning_rate"], lr["first_decay_steps"]) == ("cosine_restarts", 0.01, 1000)
    dense = EXAMPLE["model"]["layers"][0]
    assert dense["kernel_initializer"] == "he_normal" and dense["kernel_regularizer"] == {"l2": 0.01}
    assert dense["activity_regularizer"] == {"l1": 0.01} and EXAMPLE["model"]["layers"][1]["rate"] == 0.5
    assert EXAMPLE["callbacks"]["early_stopping"]["patience"] == 10


# --------------------------------------------------------------------------- hand-written pieces


def he_normal_(w: torch.Tensor) -> None:
    fan_in = w.shape[1]
    std = math.sqrt(2.0 / fan_in) / TRUNC
    with torch.no_grad():
        nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std)


def glorot_uniform_(w: torch.Tensor) -> None:
    fan_out, fan_in = w.shape
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        nn.init.uniform_(w, -limit, limit)


def zeros_(b: torch.Tensor) -> None:
    with torch.no_grad():
        nn.init.zeros_(b)


def cosine_restarts_lr(
    step: int, lr0: float, first: int, t_mul: float = 2.0, m_mul: float = 1.0, alpha: float = 0.0
) -> float:
    """semantics.md, Keras CosineDecayRestarts."""
    f = step / first
    if t_mul == 1:
        i = math.floor(f)
        f = f - i
    else:
        i = math.floor(math.log(1 - f * (1 - t_mul)) / math.log(t_mul))
        f = (f - (1 - t_mul**i) / (1 - t_mul)) / t_mul**i
    return lr0 * ((1 - alpha) * 0.5 * m_mul**i * (1 + math.cos(math.pi * f)) + alpha)


def with_warmup(base, warmup_steps: int, start: float = 0.0):
    """semantics.md: linear from warmup_start_lr to base(0) over warmup_steps, then base from 0."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return start + (base(0) - start) * step / warmup_steps
        return base(step - warmup_steps)

    return f


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_of(spec: dict):
    return load(SimpleNamespace(**spec["data"]), spec["seed"])


def run_loop(spec, build, penalty, make_step, lr_of_step, epochs):
    """Plain loop. ``build()`` returns (model, act_hook_outputs list or None); ``penalty(model,
    acts, batch)`` the regularization term; ``make_step(params)`` returns ``step(lr)``."""
    sp = split_of(spec)
    seed = spec["seed"]
    seed_all(seed)
    model, acts = build()
    xtr, ytr = torch.from_numpy(sp.x_train), torch.from_numpy(sp.y_train)
    xva, yva = torch.from_numpy(sp.x_val), torch.from_numpy(sp.y_val)
    n, bs = len(xtr), spec["data"]["batch_size"]
    params = list(model.parameters())
    step_fn = make_step(params)
    g = torch.Generator().manual_seed(seed)
    history, weights_per_epoch = [], []
    step = 0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        loss_sum = 0.0
        correct = 0
        for b in range(math.ceil(n / bs)):
            idx = perm[b * bs : (b + 1) * bs]
            xb, yb = xtr[idx], ytr[idx]
            acts.clear()
            out = model(xb)
            loss = F.cross_entropy(out, yb) + penalty(model, acts, len(xb))
            for p in params:
                p.grad = None
            loss.backward()
            step_fn(lr_of_step(step))
            step += 1
            loss_sum += loss.item() * len(xb)
            correct += int((out.argmax(-1) == yb).sum())
        model.eval()
        with torch.no_grad():
            acts.clear()
            out = model(xva)
            vloss = F.cross_entropy(out, yva) + penalty(model, acts, len(xva))
            vacc = (out.argmax(-1) == yva).float().mean().item()
        history.append(
            {"loss": loss_sum / n, "accuracy": correct / n, "val_loss": float(vloss), "val_accuracy": vacc}
        )
        weights_per_epoch.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return history, weights_per_epoch


def assert_history_close(engine_hist, ref_hist):
    assert len(engine_hist) == len(ref_hist)
    for e, (got, ref) in enumerate(zip(engine_hist, ref_hist, strict=True), start=1):
        assert got["epoch"] == e
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert abs(got[key] - ref[key]) <= TOL, (e, key, got[key], ref[key])


# --------------------------------------------------------------------------- the source note's spec


def test_parity_source_note_spec_adam_cosine_restarts_warmup_dropout_penalties():
    epochs = 4  # 4 * 23 = 92 steps: through the 50-step warm-up and into the cosine
    spec = copy.deepcopy(EXAMPLE)
    spec["epochs"] = epochs
    spec["device"] = "cpu"

    def build():
        acts: list[torch.Tensor] = []
        l0 = nn.Linear(64, 64)
        he_normal_(l0.weight)
        zeros_(l0.bias)
        drop = nn.Dropout(0.5)
        l2 = nn.Linear(64, 10)
        glorot_uniform_(l2.weight)
        zeros_(l2.bias)
        relu = nn.ReLU()
        relu.register_forward_hook(lambda m, i, o: acts.append(o))
        model = nn.Sequential(l0, relu, drop, l2)
        return model, acts

    def penalty(model, acts, batch):
        w0 = model[0].weight
        return 0.01 * (w0**2).sum() + 0.01 * acts[0].abs().sum() / batch

    def make_step(params):
        # Keras' Adam (the spec's default formulas) from torch's: Keras adds epsilon to the
        # uncorrected sqrt(v), i.e. torch's eps at update t is epsilon / sqrt(1 - beta_2**t).
        opt = torch.optim.Adam(params, lr=0.0, betas=(0.89, 0.999), eps=1e-7)
        t = 0

        def step(lr):
            nonlocal t
            t += 1
            for gr in opt.param_groups:
                gr["lr"] = lr
                gr["eps"] = 1e-7 / math.sqrt(1 - 0.999**t)
            opt.step()

        return step

    lr_of = with_warmup(lambda s: cosine_restarts_lr(s, 0.01, 1000), 50)
    ref, ref_weights = run_loop(spec, build, penalty, make_step, lr_of, epochs)

    result = training.fit(spec)
    assert result.stop_reason == "completed"
    assert_history_close(result.history, ref)

    # restore_best_weights: the final weights are the best-val_loss epoch's (min, first wins)
    vl = [h["val_loss"] for h in ref]
    best = vl.index(min(vl))
    names = {"0.weight": "0.weight", "0.bias": "0.bias", "2.weight": "3.weight", "2.bias": "3.bias"}
    assert set(result.weights) == set(names)
    for k_engine, k_ref in names.items():
        torch.testing.assert_close(result.weights[k_engine], ref_weights[best][k_ref], atol=TOL, rtol=0)


# --------------------------------------------------------------------------- SGD momentum + nesterov, step schedule


SGD_SPEC = {
    "name": "sgd-nesterov-step",
    "seed": 7,
    "device": "cpu",
    "data": {
        "dataset": "digits",
        "validation_split": 0.25,
        "batch_size": 100,
        "shuffle": True,
        "standardize": True,
    },
    "model": {
        "layers": [
            {"type": "dense", "units": 32, "activation": "tanh"},
            {"type": "dense", "units": 10},
        ],
    },
    "loss": "sparse_categorical_crossentropy",
    "metrics": ["accuracy"],
    "optimizer": {
        "name": "sgd",
        "momentum": 0.9,
        "nesterov": True,
        "learning_rate": {"schedule": "step", "initial_learning_rate": 0.05, "step_size": 2, "gamma": 0.3},
    },
    "epochs": 4,
}


@pytest.mark.parametrize("nesterov", [True, False])
def test_parity_keras_sgd_momentum_under_step_schedule(nesterov):
    spec = copy.deepcopy(SGD_SPEC)
    spec["optimizer"]["nesterov"] = nesterov
    n_train = len(split_of(spec).x_train)
    steps_per_epoch = math.ceil(n_train / spec["data"]["batch_size"])

    def build():
        l0 = nn.Linear(64, 32)
        glorot_uniform_(l0.weight)
        zeros_(l0.bias)
        l1 = nn.Linear(32, 10)
        glorot_uniform_(l1.weight)
        zeros_(l1.bias)
        return nn.Sequential(l0, nn.Tanh(), l1), []

    def penalty(model, acts, batch):
        return 0.0

    def make_step(params):
        velocity = [torch.zeros_like(p) for p in params]
        m = 0.9

        @torch.no_grad()
        def step(lr):
            for p, v in zip(params, velocity, strict=True):
                g = p.grad
                v.mul_(m).sub_(lr * g)  # v = m*v - lr*g
                if nesterov:
                    p.add_(m * v - lr * g)
                else:
                    p.add_(v)

        return step

    def lr_of(step):  # torch StepLR counted in epochs, semantics.md
        epoch = step // steps_per_epoch
        return 0.05 * 0.3 ** math.floor(epoch / 2)

    ref, ref_weights = run_loop(spec, build, penalty, make_step, lr_of, spec["epochs"])
    result = training.fit(spec)
    assert result.stop_reason == "completed"
    assert_history_close(result.history, ref)
    for k_engine, k_ref in {
        "0.weight": "0.weight",
        "0.bias": "0.bias",
        "1.weight": "2.weight",
        "1.bias": "2.bias",
    }.items():
        torch.testing.assert_close(result.weights[k_engine], ref_weights[-1][k_ref], atol=TOL, rtol=0)
    # the rate really changed during the run (the schedule is exercised)
    assert lr_of(0) != lr_of(steps_per_epoch * (spec["epochs"] - 1))
