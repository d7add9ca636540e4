"""Optimizers by Keras name, and gradient clipping.

Every optimizer spec carries ``formulas`` (see ``training/spec.py``):

- ``"keras"`` (the default): Keras 3's update, formula for formula (``docs/semantics.md``,
  Optimizers): Adam/AdamW add epsilon to the *uncorrected* ``sqrt(v)``, Adamax adds it outside the
  max, RMSprop and Adagrad inside the square root, Nadam uses ``u_t = beta_1*(1 - 0.5*0.96**t)``,
  SGD's and RMSprop's momentum buffers carry the learning rate, and ``weight_decay`` is decoupled in
  every optimizer (``w *= 1 - weight_decay * lr`` before the update).
  Each is written here op for op as Keras' torch backend computes it, with torch's multi-tensor
  (``_foreach``) ops and Keras' float32 step scalars (see :class:`_KerasForeach`).
- ``"torch"``: ``torch.optim``'s own optimizer, given the spec's values (``weight_decay`` is then
  torch's: coupled L2, decoupled for AdamW).

Clipping (``clipnorm`` per tensor, ``global_clipnorm``, ``clipvalue``; one at most) is Keras'; it
runs before the optimizer step, and so before the weight decay, as in Keras.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer


class _KerasForeach(Optimizer):
    """A Keras 3 update, written op for op as Keras' torch backend computes it
    (``keras/src/backend/torch/optimizers``): the same ``_foreach`` ops in the same order, and the
    step-dependent scalars (learning rate, ``beta**t``, bias corrections) in the variables' dtype
    (float32) as Keras computes them: ``np.float32`` arithmetic is IEEE-rounded like torch's, and
    numpy's float32 power is the same libm ``powf`` as torch's scalar ``pow``. ``1 - beta_2**t``
    loses digits in float32 at small t (1e-5 relative at t=1), so float64 scalars would already
    differ from Keras in the sixth digit; computed as Keras does, the weights agree bit for bit on
    CPU (tests/training/test_optim_keras.py).

    ``step``: take the parameters that have a gradient, count the update (``iterations``, Keras'
    counter, kept in the param group so it is saved with the optimizer state), apply decoupled
    weight decay (``w *= 1 - weight_decay * lr``), then ``_update``."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults | {"iterations": 0})

    def _slots(self, params: list[Tensor], key: str, fill: float = 0.0) -> list[Tensor]:
        out = []
        for p in params:
            state = self.state[p]
            if key not in state:
                state[key] = torch.full_like(p, fill, memory_format=torch.preserve_format)
            out.append(state[key])
        return out

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: int, ft: type[np.floating]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            ft = np.float64 if params[0].dtype == torch.float64 else np.float32  # Keras: the variables' dtype
            lr = ft(group["lr"])
            wd = group["weight_decay"]
            if wd:
                torch._foreach_mul_(params, float(1 - ft(wd) * lr))
            self._update(group, params, [p.grad for p in params], lr, group["iterations"] + 1, ft)
            group["iterations"] += 1
        return loss


class KerasSGD(_KerasForeach):
    """``v = momentum * v - lr * g; w += v`` (nesterov: ``w += momentum * v - lr * g``)."""

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay})

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: int, ft: type[np.floating]) -> None:
        m, neg_lr = group["momentum"], -float(lr)
        if m == 0:
            torch._foreach_add_(params, grads, alpha=neg_lr)
            return
        velocity = self._slots(params, "velocity")
        torch._foreach_mul_(velocity, m)
        torch._foreach_add_(velocity, grads, alpha=neg_lr)
        if group["nesterov"]:
            torch._foreach_add_(params, grads, alpha=neg_lr)
            torch._foreach_add_(params, velocity, alpha=m)
        else:
            torch._foreach_add_(params, velocity)


