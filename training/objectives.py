"""Losses and metrics, in the form the training step needs.

Targets are prepared once per job (``prepare_targets``) so the step does no conversion: class
indices for sparse CE and accuracy, one-hot (smoothed) rows for categorical CE, ``(N, 1)`` floats
for binary CE. Metrics return per-batch *sums* that accumulate on the device; the engine divides
by the sample count once per epoch (so there is no host sync per step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from training.spec import JobSpec

EPS = 1e-7  # Keras backend epsilon, used when outputs are probabilities


@dataclass(frozen=True)
class Objective:
    """``loss(out, target) -> mean loss``; ``metrics`` maps a history name to
    ``(out, labels, target) -> per-batch sum``; ``finalize`` turns summed values per sample into
    the reported value (e.g. sqrt for rmse)."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metrics: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]
    finalize: dict[str, Callable[[float], float]]
    outputs_are_logits: bool
    count_metrics: frozenset[str] = frozenset()  # metrics whose per-batch sum is an integer count
    #: each metric's per-sample values (the last axis of the outputs reduced, every leading axis
    #: kept), whose sum is the metric's per-batch sum: a fused pack (``training.fused``) sums them
    #: per trial over stacked ``(trials, batch, ...)`` outputs
    per_sample: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = field(default_factory=dict)


def strip_output_activation(spec: JobSpec) -> bool:
    """With from_logits unset and a softmax/sigmoid last layer, train on the pre-activation
    (same maths as Keras' probability path, numerically stable)."""
    last = spec.model.layers[-1]
    act = getattr(last, "activation", "linear")
    if spec.loss.name in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
        return spec.loss.from_logits is None and act == "softmax"
    if spec.loss.name == "binary_crossentropy":
        return spec.loss.from_logits is None and act == "sigmoid"
    return False


def prepare_targets(spec: JobSpec, y: torch.Tensor, n_classes: int | None) -> torch.Tensor:
    """The tensor the loss consumes, built once: see the module docstring."""
    name, ls = spec.loss.name, spec.loss.label_smoothing
    if name == "categorical_crossentropy":
        assert n_classes is not None
        onehot = F.one_hot(y, n_classes).float()
        return onehot * (1 - ls) + ls / n_classes if ls else onehot
    if name == "binary_crossentropy":
        t = y.float().unsqueeze(-1)
        return t * (1 - ls) + 0.5 * ls if ls else t
    return y


def _probs_ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = out / out.sum(dim=-1, keepdim=True)
    return -(target * p.clamp(EPS, 1 - EPS).log()).sum(dim=-1).mean()


def _probs_bce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = out.clamp(EPS, 1 - EPS)
    return -(target * p.log() + (1 - target) * (1 - p).log()).mean()


def build_objective(spec: JobSpec, n_classes: int | None) -> Objective:
    name, ls = spec.loss.name, spec.loss.label_smoothing
    last_act = getattr(spec.model.layers[-1], "activation", "linear")
    logits = spec.loss.from_logits is not False or strip_output_activation(spec)
    if name == "sparse_categorical_crossentropy":
        if logits:
            loss = (lambda o, t: F.cross_entropy(o, t, label_smoothing=ls)) if ls else F.cross_entropy
        else:
            def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                k = o.shape[-1]
                oh = F.one_hot(t, k).float()
                return _probs_ce(o, oh * (1 - ls) + ls / k if ls else oh)
    elif name == "categorical_crossentropy":
        loss = F.cross_entropy if logits else _probs_ce
    elif name == "binary_crossentropy":
        loss = F.binary_cross_entropy_with_logits if logits else _probs_bce
    elif name == "mse":
        loss = F.mse_loss
    elif name == "mae":
        loss = F.l1_loss
    else:
        delta = spec.loss.delta
        loss = lambda o, t: F.huber_loss(o, t, delta=delta)  # noqa: E731
    del last_act

    per_sample: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {}
    finalize: dict[str, Callable[[float], float]] = {}
    binary = name == "binary_crossentropy"
    threshold = 0.0 if logits else 0.5
    for m in spec.metrics:
        if m.name == "accuracy":
            if binary:
                per_sample[m.key] = lambda o, y, t, th=threshold: (o.squeeze(-1) > th).long() == y
            else:
                per_sample[m.key] = lambda o, y, t: o.argmax(dim=-1) == y
        elif m.name == "top_k_accuracy":
            k = m.k
            per_sample[m.key] = lambda o, y, t, k=k: (o.topk(min(k, o.shape[-1]), dim=-1).indices == y.unsqueeze(-1)).any(dim=-1)
        elif m.name == "mae":
            per_sample[m.key] = lambda o, y, t: (o.to(t.dtype) - t).abs().mean(dim=-1)
        elif m.name in ("mse", "rmse"):
            per_sample[m.key] = lambda o, y, t: (o.to(t.dtype) - t).square().mean(dim=-1)
            if m.name == "rmse":
                finalize[m.key] = lambda v: v**0.5
    metrics = {k: _summed(fn) for k, fn in per_sample.items()}
    counts = frozenset(m.key for m in spec.metrics if m.name in ("accuracy", "top_k_accuracy"))
    return Objective(loss=loss, metrics=metrics, finalize=finalize, outputs_are_logits=logits, count_metrics=counts,
                     per_sample=per_sample)


def _summed(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda o, y, t: fn(o, y, t).sum()
