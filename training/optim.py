"""Optimizers by Keras name, and gradient clipping.

- ``sgd`` follows Keras' formulation (velocity carries ``-lr * g``), which equals torch's SGD under
  a constant learning rate and differs from it under a schedule; implemented with foreach ops.
- ``adam``, ``adamw``, ``nadam``, ``radam``, ``adamax``, ``rmsprop``, ``adagrad`` are torch's
  implementations given Keras' hyperparameter names and defaults (epsilon 1e-7, RMSprop rho 0.9,
  Adagrad initial accumulator 0.1). Torch adds epsilon after bias correction where Keras adds it
  before; the two agree to within terms of order epsilon.
- ``weight_decay`` is coupled L2 (added to the gradient) everywhere except ``adamw`` (decoupled).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer


class KerasSGD(Optimizer):
    """``v = momentum * v - lr * g; w += v`` (nesterov: ``w += momentum * v - lr * g``)."""

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if m == 0:
                torch._foreach_add_(params, grads, alpha=-lr)
                continue
            velocity = []
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                velocity.append(state["velocity"])
            torch._foreach_mul_(velocity, m)
            torch._foreach_add_(velocity, grads, alpha=-lr)
            if group["nesterov"]:
                torch._foreach_add_(params, velocity, alpha=m)
                torch._foreach_add_(params, grads, alpha=-lr)
            else:
                torch._foreach_add_(params, velocity)


@dataclass(frozen=True)
class OptimizerInfo:
    """Registry record: how to build the named optimizer from its spec model."""

    name: str
    summary: str
    build: Callable[[list[torch.nn.Parameter], Any, float], Optimizer]


def _wd(o: Any) -> float:
    return float(o.weight_decay or 0.0)


OPTIMIZERS: dict[str, OptimizerInfo] = {
    i.name: i
    for i in (
        OptimizerInfo("sgd", "Keras SGD (momentum, nesterov)", lambda p, o, lr: KerasSGD(p, lr, o.momentum, o.nesterov, _wd(o))),
        OptimizerInfo(
            "adam", "Adam (coupled weight decay)",
            lambda p, o, lr: torch.optim.Adam(p, lr, betas=(o.beta_1, o.beta_2), eps=o.epsilon, weight_decay=_wd(o), amsgrad=o.amsgrad),
        ),
        OptimizerInfo(
            "adamw", "AdamW (decoupled weight decay)",
            lambda p, o, lr: torch.optim.AdamW(p, lr, betas=(o.beta_1, o.beta_2), eps=o.epsilon, weight_decay=_wd(o), amsgrad=o.amsgrad),
        ),
        OptimizerInfo(
            "nadam", "Nadam (momentum decay 0.004, as Keras and torch)",
            lambda p, o, lr: torch.optim.NAdam(p, lr, betas=(o.beta_1, o.beta_2), eps=o.epsilon, weight_decay=_wd(o)),
        ),
        OptimizerInfo(
            "radam", "RAdam (torch)",
            lambda p, o, lr: torch.optim.RAdam(p, lr, betas=(o.beta_1, o.beta_2), eps=o.epsilon, weight_decay=_wd(o)),
        ),
        OptimizerInfo(
            "adamax", "Adamax",
            lambda p, o, lr: torch.optim.Adamax(p, lr, betas=(o.beta_1, o.beta_2), eps=o.epsilon, weight_decay=_wd(o)),
        ),
        OptimizerInfo(
            "rmsprop", "RMSprop (rho, momentum, centered)",
            lambda p, o, lr: torch.optim.RMSprop(p, lr, alpha=o.rho, eps=o.epsilon, momentum=o.momentum, centered=o.centered, weight_decay=_wd(o)),
        ),
        OptimizerInfo(
            "adagrad", "Adagrad (initial_accumulator_value 0.1 as Keras)",
            lambda p, o, lr: torch.optim.Adagrad(p, lr, initial_accumulator_value=o.initial_accumulator_value, eps=o.epsilon, weight_decay=_wd(o)),
        ),
    )
}


def build_optimizer(params: list[torch.nn.Parameter], opt_spec: Any, lr: float) -> Optimizer:
    info = OPTIMIZERS.get(opt_spec.name)
    if info is None:
        raise ValueError(f"unknown optimizer {opt_spec.name!r}; known: {', '.join(OPTIMIZERS)}")
    return info.build(params, opt_spec, lr)


def make_clipper(params: list[torch.nn.Parameter], opt_spec: Any) -> Callable[[], None] | None:
    """Gradient clipping as Keras applies it, or None when the spec asks for none."""
    clipnorm, clipvalue, global_clipnorm = opt_spec.clipnorm, opt_spec.clipvalue, opt_spec.global_clipnorm
    if clipnorm is None and clipvalue is None and global_clipnorm is None:
        return None

    @torch.no_grad()
    def clip() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        if clipvalue is not None:
            torch._foreach_clamp_min_(grads, -clipvalue)
            torch._foreach_clamp_max_(grads, clipvalue)
        if clipnorm is not None:
            # each tensor: g * clipnorm / max(||g||, clipnorm)
            norms = torch._foreach_norm(grads)
            scales = [clipnorm / torch.clamp(n, min=clipnorm) for n in norms]
            torch._foreach_mul_(grads, scales)
        if global_clipnorm is not None:
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, global_clipnorm / torch.clamp(total, min=global_clipnorm))

    return clip