class KerasAdam(_KerasForeach):
    """Adam and AdamW: ``m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g²`` (amsgrad: ``v = max(v_hat, v)``);
    ``w -= lr*sqrt(1-b2**t)/(1-b1**t) * m / (sqrt(v) + eps)``: epsilon on the uncorrected sqrt(v)."""

    def __init__(self, params: Iterable[Any], lr: float, beta_1: float, beta_2: float, epsilon: float, weight_decay: float, amsgrad: bool) -> None:
        super().__init__(params, {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "weight_decay": weight_decay, "amsgrad": amsgrad})

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: int, ft: type[np.floating]) -> None:
        b1, b2 = group["beta_1"], group["beta_2"]
        alpha = lr * np.sqrt(1 - ft(b2) ** ft(t)) / (1 - ft(b1) ** ft(t))
        m, v = self._slots(params, "m"), self._slots(params, "v")
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_add_(v, torch._foreach_mul(grads, grads), alpha=1 - b2)
        if group["amsgrad"]:
            v_hat = self._slots(params, "v_hat")
            torch._foreach_maximum_(v_hat, v)
            v = v_hat
        update = torch._foreach_mul(m, float(alpha))
        denominators = torch._foreach_sqrt(v)
        torch._foreach_add_(denominators, group["epsilon"])
        torch._foreach_div_(update, denominators)
        torch._foreach_sub_(params, update)


class KerasNadam(_KerasForeach):
    """``u_t = b1*(1 - 0.5*0.96**t)``, ``P_t = u_1*...*u_t``; ``m``, ``v`` as Adam;
    ``w -= lr * (u_{t+1}*m/(1-P_{t+1}) + (1-u_t)*g/(1-P_t)) / (sqrt(v/(1-b2**t)) + eps)``."""

    def __init__(self, params: Iterable[Any], lr: float, beta_1: float, beta_2: float, epsilon: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "weight_decay": weight_decay, "u_product": 1.0})

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: int, ft: type[np.floating]) -> None:
        b1, b2 = group["beta_1"], group["beta_2"]
        decay, beta_1 = ft(0.96), ft(b1)
        u_t = beta_1 * (ft(1.0) - ft(0.5) * decay ** ft(t))
        u_t_1 = beta_1 * (ft(1.0) - ft(0.5) * decay ** ft(t + 1))
        u_product_t = ft(group["u_product"]) * u_t
        u_product_t_1 = u_product_t * u_t_1
        beta_2_power = ft(b2) ** ft(t)
        group["u_product"] = float(u_product_t)
        m, v = self._slots(params, "m"), self._slots(params, "v")
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_add_(v, torch._foreach_mul(grads, grads), alpha=1 - b2)
        m_hat = torch._foreach_mul(m, float(u_t_1))
        torch._foreach_div_(m_hat, float(1 - u_product_t_1))
        g_part = torch._foreach_mul(grads, float(1 - u_t))
        torch._foreach_div_(g_part, float(1 - u_product_t))
        torch._foreach_add_(m_hat, g_part)
        denominators = torch._foreach_div(v, float(1 - beta_2_power))
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["epsilon"])
        torch._foreach_mul_(m_hat, float(lr))
        torch._foreach_div_(m_hat, denominators)
        torch._foreach_sub_(params, m_hat)


class KerasAdamax(_KerasForeach):
    """``m = b1*m + (1-b1)*g; u = max(b2*u, |g|); w -= lr*m / ((u + eps) * (1 - b1**t))``."""

    def __init__(self, params: Iterable[Any], lr: float, beta_1: float, beta_2: float, epsilon: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "weight_decay": weight_decay})

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: int, ft: type[np.floating]) -> None:
        b1, b2 = group["beta_1"], group["beta_2"]
        m, u = self._slots(params, "m"), self._slots(params, "u")
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(u, b2)
        torch._foreach_maximum_(u, torch._foreach_abs(grads))
        denominators = torch._foreach_add(u, group["epsilon"])
        torch._foreach_mul_(denominators, float(1 - ft(b1) ** ft(t)))
        update = torch._foreach_mul(m, float(lr))
        torch._foreach_div_(update, denominators)
        torch._foreach_sub_(params, update)


class KerasRMSprop(_KerasForeach):
    """``v = rho*v + (1-rho)*g²``; ``inc = lr*g / sqrt(v + eps)`` (centered: ``sqrt(v + eps - a²)``,
    ``a = rho*a + (1-rho)*g``); ``w -= inc``, or with momentum ``b = momentum*b + inc; w -= b``."""

    def __init__(self, params: Iterable[Any], lr: float, rho: float, epsilon: float, momentum: float, centered: bool, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "rho": rho, "epsilon": epsilon, "momentum": momentum, "centered": centered, "weight_decay": weight_decay})

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: int, ft: type[np.floating]) -> None:
        rho = group["rho"]
        velocities = self._slots(params, "velocity")
        torch._foreach_mul_(velocities, rho)
        torch._foreach_add_(velocities, torch._foreach_mul(grads, grads), alpha=1 - rho)
        denominators = torch._foreach_add(velocities, group["epsilon"])
        if group["centered"]:
            average_grads = self._slots(params, "average_gradient")
            torch._foreach_mul_(average_grads, rho)
            torch._foreach_add_(average_grads, grads, alpha=1 - rho)
            torch._foreach_sub_(denominators, torch._foreach_mul(average_grads, average_grads))
        torch._foreach_sqrt_(denominators)
        increments = torch._foreach_mul(grads, float(lr))
        torch._foreach_div_(increments, denominators)
        if group["momentum"] > 0:
            buffers = self._slots(params, "momentum")
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, increments)
            torch._foreach_sub_(params, buffers)
        else:
            torch._foreach_sub_(params, increments)


class KerasAdagrad(_KerasForeach):
    """``acc += g²; w -= lr*g / sqrt(acc + eps)``, ``acc`` starting at ``initial_accumulator_value``."""

    def __init__(self, params: Iterable[Any], lr: float, initial_accumulator_value: float, epsilon: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "initial_accumulator_value": initial_accumulator_value, "epsilon": epsilon, "weight_decay": weight_decay})

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: int, ft: type[np.floating]) -> None:
        acc = self._slots(params, "accumulator", group["initial_accumulator_value"])
        torch._foreach_add_(acc, torch._foreach_mul(grads, grads))
        denominators = torch._foreach_add(acc, group["epsilon"])
        torch._foreach_sqrt_(denominators)
        update = torch._foreach_mul(grads, float(lr))
        torch._foreach_div_(update, denominators)
        torch._foreach_sub_(params, update)


@dataclass(frozen=True)
class OptimizerInfo:
    """Registry record: how to build the named optimizer from its spec model, per ``formulas``."""

    name: str
    summary: str
    build: dict[str, Callable[[list[torch.nn.Parameter], Any, float], Optimizer]]


def _wd(o: Any) -> float:
    return float(o.weight_decay or 0.0)


def _betas(o: Any) -> tuple[float, float]:
    return (o.beta_1, o.beta_2)


OPTIMIZERS: dict[str, OptimizerInfo] = {
    i.name: i
    for i in (
        OptimizerInfo("sgd", "SGD (momentum, nesterov)", {
            "keras": lambda p, o, lr: KerasSGD(p, lr, o.momentum, o.nesterov, _wd(o)),
            "torch": lambda p, o, lr: torch.optim.SGD(p, lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=_wd(o)),
        }),
        OptimizerInfo("adam", "Adam (amsgrad)", {
            "keras": lambda p, o, lr: KerasAdam(p, lr, o.beta_1, o.beta_2, o.epsilon, _wd(o), o.amsgrad),
            "torch": lambda p, o, lr: torch.optim.Adam(p, lr, betas=_betas(o), eps=o.epsilon, weight_decay=_wd(o), amsgrad=o.amsgrad),
        }),
        OptimizerInfo("adamw", "AdamW (decoupled weight decay)", {
            "keras": lambda p, o, lr: KerasAdam(p, lr, o.beta_1, o.beta_2, o.epsilon, _wd(o), o.amsgrad),
            "torch": lambda p, o, lr: torch.optim.AdamW(p, lr, betas=_betas(o), eps=o.epsilon, weight_decay=_wd(o), amsgrad=o.amsgrad),
        }),
        OptimizerInfo("nadam", "Nadam", {
            "keras": lambda p, o, lr: KerasNadam(p, lr, o.beta_1, o.beta_2, o.epsilon, _wd(o)),
            "torch": lambda p, o, lr: torch.optim.NAdam(p, lr, betas=_betas(o), eps=o.epsilon, weight_decay=_wd(o)),
        }),
        OptimizerInfo("radam", "RAdam (torch)", {
            "torch": lambda p, o, lr: torch.optim.RAdam(p, lr, betas=_betas(o), eps=o.epsilon, weight_decay=_wd(o)),
        }),
        OptimizerInfo("adamax", "Adamax", {
            "keras": lambda p, o, lr: KerasAdamax(p, lr, o.beta_1, o.beta_2, o.epsilon, _wd(o)),
            "torch": lambda p, o, lr: torch.optim.Adamax(p, lr, betas=_betas(o), eps=o.epsilon, weight_decay=_wd(o)),
        }),
        OptimizerInfo("rmsprop", "RMSprop (rho, momentum, centered)", {
            "keras": lambda p, o, lr: KerasRMSprop(p, lr, o.rho, o.epsilon, o.momentum, o.centered, _wd(o)),
            "torch": lambda p, o, lr: torch.optim.RMSprop(
                p, lr, alpha=o.rho, eps=o.epsilon, momentum=o.momentum, centered=o.centered, weight_decay=_wd(o)
            ),
        }),
        OptimizerInfo("adagrad", "Adagrad", {
            "keras": lambda p, o, lr: KerasAdagrad(p, lr, o.initial_accumulator_value, o.epsilon, _wd(o)),
            "torch": lambda p, o, lr: torch.optim.Adagrad(
                p, lr, initial_accumulator_value=o.initial_accumulator_value, eps=o.epsilon, weight_decay=_wd(o)
            ),
        }),
    )
}


def build_optimizer(params: list[torch.nn.Parameter], opt_spec: Any, lr: float) -> Optimizer:
    info = OPTIMIZERS.get(opt_spec.name)
    if info is None:
        raise ValueError(f"unknown optimizer {opt_spec.name!r}; known: {', '.join(OPTIMIZERS)}")
    build = info.build.get(opt_spec.formulas)
    if build is None:
        raise ValueError(f"optimizer {opt_spec.name!r} has no {opt_spec.formulas!r} formulas; known: {', '.join(info.build)}")
    return build(params, opt_spec, lr)


def make_clipper(params: list[torch.nn.Parameter], opt_spec: Any) -> Callable[[], None] | None:
    """Gradient clipping as Keras 3 applies it (one of the three), or None when the spec asks for none."""
    clipnorm, clipvalue, global_clipnorm = opt_spec.clipnorm, opt_spec.clipvalue, opt_spec.global_clipnorm
    if clipnorm is None and clipvalue is None and global_clipnorm is None:
        return None

    @torch.no_grad()
    def clip() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        if clipnorm is not None:
            # each tensor: g * clipnorm / max(||g||, clipnorm)
            norms = torch._foreach_norm(grads)
            torch._foreach_mul_(grads, clipnorm)
            torch._foreach_div_(grads, [torch.clamp(n, min=clipnorm) for n in norms])
        elif global_clipnorm is not None:
            # all tensors: g * clipnorm * min(1/||G||, 1/clipnorm)
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, global_clipnorm * torch.clamp(1.0 / total, max=1.0 / global_clipnorm))
        else:
            torch._foreach_clamp_min_(grads, -clipvalue)
            torch._foreach_clamp_max_(grads, clipvalue)

    return clip
